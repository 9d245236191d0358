"""The ``eval`` command: plan the tasks, load the model, hand each task to its scorer, write the result.

Evaluation reads top-down. Below: task entries and items (:mod:`dskd.tasks`), prompts and item selection
(:mod:`dskd.prompts`), metrics, task entries and the result table (:mod:`dskd.metrics`). Beside each
other: the two scorers, log-likelihood (:mod:`dskd.loglik`: ``loglik`` and ``letter`` scoring, packed
rows and shared prefixes) and greedy generation (:mod:`dskd.generate`). Above them: the presets that
plan the tasks (:mod:`dskd.presets`) and this module, :func:`evaluate` and the command.

Result files are JSON (see :func:`evaluate`) with per-item predictions and log-likelihoods, so
:mod:`dskd.report` can compute paired bootstrap intervals between models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dskd.config import DEFAULT_TEACHER, ConfigError, EvalConfig
from dskd.devices import environment
from dskd.generate import score_generate
from dskd.io import write_json, write_text_atomic

# Re-exported for existing callers: the log-likelihood scorer's public names, and those of the modules below.
from dskd.loglik import (  # noqa: F401
    Group,
    build_groups,
    packing_ok,
    plan_rows,
    score_groups,
    score_loglik,
    score_reference,
    shared_prefixes,
    wants_bos,
)
from dskd.metrics import (  # noqa: F401
    RESULT_FORMAT,
    bootstrap_samples,
    markdown_table,
    metric_value,
    progress_bar,
    setup_label,
    task_entry,
)
from dskd.presets import check_chat, plan
from dskd.prompts import (  # noqa: F401
    letter_prompt,
    letter_requests,
    loglik_requests,
    select_items,
)
from dskd.tasks import Item, Task

if TYPE_CHECKING:
    from dskd.prefix import PrefixMemo


def score_task(
    model: nn.Module,
    tokenizer,
    task: Task,
    items: Sequence[Item],
    cfg: EvalConfig,
    progress: bool = False,
    packed: bool | None = None,
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Score ``items`` of ``task`` with the scorer ``cfg.scoring`` names; the task's entry of the result file.

    ``generate`` goes to :func:`dskd.generate.score_generate`; ``loglik`` and ``letter`` to
    :func:`dskd.loglik.score_loglik` (``packed`` and ``memo`` are its options; see there).
    """
    if cfg.scoring == "generate":
        return score_generate(model, tokenizer, task, items, cfg, progress=progress)
    return score_loglik(model, tokenizer, task, items, cfg, progress=progress, packed=packed, memo=memo)


def resolve_model_spec(spec: str) -> str:
    """A model spec, with a run folder (holding ``student/``) mapped to its exported student."""
    p = Path(spec).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "student" / "config.json").is_file():
        return str(p / "student")
    return spec


def evaluate(
    model_spec: str,
    cfg: EvalConfig,
    out: Path | str,
    model: nn.Module | None = None,
    tokenizer=None,
    progress: bool = True,
    name: str | None = None,
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Evaluate a causal LM on ``cfg.tasks`` and write ``out`` (JSON) and ``out`` with ``.md``.

    Args:
        model_spec: Hub id, local folder, alias, or a run folder (its ``student/`` is evaluated).
        cfg: Evaluation settings.
        out: Result JSON path; the markdown table goes next to it with the suffix ``.md``.
        model: An already loaded model (then ``model_spec`` only labels the result).
        tokenizer: Its tokenizer (loaded from ``model_spec`` when None).
        progress: Show progress bars.
        name: Label of the result in reports (default: the file name without suffix).
        memo: Bottom-layer states shared with models evaluated before or after this one in the same
            process (:class:`dskd.prefix.PrefixMemo`): they are computed once; results are unchanged.

    Returns:
        The result dict written to ``out``: ``format``, ``name``, ``model``, ``fingerprint``,
        ``config``, ``dskd_version``, ``tasks`` (per task: ``metrics`` with ``acc``, ``acc_norm``
        and their bootstrap ``*_stderr``, ``n``, ``items_per_s``, per-item ``items``; MMLU also
        ``subjects``), ``complete``.
    """
    from dskd import __version__
    from dskd.models import fingerprint, load_model, load_tokenizer

    out = Path(out)
    if out.suffix != ".json":
        raise ConfigError(f"--out: expected a .json file (got {out})")
    work = plan(cfg)  # unknown tasks/presets and data errors surface before the model loads
    spec = resolve_model_spec(model_spec)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    check_chat(tokenizer, work, cfg.preset)
    if model is None:
        from dskd.devices import log_placement, resolve_device

        device = resolve_device(cfg.device, flag="--eval.device")  # an absent accelerator is an error, not the CPU
        model = load_model(spec, cfg.dtype, device=device)
        log_placement("eval", device, next(model.parameters()).dtype, f"model {model_spec}")
    model.eval()
    result: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "name": name or out.stem,
        "model": model_spec,
        "model_path": spec,
        "fingerprint": fingerprint(model, tokenizer),
        "config": dataclasses.asdict(cfg),
        "dskd_version": __version__,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "environment": environment(),
        "tasks": {},
        "complete": False,
    }
    for task, items, task_cfg in work:
        result["tasks"][task.name] = score_task(model, tokenizer, task, items, task_cfg, progress=progress, memo=memo)
    result["complete"] = True
    write_json(out, result, indent=1)
    write_text_atomic(out.with_suffix(".md"), markdown_table(result))
    return result


# ---- command ------------------------------------------------------------------------------------
def eval_command(
    eval: EvalConfig,
    model: str = DEFAULT_TEACHER,
    out: Path | None = None,
    name: str | None = None,
    list_tasks: bool = False,
) -> dict[str, Any] | None:
    """Evaluate a causal LM on multiple-choice and extractive-QA benchmarks; writes JSON results and a
    markdown table.

      dskd eval --model smollm2-135m-instruct --eval.tasks arc_easy,arc_challenge --eval.limit 200 --out results/t.json
      dskd eval --model runs/x/students/dskd --eval.preset paper --eval.limit 100 --out results/paper.json
      dskd eval --config configs/smollm2-135m_to_15l.yaml --model runs/x/students/kd/student --out results/kd.json
      dskd eval --list_tasks

    Args:
        eval: Evaluation.
        model: Hub id, folder, alias, or a run folder (its student/).
        out: Result JSON file (a .md table is written next to it).
        name: Label of this result in reports (default: the file name).
        list_tasks: List the tasks and their split protocol, then exit.
    """
    from dskd.tasks import TASKS

    if list_tasks:
        for n, cls in TASKS.items():
            alias = f" (aliases: {', '.join(cls.aliases)})" if cls.aliases else ""
            print(f"{n:<14} {cls.title}{alias}\n{'':<14} {cls.protocol}")
        return None
    if out is None:
        raise ConfigError("--out: required (a .json file)")
    out = Path(out)
    if eval.stop:  # a shell passes a newline as backslash-n
        eval = dataclasses.replace(eval, stop=[x.replace("\\n", "\n") for x in eval.stop])
    res = evaluate(model, eval, out, name=name)
    print(markdown_table(res), end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return res


__all__ = [
    "eval_command",
    "evaluate",
    "resolve_model_spec",
    "score_task",
]
