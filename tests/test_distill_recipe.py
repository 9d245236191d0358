"""The recipe, not the machine, decides devices, precision, accumulation and the resume window (issue 23)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOY_TEXT, make_model
from test_distill import ROOT, make_cfg, metrics, trainable

from dskd.accelerator import make_accelerator
from dskd.checkpoint import latest_checkpoint
from dskd.config import ConfigError, to_dict
from dskd.distill import distill, setup


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n\n".join(TOY_TEXT[-2600:][i : i + 200] for i in range(0, 2600, 200)))
    return p


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_a_recipe_that_requires_an_accelerator_is_refused_before_any_work(
    tiny_teacher_dir, text_file, tmp_path, monkeypatch
):
    from dskd.data import cache_build_command
    from dskd.pipeline import run

    _no_gpu(monkeypatch)
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, model__require_accelerator=True)
    cfg.out = str(tmp_path / "run")
    for call in (lambda: distill(cfg, tmp_path / "d"), lambda: cache_build_command(cfg), lambda: run(cfg)):
        with pytest.raises(ConfigError, match="^--model.require_accelerator: this recipe requires a GPU") as e:
            call()
        assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing was written
    # on the CPU on purpose: the flag off runs (the default)
    cfg.model.require_accelerator = False
    assert setup(cfg, tmp_path / "ok") is not None


def test_the_node_accelerate_environment_does_not_leak_in(tiny_teacher_dir, text_file, tmp_path, monkeypatch):
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    # what `accelerate launch` exports from a node's default config
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0)
    acc = make_accelerator(Accelerator, cfg, tmp_path)
    assert (acc.mixed_precision, acc.gradient_accumulation_steps, acc.scaler) == ("no", 4, None)
    assert acc.state.dynamo_plugin.backend.value == "NO"
    from datetime import timedelta

    assert acc.init_handler.timeout == timedelta(minutes=cfg.distill.timeout_minutes)  # the process group's
    cfg_bf16 = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__precision="bf16")
    assert make_accelerator(Accelerator, cfg_bf16, tmp_path).mixed_precision == "bf16"
    # float16 autocast would need a loss scaler: refused in one line
    with pytest.raises(ConfigError, match="^--model.dtype: training under float16 autocast needs a loss scaler"):
        make_accelerator(Accelerator, make_cfg(tiny_teacher_dir, text_file, model__dtype="float16"), tmp_path)
    for backend in ("DEEPSPEED", "FSDP"):  # a node config for another engine: refused, not half-used
        with monkeypatch.context() as m:
            m.setenv(f"ACCELERATE_USE_{backend}", "true")
            with pytest.raises(ConfigError, match=f"^accelerate launch: the accelerate config asks for {backend}"):
                make_accelerator(Accelerator, cfg, tmp_path)
    run = setup(cfg, tmp_path / "run")
    assert isinstance(run.opt, AcceleratedOptimizer) and isinstance(run.sched, AcceleratedScheduler)
    assert run.acc.mixed_precision == "no" and run.acc.gradient_accumulation_steps == 4


def test_the_environment_changes_no_bit_of_training(tiny_teacher_dir, text_file, tmp_path, monkeypatch):
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=2)
    clean = distill(cfg, tmp_path / "clean", progress=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    leaky = distill(cfg, tmp_path / "env", progress=False)
    a, b = trainable(clean), trainable(leaky)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(clean)] == [m["loss"] for m in metrics(leaky)]


def test_resume_with_another_window_is_refused(tiny_teacher_dir, text_file, tmp_path):
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=4, distill__save_every=2)
    run = distill(cfg, tmp_path / "r", stop_after=3, progress=False)
    st = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert (st["processes"], st["grad_accum"], st["total_steps"]) == (1, 4, 4)
    other = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=4, distill__grad_accum=2)
    other.distill.save_every = 2
    with pytest.raises(ConfigError, match=r"^--resume: .* 1 process\(es\) x grad_accum 4 = 4 micro-batches") as e:
        distill(other, run, progress=False)
    assert "--distill.grad_accum 4" in str(e.value) and "\n" not in str(e.value)
    # the RNG state of a process the checkpoint had is needed: without it the resume is refused, not inexact
    rng = latest_checkpoint(run) / "rng-0.safetensors"
    rng.rename(rng.with_suffix(".aside"))
    with pytest.raises(ConfigError, match=r"^--resume: checkpoint .* lacks rng-0.safetensors"):
        distill(cfg, run, progress=False)
    rng.with_suffix(".aside").rename(rng)
    # a tracker or a timeout may change on resume: they change neither the data nor the maths
    cfg.distill.timeout_minutes = 5
    distill(cfg, run, progress=False)
    assert (run / "student").is_dir()


@pytest.mark.slow
def test_one_process_run_continues_under_two_gloo_processes(tiny_teacher_dir, text_file, tmp_path):
    """Killed after step 3 of 4 (checkpoint at step 2) with 1 process x accumulation 4, resumed by 2 processes
    x accumulation 2 (DDP over gloo): the same windows and schedule, so it ends where the uninterrupted run does."""
    import yaml

    kw = {"loss__lam": 0.0, "loss__hidden": "mse", "loss__hidden_weight": 0.5, "distill__save_every": 2}
    cfg = make_cfg(tiny_teacher_dir, text_file, distill__max_steps=4, **kw)
    full = distill(cfg, tmp_path / "full", progress=False)
    run = distill(cfg, tmp_path / "run", stop_after=3, progress=False)
    assert latest_checkpoint(run).name == "step-00000002"
    two = make_cfg(tiny_teacher_dir, text_file, distill__max_steps=4, distill__grad_accum=2, **kw)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(to_dict(two)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "dskd", "distill", "--config", str(path), "--out", str(run), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "meta.json").read_text())["processes"] == 2
    one, resumed = metrics(full), metrics(run)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(one, resumed, strict=True):
        for k in ("loss", "ce", "kd", "hidden", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
        assert a["tokens"] == b["tokens"]
    w1, w2 = trainable(full), trainable(run)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)
    # the same launch with accumulation 4 would make 8 micro-batches per step: refused in one line
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(to_dict(cfg)))
    killed = distill(cfg, tmp_path / "again", stop_after=3, progress=False)
    cmd[cmd.index(str(path))] = str(bad)
    cmd[cmd.index(str(run))] = str(killed)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode != 0 and "--distill.grad_accum 2" in r.stdout + r.stderr


def test_a_student_of_another_width_is_refused_for_state_losses_but_trains_kd(
    tiny_teacher_dir, tokenizer, text_file, tmp_path
):
    narrow = tmp_path / "narrow"
    make_model(len(tokenizer), layers=2, hidden=16, seed=3).save_pretrained(narrow)
    tokenizer.save_pretrained(narrow)
    for over, flag in (
        ({"loss__lam": 1.0}, "--loss.lam"),
        ({"loss__hidden": "mse", "loss__hidden_weight": 1.0}, "--loss.hidden"),
    ):
        cfg = make_cfg(tiny_teacher_dir, text_file, **{"loss__lam": 0.0, **over})
        cfg.model.student = str(narrow)
        cfg.distill.lexicon_dir = cfg.distill.senses_dir = str(tmp_path)  # folders exist; refused before use
        with pytest.raises(
            ConfigError, match=f"^{flag}: the student's hidden size \\(16\\) differs from the teacher's \\(32\\)"
        ):
            distill(cfg, tmp_path / flag.strip("-"), progress=False)
    kd = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=2)
    kd.model.student = str(narrow)
    out = distill(kd, tmp_path / "kd", progress=False)
    assert [m["step"] for m in metrics(out)] == [1, 2] and all(m["kd"] > 0 for m in metrics(out))


def test_tensorboard_receives_every_logged_term(tiny_teacher_dir, text_file, tmp_path):
    pytest.importorskip("tensorboard", reason="the test extra installs tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(
        tiny_teacher_dir,
        text_file,
        loss__lam=0.0,
        loss__hidden="mse",
        loss__hidden_weight=0.5,
        distill__max_steps=3,
        distill__report_to="tensorboard",
    )
    out = distill(cfg, tmp_path / "tb", progress=False)
    events = list((out / "tracking").rglob("events.out.tfevents.*"))
    assert events, list(out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    lines = metrics(out)
    terms = {k for m in lines for k, v in m.items() if isinstance(v, int | float)}
    assert {"loss", "ce", "kd", "hidden", "lr", "grad_norm", "tokens"} <= terms
    assert terms <= set(acc.Tags()["scalars"]), sorted(terms - set(acc.Tags()["scalars"]))
    for k in ("loss", "kd", "hidden", "lr"):
        got = [(e.step, e.value) for e in acc.Scalars(k)]
        assert got == [(m["step"], pytest.approx(m[k], rel=1e-6)) for m in lines], k


def test_an_absent_tracker_package_is_one_line_before_any_work(tiny_teacher_dir, text_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__report_to="wandb")
    with pytest.raises(ConfigError, match=r"^--distill.report_to wandb: the wandb package is not installed \(pip"):
        distill(cfg, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_teacher_licence_and_base_model(tmp_path):
    from dskd.card import base_model, teacher_license

    assert base_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert teacher_license("smollm2-135m-instruct")[0] == "apache-2.0"
    assert teacher_license("meta-llama/Meta-Llama-3-8B-Instruct")[0] == "llama3"
    assert teacher_license("mistralai/Mistral-7B-Instruct-v0.1")[0] == "apache-2.0"
    assert teacher_license("someone/their-model")[0] == "unknown"  # never guessed
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/model-7b"}))
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    assert teacher_license(str(folder)) == ("mit", f"the teacher's model card ({folder / 'README.md'})")
    assert base_model(str(folder)) == "org/model-7b"


def test_the_exported_student_has_a_model_card_the_hub_renders(tiny_teacher_dir, text_file, tmp_path):
    from dskd.card import front_matter, write_card

    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=2)
    out = distill(cfg, tmp_path / "run", progress=False)
    text = (out / "student" / "README.md").read_text()
    fm = front_matter(text)
    assert fm["license"] == "unknown" and "base_model" not in fm  # a local folder with no card: not guessed
    assert fm["library_name"] == "transformers" and "knowledge-distillation" in fm["tags"]
    meta = json.loads((out / "meta.json").read_text())
    assert f"dskd {meta['dskd_version']}" in text and "2 steps" in text and f"{meta['tokens']:,} target tokens" in text
    assert f"Last logged step (2): loss {metrics(out)[-1]['loss']:.4g}" in text
    assert "```yaml\nname: run\n" in text  # the recipe
    assert "## Evaluation" not in text
    ev = tmp_path / "eval.json"
    task = {"title": "ARC-Easy", "n": 40, "primary": "acc_norm", "metrics": {"acc_norm": 0.3, "acc_norm_stderr": 0.07}}
    ev.write_text(json.dumps({"tasks": {"arc_easy": task}}))
    write_card(out, results={"eval": ev})
    text = (out / "student" / "README.md").read_text()
    assert "| eval | ARC-Easy | 40 | acc_norm | 0.3000 ± 0.0700 |" in text
    assert front_matter(text) == fm


def test_bf16_through_accelerate_trains_as_dskd_autocast_alone(tiny_teacher_dir, text_file, tmp_path, monkeypatch):
    """accelerate's bf16 wrapping of the forward (autocast, outputs to float32) adds nothing to dskd's own
    autocast: the losses are computed in float32 from the same bfloat16 values."""
    import dskd.accelerator

    cfg = make_cfg(tiny_teacher_dir, text_file, loss__lam=0.0, distill__max_steps=2, distill__precision="bf16")
    cfg.loss.hidden, cfg.loss.hidden_weight = "mse", 0.5
    wrapped = distill(cfg, tmp_path / "acc", progress=False)
    monkeypatch.setattr(
        dskd.accelerator, "accelerate_precision", lambda amp: "no"
    )  # the Accelerator as before: no wrapping
    plain = distill(cfg, tmp_path / "plain", progress=False)
    a, b = trainable(wrapped), trainable(plain)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(m["loss"], m["hidden"]) for m in metrics(wrapped)] == [(m["loss"], m["hidden"]) for m in metrics(plain)]


def test_stages_built_before_the_new_fields_are_still_up_to_date(tmp_path):
    """A stage whose inputs were hashed before model.require_accelerator / data.datasets / distill.report_to /
    distill.timeout_minutes existed is skipped when they hold their old behaviour, rebuilt when one does not;
    a tracker or a timeout never rebuilds a student."""
    from dskd.config import ModelConfig, RunConfig, TrainConfig
    from dskd.pipeline import Pipeline, _train_inputs

    built = []
    pipe = Pipeline(tmp_path / "p", log=lambda _: None)
    old = {"model": {k: v for k, v in to_dict(ModelConfig()).items() if k != "require_accelerator"}}
    out = tmp_path / "p" / "stage"

    def fn():
        built.append(1)
        out.mkdir(exist_ok=True)
        (out / "x").write_text("x")

    pipe.stage("s", old, out, fn)
    pipe.stage("s", {"model": to_dict(ModelConfig())}, out, fn)
    assert len(built) == 1
    pipe.stage("s", {"model": to_dict(ModelConfig(require_accelerator=True))}, out, fn)
    assert len(built) == 2
    shared = {"hashes": {}}
    a = _train_inputs(RunConfig(), shared)
    b = _train_inputs(RunConfig(distill=TrainConfig(report_to="tensorboard", timeout_minutes=5)), shared)
    assert a == b
