"""The artefact contract (dskd.io): every stage's output, damaged in one file, gives one line naming the
file and the command that rebuilds it (no traceback), and the contract's pieces on their own."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TOY_TEXT

from dskd.__main__ import main
from dskd.io import Artefact, ArtefactError, check_files, is_built, read_sidecar, safetensors_problem, sidecar


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("dskd ")]
    assert len(lines) == 1, err
    return lines[0]


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_damaged_file_of_each_artefact_kind_is_one_line(tiny_teacher_dir, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TOY_TEXT)
    ant = tmp_path / "ant.txt"
    ant.write_text("hot cold\ngood bad\nbig small\nlight dark\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
                "lexicon": {"sources": [f"pairs:{ant}:ant"]},
                "senses": {"corpus": [str(corpus)], "k": 2, "max_tokens": 1500, "seq_len": 64, "key": "actual"},
                "data": {"tasks": [], "text_files": [str(corpus)], "max_length": 32},
                "loss": {"lam": 0.0},
                "distill": {"max_steps": 1, "grad_accum": 1, "save_every": 0, "cache_dir": str(tmp_path / "cache")},
                "eval": {"tasks": ["arc_easy"], "limit": 2, "bootstrap": 0},
            }
        )
    )
    c = ["--config", str(recipe)]
    lex, store, run, res = tmp_path / "lex", tmp_path / "store", tmp_path / "run", tmp_path / "res.json"
    assert main(["lexicon", "build", *c, "--out", str(lex)]) == 0
    assert main(["senses", "build", *c, "--out", str(store)]) == 0
    assert main(["cache", "build", *c]) == 0
    assert main(["distill", *c, "--out", str(run)]) == 0
    assert main(["eval", *c, "--model", str(run), "--out", str(res)]) == 0
    capsys.readouterr()

    # sense store: a truncated .safetensors (a raw SafetensorError / numpy error before)
    store_file = next(store.glob("*.safetensors"))
    _truncate(store_file)
    assert main(["senses", "show", str(store), "red"]) == 2
    line = _error_line(capsys)
    assert str(store_file) in line and "truncated" in line and "`dskd senses build`" in line

    # lexicon: a corrupt relations.json
    (lex / "relations.json").write_text('{"heads": {')
    assert main(["lexicon", "show", str(lex), "hot"]) == 2
    line = _error_line(capsys)
    assert str(lex / "relations.json") in line and "`dskd lexicon build`" in line

    # teacher cache: a truncated shard
    from dskd.data import CacheError, TeacherCache

    shard = tmp_path / "cache" / json.loads((tmp_path / "cache" / "meta.json").read_text())["shards"][0]
    _truncate(shard)
    with pytest.raises(CacheError) as e:
        TeacherCache.open(tmp_path / "cache")
    assert str(shard) in str(e.value) and "`dskd cache build`" in str(e.value) and "\n" not in str(e.value)
    assert main(["distill", *c, "--out", str(tmp_path / "run2")]) == 2
    assert str(shard) in _error_line(capsys)

    # student weights: a truncated model.safetensors of the exported student
    weights = run / "student" / "model.safetensors"
    _truncate(weights, 0.9)
    assert main(["eval", *c, "--model", str(run), "--out", str(tmp_path / "res2.json")]) == 2
    line = _error_line(capsys)
    assert str(weights) in line and "`dskd distill`" in line

    # evaluation result: corrupt JSON
    res.write_text(res.read_text()[:100])
    assert main(["report", str(res)]) == 2
    line = _error_line(capsys)
    assert str(res) in line and "`dskd eval`" in line


KIND = Artefact("dskd-thing", 2, "thing", "dskd thing build", ArtefactError)


def test_sidecar_read_back_and_skip_if_built(tmp_path):
    from dskd.io import write_sidecar

    meta = sidecar(KIND, fingerprint="f", inputs_hash="h1", counts={"n": 3})
    assert list(meta)[-1] == "complete" and meta["format"] == {"name": "dskd-thing", "version": 2}
    write_sidecar(tmp_path, meta)
    assert read_sidecar(tmp_path, KIND)["counts"] == {"n": 3}
    assert is_built(tmp_path, KIND, "h1") and not is_built(tmp_path, KIND, "h2")
    assert not is_built(tmp_path / "none", KIND)
    other = Artefact("dskd-other", 2, "other", "dskd other build")
    with pytest.raises(ArtefactError, match=r"not a other \(format 'dskd-thing'.*rebuild it with `dskd other build`"):
        read_sidecar(tmp_path, other)
    with pytest.raises(ArtefactError, match="format version 2 .this dskd reads 3"):
        read_sidecar(tmp_path, Artefact("dskd-thing", 3, "thing", "x"))
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ArtefactError, match="incomplete thing"):
        read_sidecar(tmp_path, KIND)
    assert not is_built(tmp_path, KIND, "h1")


def test_recorded_inputs_make_any_output_skippable(tmp_path):
    from dskd.io import record_inputs, sidecar_file

    # a folder keeps meta.json; a JSON result file is its own sidecar; another file gets one beside it
    folder, result, plain = tmp_path / "store", tmp_path / "r.json", tmp_path / "prompts.jsonl"
    folder.mkdir()
    assert sidecar_file(folder) == folder / "meta.json" and sidecar_file(result) == result
    assert sidecar_file(plain) == tmp_path / "prompts.jsonl.meta.json"
    result.write_text(json.dumps({**sidecar(KIND), "tasks": {"a": 1}}, indent=1))
    record_inputs(result, KIND, "h1")
    got = json.loads(result.read_text())
    assert got["tasks"] == {"a": 1} and got["inputs_hash"] == "h1" and list(got)[-1] == "complete"
    assert is_built(result, KIND, "h1") and not is_built(result, KIND, "h2")
    plain.write_text('{"text": "x"}\n')
    with pytest.raises(ArtefactError, match="prompts.jsonl: not a thing"):  # no sidecar of its own
        record_inputs(plain, KIND, "h1")
    record_inputs(plain, KIND, "h1", create=True)
    assert is_built(plain, KIND, "h1") and plain.read_text() == '{"text": "x"}\n'
    with pytest.raises(ArtefactError, match="thing not found"):  # a stage that wrote nothing
        record_inputs(folder / "missing", KIND, "h1")


def test_safetensors_check_sees_truncation_and_garbage(tmp_path):
    import torch
    from safetensors.torch import save_file

    f = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(100, 10)}, str(f))
    assert safetensors_problem(f) is None
    check_files(tmp_path, KIND)
    _truncate(f, 0.8)
    assert "truncated" in safetensors_problem(f)
    with pytest.raises(ArtefactError, match=r"a.safetensors: damaged thing file \(truncated"):
        check_files(tmp_path, KIND)
    f.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert "unreadable header" in safetensors_problem(f)
    f.write_bytes(b"abc")
    assert "shorter than a safetensors header" in safetensors_problem(f)
