"""Paired bootstrap and the report table on hand-made results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dskd.__main__ import main as dskd_main
from dskd.report import ReportError, paired_bootstrap, report


def test_paired_bootstrap_hand_made():
    # 100 items; the model is right wherever the baseline is, plus on 10 more items.
    b = np.array([1] * 50 + [0] * 50, dtype=float)
    a = b.copy()
    a[50:60] = 1
    d, lo, hi = paired_bootstrap(a, b, n=4000, seed=0)
    assert d == pytest.approx(0.10)
    # per-item differences are Bernoulli(0.1): se = sqrt(0.1 * 0.9 / 100) = 0.03
    assert lo == pytest.approx(0.10 - 1.96 * 0.03, abs=0.015)
    assert hi == pytest.approx(0.10 + 1.96 * 0.03, abs=0.015)
    assert lo > 0  # pairing: never below 0 as every item difference is >= 0
    d0, lo0, hi0 = paired_bootstrap(b, b)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_macro_over_subjects():
    a = np.array([1, 1, 1, 1, 0, 0], dtype=float)
    b = np.array([1, 1, 1, 1, 1, 1], dtype=float)
    subj = ["x", "x", "x", "x", "y", "y"]
    d, _, _ = paired_bootstrap(a, b, subj)
    assert d == pytest.approx((1.0 + 0.0) / 2 - 1.0)  # macro: subject y counts as much as subject x


def _result(path, name, pred, gold, norm=None):
    items = {"id": [f"q{i}" for i in range(len(gold))], "gold": gold, "pred": pred}
    metrics = {"acc": float(np.mean(np.array(pred) == np.array(gold))), "acc_stderr": 0.01}
    if norm is not None:
        items["pred_norm"] = norm
        metrics["acc_norm"] = float(np.mean(np.array(norm) == np.array(gold)))
    data = {
        "format": {"name": "dskd-eval", "version": 1},
        "name": name,
        "model": f"models/{name}",
        "complete": True,
        "tasks": {"arc_easy": {"n": len(gold), "metrics": metrics, "items": items}},
    }
    path.write_text(json.dumps(data))
    return path


def test_report_table_with_baseline(tmp_path, capsys):
    gold = [0] * 100
    base = _result(tmp_path / "kd.json", "kd", [0] * 50 + [1] * 50, gold)
    better = _result(tmp_path / "dskd.json", "dskd", [0] * 60 + [1] * 40, gold, norm=[0] * 100)
    text = report([base, better], baseline="kd")
    assert "| kd | models/kd | 50.00 ± 1.00 |" in text
    assert "| dskd | models/dskd | 60.00 ± 1.00 (Δ +10.00 [" in text and "]*)" in text
    text_norm = report([base, better], baseline="kd", metric="acc_norm")
    assert "(Δ +50.00" in text_norm  # kd has no acc_norm (letter scoring): its acc is used
    assert dskd_main(["report", str(base), str(better), "--baseline", "kd"]) == 0
    assert "Δ +10.00" in capsys.readouterr().out


def test_report_errors(tmp_path):
    f = _result(tmp_path / "a.json", "a", [0], [0])
    with pytest.raises(ReportError, match="--baseline"):
        report([f], baseline="nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": {"name": "dskd-eval", "version": 1}, "complete": False, "tasks": {}}))
    with pytest.raises(ReportError, match="incomplete"):
        report([bad])
    with pytest.raises(ReportError, match="not found"):
        report([tmp_path / "missing.json"])


def test_report_average_column_over_tasks(tmp_path):
    """Several tasks: an `average` column, the unweighted mean over tasks, and its paired Δ and CI; a
    result missing a task gets no average."""
    gold = [0] * 100

    def two_tasks(name, right_a, right_b):
        p = _result(tmp_path / f"{name}.json", name, [0] * right_a + [1] * (100 - right_a), gold)
        d = json.loads(p.read_text())
        other = _result(tmp_path / "tmp.json", name, [0] * right_b + [1] * (100 - right_b), gold)
        d["tasks"]["sciq"] = json.loads(other.read_text())["tasks"]["arc_easy"]
        p.write_text(json.dumps(d))
        return p

    kd, dskd = two_tasks("kd", 50, 30), two_tasks("dskd", 60, 30)  # +10 on one task, +0 on the other
    partial = _result(tmp_path / "partial.json", "partial", [0] * 100, gold)
    text = report([kd, dskd, partial], baseline="kd")
    assert "| arc_easy | sciq | average |" in text
    row = next(line for line in text.splitlines() if line.startswith("| dskd |"))
    assert "| 45.00 (Δ +5.00 [" in row and row.endswith("]*) |"), row
    assert next(line for line in text.splitlines() if line.startswith("| kd |")).endswith("| 40.00 |")
    assert next(line for line in text.splitlines() if line.startswith("| partial |")).endswith("| - |")
    assert "average" not in report([partial])
