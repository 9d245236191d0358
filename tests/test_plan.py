"""``dskd plan``: exact parameter counts, parts that add up, steps that match a real run, and the
paper configs' header commands, verbatim, getting past argument parsing and config validation."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import pytest
from conftest import TOY_TEXT, make_model

from dskd.__main__ import main
from dskd.config import from_dict
from dskd.plan import KNOWN_ARCHITECTURES, architecture, make_plan, model_config, render

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = ["llama3-8b-instruct_to_16l.yaml", "mistral-7b-instruct_to_16l.yaml"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "train.txt"
    p.write_text("\n\n".join(TOY_TEXT[-2000:][i : i + 160] for i in range(0, 2000, 160)))
    return p


def _cfg(teacher, text_file, **distill):
    return from_dict(
        {
            "name": "tiny",
            "model": {"teacher": str(teacher), "student_layers": 3, "trainable_layers": 1},
            "data": {"tasks": [], "text_files": [str(text_file)], "max_length": 24},
            "loss": {"lam": 0.0},
            "distill": {
                "batch_size": 2,
                "grad_accum": 2,
                "epochs": 2,
                "teacher_cache": False,
                "save_every": 0,
                **distill,
            },
            "eval": {"tasks": ["arc_easy"], "limit": 5},
        }
    )


@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_equal_the_instantiated_models(tmp_path, tokenizer, text_file, tie):
    from dskd.models import build_pair

    folder = tmp_path / "teacher"
    teacher = make_model(len(tokenizer), layers=4, seed=0, tie=tie)
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    plan = make_plan(_cfg(folder, text_file), ["--config", "c.yaml"])
    assert plan["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    pair = build_pair(from_dict({"model": {"teacher": str(folder), "student_layers": 3, "trainable_layers": 1}}).model)
    assert plan["student"]["params"] == pair.info["total_params"] == sum(p.numel() for p in pair.student.parameters())
    assert plan["student"]["trainable"] == pair.info["trainable_params"]
    assert plan["data"]["exact"]  # the tokenizer is in the folder: counted, not estimated


def test_memory_parts_add_up_and_follow_the_counts(tiny_teacher_dir, text_file):
    plan = make_plan(_cfg(tiny_teacher_dir, text_file), ["--config", "c.yaml"], gpus=1)
    trained = plan["student"]["trainable"]
    for st in plan["stages"]:
        assert st["memory_total"] == pytest.approx(sum(st["memory"].values()))
        assert all(v >= 0 for v in st["memory"].values())
    dist = next(st for st in plan["stages"] if st["name"] == "distill:dskd")
    assert dist["memory"]["AdamW states (float32)"] == 8 * trained
    assert dist["memory"]["gradients (float32)"] == 4 * trained
    assert dist["memory"]["teacher weights"] == plan["teacher_params"] * 2  # auto dtype is bfloat16 on a GPU
    # the rendered text adds up too: the total printed equals the sum of the printed parts (to rounding)
    for line in render(plan).splitlines():
        m = re.match(r"\s+memory per GPU ~([\d.]+) GB(?:  !![^:]*)?: (.*)", line)
        if m:
            parts = [float(x) for x in re.findall(r" ([\d.]+) GB", " " + m.group(2))]
            assert float(m.group(1)) == pytest.approx(sum(parts), abs=0.02 * len(parts))


def test_steps_and_tokens_match_a_real_run(tiny_teacher_dir, text_file, tmp_path):
    from dskd.distill import distill

    cfg = _cfg(tiny_teacher_dir, text_file)
    plan = make_plan(cfg, ["--config", "c.yaml"])
    run = distill(cfg, tmp_path / "run", progress=False)
    meta = json.loads((run / "meta.json").read_text())
    dist = next(st for st in plan["stages"] if st["name"] == "distill:kd")
    assert dist["steps"] == meta["steps"]
    assert plan["data"]["sequences"] == meta["data"]["sequences"]
    # the plan counts every position, the run every target (one fewer per sequence)
    assert plan["data"]["positions"] - plan["data"]["sequences"] == meta["data"]["tokens_per_epoch"]
    # several GPUs keep the effective batch by dividing the accumulation
    plan2 = make_plan(cfg, ["--config", "c.yaml"], gpus=2)
    d2 = next(st for st in plan2["stages"] if st["name"] == "distill:kd")
    assert d2["steps"] == dist["steps"] and "--distill.grad_accum 1" in d2["command"]
    assert d2["command"].startswith("accelerate launch --multi_gpu --num_processes 2 -m dskd distill")


def test_paper_teachers_ship_their_shapes():
    conf, source = model_config("meta-llama/Meta-Llama-3-8B-Instruct")
    a = architecture(conf, source)
    assert "shipped" in source
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab) == (4096, 32, 32, 8, 14336, 128256)
    assert a.total == 8_030_261_248  # Llama-3-8B's published parameter count
    m = architecture(*model_config("mistralai/Mistral-7B-Instruct-v0.2"))
    assert m.total == 7_241_732_096 and m.vocab == 32000
    assert architecture(*model_config("mistralai/Mistral-7B-Instruct-v0.3")).vocab == 32768
    assert set(KNOWN_ARCHITECTURES) >= {"mistralai/Mistral-7B-Instruct-v0.1", "smollm2-135m-instruct"}


def _header_commands(path: Path) -> list[str]:
    """The commands of a config's header: comment lines that run python -m dskd or accelerate launch."""
    cmds = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip().removeprefix("(on one GPU the same optimisation: ").rstrip(")")
        if text.startswith(("python -m dskd", "accelerate launch", "dskd ")):
            cmds.append(text)
    return cmds


