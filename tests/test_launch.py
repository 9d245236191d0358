"""``dskd run`` under several processes (torchrun, gloo on the CPU) against one process: the same chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TOY_TEXT
from safetensors.torch import load_file

FIX = Path(__file__).parent / "fixtures" / "lexicon"
ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, teacher: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([TOY_TEXT[i : i + 600] for i in range(0, 6000, 600)]))
    cfg = {
        "name": "tiny",
        "model": {"teacher": str(teacher), "student_layers": 2, "trainable_layers": 1},
        "lexicon": {"sources": [f"pairs:{FIX / 'antonyms.txt'}:ant", f"pairs:{FIX / 'tails.txt'}:syn"]},
        # no token over the cap and a block layout: the store does not depend on the process count
        "senses": {
            "corpus": [str(corpus), "prompts"],
            "key": "actual",
            "k": 2,
            "max_samples": 1500,
            "max_tokens": 1200,
            "seq_len": 64,
            "block_chars": 400,
        },
        "data": {"tasks": ["arc_easy"], "text_files": [str(corpus)], "shots": 0, "max_items": 4, "max_length": 96},
        # the default margin (calibrated on the store); state_median's scales with its per-process distance sample
        "loss": {"lam": 1.0, "kappa": 2},
        "distill": {"epochs": 1, "max_steps": 2, "batch_size": 1, "grad_accum": 2, "save_every": 0},
        "eval": {"tasks": ["arc_easy"], "limit": 4, "bootstrap": 20, "batch_size": 4, "paper_limit": -1},
        "fidelity": {"text_limit": 3, "prompt_limit": 2, "bootstrap": 20},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _items(f: Path) -> dict:
    return json.loads(f.read_text())


TIMES = ("seconds", "score_seconds", "items_per_s")


def _scores(f: Path) -> dict:
    """An evaluation result's tasks without their timings."""
    return {t: {k: v for k, v in e.items() if k not in TIMES} for t, e in _items(f)["tasks"].items()}


def _launch(procs: int, recipe: Path, out: Path, *flags: str) -> str:
    """``dskd run`` as ``procs`` gloo processes under torchrun (1: a plain process), one thread each."""
    cmd = [sys.executable, "-m", "dskd", "run", "--config", str(recipe), "--out", str(out), *flags]
    if procs > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m", "dskd"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "students" / name / "student" / "model.safetensors"))


@pytest.mark.slow
def test_run_under_two_gloo_processes_equals_one_process(tiny_teacher_dir, tmp_path):
    """`dskd run` under 2 processes (1 x accumulation 1 each, DDP) against 1 process (accumulation 2), one
    thread each: the lexicon and the sense store are the same bytes (the gather is sharded, process 0
    clusters), the students the same weights to DDP's float rounding, and process 0 alone scores the
    teacher and the untrained student with the very numbers of the 1-process run."""
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(1, recipe, one)
    log = _launch(2, recipe, two, "--distill.grad_accum", "1")
    assert "process 1: students trained; evaluation, fidelity and report run on process 0" in log
    assert log.count("[run ] eval:teacher") == 1 and log.count("dskd run: tiny -> ") == 1

    for rel in ("lexicon", "senses"):
        files = sorted(p.relative_to(one / rel) for p in (one / rel).rglob("*") if p.name != "meta.json")
        assert files and files == sorted(
            p.relative_to(two / rel) for p in (two / rel).rglob("*") if p.name != "meta.json"
        )
        assert all((one / rel / f).read_bytes() == (two / rel / f).read_bytes() for f in files), rel
    m1, m2 = (_items(d / "lexicon" / "meta.json") for d in (one, two))
    assert m1.pop("seconds") >= 0 and m2.pop("seconds") >= 0 and m1 == m2
    s1, s2 = (_items(d / "senses" / "meta.json") for d in (one, two))
    assert s1["counts"] == s2["counts"] and s1["corpus"]["fingerprint"] == s2["corpus"]["fingerprint"]
    assert (s1["runtime"]["processes"], s2["runtime"]["processes"]) == (1, 2)
    assert s1["counts"]["senses"] > 100
    untrained = _weights(one, "untrained")
    for arm in ("kd", "dskd"):  # the same weights to DDP's float rounding (gradients averaged over processes)
        w1, w2 = _weights(one, arm), _weights(two, arm)
        assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1), arm
        assert any(not torch.equal(w1[k], untrained[k]) for k in w1), arm  # it did train
        assert _items(two / "students" / arm / "meta.json")["processes"] == 2
    for name in ("teacher", "untrained"):  # the same models, scored by process 0 alone: the same numbers
        assert _scores(one / "eval" / f"{name}.json") == _scores(two / "eval" / f"{name}.json"), name
    f1, f2 = (_items(d / "eval" / "fidelity.json") for d in (one, two))
    for s in f1["sets"]:
        for m in ("teacher", "untrained"):
            assert f1["sets"][s]["models"][m] == f2["sets"][s]["models"][m], (s, m)
        for m in ("kd", "dskd"):
            a, b = f1["sets"][s]["models"][m]["sums"], f2["sets"][s]["models"][m]["sums"]
            assert all(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in ("n", "kl", "n_tgt", "nll")), (s, m)
    assert (two / "report.md").is_file() and "Held-out fidelity" in (two / "report.md").read_text()
    # a rerun under 2 processes: process 0 finds every stage up to date, and so the others skip it too
    again = _launch(2, recipe, two, "--distill.grad_accum", "1", "--until", "students")
    assert "[run ]" not in again and again.count("[skip] train:dskd") == 1, again


def test_experiment_is_refused_under_several_processes(monkeypatch):
    from dskd.config import ConfigError, RunConfig
    from dskd.pipeline import Launch, experiment

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^dskd experiment runs in one process"):
        experiment(RunConfig())
    # alone, a launch does nothing collective
    alone = Launch()
    assert alone.main and alone.broadcast({"x": 1}) == {"x": 1} and alone.leave() == Launch()
