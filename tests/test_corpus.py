"""The one corpus reader (dskd.corpus): the same rules for the sense corpus and data.text_files."""

from __future__ import annotations

import json

import pytest

from dskd import corpus as C
from dskd.config import from_dict
from dskd.data import DataError, text_windows


def test_txt_paragraphs_and_documents(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("  first para\nstill first \n\n\n second\n \nthird\n")
    assert list(C.file_documents(f, max_chars=0)) == ["first para\nstill first", "second", "third"]
    assert list(C.file_documents(f)) == ["first para\nstill first\n\nsecond\n\nthird"]  # joined up to 4,000
    assert list(C.file_documents(f, max_chars=25)) == ["first para\nstill first", "second\n\nthird"]


def test_jsonl_fields_and_errors_name_the_flag(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"text": "a"}) + "\n\n" + json.dumps({"passage": "b"}) + "\n" + json.dumps({"content": "c"})
    )
    assert list(C.file_documents(f)) == ["a", "b", "c"]
    f.write_text(json.dumps({"title": "x"}) + "\n")
    with pytest.raises(C.CorpusError, match=r"--data.text_files: .*d.jsonl:1"):
        list(C.file_documents(f, flag="--data.text_files"))
    with pytest.raises(C.CorpusError, match="--senses.corpus: no such file"):
        list(C.file_documents(tmp_path / "nope.txt"))


def test_data_text_files_use_the_corpus_reader(tmp_path, tokenizer):
    txt, jl = tmp_path / "t.txt", tmp_path / "d.jsonl"
    txt.write_text("the red car\n\nthe blue bus\n")
    jl.write_text(json.dumps({"passage": "a green tram"}) + "\n")
    cfg = from_dict({"data": {"tasks": [], "text_files": [str(txt), str(jl)], "max_length": 32}})
    got = [tokenizer.decode(w, skip_special_tokens=True).strip() for w in text_windows(cfg.data, tokenizer)]
    assert got == ["the red car", "the blue bus", "a green tram"]  # a .txt paragraph each, as before
    jl.write_text("{not json\n")
    with pytest.raises(DataError, match="--data.text_files: .*d.jsonl:1"):
        text_windows(cfg.data, tokenizer)
