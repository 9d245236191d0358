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
from dskd.io import Artefact, read_sidecar, write_text_atomic
from dskd.metrics import RESULT_FORMAT, bootstrap_samples, metric_value


class ReportError(DskdError, ValueError):
    """An unreadable result file or an unknown baseline; the message names it."""


RESULT_ARTEFACT = Artefact(
    RESULT_FORMAT["name"], RESULT_FORMAT["version"], "dskd eval result", "dskd eval", ReportError
)


def load_result(path: Path | str) -> dict[str, Any]:
    """A result file written by :func:`dskd.evaluate.evaluate`, checked for format and completeness."""
    path = Path(path)
    data = read_sidecar(path, RESULT_ARTEFACT)  # the result file is its own sidecar
    data.setdefault("name", path.stem)
    return data


def _correct(entry: dict[str, Any], metric: str) -> tuple[dict[str, float], str]:
    items = entry["items"]
    if metric not in entry["metrics"]:
        metric = entry.get("primary", "acc")
    if metric in items:  # per-item scores, e.g. SQuAD's F1
        return {i: float(v) for i, v in zip(items["id"], items[metric], strict=True)}, metric
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
    avg = len(tasks) > 1  # an `average` column: the unweighted mean over tasks, for results with every task
    head = f"| result | model | {' | '.join(tasks)} |" + (" average |" if avg else "")
    lines = [
        f"metric: {metric} in % ± bootstrap s.e.; "
        + (
            f"Δ vs {results[base]['name']} with paired bootstrap 95% CI (* excludes 0)"
            if base is not None
            else "no baseline"
        )
        + ("; `average` is the unweighted mean over tasks (its CI resamples each task's items)" if avg else ""),
        "",
        head,
        "|---|---|" + "---:|" * (len(tasks) + avg),
    ]
    for i, r in enumerate(results):
        cells = []
        for t in tasks:
            e = r["tasks"].get(t)
            if e is None:
                cells.append("-")
                continue
            m = metric if metric in e["metrics"] else e.get("primary", "acc")
            val, se = e["metrics"][m], e["metrics"].get(f"{m}_stderr")
            cell = f"{100 * val:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")
            if base is not None and i != base and t in results[base]["tasks"]:
                cell += " " + _diff_cell(e, results[base]["tasks"][t], m, n_boot, seed)
            cells.append(cell)
        if avg:
            b = results[base] if base is not None and i != base else None
            cells.append(_average_cell(r, b, tasks, metric, n_boot, seed))
        lines.append(f"| {r['name']} | {r['model']} | {' | '.join(cells)} |")
    setups = {t: e for t in tasks for r in results if (e := r["tasks"].get(t)) is not None and "setup" in e}
    if setups:  # which protocol produced each column, and the metric a task without `metric` shows
        lines += ["", "protocol per task:"]
        for t, e in setups.items():
            shown = metric if metric in e["metrics"] else e.get("primary", "acc")
            lines.append(f"- {t}: {e['setup']} ({shown})")
    return "\n".join(lines) + "\n"


