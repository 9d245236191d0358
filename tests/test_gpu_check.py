"""benchmarks/gpu_check.py at tiny size on the CPU: every measurement runs and the projection adds up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_at_tiny_size(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "gc.json"
    assert mod.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "TINY shapes" in text and "projected wall time" in text
    res = json.loads(out.read_text())
    assert res["tiny"] and res["device"].startswith("cpu") and res["dtype"] == "bfloat16"
    # a ratio, not a timing bound: timed assertions fail on a loaded machine (speed goals live in benchmarks)
    assert res["gather"]["gather_tokens_per_s"] > 0 and res["gather"]["ratio"] > 0
    assert res["kmeans"]["rows"] == mod.TINY.kmeans_groups * mod.TINY.kmeans_per_group and res["kmeans"]["seconds"] > 0
    d = res["distill"]
    assert d["kd_step_s"] > 0 and d["ratio"] == pytest.approx(d["dskd_step_s"] / d["kd_step_s"])
    assert d["sense_table"]["bank_rows"] > 0  # the DSKD arm really ran the sense loss
    # the loop's cached path: the layers above the frozen ones, the head at target positions only
    assert d["prefix_layers"] == mod.TINY.student_layers - mod.TINY.trainable and d["head_at_targets"]
    assert res["eval"]["items_per_s"] > 0
    one, eight = res["projection"]
    assert (one["gpus"], eight["gpus"]) == (1, 8)
    for p in (one, eight):
        parts = [v for k, v in p.items() if k.endswith("_h") and k != "total_h"]
        assert p["total_h"] == pytest.approx(sum(parts))
    assert eight["total_h"] < one["total_h"]
    assert one["distill_kd_plus_dskd_h"] == pytest.approx(8 * eight["distill_kd_plus_dskd_h"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_paper_shapes_without_a_gpu(capsys):
    assert _module().main(["--device", "cpu"]) == 2
    assert "no GPU here" in capsys.readouterr().err
