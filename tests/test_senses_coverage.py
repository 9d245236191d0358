"""Store coverage counted from tokens (dskd.senses.coverage): the counting rule and its match with built stores."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY_TEXT

from dskd import senses as S
from dskd.config import SenseConfig
from dskd.senses.coverage import coverage_markdown, coverage_row, coverage_rows, gather_keys, store_seen


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cov-corpus")
    (d / "a.txt").write_text(TOY_TEXT)
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in TOY_TEXT.split(". ")[:200]))
    return d


def _cfg(corpus: Path, **kw) -> SenseConfig:
    base = dict(corpus=[str(corpus)], k=3, max_samples=40, max_tokens=2500, seq_len=64, batch_size=4, seed=0)
    return SenseConfig(**{**base, **kw})


def test_coverage_row_counts_by_hand():
    # token:         0  1  2  3  4  5
    seen = np.array([0, 3, 4, 1, 9, 0])
    targets = np.array([1, 1, 2, 3, 5, 4, 4, 4])  # distinct 1, 2, 3, 4, 5; positions weighted
    r = coverage_row(seen, k=3, cap=5, targets=targets, heads=[2, 4, 5])
    assert (r["targets"], r["targets_with_senses"], r["targets_clustered"]) == (5, 4, 2)  # 1,2,3,4 / 2,4
    assert (r["positions"], r["positions_with_senses"], r["positions_clustered"]) == (8, 7, 4)
    assert (r["head_targets"], r["head_targets_with_senses"], r["head_targets_clustered"]) == (3, 2, 2)
    assert (r["head_positions"], r["head_positions_with_senses"], r["head_positions_clustered"]) == (5, 4, 4)
    assert (r["tokens_with_senses"], r["tokens_clustered"]) == (4, 2)
    assert (r["samples"], r["clustered_samples"]) == (3 + 4 + 1 + 5, 4 + 5)  # capped at 5
    # store size: senses min(samples, k) = 3+3+1+3 = 10; the span (1, 3) composes 3 senses, (1, 5) is skipped
    r = coverage_row(seen, 3, 5, targets, [2], tails=[(1, 3), (1, 5)], dim=4)
    assert (r["spans"], r["senses_max"]) == (1, 13)
    assert r["bytes_max"] == 13 * (2 * 4 + 8) + 8 * (6 + 1 + 1) + 8 * S.MAX_SPAN
    rows = coverage_rows(np.array([1, 1, 1, 1, 2]), [2, 4, 10], 3, 5, np.array([1, 2]), [], vocab=3)
    assert [x["targets_clustered"] for x in rows] == [0, 1, 1]
    assert [x["positions_gathered"] for x in rows] == [2, 4, 5]
    assert "5 held" in coverage_markdown(rows, 3)


@pytest.mark.parametrize("key, block_chars", [("actual", 0), ("actual", 700), ("predicted", 0)])
def test_counted_keys_are_the_built_stores(tmp_path, tokenizer, tiny_teacher_dir, corpus, key, block_chars):
    """A store of N positions holds, per token, min(count of its key in the first N counted positions, cap)
    samples: checked against stores built at two sizes from one count at a third, larger one."""
    from dskd.models import load_model

    cfg = _cfg(corpus, key=key, block_chars=block_chars)
    teacher = load_model(str(tiny_teacher_dir), "float32") if key == "predicted" else None
    keys, info = gather_keys(tokenizer, cfg, block_chars, teacher)
    assert keys.size == info["positions"] == 2500
    if key == "actual" and block_chars == 0:
        stream, _ = S.token_stream(tokenizer, cfg.corpus, 2501)
        assert np.array_equal(keys, stream[1:].numpy())
    vocab = len(tokenizer)
    for n in (900, 1700):
        out = S.build_senses(
            str(tiny_teacher_dir), dataclasses.replace(cfg, max_tokens=n), None, tmp_path / f"s{n}", progress=False
        )
        got = store_seen(out, vocab)
        want = np.minimum(np.bincount(keys[:n], minlength=got.size), cfg.max_samples)
        assert np.array_equal(got, want)
        row = coverage_rows(keys, [n], cfg.k, cfg.max_samples, np.arange(vocab), [], vocab, dim=32)[0]
        st = S.SenseStore.open(out)
        assert row["tokens_clustered"] == st.meta["counts"]["tokens_clustered"]
        assert row["tokens_with_senses"] == st.meta["coverage"]["vocab_tokens_with_senses"]
        assert row["samples"] == st.meta["counts"]["samples"]
        assert int(st.offsets[-1]) <= row["senses_max"]


def test_predicted_keys_need_a_teacher(tokenizer, corpus):
    with pytest.raises(S.SenseError, match="--senses.key predicted"):
        gather_keys(tokenizer, _cfg(corpus), 0, None)


def test_command_writes_the_table(tmp_path, tiny_teacher_dir, corpus, capsys):
    """``dskd senses coverage`` on a tiny recipe: its tables, and the check row from a store built at one size."""
    import yaml

    from dskd.__main__ import main

    pairs = tmp_path / "ant.txt"
    pairs.write_text("hot cold\ngood bad\nbig small\nlight dark\n")
    text = corpus / "a.txt"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"teacher": str(tiny_teacher_dir), "student_layers": 2, "trainable_layers": 1},
                "lexicon": {"sources": [f"pairs:{pairs}:ant"]},
                "senses": {"corpus": [str(text)], "k": 2, "max_tokens": 1500, "seq_len": 64, "key": "actual"},
                "data": {"tasks": [], "text_files": [str(text)], "max_length": 32},
            }
        )
    )
    c = ["--config", str(recipe)]
    assert main(["lexicon", "build", *c, "--out", str(tmp_path / "lex"), "--quiet"]) == 0
    assert main(["senses", "build", *c, "--lexicon_dir", str(tmp_path / "lex"), "--out", str(tmp_path / "st")]) == 0
    out = tmp_path / "cov.md"
    args = ["--lexicon_dir", str(tmp_path / "lex"), "--store", str(tmp_path / "st"), "--sizes", "500,1500,99999"]
    assert main(["senses", "coverage", *c, *args, "--out", str(out)]) == 0
    assert out.read_text().startswith("Made by:") and "dskd senses coverage --config" in out.read_text()
    got = json.loads(out.with_suffix(".json").read_text())
    rows, check = got["rows"], got["check"]
    assert [r["positions_gathered"] for r in rows[:2]] == [500, 1500]
    assert rows[2]["positions_gathered"] == got["corpus"]["positions"] < 99999  # the corpus holds fewer
    for name in ("tokens_clustered", "targets_clustered", "head_targets_with_senses", "positions_clustered"):
        assert check[name] == rows[1][name]  # the store was built at 1500 positions
    assert check["bytes_max"] == rows[1]["bytes_max"] and check["spans"] == rows[1]["spans"]
    # key predicted without --teacher_keys: refused in one line, before any tokenizing
    assert main(["senses", "coverage", *c, *args, "--senses.key", "predicted"]) == 2
    # --out: a .md file; a JSON file beside it that is not the command's own is never replaced
    assert main(["senses", "coverage", *c, *args, "--out", str(tmp_path / "cov.txt")]) == 2
    (tmp_path / "mine.json").write_text('{"years": "of work"}')
    assert main(["senses", "coverage", *c, *args, "--out", str(tmp_path / "mine.md")]) == 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"years": "of work"}' and not (tmp_path / "mine.md").exists()
    # a store gathered from other text than the recipe's first positions is refused, naming --store
    (tmp_path / "other.txt").write_text(" ".join(reversed(TOY_TEXT.split())))
    other = ["--senses.corpus", str(tmp_path / "other.txt")]
    assert main(["senses", "coverage", *c, *args, *other]) == 2
    assert "--store" in capsys.readouterr().err
