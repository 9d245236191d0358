"""The ``dskd`` command: a table from subcommand to the function that runs it."""

from __future__ import annotations

import sys

from dskd.cli import dispatch

COMMANDS: dict[str, tuple[str, str]] = {
    "assets": (
        "dskd.assets:main",
        "Prepare the offline defaults (SmolLM2 teacher, benchmarks, WordNet) under $DSKD_HOME.",
    ),
    "demo": ("dskd.demo:main", "Show the teacher and a truncated student completing a prompt."),
    "lexicon build": ("dskd.lexicon:build_main", "Build synonym/antonym relations for a teacher's tokenizer."),
    "lexicon show": ("dskd.lexicon:show_main", "Print a word's synonyms and antonyms with their token ids."),
    "senses build": ("dskd.senses:build_main", "Gather teacher states, cluster senses per token, store them."),
    "senses show": ("dskd.senses:show_main", "Print a word's senses, samples per sense and nearest tokens."),
    "plot senses": (
        "dskd.plots:senses_main",
        "Draw the teacher's contextual states and senses of some words (Figure 1).",
    ),
    "cache build": ("dskd.distill:cache_main", "Run the teacher once over a recipe's data and cache its outputs."),
    "distill": ("dskd.distill:main", "Train a student with KD or DSKD (resumable) and export it as an HF folder."),
    "eval": ("dskd.evaluate:main", "Evaluate a model on multiple-choice benchmarks (dskd eval --list for tasks)."),
    "report": ("dskd.report:main", "One table from result files, with paired bootstrap CIs against a baseline."),
    "plan": ("dskd.plan:main", "Per stage: GPUs, parameters, memory, disk, tokens, steps, command (no weights read)."),
    "run": ("dskd.pipeline:main_run", "The main job: lexicon, senses, cache, KD + DSKD students, evaluation, report."),
    "experiment": ("dskd.pipeline:main_experiment", "Paired KD / DSKD / hidden-MSE arms over seeds, with CIs."),
}


def main(argv: list[str] | None = None) -> int:
    return dispatch(COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
