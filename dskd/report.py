"""Tables from result files: one row per result, one column per task, with paired bootstrap CIs.

``dskd report FILE... --baseline NAME`` reads result JSON files written by ``dskd eval`` (teacher,
untrained student, KD, DSKD, several seeds ...) and prints a markdown table. Each cell is the metric
in percent with its bootstrap standard error; rows other than the baseline also show the difference
to the baseline and its paired bootstrap 95% interval: the same resampled items (resampled within
each subject for MMLU, whose metric is the macro average) are scored for both results, so the
interval reflects item-level pairing rather than two independent errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dskd.config import DskdError
from dskd.evaluate import RESULT_FORMAT, bootstrap_samples, metric_value


class ReportError(DskdError, ValueError):
    """An unreadable result file or an unknown baseline; the message names it."""


def load_result(path: Path | str) -> dict[str, Any]:
    """A result file written by :func:`dskd.evaluate.evaluate`, checked for format and completeness."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ReportError(f"result file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from e
    if data.get("format", {}).get("name") != RESULT_FORMAT["name"]:
        raise ReportError(f"{path}: not a dskd eval result (format {data.get('format')!r})")
    if not data.get("complete"):
        raise ReportError(f"{path}: incomplete result (the evaluation did not finish)")
    data.setdefault("name", path.stem)
    return data


def _correct(entry: dict[str, Any], metric: str) -> tuple[dict[str, float], str]:
    items = entry["items"]
    key = "pred_norm" if metric == "acc_norm" and "pred_norm" in items else "pred"
    used = "acc_norm" if key == "pred_norm" else "acc"
    return {i: float(p == g) for i, p, g in zip(items["id"], items[key], items["gold"], strict=True)}, used


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    subjects: list[str] | None = None,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Difference ``metric(a) - metric(b)`` over the same items and its paired bootstrap interval.

    Args:
        a: (N,) per-item scores of the compared result.
        b: (N,) per-item scores of the baseline, same item order.
        subjects: (N,) subject per item: the metric is then the macro average over subjects and
            items are resampled within subjects.
        n: Bootstrap resamples.
        seed: RNG seed.
        level: Coverage of the percentile interval.

    Returns:
        (difference, lower, upper).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ReportError(f"paired bootstrap needs the same items (got {a.shape} and {b.shape})")
    diff = metric_value(a, subjects) - metric_value(b, subjects)
    reps = bootstrap_samples(np.stack([a, b]), subjects, n, seed)  # (n, 2)
    d = reps[:, 0] - reps[:, 1]
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(diff), float(lo), float(hi)


def _find_baseline(results: list[dict[str, Any]], files: list[Path], baseline: str) -> int:
    for i, (r, f) in enumerate(zip(results, files, strict=True)):
        if baseline in (r["name"], f.stem, str(f), f.name, r.get("model")):
            return i
    names = ", ".join(r["name"] for r in results)
    raise ReportError(f"--baseline: {baseline!r} is none of the results ({names})")


def report(
    files: list[Path | str], baseline: str | None = None, metric: str = "acc", n_boot: int = 1000, seed: int = 0
) -> str:
    """A markdown table of the result files, with paired bootstrap CIs of differences to ``baseline``.

    Args:
        files: Result JSON files.
        baseline: Name (``--name`` of the eval, or the file name without suffix), file path or model
            spec of the baseline result; None: no differences.
        metric: ``acc`` or ``acc_norm`` (results without acc_norm, e.g. letter scoring, use acc).
        n_boot: Bootstrap resamples.
        seed: RNG seed.
    """
    if not files:
        raise ReportError("no result files given")
    if metric not in ("acc", "acc_norm"):
        raise ReportError(f"--metric: must be acc or acc_norm (got {metric!r})")
    paths = [Path(f) for f in files]
    results = [load_result(p) for p in paths]
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    base = _find_baseline(results, paths, baseline) if baseline is not None else None
    head = f"| result | model | {' | '.join(tasks)} |"
    lines = [
        f"metric: {metric} in % ± bootstrap s.e.; "
        + (
            f"Δ vs {results[base]['name']} with paired bootstrap 95% CI (* excludes 0)"
            if base is not None
            else "no baseline"
        ),
        "",
        head,
        "|---|---|" + "---:|" * len(tasks),
    ]
    for i, r in enumerate(results):
        cells = []
        for t in tasks:
            e = r["tasks"].get(t)
            if e is None:
                cells.append("-")
                continue
            m = metric if metric in e["metrics"] else "acc"
            val, se = e["metrics"][m], e["metrics"].get(f"{m}_stderr")
            cell = f"{100 * val:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")
            if base is not None and i != base and t in results[base]["tasks"]:
                cell += " " + _diff_cell(e, results[base]["tasks"][t], m, n_boot, seed)
            cells.append(cell)
        lines.append(f"| {r['name']} | {r['model']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _diff_cell(e: dict[str, Any], b: dict[str, Any], metric: str, n_boot: int, seed: int) -> str:
    ca, _ = _correct(e, metric)
    cb, _ = _correct(b, metric)
    common = [i for i in ca if i in cb]
    if not common:
        return "(Δ: no common items)"
    subj = None
    if "subject" in e["items"]:
        by_id = dict(zip(e["items"]["id"], e["items"]["subject"], strict=True))
        subj = [by_id[i] for i in common]
    d, lo, hi = paired_bootstrap(
        np.array([ca[i] for i in common]), np.array([cb[i] for i in common]), subj, n_boot, seed
    )
    star = "*" if lo > 0 or hi < 0 else ""
    return f"(Δ {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{star})"


def main(argv: list[str]) -> int:
    """``dskd report``: one markdown table from several result files."""
    from dskd.cli import parser

    p = parser(
        "report",
        "Combine dskd eval result files into one markdown table, with the paired bootstrap 95% CI of each\n"
        "difference against a baseline.\n\n"
        "  dskd report results/teacher.json results/student.json results/kd.json results/dskd.json "
        "--baseline kd",
    )
    p.add_argument("files", nargs="+", type=Path, help="Result JSON files written by dskd eval.")
    p.add_argument("--baseline", default=None, help="Name, file or model of the result to compare against.")
    p.add_argument("--metric", choices=("acc", "acc_norm"), default="acc", help="Metric shown in the table.")
    p.add_argument("--bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals.")
    p.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    p.add_argument("--out", type=Path, default=None, help="Also write the table to this markdown file.")
    args = p.parse_args(argv)
    if args.bootstrap < 1:
        raise ReportError(f"--bootstrap: must be >= 1 (got {args.bootstrap})")
    text = report(args.files, args.baseline, args.metric, args.bootstrap, args.seed)
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0
