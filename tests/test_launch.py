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

import dskd.senses as S
from dskd.__main__ import main

FIX = Path(__file__).parent / "fixtures" / "lexicon"
ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, teacher: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([TOY_TEXT[i : i + 600] for i in range(0, 6000, 600)]))
    cfg = {
        "name": "tiny",
        "model": {"teacher": str(teacher), "student_layers": 2, "trainable_layers": 1},
        "lexicon": {"sources": [f"pairs:{FIX / 'antonyms.txt'}:ant", f"pairs:{FIX / 'tails.txt'}:syn"]},
        # no token over the cap and the same block layout: the store does not depend on the process count
        "senses": {
            "corpus": [str(corpus), "prompts"],
            "key": "actual",
            "k": 2,
            "max_samples": 1500,
            "max_tokens": 1200,
            "seq_len": 64,
            "block_chars": 400,
            "keep_samples": True,
        },
        "data": {"tasks": ["arc_easy"], "text_files": [str(corpus)], "shots": 0, "max_items": 4, "max_length": 96},
        "loss": {"lam": 1.0, "kappa": 2, "margin_mode": "relative"},
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


@pytest.mark.slow
def test_run_under_two_gloo_processes_equals_one_process(tiny_teacher_dir, tmp_path):
    """`dskd run` under 2 processes (1 x accumulation 1 each, DDP) against 1 process (accumulation 2): the
    lexicon and the sense store are the same bytes, the students the same weights to DDP's float rounding,
    the teacher's and untrained student's evaluation and fidelity identical (process 0 alone scores them).

    Not compared: the k-means senses (the merged gather orders a token's states otherwise than one process
    does, and k-means starts from that order) and so the DSKD student and the sense probe."""
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", "--config", str(recipe), "--out", str(one)]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "dskd", "run", "--config", str(recipe), "--out", str(two), "--distill.grad_accum", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "process 1: students trained; evaluation, fidelity and report run on process 0" in r.stdout
    assert r.stdout.count("[run ] eval:teacher") == 1 and "dskd run: tiny -> " in r.stdout

    lex = sorted(p.relative_to(one / "lexicon") for p in (one / "lexicon").rglob("*"))
    assert lex == sorted(p.relative_to(two / "lexicon") for p in (two / "lexicon").rglob("*"))
    assert all(
        (one / "lexicon" / f).read_bytes() == (two / "lexicon" / f).read_bytes() for f in lex if f.name != "meta.json"
    )
    m1, m2 = (_items(d / "lexicon" / "meta.json") for d in (one, two))
    assert m1.pop("seconds") >= 0 and m2.pop("seconds") >= 0 and m1 == m2
    # the gather is sharded: each token gets the same states (no cap reached; to the float rounding of other
    # batches and threads), and as many senses
    s1, s2 = (_items(d / "senses" / "meta.json") for d in (one, two))
    c1, c2 = ({k: v for k, v in s["counts"].items() if k != "total_inertia"} for s in (s1, s2))  # (k-means)
    assert c1 == c2 and s1["corpus"]["fingerprint"] == s2["corpus"]["fingerprint"]
    assert (s1["runtime"]["processes"], s2["runtime"]["processes"]) == (1, 2)
    (t1, r1), (t2, r2) = S.load_samples(one / "senses"), S.load_samples(two / "senses")
    assert torch.equal(t1, t2) and len(t1) > 100
    for t in t1.unique():
        a, b = r1[t1 == t], r2[t2 == t]
        assert torch.allclose(a[torch.argsort(a[:, 0])], b[torch.argsort(b[:, 0])], atol=1e-5), int(t)
    k1, k2 = (load_file(str(d / "senses" / "senses.safetensors")) for d in (one, two))
    assert torch.equal(k1["offsets"], k2["offsets"]) and torch.equal(k1["spans"], k2["spans"])
    # the KD student (no sense loss): the same weights to DDP's float rounding; DSKD trained by both processes
    w1, w2 = (load_file(str(d / "students" / "kd" / "student" / "model.safetensors")) for d in (one, two))
    untrained = load_file(str(one / "students" / "untrained" / "student" / "model.safetensors"))
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert any(not torch.equal(w1[k], untrained[k]) for k in w1)  # it did train
    for arm in ("kd", "dskd"):
        assert _items(two / "students" / arm / "meta.json")["processes"] == 2
    # process 0 alone scores the same models as the 1-process run: the same numbers
    for name in ("teacher", "untrained"):
        assert _scores(one / "eval" / f"{name}.json") == _scores(two / "eval" / f"{name}.json"), name
    f1, f2 = (_items(d / "eval" / "fidelity.json") for d in (one, two))
    for s in f1["sets"]:
        for m in ("teacher", "untrained", "kd"):
            a, b = f1["sets"][s]["models"][m]["sums"], f2["sets"][s]["models"][m]["sums"]
            for k in ("n", "kl", "agree", "n_tgt", "nll"):  # (the probe reads the store's k-means senses)
                assert a[k] == b[k] if m != "kd" else np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (s, m, k)
    assert (two / "report.md").is_file() and "Held-out fidelity" in (two / "report.md").read_text()


def test_experiment_is_refused_under_several_processes(monkeypatch):
    from dskd.config import ConfigError, RunConfig
    from dskd.pipeline import Launch, experiment

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="^dskd experiment runs in one process"):
        experiment(RunConfig())
    # alone, a launch does nothing collective
    alone = Launch()
    assert alone.main and alone.broadcast({"x": 1}) == {"x": 1} and alone.leave() == Launch()
