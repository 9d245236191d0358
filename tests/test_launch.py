"""``dskd run`` under several processes (torchrun, gloo on the CPU) against one process: the same chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOY_TEXT
from safetensors.torch import load_file

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


@pytest.mark.slow
def test_run_under_two_gloo_processes_equals_one_process(tiny_teacher_dir, tmp_path):
    """`dskd run` under 2 processes (1 x accumulation 1 each, DDP) against 1 process (accumulation 2): the
    lexicon and the sense store are the same bytes, the students the same weights to DDP's float rounding,
    the teacher's and untrained student's evaluation and fidelity identical (process 0 alone scores them)."""
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

    for rel in ("lexicon", "senses"):
        files = sorted(p.relative_to(one / rel) for p in (one / rel).rglob("*") if p.suffix != ".json")
        assert files and files == sorted(
            p.relative_to(two / rel) for p in (two / rel).rglob("*") if p.suffix != ".json"
        )
        for f in files:
            assert (one / rel / f).read_bytes() == (two / rel / f).read_bytes(), f
    s1, s2 = (_items(d / "senses" / "meta.json") for d in (one, two))
    assert s1["counts"] == s2["counts"] and s2["runtime"]["processes"] == 2 and s1["runtime"]["processes"] == 1
    for arm in ("kd", "dskd"):
        assert _items(two / "students" / arm / "meta.json")["processes"] == 2
        w1, w2 = (load_file(str(d / "students" / arm / "student" / "model.safetensors")) for d in (one, two))
        assert w1.keys() == w2.keys()
        assert all(torch.allclose(w1[k].float(), w2[k].float(), atol=1e-5) for k in w1), arm
        assert any(not torch.equal(w1[k], load_file(str(one / "students/untrained/student/model.safetensors"))[k])
                   for k in w1)  # fmt: skip
    for name in ("teacher", "untrained"):  # the same model scored by one process: the same numbers
        e1, e2 = (_items(d / "eval" / f"{name}.json") for d in (one, two))
        assert e1["tasks"] == e2["tasks"], name
    for name in ("kd", "dskd"):
        e1, e2 = (_items(d / "eval" / f"{name}.json") for d in (one, two))
        assert e1["tasks"].keys() == e2["tasks"].keys()
    f1, f2 = (_items(d / "eval" / "fidelity.json") for d in (one, two))
    for s in f1["sets"]:
        for m in ("teacher", "untrained"):
            assert f1["sets"][s]["models"][m] == f2["sets"][s]["models"][m], (s, m)
        for m in ("kd", "dskd"):
            assert f1["sets"][s]["models"][m]["metrics"]["kl"] == pytest.approx(
                f2["sets"][s]["models"][m]["metrics"]["kl"], rel=1e-3
            )
    assert (two / "report.md").is_file() and "Held-out fidelity" in (two / "report.md").read_text()
