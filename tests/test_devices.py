"""Device and dtype of every stage: resolution rules, no silent CPU fallback, what each stage makes,
the student built without a second copy of the teacher, and float32 master weights in bfloat16 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOY_TEXT, make_model
from safetensors.torch import load_file

from dskd.config import ConfigError, EvalConfig, ModelConfig, from_dict
from dskd.devices import resolve_device, resolve_dtype
from dskd.models import build_pair, freeze_except_top, keep_float32_master, load_model, truncate

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n\n".join(TOY_TEXT[-1200:][i : i + 200] for i in range(0, 1200, 200)))
    return p


def _cfg(teacher_dir, text_file, **model):
    return from_dict(
        {
            "model": {"teacher": str(teacher_dir), "student_layers": 2, "trainable_layers": 1, **model},
            "data": {"tasks": [], "text_files": [str(text_file)], "max_length": 32},
            "loss": {"lam": 0.0},
            "distill": {
                "batch_size": 2,
                "grad_accum": 1,
                "epochs": 1,
                "max_steps": 1,
                "teacher_cache": False,
                "save_every": 0,
                "lr": 1e-5,
                "warmup_frac": 0.0,
                "weight_decay": 0.0,
            },
        }
    )


# ----------------------------------------------------------------------------- resolution rules


@needs_no_cuda
def test_auto_is_the_cpu_here_and_an_absent_accelerator_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="--device: 'cuda' asked for.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="--model.device"):
        resolve_device("cuda:1", flag="--model.device")


def test_device_and_dtype_specs():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")
    with pytest.raises(ConfigError, match="--device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # explicit wins on any device
    with pytest.raises(ConfigError, match="--dtype: must be one of auto"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_auto_dtype_on_a_gpu_is_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.float16


def test_configs_accept_auto_and_refuse_nonsense():
    assert ModelConfig().dtype == "auto" and ModelConfig().device == "auto"
    assert EvalConfig().dtype == "auto"
    with pytest.raises(ConfigError, match="--model.dtype"):
        ModelConfig(dtype="fp8")


# ----------------------------------------------------------------------------- models


def test_load_model_puts_weights_in_the_asked_dtype(tiny_teacher_dir):
    m = load_model(str(tiny_teacher_dir), "bfloat16", device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m = load_model(str(tiny_teacher_dir), "auto", device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float32}


def test_truncating_a_meta_teacher_allocates_nothing(tokenizer):
    with torch.device("meta"):
        teacher = make_model(len(tokenizer), layers=4)
    student = truncate(teacher, 2, share=True)
    assert all(p.is_meta for p in student.parameters())
    assert student.config.num_hidden_layers == 2


def test_build_pair_shares_frozen_tensors_and_owns_trainable_ones(tiny_teacher_dir):
    pair = build_pair(
        ModelConfig(teacher=str(tiny_teacher_dir), student_layers=3, trainable_layers=1, dtype="bfloat16")
    )
    t, s = pair.teacher, pair.student
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16}
    # frozen layers: one copy in memory for teacher and student
    assert s.model.layers[0].mlp.up_proj.weight.data_ptr() == t.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert s.model.embed_tokens.weight.data_ptr() == t.model.embed_tokens.weight.data_ptr()
    # trainable layer: its own copy, so an update never reaches the teacher
    top_s, top_t = s.model.layers[2].mlp.up_proj.weight, t.model.layers[2].mlp.up_proj.weight
    assert top_s.requires_grad and top_s.data_ptr() != top_t.data_ptr()
    before = top_t.clone()
    with torch.no_grad():
        top_s.add_(1.0)
    assert torch.equal(top_t, before)


def test_bfloat16_loses_a_tiny_adamw_update_float32_master_weights_keep_it(tokenizer):
    def step(model: torch.nn.Module) -> float:
        p = model.model.layers[-1].mlp.up_proj.weight
        with torch.no_grad():
            p.fill_(1.0)  # a bfloat16 step at 1.0 is 2**-7; half of it is 3.9e-3
        start = p.detach().float().clone()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
        x = torch.randint(0, len(tokenizer), (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x).logits.float().pow(2).mean()
        loss.backward()
        opt.step()  # AdamW's first step moves each weight by ~lr = 1e-4
        return float((p.detach().float() - start).abs().max())

    pure = make_model(len(tokenizer), layers=2).to(torch.bfloat16)
    freeze_except_top(pure, 1)
    assert step(pure) == 0.0  # the update rounds away
    master = make_model(len(tokenizer), layers=2).to(torch.bfloat16)
    freeze_except_top(master, 1)
    assert keep_float32_master(master) > 0
    assert master.model.layers[-1].mlp.up_proj.weight.dtype == torch.float32
    assert master.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # frozen weights stay small
    moved = step(master)
    assert 5e-5 < moved < 2e-4


# ----------------------------------------------------------------------------- stages


@needs_no_cuda
def test_stages_refuse_an_absent_gpu_before_loading(tiny_teacher_dir, text_file, tmp_path):
    from dskd.data import build_teacher_cache
    from dskd.distill import distill
    from dskd.evaluate import evaluate

    cfg = _cfg(tiny_teacher_dir, text_file, device="cuda")
    with pytest.raises(ConfigError, match="--model.device: 'cuda'"):
        distill(cfg, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--model.device: 'cuda'"):
        build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, tmp_path / "cache")
    with pytest.raises(ConfigError, match="--eval.device: 'cuda'"):
        evaluate(str(tiny_teacher_dir), EvalConfig(tasks=["arc_easy"], limit=2, device="cuda"), tmp_path / "e.json")


def test_distill_in_bfloat16_trains_float32_masters_and_exports_bfloat16(tiny_teacher_dir, text_file, tmp_path, capsys):
    from dskd.checkpoint import latest_checkpoint
    from dskd.distill import distill

    run = distill(_cfg(tiny_teacher_dir, text_file, device="cpu", dtype="bfloat16"), tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    assert "[dskd distill] on cpu" in err and "weights bfloat16" in err and "autocast bfloat16" in err
    trained = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert trained and {v.dtype for v in trained.values()} == {torch.float32}
    start = load_model(str(tiny_teacher_dir), "bfloat16").state_dict()
    moved = max(float((v - start[k].float()).abs().max()) for k, v in trained.items())
    assert 0 < moved < 1e-4  # lr 1e-5: below half a bfloat16 step of these weights, yet kept
    exported = load_file(str(run / "student" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}


def test_cache_build_and_eval_say_where_they_run(tiny_teacher_dir, text_file, tmp_path, capsys):
    from dskd.cli import parse_command
    from dskd.data import build_teacher_cache, cache_build_command
    from dskd.evaluate import evaluate

    argv = ["--model.teacher", str(tiny_teacher_dir), "--device", "cpu", "--dtype", "bfloat16"]
    cfg = parse_command("cache build", cache_build_command, argv)["cfg"]
    assert (cfg.model.device, cfg.model.dtype, cfg.eval.dtype) == ("cpu", "bfloat16", "bfloat16")
    cfg = _cfg(tiny_teacher_dir, text_file, device="cpu", dtype="bfloat16")
    path = build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, tmp_path / "cache")
    assert "[dskd cache build] on cpu" in capsys.readouterr().err
    meta = json.loads((path / "meta.json").read_text())
    shard = load_file(str(path / meta["shards"][0]))
    # a truncated student shares the teacher's head: the cache holds states only (exact KD from them),
    # and the state entering its first trained layer in the dtype the teacher computed it in
    assert shard["hidden"].dtype == torch.float16 and set(shard) == {"hidden", "prefix"}
    assert shard["prefix"].dtype == torch.bfloat16
    res = evaluate(
        str(tiny_teacher_dir),
        EvalConfig(tasks=["arc_easy"], limit=2, bootstrap=0, device="cpu", dtype="bfloat16"),
        tmp_path / "e.json",
        progress=False,
    )
    assert res["device"] == "cpu" and res["dtype"] == "bfloat16"
    assert (
        res["environment"]["torch"] == torch.__version__.split("+")[0]
        or res["environment"]["torch"] == torch.__version__
    )
    assert "[dskd eval] on cpu" in capsys.readouterr().err


def test_environment_records_versions_kernel_level_and_processor():
    import importlib.metadata as md

    from dskd.devices import environment

    env = environment()
    assert env["torch"] == md.version("torch") and env["transformers"] == md.version("transformers")
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu"] and env["python"].count(".") == 2
    assert ("gpu" in env) == torch.cuda.is_available()
    json.dumps(env)  # stored in result JSON as it is
