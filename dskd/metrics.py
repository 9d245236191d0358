"""Metrics of evaluation results: the per-item metric, bootstrap replicates (within subjects when a task
has them), a task's entry of a result file and its protocol label, and the markdown table of a result
file. Shared by both scorers (log-likelihood in :mod:`dskd.loglik`, generation in :mod:`dskd.generate`),
:mod:`dskd.presets` and :mod:`dskd.report` without importing either scorer.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from dskd.config import EvalConfig
    from dskd.tasks import Item, Task

RESULT_FORMAT = {"name": "dskd-eval", "version": 1}


def bootstrap_samples(
    correct: np.ndarray, subjects: Sequence[str] | None = None, n: int = 1000, seed: int = 0
) -> np.ndarray:
    """Bootstrap replicates of a metric over items (resampled within each subject when given).

    Args:
        correct: (R, N) per-item scores of R paired result sets over the same N items.
        subjects: (N,) subject per item; the metric is then the macro average over subjects.
        n: Number of resamples.
        seed: RNG seed.

    Returns:
        (n, R) metric of each resample for each result set.
    """
    rng = np.random.default_rng(seed)
    correct = np.asarray(correct, dtype=np.float64)
    if subjects is None:
        idx = rng.integers(0, correct.shape[1], size=(n, correct.shape[1]))
        return correct[:, idx].mean(axis=2).T
    subj = np.asarray(subjects)
    parts = []
    for s in dict.fromkeys(subj.tolist()):
        cols = np.flatnonzero(subj == s)
        idx = cols[rng.integers(0, len(cols), size=(n, len(cols)))]
        parts.append(correct[:, idx].mean(axis=2).T)  # (n, R)
    return np.mean(parts, axis=0)


def metric_value(correct: np.ndarray, subjects: Sequence[str] | None = None) -> float:
    """Mean of ``correct`` (N,), or the macro average over subjects."""
    correct = np.asarray(correct, dtype=np.float64)
    if subjects is None:
        return float(correct.mean())
    subj = np.asarray(subjects)
    return float(np.mean([correct[subj == s].mean() for s in dict.fromkeys(subj.tolist())]))


# ---- a task's entry of a result file ---------------------------------------------------------
def setup_label(cfg: EvalConfig) -> str:
    """One line naming the protocol a number came from, e.g. ``5-shot chat, greedy generation``."""
    how = {
        "loglik": "log-likelihood of each choice",
        "letter": "log-likelihood of the answer letters",
        "generate": "greedy generation",
    }[cfg.scoring]
    return f"{cfg.shots}-shot {'chat' if cfg.chat else 'plain'}, {how}"


def progress_bar(progress: bool, total: int, desc: str) -> Any:
    """A tqdm bar over ``total`` items with items/s on stderr, or None when ``progress`` is off."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True)


def task_entry(
    task: Task,
    items: Sequence[Item],
    scores: dict[str, np.ndarray],
    rec: dict[str, Any],
    cfg: EvalConfig,
    *,
    primary: str,
    setup: str,
    seconds: float,
    score_seconds: float,
    tokens: int,
    extra_metrics: dict[str, float] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """The task's entry of a result file from per-item scores, the same for every scoring mode.

    Args:
        task: The task scored.
        items: Its items, (N,).
        scores: Per metric, the per-item scores, each (N,); a metric is their mean, or the macro
            average over subjects for tasks with subjects, with a bootstrap ``*_stderr``.
        rec: Per-item records (``id``, predictions, ...); gets ``subject`` for tasks with subjects.
        cfg: Bootstrap resamples and seed.
        primary: The headline metric.
        setup: The protocol label (:func:`setup_label`).
        seconds: Wall time of the whole task.
        score_seconds: Wall time of the model calls (items/s is over these).
        tokens: Prompt tokens scored (counted as if no prefix were shared).
        extra_metrics: Metrics without per-item scores or errors (``unparseable``).
        **fields: Mode-specific entries (``packed``, ``max_new_tokens``, ``stop``).
    """
    subjects = [x.subject or "" for x in items] if task.has_subjects else None
    if subjects is not None:
        rec["subject"] = subjects
    metrics: dict[str, float] = {}
    for name, c in scores.items():
        metrics[name] = metric_value(c, subjects)
        if cfg.bootstrap:
            metrics[f"{name}_stderr"] = float(bootstrap_samples(c[None], subjects, cfg.bootstrap, cfg.seed).std())
    metrics |= extra_metrics or {}
    entry: dict[str, Any] = {
        "title": task.title,
        "n": len(items),
        "metrics": metrics,
        "primary": primary,
        "setup": setup,
        "aggregate": "macro over subjects" if subjects is not None else "mean over items",
        "protocol": task.protocol,
        **fields,
        "seconds": round(seconds, 3),
        "score_seconds": round(score_seconds, 3),
        "items_per_s": round(len(items) / max(score_seconds, 1e-9), 3),
        "tokens": int(tokens),
        "items": rec,
    }
    if subjects is not None:
        entry["subjects"] = {
            s: {k: float(c[np.asarray(subjects) == s].mean()) for k, c in scores.items()}
            | {"n": int(sum(1 for x in subjects if x == s))}
            for s in dict.fromkeys(subjects)
        }
    return entry


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown table of a result dict: one row per task (and per MMLU subject below it)."""
    cfg = result["config"]
    head = f"scoring={cfg['scoring']} shots={cfg['shots']} chat={cfg['chat']} limit={cfg['limit']}"
    if cfg.get("preset"):
        head = f"preset={cfg['preset']} limit={cfg['limit']} (the setup column gives each task's protocol)"
    lines = [
        f"# {result['name']}: {result['model']}",
        "",
        head,
        "",
        "| task | n | acc | acc_norm | f1 | em | unparseable | items/s | setup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def cell(m: dict[str, float], k: str) -> str:
        if k not in m:
            return "-"
        se = m.get(f"{k}_stderr")
        return f"{100 * m[k]:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")

    for name, e in result["tasks"].items():
        m = e["metrics"]
        unp = f"{100 * m['unparseable']:.1f}%" if "unparseable" in m else "-"
        cells = " | ".join(cell(m, k) for k in ("acc", "acc_norm", "f1", "em"))
        lines.append(f"| {name} | {e['n']} | {cells} | {unp} | {e['items_per_s']:.1f} | {e.get('setup', '-')} |")
    for name, e in result["tasks"].items():
        if "subjects" in e:
            lines += ["", f"## {name} per subject", "", "| subject | n | acc | acc_norm |", "|---|---:|---:|---:|"]
            for s, m in e["subjects"].items():
                lines.append(f"| {s} | {m['n']} | {cell(m, 'acc')} | {cell(m, 'acc_norm')} |")
    return "\n".join(lines) + "\n"