def _paired(e: dict[str, Any], b: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Per-item scores of two results of one task on their common items (and the items' subjects)."""
    ca, _ = _correct(e, metric)
    cb, _ = _correct(b, metric)
    common = [i for i in ca if i in cb]
    subj = None
    if "subject" in e["items"]:
        by_id = dict(zip(e["items"]["id"], e["items"]["subject"], strict=True))
        subj = [by_id[i] for i in common]
    return np.array([ca[i] for i in common]), np.array([cb[i] for i in common]), subj


def _diff_cell(e: dict[str, Any], b: dict[str, Any], metric: str, n_boot: int, seed: int) -> str:
    a_vec, b_vec, subj = _paired(e, b, metric)
    if not len(a_vec):
        return "(Δ: no common items)"
    d, lo, hi = paired_bootstrap(a_vec, b_vec, subj, n_boot, seed)
    star = "*" if lo > 0 or hi < 0 else ""
    return f"(Δ {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{star})"


def _average_cell(
    r: dict[str, Any], b: dict[str, Any] | None, tasks: list[str], metric: str, n_boot: int, seed: int
) -> str:
    """The unweighted mean over tasks and, against the baseline ``b`` (None: no difference), its paired
    difference and CI."""
    if any(t not in r["tasks"] for t in tasks):
        return "-"
    cell = f"{100 * float(np.mean([_metric_of(r['tasks'][t], metric) for t in tasks])):.2f}"
    if b is None or any(t not in b["tasks"] for t in tasks):
        return cell
    parts = [_paired(r["tasks"][t], b["tasks"][t], metric) for t in tasks]
    if any(not len(a) for a, _, _ in parts):
        return cell
    return cell + f" (Δ {100 * _avg_diff(parts):+.2f} {_avg_ci(parts, n_boot, seed)})"


def _seed_mean(results: list[dict[str, Any]], task: str, metric: str) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Per-item score averaged over seeds (items common to every seed), in a fixed item order."""
    per = [_correct(r["tasks"][task], metric)[0] for r in results]
    ids = [i for i in per[0] if all(i in c for c in per[1:])]
    scores = np.array([[c[i] for i in ids] for c in per]).mean(axis=0)  # (N,)
    subj = None
    items = results[0]["tasks"][task]["items"]
    if "subject" in items:
        by_id = dict(zip(items["id"], items["subject"], strict=True))
        subj = [by_id[i] for i in ids]
    return ids, scores, subj


def experiment_table(
    files: dict[str, dict[int, Path]],
    refs: dict[str, Path],
    baseline: str = "kd",
    descriptions: dict[str, str] | None = None,
    metric: str = "acc",
    n_boot: int = 1000,
    seed: int = 0,
) -> str:
    """The experiment's table: per task and on average, each arm's mean over seeds, and its paired
    difference against the baseline arm with a paired bootstrap 95% interval.

    Pairing: for each item, an arm's score is its correctness averaged over seeds (seed s of every
    arm shares data order and position sampling seeds); the bootstrap resamples items, so the interval
    covers item sampling, and the per-seed spread is shown separately (min-max over seeds).

    Args:
        files: arm -> seed -> result file.
        refs: reference rows (teacher, untrained student) -> result file.
        baseline: The arm the differences are taken against.
        descriptions: arm -> one-line description, printed under the table.
        metric: ``acc`` or ``acc_norm``.
        n_boot: Bootstrap resamples.
        seed: RNG seed.
    """
    if baseline not in files:
        raise ReportError(f"--arms: the baseline arm {baseline!r} has no results")
    arms = {a: [load_result(p) for _, p in sorted(f.items())] for a, f in files.items()}
    ref_res = {k: load_result(p) for k, p in refs.items()}
    tasks = list(dict.fromkeys(t for rs in arms.values() for r in rs for t in r["tasks"]))
    tasks = [t for t in tasks if all(t in r["tasks"] for rs in arms.values() for r in rs)]
    seeds = {a: len(rs) for a, rs in arms.items()}
    lines = [
        f"metric: {metric} in %, mean over seeds (min-max over seeds); Δ vs {baseline} with paired bootstrap "
        "95% CI over items (* excludes 0); `average` is the unweighted mean over tasks",
        "",
        f"| row | seeds | {' | '.join(tasks)} | average |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    for name, r in ref_res.items():
        vals = [_metric_of(r["tasks"][t], metric) if t in r["tasks"] else float("nan") for t in tasks]
        cells = [f"{100 * v:.2f}" for v in vals]
        lines.append(f"| {name} (reference) | - | {' | '.join(cells)} | {100 * np.nanmean(vals):.2f} |")
    base_scores = {t: _seed_mean(arms[baseline], t, metric) for t in tasks}
    for arm, rs in arms.items():
        cells, means, diffs_all = [], [], []
        for t in tasks:
            per_seed = [_metric_of(r["tasks"][t], metric) for r in rs]
            mean = float(np.mean(per_seed))
            means.append(mean)
            cell = f"{100 * mean:.2f} ({100 * min(per_seed):.1f}-{100 * max(per_seed):.1f})"
            if arm != baseline:
                ids, sc, subj = _seed_mean(rs, t, metric)
                b_ids, b_sc, _ = base_scores[t]
                b_map = dict(zip(b_ids, b_sc, strict=True))
                keep = [k for k, i in enumerate(ids) if i in b_map]
                a_vec = sc[keep]
                b_vec = np.array([b_map[ids[k]] for k in keep])
                sub = [subj[k] for k in keep] if subj else None
                d, lo, hi = paired_bootstrap(a_vec, b_vec, sub, n_boot, seed)
                diffs_all.append((a_vec, b_vec, sub))
                star = "*" if lo > 0 or hi < 0 else ""
                cell += f" Δ {100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]{star}"
            cells.append(cell)
        avg = f"{100 * float(np.mean(means)):.2f}"
        if arm != baseline and diffs_all:
            avg += f" Δ {100 * _avg_diff(diffs_all):+.2f} {_avg_ci(diffs_all, n_boot, seed)}"
        lines.append(f"| {arm} | {seeds[arm]} | {' | '.join(cells)} | {avg} |")
    if descriptions:
        lines.append("")
        lines += [f"- `{a}`: {d}" for a, d in descriptions.items() if a in arms]
    return "\n".join(lines) + "\n"


def _metric_of(entry: dict[str, Any], metric: str) -> float:
    m = metric if metric in entry["metrics"] else entry.get("primary", "acc")
    return float(entry["metrics"][m])


def _avg_diff(parts: list[tuple[np.ndarray, np.ndarray, list[str] | None]]) -> float:
    return float(np.mean([metric_value(a, s) - metric_value(b, s) for a, b, s in parts]))


def _avg_ci(parts: list[tuple[np.ndarray, np.ndarray, list[str] | None]], n_boot: int, seed: int) -> str:
    """Paired bootstrap CI of the task-averaged difference: tasks resampled independently, same draws
    for both arms within a task."""
    reps = np.zeros(n_boot)
    for j, (a, b, s) in enumerate(parts):
        r = bootstrap_samples(np.stack([a, b]), s, n_boot, seed + j)  # (n_boot, 2)
        reps += r[:, 0] - r[:, 1]
    reps /= len(parts)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    star = "*" if lo > 0 or hi < 0 else ""
    return f"[{100 * lo:+.2f}, {100 * hi:+.2f}]{star}"


def fidelity_section(path: Path | str, baseline: str | None = None) -> str:
    """The held-out fidelity tables of a ``dskd fidelity`` result (see :mod:`dskd.fidelity`):
    KL to the teacher, top-1 agreement, perplexity and the sense probe of each student, with paired
    bootstrap 95% intervals over documents against ``baseline``."""
    from dskd.fidelity import load_result, markdown

    return markdown(load_result(path), baseline)


def _is_fidelity(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format", {}).get("name") == "dskd-fidelity"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def report_command(
    files: list[Path],
    /,
    baseline: str | None = None,
    metric: str = "acc",
    bootstrap: int = 1000,
    seed: int = 0,
    out: Path | None = None,
) -> str:
    """Combine dskd eval result files into one markdown table, with the paired bootstrap 95% CI of each
    difference against a baseline (fidelity result files get their own section).

      dskd report results/teacher.json results/student.json results/kd.json results/dskd.json --baseline kd

    Args:
        files: Result JSON files written by ``dskd eval`` (and ``dskd fidelity``).
        baseline: Name, file or model of the result to compare against.
        metric: Metric shown in the table: acc or acc_norm.
        bootstrap: Bootstrap resamples for the intervals.
        seed: Bootstrap seed.
        out: Also write the table to this markdown file.
    """
    if metric not in ("acc", "acc_norm"):
        raise ReportError(f"--metric: must be acc or acc_norm (got {metric!r})")
    if bootstrap < 1:
        raise ReportError(f"--bootstrap: must be >= 1 (got {bootstrap})")
    files = [Path(f) for f in files]
    fid = [f for f in files if _is_fidelity(f)]
    acc = [f for f in files if f not in fid]
    parts = [report(acc, baseline, metric, bootstrap, seed)] if acc else []
    gap = answer_gap_section(acc, baseline, bootstrap, seed) if acc else ""
    parts += [gap] if gap else []
    parts += [fidelity_section(f, baseline) for f in fid]
    text = "\n".join(parts)
    print(text, end="")
    if out:
        write_text_atomic(Path(out), text)
    return text


# ----------------------------------------------------------------------------- answer gap and training diagnostics


def answer_gaps(entry: dict[str, Any]) -> dict[str, float]:
    """Per item of a log-likelihood task: the gold choice's log-likelihood minus the best wrong choice's (nats;
    > 0 where the item is right by ``acc``). Empty for a task without per-choice log-likelihoods."""
    items = entry.get("items", {})
    ll = items.get("loglik")
    if not ll or "gold" not in items:
        return {}
    out: dict[str, float] = {}
    for i, v, g in zip(items["id"], ll, items["gold"], strict=True):
        if isinstance(v, list) and len(v) >= 2 and isinstance(g, int) and 0 <= g < len(v):
            out[i] = float(v[g]) - max(float(x) for j, x in enumerate(v) if j != g)
    return out


def _gap_vectors(results: list[dict[str, Any]], task: str) -> tuple[list[str], np.ndarray, list[str] | None]:
    """Per-item answer gap averaged over results (seeds), on the items every one of them has."""
    per = [answer_gaps(r["tasks"][task]) for r in results]
    ids = [i for i in per[0] if all(i in g for g in per[1:])]
    vals = np.array([[g[i] for i in ids] for g in per]).mean(axis=0) if ids else np.zeros(0)
    items = results[0]["tasks"][task]["items"]
    subj = None
    if "subject" in items:
        by_id = dict(zip(items["id"], items["subject"], strict=True))
        subj = [by_id[i] for i in ids]
    return ids, vals, subj


def answer_gap_table(
    rows: dict[str, list[dict[str, Any]]], baseline: str | None = None, n_boot: int = 1000, seed: int = 0
) -> str:
    """The mean answer gap (gold log-likelihood minus the best wrong one, nats) per task and on average, with
    the paired difference against ``baseline`` and its paired bootstrap 95% interval (the items of
    :func:`paired_bootstrap`; several results of a row, e.g. seeds, are averaged per item first).

    Args:
        rows: row name -> its results (loaded result files), one per seed.
        baseline: The row the differences are taken against (None: none).
        n_boot: Bootstrap resamples.
        seed: RNG seed.

    Returns:
        A markdown table, or an empty string when no task has per-choice log-likelihoods.
    """
    names = list(rows)
    tasks = list(dict.fromkeys(t for rs in rows.values() for r in rs for t in r["tasks"]))
    tasks = [
        t for t in tasks if all(t in r["tasks"] and answer_gaps(r["tasks"][t]) for rs in rows.values() for r in rs)
    ]
    if not tasks:
        return ""
    if baseline is not None and baseline not in rows:
        raise ReportError(f"--baseline: {baseline!r} is none of the rows ({', '.join(names)})")
    vec = {n: {t: _gap_vectors(rs, t) for t in tasks} for n, rs in rows.items()}
    lines = [
        "answer gap: mean over items of the gold choice's log-likelihood minus the best wrong choice's (nats)"
        + (f"; Δ vs {baseline} with paired bootstrap 95% CI over items (* excludes 0)" if baseline else ""),
        "",
        f"| row | {' | '.join(tasks)} | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for n in names:
        cells, parts = [], []
        for t in tasks:
            ids, v, subj = vec[n][t]
            cell = f"{metric_value(v, subj):.3f}" if len(v) else "-"
            if baseline is not None and n != baseline and len(v):
                b_ids, b_v, _ = vec[baseline][t]
                b_map = dict(zip(b_ids, b_v, strict=True))
                keep = [k for k, i in enumerate(ids) if i in b_map]
                a_vec, b_vec = v[keep], np.array([b_map[ids[k]] for k in keep])
                sub = [subj[k] for k in keep] if subj else None
                if len(a_vec):
                    d, lo, hi = paired_bootstrap(a_vec, b_vec, sub, n_boot, seed)
                    star = "*" if lo > 0 or hi < 0 else ""
                    cell += f" Δ {d:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"
                    parts.append((a_vec, b_vec, sub))
            cells.append(cell)
        avg = f"{float(np.mean([metric_value(vec[n][t][1], vec[n][t][2]) for t in tasks])):.3f}"
        if parts and len(parts) == len(tasks):
            reps = np.zeros(n_boot)
            for j, (a, b, s) in enumerate(parts):  # tasks resampled independently, as the accuracy average
                r = bootstrap_samples(np.stack([a, b]), s, n_boot, seed + j)
                reps += r[:, 0] - r[:, 1]
            reps /= len(parts)
            lo, hi = np.quantile(reps, [0.025, 0.975])
            star = "*" if lo > 0 or hi < 0 else ""
            avg += f" Δ {_avg_diff(parts):+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"
        lines.append(f"| {n} | {' | '.join(cells)} | {avg} |")
    return "\n".join(lines) + "\n"


def answer_gap_section(files: list[Path | str], baseline: str | None = None, n_boot: int = 1000, seed: int = 0) -> str:
    """:func:`answer_gap_table` of result files, one row each (named as in :func:`report`)."""
    paths = [Path(f) for f in files]
    results = [load_result(p) for p in paths]
    base = results[_find_baseline(results, paths, baseline)]["name"] if baseline is not None else None
    return answer_gap_table({r["name"]: [r] for r in results}, base, n_boot, seed)


def training_diagnostics_section(runs: dict[str, Path | str]) -> str:
    """What each training run's ``meta.json`` says about its sense (or hidden-state) term against KD + CE:
    the sense floor (the sense loss at the teacher's own states), ``sense - floor`` at the first and last
    logged step, and the norm ratio and cosine of the weighted term's gradient against KD + CE's (first,
    mean and last logged step; one micro-batch each). Empty when no run has a sense or hidden loss."""
    lines = []
    for name, run_dir in runs.items():
        f = Path(run_dir) / "meta.json"
        if not f.is_file():
            continue
        meta = json.loads(f.read_text())
        dg, sc = meta.get("diagnostics") or {}, meta.get("sense_scale") or {}
        if "aux_grad_ratio" not in dg:
            continue

        def fl(d: dict[str, Any] | None, k: str, fmt: str = "{:.3g}") -> str:
            v = (d or {}).get(k)
            return "-" if v is None else fmt.format(v)

        floor = (dg.get("sense_floor") or {}).get("floor")
        above = dg.get("sense_above_floor")
        r, c = dg["aux_grad_ratio"], dg.get("aux_grad_cos")
        loss = meta.get("loss") or {}
        weight = fl({"v": sc.get("lam", loss.get("lam"))}, "v")
        if not loss.get("lam") and loss.get("hidden", "none") != "none":  # KD + hidden-state loss
            weight = f"hidden {loss.get('hidden_weight', 0):.3g}"
        lines.append(
            f"| {name} | {sc.get('mode', 'none')} | {weight} | {fl({'v': floor}, 'v')} | "
            f"{fl(above, 'first')} → {fl(above, 'last')} | {fl(r, 'first')} / {fl(r, 'mean')} / {fl(r, 'last')} | "
            f"{fl(c, 'first', '{:+.2f}')} / {fl(c, 'mean', '{:+.2f}')} / {fl(c, 'last', '{:+.2f}')} |"
        )
    if not lines:
        return ""
    head = [
        "training diagnostics (one micro-batch per logged step): the sense floor is the sense loss at the "
        "teacher's own states; ratio = ||grad of lambda x sense (+ hidden)|| / ||grad of KD + CE||, cosine "
        "between the two (< 0: the term opposes KD + CE); first / mean / last logged step",
        "",
        "| run | sense_scale | weight (lambda) | sense floor | sense - floor | grad ratio | grad cosine |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(head + lines) + "\n"
