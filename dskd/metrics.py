"""Metrics of evaluation results: the per-item metric, bootstrap replicates (within subjects when a task
has them), and the markdown table of a result file. Shared by :mod:`dskd.evaluate`,
:mod:`dskd.generate` and :mod:`dskd.report` without importing the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

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
