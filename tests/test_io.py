"""dskd.io: stable hashes and atomic writes of files and folders."""

from __future__ import annotations

import pytest

from dskd.io import atomic_dir, replace_dir, stable_hash, write_text_atomic


def test_stable_hash_ignores_key_order_and_sees_values():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash(None)) == 16


def test_write_text_atomic_replaces_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "sub" / "x.json"
    write_text_atomic(f, "one")
    write_text_atomic(f, "two")
    assert f.read_text() == "two"
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # untouched until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no temporary or old copy left


def test_atomic_dir_error_keeps_the_old_folder(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_replace_dir_restores_the_old_folder_when_the_rename_fails(tmp_path, monkeypatch):
    out, src = tmp_path / "store", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    src.mkdir()
    real_rename = type(src).rename

    def flaky(self, target):
        if self == src:
            raise OSError("disk full")
        return real_rename(self, target)

    monkeypatch.setattr(type(src), "rename", flaky)
    with pytest.raises(OSError):
        replace_dir(src, out)
    assert (out / "old.txt").read_text() == "old"


def test_replace_dir_keeps_a_finished_folder_and_drops_an_unfinished_one(tmp_path):
    out = tmp_path / "lexicon"
    for complete in ("false", "true", "true"):
        with atomic_dir(out) as tmp:
            (tmp / "meta.json").write_text(f'{{"complete": {complete}}}')
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name != "lexicon")
    # the unfinished first folder was dropped; the finished second one was kept beside, under a dated name
    assert len(kept) == 1 and kept[0].startswith("lexicon.replaced-"), kept
    assert '"complete": true' in (tmp_path / kept[0] / "meta.json").read_text()
    assert '"complete": true' in (out / "meta.json").read_text()
