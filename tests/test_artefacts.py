"""The artefact contract (dskd.io) and its pieces on their own. Every stage's output, damaged in one file,
giving one line naming the file and the command that rebuilds it: tests/test_bad_inputs.py."""

from __future__ import annotations

import json

import pytest

from dskd.io import Artefact, ArtefactError, check_files, is_built, read_sidecar, safetensors_problem, sidecar


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# A damaged file of each artefact kind given to the commands that read it: tests/test_bad_inputs.py.


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
