"""Evaluation presets: a named protocol fixing tasks, shots, prompt style and scoring per task.

``dskd eval --eval.preset paper`` (or ``eval: {preset: paper}`` in a recipe) reproduces the paper's
evaluation (method.md section 6) with the data that ships offline:

============== ===== ===== ========================================================================
task           shots chat  scoring
============== ===== ===== ========================================================================
arc_challenge  5     yes   greedy generation, exact match of the parsed answer letter (acc)
csqa           5     yes   same
piqa           5     yes   same
mmlu           5     yes   same; exemplars are each subject's first 5 dev questions; macro average
squad          1     yes   greedy generation, token F1 (and exact match) against all gold answers
============== ===== ===== ========================================================================

Where this differs from the paper (SQuAD v1-style data, which splits evaluate) is in
``docs/evaluation.md``. Under a preset, ``limit`` caps every task at that many items; MMLU spreads
them over its subjects (:func:`preset_items`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from dskd.config import ConfigError, EvalConfig
from dskd.metrics import setup_label
from dskd.prompts import select_items, subject_quota
from dskd.tasks import Item, Task, get_task


@dataclass(frozen=True)
class Protocol:
    """How one task of a preset is evaluated."""

    task: str
    shots: int
    chat: bool
    scoring: str


PRESETS: dict[str, tuple[Protocol, ...]] = {
    "paper": (
        Protocol("arc_challenge", 5, True, "generate"),
        Protocol("csqa", 5, True, "generate"),
        Protocol("piqa", 5, True, "generate"),
        Protocol("mmlu", 5, True, "generate"),
        Protocol("squad", 1, True, "generate"),
    ),
}


def task_configs(cfg: EvalConfig) -> list[tuple[str, EvalConfig]]:
    """(task name, the settings it is scored with) for every task ``cfg`` asks for.

    Without a preset every task uses ``cfg`` itself; with one, each task gets the preset's shots,
    chat and scoring (everything else, e.g. batch size, budget and seed, comes from ``cfg``).

    Raises:
        ConfigError: An unknown preset (names ``--preset``).
    """
    if not cfg.preset:
        return [(t, cfg) for t in cfg.tasks]
    if cfg.preset not in PRESETS:
        raise ConfigError(f"--eval.preset: unknown preset {cfg.preset!r} (known: {', '.join(PRESETS)})")
    return [
        (p.task, dataclasses.replace(cfg, tasks=[p.task], shots=p.shots, chat=p.chat, scoring=p.scoring))
        for p in PRESETS[cfg.preset]
    ]


def preset_items(task: Task, limit: int) -> list[Item]:
    """Evaluation items under a preset: at most ``limit`` in all (0: every item), in file order.

    A task with subjects spreads the limit over them: every subject gets ``limit // S`` items and
    ``limit % S`` evenly spaced subjects one more, so a small budget still samples the whole range
    of subjects (the macro average is then over the subjects present).
    """
    items = task.eval_items()
    if not limit:
        return items
    if not task.has_subjects:
        return items[:limit]
    quota = subject_quota(list(dict.fromkeys(x.subject for x in items)), limit)
    seen: dict[str | None, int] = {}
    out = []
    for x in items:
        if seen.get(x.subject, 0) < quota[x.subject]:
            seen[x.subject] = seen.get(x.subject, 0) + 1
            out.append(x)
    return out


def parse_sources(data: Sequence[str]) -> dict[str, str]:
    """``["piqa=ybisk/piqa", ...]`` -> ``{"piqa": "ybisk/piqa"}`` with task names checked."""
    out = {}
    for entry in data:
        name, sep, source = entry.partition("=")
        if not sep or not name or not source:
            raise ConfigError(f"--eval.data: expected TASK=DATASET (got {entry!r})")
        out[get_task(name, flag="--eval.data").name] = source
    return out


def plan(cfg: EvalConfig) -> list[tuple[Task, list[Item], EvalConfig]]:
    """The tasks, items and per-task settings of an evaluation, checked before any model loads.

    Raises:
        ConfigError / TaskError: An unknown preset or task, or a task that the chosen scoring cannot
            score (extractive QA needs ``--scoring generate``); the message names the flag.
    """
    sources = parse_sources(cfg.data)
    out = []
    for name, c in task_configs(cfg):
        task = get_task(name, sources.get(get_task(name).name))
        if task.kind == "qa" and c.scoring != "generate":
            raise ConfigError(
                f"--eval.scoring: {task.name} is extractive QA, scored only by generation; use --eval.scoring generate"
            )
        items = preset_items(task, c.limit) if cfg.preset else select_items(task, c.limit)
        out.append((task, items, c))
    return out


def check_chat(tokenizer, work: list[tuple[Task, list[Item], EvalConfig]], preset: str = "") -> None:
    """Refuse chat prompts for a tokenizer without a chat template (before the model loads)."""
    if getattr(tokenizer, "chat_template", None):
        return
    chat = [t.name for t, _, c in work if c.chat]
    if chat:
        why = f"--eval.preset {preset} uses chat prompts" if preset else "--eval.chat asks for chat prompts"
        raise ConfigError(
            f"--eval.chat: this tokenizer has no chat template, but {why} (tasks: {', '.join(chat)}); "
            + ("evaluate a chat model" if preset else "use --eval.chat false")
        )


def paper_config(cfg: EvalConfig) -> EvalConfig | None:
    """The paper preset on ``cfg.paper_limit`` items per task, as ``dskd run`` evaluates it (None: off)."""
    if cfg.paper_limit < 0:
        return None
    return dataclasses.replace(cfg, preset="paper", limit=cfg.paper_limit)


def check_paper(cfg: EvalConfig, model_spec: str) -> None:
    """Before a main job starts: the paper protocol it will run needs the model's chat template.

    Raises:
        ConfigError: Naming ``--eval.paper_limit`` (``-1`` skips the protocol) when it cannot run.
    """
    paper = paper_config(cfg)
    if paper is None:
        return
    from dskd.models import load_tokenizer, resolve_spec

    try:
        check_chat(load_tokenizer(resolve_spec(model_spec)), plan(paper), paper.preset)
    except ConfigError as e:
        raise ConfigError(f"--eval.paper_limit: {e}; or set --eval.paper_limit -1 to skip the paper protocol") from e


def describe(cfg: EvalConfig) -> str:
    """One markdown line stating the protocol of every task of a preset evaluation."""
    limit = f"at most {cfg.limit} items per task" if cfg.limit else "all evaluation items"
    parts = [f"{name}: {setup_label(c)}" for name, c in task_configs(cfg)]
    return f"preset `{cfg.preset}`, {limit}; " + "; ".join(parts)


__all__ = [
    "PRESETS",
    "Protocol",
    "check_chat",
    "check_paper",
    "describe",
    "paper_config",
    "parse_sources",
    "plan",
    "preset_items",
    "task_configs",
]