@pytest.mark.parametrize("name", ["smollm2-135m_to_15l.yaml", "smollm2-135m_to_24l.yaml"])
def test_demo_config_header_commands_parse(name, tmp_path, monkeypatch):
    import dskd.pipeline
    from dskd.__main__ import main as dskd_main

    cmds = _header_commands(ROOT / "configs" / name)
    assert len(cmds) == 3, cmds
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    seen = []
    monkeypatch.setattr(dskd.pipeline, "run", lambda cfg, **kw: seen.append(cfg) or {})
    monkeypatch.setattr(dskd.pipeline, "experiment", lambda cfg, **kw: seen.append(cfg) or tmp_path)
    for cmd in cmds:
        argv = shlex.split(cmd.split("#")[0])
        assert argv[0] == "dskd"
        assert dskd_main(argv[1:]) == 0, cmd
    assert len(seen) == 3 and seen[1].name.endswith("-quick")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_header_commands_pass_parsing_and_validation(name, tmp_path, monkeypatch, capsys):
    """Each command of the header, verbatim: accelerate's own parser takes the launcher part; dskd's
    parsers and config validation take the rest, up to where weights would load. The distill
    commands find the lexicon and sense store where the header's first command (`dskd run`) puts them."""
    from accelerate.commands.launch import launch_command_parser

    import dskd.distill
    import dskd.pipeline
    import dskd.sense_targets
    from dskd.__main__ import main as dskd_main

    cmds = _header_commands(ROOT / "configs" / name)
    assert len(cmds) >= 5, cmds
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    seen: dict[str, list] = {"run": [], "distill": []}

    def fake_run(cfg, *, until="report", force=False):
        seen["run"].append(cfg)
        # what `dskd run` writes for this recipe (dskd.pipeline.prepare_shared): the folders, with the
        # sidecars that the CLI's input checks read before any distill command starts
        from dskd.io import sidecar, write_sidecar
        from dskd.lexicon import ARTEFACT
        from dskd.senses.cli import STORE_ARTEFACT

        for stage, kind in (("lexicon", ARTEFACT), ("senses", STORE_ARTEFACT)):
            (cfg.out_dir / stage).mkdir(parents=True, exist_ok=True)
            write_sidecar(cfg.out_dir / stage, sidecar(kind))
        return {}

    def fake_distill(cfg, out=None, resume=True, **kw):
        # the checks distill makes before loading anything
        lex, sen = dskd.sense_targets.sense_dirs(cfg.distill, None, None) if cfg.loss.lam > 0 else (None, None)
        seen["distill"].append((cfg, Path(out), lex, sen))
        return Path(out)

    monkeypatch.setattr(dskd.pipeline, "run", fake_run)
    monkeypatch.setattr(dskd.distill, "distill", fake_distill)
    for cmd in cmds:
        argv = shlex.split(cmd)
        if argv[0] == "accelerate":
            args = launch_command_parser().parse_args(argv[2:])
            assert args.module and args.training_script == "dskd" and args.multi_gpu
            argv = args.training_script_args
        else:
            assert argv[:3] == ["python", "-m", "dskd"]
            argv = argv[3:]
        assert dskd_main(argv) == 0, cmd
    out = capsys.readouterr().out
    assert "[distill:dskd]" in out and "optimiser steps" in out  # the plan command ran, from shipped shapes
    assert seen["run"] and len(seen["distill"]) >= 3
    run_cfg = seen["run"][0]
    for cfg, out_dir, lex, sen in seen["distill"]:
        assert out_dir.parent == run_cfg.out_dir / "students"
        if cfg.loss.lam > 0:
            assert lex == run_cfg.out_dir / "lexicon" and sen == run_cfg.out_dir / "senses"


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_follow_the_reference_recipe(name):
    from dskd.config import load_yaml

    cfg = load_yaml(ROOT / "configs" / name)
    llama = name.startswith("llama")
    assert cfg.senses.k == (10 if llama else 5)
    assert cfg.loss.lam == (1.0 if llama else 1.5)
    assert cfg.distill.lr == (1.5e-4 if llama else 6e-5)
    # effective batch 3 on one process (1 per rank x 3 ranks in the reference)
    assert cfg.distill.batch_size * cfg.distill.grad_accum == 3
    assert cfg.distill.epochs == 2 and cfg.distill.warmup_frac == 0.1 and cfg.distill.weight_decay == 1e-3
    assert (cfg.loss.T, cfg.loss.alpha, cfg.loss.kappa, cfg.loss.margin) == (2.0, 0.7, 5, 1.0)
    assert (cfg.model.student_layers, cfg.model.trainable_layers, cfg.model.dtype) == (16, 2, "bfloat16")
    assert cfg.eval.dtype == "bfloat16" and cfg.eval.shots == 5 and cfg.data.shots == 5
    assert cfg.data.sample_frac == 0.25
    # method.md 1.6, 9: the sense corpus holds the training prompts; the reference clips no gradient
    assert "prompts" in cfg.senses.corpus and cfg.distill.max_grad_norm == 0
    # what the offline corpus fills (4,454,540 tokens of the default mix with SmolLM2's tokenizer)
    assert cfg.senses.corpus == ["default", "prompts"] and cfg.senses.max_tokens <= 4_454_540
    assert llama or cfg.model.teacher == "mistralai/Mistral-7B-Instruct-v0.1"  # the paper's and its code's
    plan = make_plan(cfg, ["--config", f"configs/{name}"], gpus=3)
    dist = next(st for st in plan["stages"] if st["name"] == "distill:dskd")
    # 3 processes x grad_accum 1: one optimiser step per 3 sequences, 2 epochs
    assert dist["steps"] == 2 * math.ceil(plan["data"]["sequences"] / 3)
    assert "--num_processes 3" in dist["command"] and "--distill.grad_accum 1" in dist["command"]
    assert dist["memory_total"] < 80e9  # one 80 GB GPU holds teacher and student (estimate)


