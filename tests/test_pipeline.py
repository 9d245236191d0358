"""End-to-end: ``dskd run`` and ``dskd experiment`` on a tiny in-process teacher and fixture data."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TOY_TEXT

from dskd.__main__ import main
from dskd.io import sidecar_file
from dskd.pipeline import STAGE_OUTPUT

FIX = Path(__file__).parent / "fixtures" / "lexicon"
ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, teacher: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([TOY_TEXT[i : i + 600] for i in range(0, 6000, 600)]))
    cfg = {
        "name": "tiny",
        "out": str(tmp_path / "run"),
        "model": {"teacher": str(teacher), "student_layers": 2, "trainable_layers": 1},
        "lexicon": {"sources": [f"pairs:{FIX / 'antonyms.txt'}:ant", f"pairs:{FIX / 'tails.txt'}:syn"]},
        "senses": {
            "corpus": [str(corpus), "prompts"],
            "key": "actual",
            "k": 2,
            "max_samples": 20,
            "max_tokens": 1500,
            "seq_len": 64,
        },
        "data": {"tasks": ["arc_easy"], "text_files": [str(corpus)], "shots": 0, "max_items": 4, "max_length": 160},
        "loss": {"lam": 1.0, "kappa": 2, "margin_mode": "relative"},
        "distill": {"epochs": 1, "max_steps": 2, "batch_size": 1, "grad_accum": 2, "save_every": 0},
        "eval": {"tasks": ["arc_easy"], "limit": 6, "bootstrap": 50, "batch_size": 4, "paper_limit": 2},
        "fidelity": {"text_limit": 6, "prompt_limit": 3, "bootstrap": 50},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_writes_every_artefact_and_a_rerun_skips_all_stages(tiny_teacher_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    assert main(["run", "--config", str(recipe)]) == 0
    first = capsys.readouterr().out
    out = tmp_path / "run"
    for rel in [
        "config.yaml",
        "pipeline.json",
        "lexicon/meta.json",
        "senses/meta.json",
        "senses/senses.safetensors",
        "students/untrained/student/config.json",
        "students/kd/student/model.safetensors",
        "students/dskd/student/model.safetensors",
        "students/dskd/metrics.jsonl",
        "eval/teacher.json",
        "eval/untrained.json",
        "eval/kd.json",
        "eval/dskd.json",
        "eval_paper/teacher.json",
        "eval_paper/dskd.json",
        "report.md",
        "figures/losses.png",
        "figures/senses_tsne.png",
        "prompts.jsonl",
        "senses_coverage.json",
        "eval/fidelity.json",
    ]:
        assert (out / rel).exists(), rel
    # the training prompts were a sense corpus, chat-formatted as the students see them
    prompts = [json.loads(line)["text"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and all(p.startswith("<|im_start|>user") for p in prompts)
    per_corpus = json.loads((out / "senses/meta.json").read_text())["corpus"]["tokens_per_corpus"]
    assert per_corpus[str(out / "prompts.jsonl")] > 0
    assert "lexicon heads with senses" in first and "training-prompt positions predicting a lexicon head" in first
    cov = json.loads((out / "senses_coverage.json").read_text())
    assert 0 < cov["head_positions_with_senses"] <= cov["head_positions"] <= cov["prompt_positions"]
    fid = json.loads((out / "eval/fidelity.json").read_text())
    assert set(fid["sets"]) == {"text", "prompts"}
    assert set(fid["sets"]["text"]["models"]) == {"teacher", "untrained", "kd", "dskd"}
    assert fid["sets"]["text"]["models"]["untrained"]["metrics"]["kl"] > 0
    assert any((out / "teacher_cache").iterdir())
    state = json.loads((out / "pipeline.json").read_text())
    assert {"lexicon", "senses", "cache", "train:kd", "train:dskd", "eval:teacher", "eval:dskd"} <= set(state)
    report = (out / "report.md").read_text()
    for row in ("teacher", "untrained", "kd", "dskd"):
        assert report.count(f"| {row} |") >= 2  # the log-likelihood table and the paper protocol's
    assert "## Paper protocol" in report and "- squad: 1-shot chat, greedy generation" in report
    assert "Held-out fidelity" in report and "**prompts**" in report
    # issue 24: the answer gap against KD, and what the sense term did during training (DSKD only)
    assert "answer gap: mean over items" in report and "| dskd | " in report.split("answer gap")[1]
    assert "training diagnostics" in report and "| dskd | none | 1 |" in report
    assert (out / "figures" / "diagnostics.png").is_file()
    assert "[run ]" in first
    # the students' frozen bottom layer is computed once per batch: the teacher fills the memo, the
    # untrained, KD and DSKD students reuse it on every batch, and so do they in the fidelity stage
    reuse = [tuple(map(int, m)) for m in re.findall(r"shared prefix: 1 layer reused for (\d+) of (\d+) batches", first)]
    assert len(reuse) == 5, first
    assert reuse[0][0] == 0 and all(0 < h == n for h, n in reuse[1:4]) and 0 < reuse[4][0] < reuse[4][1]
    # KD and DSKD differ only in lambda: their metrics logs must differ in the sense term
    kd = [json.loads(line) for line in (out / "students/kd/metrics.jsonl").read_text().splitlines()]
    ds = [json.loads(line) for line in (out / "students/dskd/metrics.jsonl").read_text().splitlines()]
    assert all(r.get("sense", 0.0) == 0.0 for r in kd if "step" in r)
    assert any(r.get("sense", 0.0) > 0.0 for r in ds if "step" in r)

    assert main(["run", "--config", str(recipe)]) == 0
    second = capsys.readouterr().out
    assert "[run ]" not in second, second
    assert second.count("[skip]") >= 10

    # changing a loss option retrains the DSKD student only (and re-evaluates it)
    assert main(["run", "--config", str(recipe), "--loss.kappa", "1"]) == 0
    third = capsys.readouterr().out
    ran = {line.split()[2] for line in third.splitlines() if line.startswith("[run ]")}
    assert ran == {"train:dskd", "eval:dskd", "eval_paper:dskd", "fidelity"}, third
    # the paper budget is one field: changing it re-evaluates the preset only
    assert main(["run", "--config", str(recipe), "--loss.kappa", "1", "--eval.paper_limit", "3"]) == 0
    fourth = capsys.readouterr().out
    ran = {line.split()[2] for line in fourth.splitlines() if line.startswith("[run ]")}
    assert ran == {f"eval_paper:{m}" for m in ("teacher", "untrained", "kd", "dskd")}, fourth

    # what a stage was built from lives in its artefact's sidecar: without pipeline.json all stages skip
    argv = ["run", "--config", str(recipe), "--loss.kappa", "1", "--eval.paper_limit", "3"]
    state = json.loads((out / "pipeline.json").read_text())
    (out / "pipeline.json").unlink()
    assert main(argv) == 0
    fifth = capsys.readouterr().out
    assert "[run ]" not in fifth and fifth.count("[skip]") >= 10, fifth
    # a run folder of an older dskd kept those hashes in pipeline.json only: its artefacts are adopted
    legacy = {}
    for key, rec in state.items():
        meta_file = sidecar_file(rec["path"])
        meta = json.loads(meta_file.read_text())
        legacy[key] = {"hash": meta.pop("inputs_hash"), "path": rec["path"], "complete": True}
        if meta["format"]["name"] == STAGE_OUTPUT.name:
            meta_file.unlink()  # the prompts file and the untrained student had no sidecar then
        else:
            meta_file.write_text(json.dumps(meta))
    (out / "pipeline.json").write_text(json.dumps(legacy))
    assert main(argv) == 0
    sixth = capsys.readouterr().out
    assert "[run ]" not in sixth, sixth
    assert all("inputs_hash" in json.loads(sidecar_file(r["path"]).read_text()) for r in state.values())
    assert not any("hash" in r for r in json.loads((out / "pipeline.json").read_text()).values())
    # a legacy stage built from other inputs is rebuilt, one built from the same is adopted
    for key in ("eval:kd", "eval:dskd"):
        meta = json.loads(sidecar_file(legacy[key]["path"]).read_text())
        meta.pop("inputs_hash")
        sidecar_file(legacy[key]["path"]).write_text(json.dumps(meta))
    legacy["eval:kd"]["hash"] = "0" * 16
    (out / "pipeline.json").write_text(json.dumps(legacy))
    assert main(argv) == 0
    ran = {line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("[run ]")}
    assert ran == {"eval:kd"}


def test_experiment_pairs_arms_and_reports(tiny_teacher_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    # the run's students are the experiment's first seed: trained once
    assert main(["run", "--config", str(recipe), "--until", "students"]) == 0
    capsys.readouterr()
    assert main(["experiment", "--config", str(recipe), "--seeds", "2", "--arms", "kd,dskd,hidden_mse"]) == 0
    log = capsys.readouterr().out
    ran = {line.split()[2] for line in log.splitlines() if line.startswith("[run ]")}
    assert {"train:kd", "train:dskd"}.isdisjoint(ran) and {"train:hidden_mse", "train:kd/seed1"} <= ran, ran
    # one memo for the experiment: every student's evaluation reuses the teacher's bottom-layer states
    reuse = [tuple(map(int, m)) for m in re.findall(r"shared prefix: 1 layer reused for (\d+) of (\d+) batches", log)]
    assert len(reuse) == 2 + 6 + 1 and reuse[0][0] == 0 and all(0 < h == n for h, n in reuse[1:-1]), log
    out = tmp_path / "run"
    table = (out / "experiment.md").read_text()
    for row in (
        "| teacher (reference) |",
        "| untrained (reference) |",
        "| kd | 2 |",
        "| dskd | 2 |",
        "| hidden_mse | 2 |",
    ):
        assert row in table, table
    assert table.count("Δ") >= 4
    files = json.loads((out / "experiment.json").read_text())["files"]
    assert set(files) == {"kd", "dskd", "hidden_mse"} and all(len(v) == 2 for v in files.values())
    # fidelity: every student in one result; each arm's row pools its seeds (mean KL over the seeds)
    fid = json.loads((out / "eval" / "experiment_fidelity.json").read_text())
    assert set(fid["models"]) == {"untrained"} | {f"{a}{s}" for a in files for s in ("", "/seed1")}
    assert "Seeds pooled (kd 2, dskd 2, hidden_mse 2)" in table
    for name, s in fid["sets"].items():
        kls = [s["models"][m]["metrics"]["kl"] for m in ("dskd", "dskd/seed1")]
        assert kls[0] != kls[1]
        section = table.split(f"**{name}**")[1]
        row = next(line for line in section.splitlines() if line.startswith("| dskd |"))
        assert row.split("|")[2].strip().startswith(f"{sum(kls) / 2:.3f} ± "), row
        assert "(Δ " in row and "| kd |" in section and "| untrained |" in section
    cfg = yaml.safe_load((out / "students/hidden_mse/seed1/config.yaml").read_text())
    assert cfg["loss"]["hidden"] == "mse" and cfg["loss"]["lam"] == 0.0 and cfg["distill"]["seed"] == 1

    # a sweep arm with overrides: its own folder and table; the shared stages and the KD baseline skip
    before = (out / "experiment.md").read_text()
    capsys.readouterr()
    argv = ["experiment", "--config", str(recipe), "--seeds", "1", "--report-name", "sweep"]
    assert main([*argv, "--arms", "kd,dskd@margin=0.5@distill.epochs=2"]) == 0
    log = capsys.readouterr().out
    ran = {line.split()[2] for line in log.splitlines() if line.startswith("[run ]")}
    assert ran == {"train:dskd@margin=0.5@distill.epochs=2", "eval:dskd@margin=0.5@distill.epochs=2", "sweep_fidelity"}
    cfg = yaml.safe_load((out / "students/dskd@margin=0.5@distill.epochs=2/config.yaml").read_text())
    assert cfg["loss"]["margin"] == 0.5 and cfg["distill"]["epochs"] == 2 and cfg["loss"]["lam"] > 0
    assert "| dskd@margin=0.5@distill.epochs=2 | 1 |" in (out / "sweep.md").read_text()
    assert (out / "experiment.md").read_text() == before
    assert (out / "figures" / "experiment_losses.png").is_file() and (out / "figures" / "sweep_losses.png").is_file()


def test_unknown_arm_is_refused(tiny_teacher_dir, tmp_path, capsys):
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    assert main(["experiment", "--config", str(recipe), "--arms", "kd,dksd"]) == 2
    assert "unknown arm 'dksd'" in capsys.readouterr().err
    for bad, msg in (
        ("dskd@margni=0.5", "loss has no field 'margni'"),
        ("dskd@margin", "expected @key=value"),
        ("kd@data.max_items=3", "expected @key=value"),
        ("dskd@kappa=0", "kappa"),
        ("dskd --baseline kd@lam=x", "lam"),
    ):
        arm, *rest = bad.split()
        assert main(["experiment", "--config", str(recipe), "--arms", f"kd,{arm}", *rest]) == 2
        assert msg in capsys.readouterr().err, bad


@pytest.mark.slow
def test_quick_run_with_the_packaged_smollm2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dskd", "run", "--config", "configs/smollm2-135m_to_24l.yaml", "--quick"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "q")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "q-quick"
    assert (out / "report.md").is_file() and (out / "figures" / "losses.png").is_file()
    report = (out / "report.md").read_text()
    assert "| dskd |" in report and "| teacher |" in report


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_adopts_or_refuses_a_student_trained_by_distill_and_never_deletes_one(tiny_teacher_dir, tmp_path, capsys):
    """README step 3: students trained by `dskd distill` (as under `accelerate launch`) carry no stage
    inputs hash. `dskd run` with other flags keeps their bytes: adopted when the fields that shape a
    student agree, refused with one line naming the field otherwise; a student the run itself trained
    with other inputs is moved under replaced/, never deleted."""
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    out = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--until", "cache"]) == 0
    dskd = out / "students" / "dskd"
    argv = ["--config", str(recipe), "--distill.lexicon_dir", str(out / "lexicon")]
    argv += ["--distill.senses_dir", str(out / "senses"), "--distill.grad_accum", "1"]
    assert main(["distill", *argv, "--out", str(dskd)]) == 0
    trained = _tree_bytes(dskd)
    assert "student/model.safetensors" in trained
    capsys.readouterr()

    # another training field: refused before any work, one line naming it and the flag that adopts it
    assert main(["run", "--config", str(recipe), "--until", "students"]) != 0
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()[-1]
    assert err.startswith("dskd run: error: ") and "distill.grad_accum 1 (recipe: 2)" in err, err
    assert "pass --distill.grad_accum 1 to use it" in err
    assert "[run ]" not in cap.out, cap.out  # not even the KD student was trained
    assert _tree_bytes(dskd) == trained

    # the same training fields, other evaluation flags: adopted, not retrained
    run2 = ["run", "--config", str(recipe), "--until", "students", "--distill.grad_accum", "1"]
    assert main([*run2, "--eval.paper_limit", "0"]) == 0
    log = capsys.readouterr().out
    assert "adopted" in log and "[run ] train:dskd" not in log, log
    assert "[run ] train:kd" in log
    meta = json.loads((dskd / "meta.json").read_text())
    assert "inputs_hash" in meta
    assert {k: v for k, v in _tree_bytes(dskd).items() if k != "meta.json"} == {
        k: v for k, v in trained.items() if k != "meta.json"
    }
    assert main(run2) == 0
    assert "[run ]" not in capsys.readouterr().out  # an unchanged rerun skips every stage

    # a changed loss option retrains DSKD: the adopted student is moved aside, byte for byte
    assert main([*run2, "--loss.kappa", "1"]) == 0
    log = capsys.readouterr().out
    assert "[run ] train:dskd" in log and "[run ] train:kd" not in log
    aside = list((out / "replaced").glob("*/students/dskd"))
    assert len(aside) == 1, log
    kept = _tree_bytes(aside[0])
    assert kept["student/model.safetensors"] == trained["student/model.safetensors"]
    assert kept.keys() == trained.keys()
    assert (dskd / "student" / "model.safetensors").read_bytes() != trained["student/model.safetensors"]


def test_an_unfinished_student_resumes_whatever_the_evaluation_flags(tmp_path):
    """The sections that do not shape a student come from the run's own config.yaml, so distill's
    resume check passes; another training field is no resume (the run is then moved aside)."""
    import dataclasses

    from dskd.config import RunConfig, config_diff, dump_yaml, to_dict
    from dskd.pipeline import _resume_config, training_changes

    saved = RunConfig(name="r")
    dump_yaml(saved, tmp_path / "config.yaml")
    now = RunConfig(name="r", eval=dataclasses.replace(saved.eval, paper_limit=0))
    rc = _resume_config(tmp_path, now)
    assert rc is not None and config_diff(to_dict(saved), to_dict(rc)) == []
    lr = RunConfig(name="r", distill=dataclasses.replace(saved.distill, lr=1e-3))
    assert _resume_config(tmp_path, lr) is None
    assert training_changes(to_dict(saved), lr) == ["distill.lr"]
    # paths and logging cadence shape no student; without the sense loss, neither do its options
    where = RunConfig(name="r", distill=dataclasses.replace(saved.distill, senses_dir="x", save_every=7))
    assert training_changes(to_dict(saved), where) == []
    older = to_dict(saved)
    del older["distill"]["seed"]  # a field added after the run: its default is what the run did
    assert training_changes(older, saved) == []
    kd = RunConfig(name="r", loss=dataclasses.replace(saved.loss, lam=0.0))
    kd_saved = to_dict(kd)
    kd_saved["loss"]["kappa"] = 9
    assert training_changes(kd_saved, kd) == []
    assert training_changes(kd_saved, RunConfig(name="r")) == ["loss.kappa", "loss.lam"]


def test_an_interrupted_student_without_a_checkpoint_is_set_aside_saying_so(tiny_teacher_dir, tmp_path, capsys):
    """A student killed before its first checkpoint has nothing to resume from: its folder (the steps'
    metrics) is moved under replaced/ with the reason, not described as trained with other settings."""
    recipe = _recipe(tmp_path, tiny_teacher_dir)
    out = tmp_path / "run"
    assert main(["run", "--config", str(recipe), "--until", "cache"]) == 0
    kd = out / "students" / "kd"
    kd.mkdir(parents=True)
    (kd / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    capsys.readouterr()
    assert main(["run", "--config", str(recipe), "--until", "students"]) == 0
    log = capsys.readouterr().out
    line = next(x for x in log.splitlines() if x.startswith("[keep] train:kd"))
    assert "(unfinished, no checkpoint yet) moved to" in line, line
    aside = list((out / "replaced").glob("*/students/kd/metrics.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == '{"step": 1, "loss": 9.0}\n'
    assert (kd / "student" / "model.safetensors").is_file()
