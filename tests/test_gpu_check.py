"""benchmarks/gpu_check.py at tiny size on the CPU: dskd's own functions run, the outputs are written, the
projection adds up."""

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
    assert mod.main(["--tiny", "--device", "cpu", "--out_dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "TINY shapes" in text and "projected wall time" in text and "FAILED" not in text
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["tiny"] and res["device"].startswith("cpu") and res["dtype"] == "bfloat16"
    assert res["never_ran_on_a_gpu_before"]
    # the project's own functions, not re-implementations
    assert res["gather"]["function"] == "dskd.senses.build.gather_batch"
    assert res["kmeans"]["function"] == "dskd.senses.kmeans.cluster_groups"
    assert res["distill:kd"]["function"] == res["distill:dskd"]["function"] == "dskd.distill.fit"
    assert res["eval"]["function"] == "dskd.loglik.score_groups"
    # a ratio, not a timing bound: timed assertions fail on a loaded machine (speed goals live in benchmarks)
    assert res["gather"]["gather_tokens_per_s"] > 0 and res["gather"]["ratio"] > 0
    assert res["gather"]["reservoir_rows"] > 0  # the states went through the reservoir to its row file
    tiny = mod.recipe_shapes(None, True)
    assert res["kmeans"]["rows"] == tiny.kmeans_groups * tiny.kmeans_per_group and res["kmeans"]["seconds"] > 0
    kd, dskd = res["distill:kd"], res["distill:dskd"]
    assert kd["step_s"] > 0 and dskd["step_s"] > 0 and kd["lam"] == 0 and dskd["lam"] > 0
    assert kd["steps_timed"] == tiny.repeats
    assert dskd["sense_table"]["bank_rows"] > 0  # the DSKD arm really ran the sense loss
    assert res["eval"]["items_per_s"] > 0
    one, eight = res["projection"]
    assert (one["gpus"], eight["gpus"]) == (1, 8) and not one["left_out"]
    for p in (one, eight):
        parts = [v for k, v in p.items() if k.endswith("_h") and k != "total_h"]
        assert p["total_h"] == pytest.approx(sum(parts))
    assert eight["total_h"] < one["total_h"]
    assert one["distill_dskd_h"] == pytest.approx(8 * eight["distill_dskd_h"])
    # the plan of the same recipe beside the measurement
    plan = json.loads((tmp_path / "gpu_check_plan.json").read_text())
    assert plan["name"] == "llama3-8b-instruct_to_16l"
    assert "[distill:dskd]" in (tmp_path / "gpu_check_plan.txt").read_text()
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| distill:dskd | `dskd.distill.fit` |" in md and "TINY" in md


def test_a_failing_stage_is_reported_and_the_others_run():
    mod = _module()

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")

    r = mod.run_stage("distill:dskd", oom, torch.device("cpu"))
    assert r["error"].startswith("out of memory: CUDA out of memory") and "stage_seconds" in r


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_paper_shapes_without_a_gpu(capsys):
    assert _module().main(["--device", "cpu"]) == 2
    assert "no GPU here" in capsys.readouterr().err