def test_cli_plan_json_and_bad_flags(tiny_teacher_dir, text_file, tmp_path, capsys):
    import yaml

    c = tmp_path / "c.yaml"
    c.write_text(
        yaml.safe_dump(
            {"model": {"teacher": str(tiny_teacher_dir)}, "data": {"tasks": [], "text_files": [str(text_file)]}}
        )
    )
    assert main(["plan", "--config", str(c), "--gpus", "2", "--as_json", "--loss.lam", "0"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpus"] == 2
    cmd = next(st for st in plan["stages"] if st["name"] == "distill:kd")["command"]
    assert f"--config {c} --loss.lam 0" in cmd and "--gpus" not in cmd and "--json" not in cmd
    assert main(["plan", "--config", str(c), "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err
    assert main(["plan", "--config", str(c), "--model.teacher", "no-org/no-model"]) == 2
    assert "--model.teacher: no configuration" in capsys.readouterr().err


def test_plan_of_the_packaged_alias_exports_nothing(tmp_path, monkeypatch, text_file):
    monkeypatch.setenv("DSKD_HOME", str(tmp_path / "home"))
    cfg = from_dict(
        {
            "model": {"teacher": "smollm2-135m-instruct", "student_layers": 15},
            "data": {"tasks": [], "text_files": [str(text_file)]},
            "eval": {"tasks": ["arc_easy"], "limit": 3},
        }
    )
    plan = make_plan(cfg, ["--config", "c.yaml"])
    assert "shipped" in plan["teacher"]["source"] and not plan["data"]["exact"]
    assert plan["teacher_params"] == 134_515_008  # SmolLM2-135M, tied embeddings
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("prefix", ["auto", "off"])
def test_planned_cache_size_equals_a_built_cache(prefix, tiny_teacher_dir, text_file, tmp_path):
    """Per target position the plan's teacher cache holds what a built one does (here: no logits, fp16
    states, and with a shared prefix the float32 state entering the trained layer)."""
    from safetensors import safe_open

    from dskd.distill import distill

    cfg = _cfg(tiny_teacher_dir, text_file, teacher_cache=True, cache_prefix=prefix, max_steps=1)
    cfg.model.dtype = "float32"  # the plan's default dtype is a GPU's (bfloat16); the CPU run's is float32
    plan = make_plan(cfg, ["--config", "c.yaml"])
    planned = next(st for st in plan["stages"] if st["name"] == "cache")["disk"]["teacher cache"]
    distill(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    built = 0
    for name in meta["shards"]:
        with safe_open(str(tmp_path / "cache" / name), framework="pt") as f:
            built += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118
    targets = plan["data"]["positions"] - plan["data"]["sequences"]  # the cache keeps target positions
    assert meta["counts"]["positions"] == targets
    assert planned / plan["data"]["positions"] == built / targets
    # the stage's figure is its estimator's, per position
    from dskd.plan import shapes, teacher_cache_position_bytes

    sh = shapes(cfg, [])
    assert planned == plan["data"]["positions"] * teacher_cache_position_bytes(cfg, sh)
    assert ("prefix_layers" in meta["settings"]) == (prefix == "auto")


@pytest.mark.parametrize("prefix", ["auto", "off"])
def test_distill_stage_says_when_it_assumes_an_exact_split(prefix, tiny_teacher_dir, text_file):
    """The plan cannot probe the split (it loads no weights): with a cached prefix it says what it assumed."""
    cfg = _cfg(tiny_teacher_dir, text_file, teacher_cache=True, cache_prefix=prefix, max_steps=1)
    plan = make_plan(cfg, ["--config", "c.yaml"])
    notes = " ".join(n for st in plan["stages"] if st["name"].startswith("distill") for n in st["notes"])
    assert ("assumes the split below" in notes) == (prefix == "auto"), notes
