"""Lexicon: sources, symmetry, conflicts, negation normalisation, token mapping, on-disk format, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer

from dskd.__main__ import main
from dskd.config import LexiconConfig
from dskd.lexicon import (
    Lexicon,
    LexiconError,
    NegationNormalizer,
    SourceResult,
    build_lexicon,
    combine,
    parse_source,
    read_kaikki,
    read_mythes,
    read_pairs,
    write_folder_atomic,
)

FIX = Path(__file__).parent / "fixtures" / "lexicon"
KAIKKI = f"kaikki:{FIX / 'kaikki.jsonl'}"
ANTONYMS = f"pairs:{FIX / 'antonyms.txt'}:ant"
TAILS = f"pairs:{FIX / 'tails.txt'}:syn"
WORDNET_FILE = Path("/usr/share/wordnet/data.noun")
MYTHES_FILE = Path("/usr/share/mythes/th_en_US_v2.dat")
needs_wordnet = pytest.mark.skipif(not WORDNET_FILE.is_file(), reason="Debian WordNet (wordnet-base) not installed")
needs_mythes = pytest.mark.skipif(not MYTHES_FILE.is_file(), reason="Debian mythes-en-us not installed")


def ids(tok, word: str) -> tuple[int, ...]:
    return tuple(tok(" " + word, add_special_tokens=False)["input_ids"])


def build(tok, tmp_path: Path, *sources: str, name: str = "lex", **kw) -> Lexicon:
    cfg = LexiconConfig(sources=list(sources), **kw)
    out = build_lexicon(tok, "toy", cfg, tmp_path / name, quiet=True)
    return Lexicon.load(out, tok)


def result(syn=(), ant=(), pos=None) -> SourceResult:
    r = SourceResult()
    for a, b in syn:
        r.add("syn", a, b)
    for a, b in ant:
        r.add("ant", a, b)
    for w, letters in (pos or {}).items():
        for p in letters:
            r.add_pos(w, p)
    return r


# -------------------------------------------------------------------------------------------- sources


def test_kaikki_reads_sense_and_entry_lists_and_skips_other_languages():
    r = read_kaikki(FIX / "kaikki.jsonl")
    assert ("red", "ruby") in r.pairs["syn"] and ("red", "crimson") in r.pairs["syn"]
    assert ("hot", "cold") in r.pairs["ant"] and ("sad", "glad") in r.pairs["ant"]
    assert r.other_language == 1 and r.malformed == 0
    assert r.dropped_words == 1  # "12" is not a word
    assert "a" in r.pos["hot"]


def test_pairs_reader_skips_comments():
    r = read_pairs(FIX / "antonyms.txt", "ant")
    assert r.lines == 6 and r.malformed == 0 and ("good", "bad") in r.pairs["ant"]


@pytest.mark.parametrize(
    ("fixture", "spec", "count", "first"),
    [("pairs_bad.txt", "pairs:{}:ant", 1, 4), ("kaikki_bad.jsonl", "kaikki:{}", 2, 2)],
)
def test_malformed_lines_fail_above_the_share_and_are_reported(
    tokenizer, tmp_path, capsys, fixture, spec, count, first
):
    source = spec.format(FIX / fixture)
    with pytest.raises(
        LexiconError,
        match=rf"{count} of \d+ lines are malformed \(first at line {first}\).*--lexicon.max_malformed_share",
    ):
        build(tokenizer, tmp_path, source)
    cfg = LexiconConfig(sources=[source], max_malformed_share=0.6)
    out = build_lexicon(tokenizer, "toy", cfg, tmp_path / "ok")
    assert f"{count} malformed lines (first at line {first})" in capsys.readouterr().out
    stats = Lexicon.load(out).meta["per_source"][source]
    assert stats["malformed"] == count and stats["first_malformed_line"] == first


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(
        LexiconError, match=r"unknown source.*wordnet, mythes\[:FILE\], kaikki:FILE, pairs:FILE:syn\|ant"
    ):
        parse_source("wiktionary")
    with pytest.raises(LexiconError, match="did you mean 'kaikki'"):
        parse_source("kaiki:x.jsonl")
    with pytest.raises(LexiconError, match="pairs:FILE:syn or pairs:FILE:ant"):
        parse_source(f"pairs:{FIX / 'antonyms.txt'}:hyp")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(LexiconError, match=f"file not found: {missing}"):
        parse_source(f"kaikki:{missing}")
    with pytest.raises(LexiconError, match="file not found"):
        parse_source(f"pairs:{missing}:syn")


# ------------------------------------------------------------------------- symmetry, conflicts, self-pairs


def test_relations_are_symmetric_and_conflicts_and_self_pairs_dropped(tokenizer, tmp_path):
    lex = build(tokenizer, tmp_path, KAIKKI, ANTONYMS, normalize_negation=False)
    c = lex.meta["counts"]
    # kaikki says syn(fast, slow), the pair list ant(fast, slow): dropped, counted
    assert c["conflicts"] == 1
    fast, slow = ids(tokenizer, "fast")[0], ids(tokenizer, "slow")[0]
    assert (slow,) not in lex.synonyms(fast) and (slow,) not in lex.antonyms(fast)
    assert c["self_pairs"] == 1  # syn(fast, fast)
    # kaikki lists only hot -> warm and red -> ruby; the reverse direction exists too
    assert (ids(tokenizer, "hot")[0],) in lex.synonyms(ids(tokenizer, "warm")[0])
    assert (ids(tokenizer, "red")[0],) in lex.synonyms(ids(tokenizer, "ruby")[0])
    for h in lex.heads():
        for kind, get in (("syn", lex.synonyms), ("ant", lex.antonyms)):
            for tail in get(h):
                assert tail != (h,)
                if len(tail) == 1 and tail[0] in lex.heads():
                    assert (h,) in get(tail[0]), (kind, lex.word(h), lex.word(tail[0]))


def test_combine_counts_conflicts_across_sources():
    rel = combine([result(syn=[("big", "large"), ("hot", "cold")]), result(ant=[("cold", "hot")])])
    assert rel.syn == {("big", "large")} and rel.ant == set() and rel.counts["conflicts"] == 1


# -------------------------------------------------------------------------------- negation normalisation


def normalizer(syn=(), ant=(), pos=None) -> NegationNormalizer:
    known = {w for pair in [*syn, *ant] for w in pair}
    return NegationNormalizer(known, {tuple(sorted(p)) for p in ant}, {w: set(p) for w, p in (pos or {}).items()})


def test_negation_sad_unhappy_becomes_antonym_of_happy():
    rel = combine([result(syn=[("sad", "unhappy")], ant=[("happy", "unhappy")])])
    assert ("happy", "sad") in rel.ant
    assert ("sad", "unhappy") not in rel.syn
    assert ("happy", "unhappy") in rel.ant  # the evidence pair itself is kept
    assert rel.counts["normalized"] == 1 and rel.counts["normalized_words"] == 1


def test_negation_antonym_of_negated_word_becomes_synonym():
    rel = combine([result(ant=[("cheerful", "unhappy"), ("happy", "unhappy")])])
    assert ("cheerful", "happy") in rel.syn


def test_negation_parity():
    pos = {"nonunhappy": "a", "unhappy": "a", "happy": "a", "cheerful": "a", "joyful": "a"}
    rel = combine(
        [
            result(
                syn=[("joyful", "nonunhappy"), ("cheerful", "happy")],
                ant=[("happy", "unhappy"), ("sad", "happy")],
                pos=pos,
            )
        ]
    )
    assert ("happy", "joyful") in rel.syn  # two negations: the relation keeps its kind


def test_negation_by_part_of_speech_evidence():
    n = normalizer(syn=[("kind", "nice"), ("unkind", "mean"), ("careless", "sloppy"), ("care", "worry")],
                   pos={"kind": "a", "unkind": "a", "careless": "a", "care": "nv"})  # fmt: skip
    assert n.base("unkind") == ("kind", 1)
    assert n.base("careless") == ("care", 1)
    # no evidence at all: a known base alone is not enough for un- + a noun
    n2 = normalizer(syn=[("kind", "nice"), ("unkind", "mean")])
    assert n2.base("unkind") == ("unkind", 0)


@pytest.mark.parametrize(
    ("word", "base", "pos"),
    [
        ("under", "der", {"under": "ar", "der": "n"}),  # "der" is no adjective
        ("dish", "sh", {"dish": "nv", "sh": "a"}),  # base shorter than 3 characters
        ("index", "dex", {"index": "n", "dex": "n"}),  # nouns, no antonymy
        ("increase", "crease", {"increase": "nv", "crease": "nv"}),  # would break increase/decrease
        ("inform", "form", {"inform": "v", "form": "nv"}),
        ("income", "come", {"income": "n", "come": "v"}),
        ("intense", "tense", {"intense": "a", "tense": "a"}),  # a known false negation
        ("disclosed", "closed", {"disclosed": "a", "closed": "a"}),  # dis- needs attested antonymy
        ("inlet", "let", {"inlet": "a", "let": "a"}),  # "in" never precedes l (il-)
    ],
)
def test_negation_never_splits(word, base, pos):
    n = normalizer(syn=[(word, "x1"), (base, "x2")], ant=[(word, "opposite")], pos=pos)
    assert n.base(word) == (word, 0)


def test_never_split_words_keep_their_relations_in_a_build():
    rel = combine(
        [
            result(
                syn=[("index", "list"), ("dex", "dexedrine"), ("dish", "plate"), ("sh", "hush")],
                ant=[("under", "over"), ("increase", "decrease"), ("der", "die")],
                pos={"index": "n", "dex": "n", "dish": "n", "sh": "a"},
            )
        ]
    )
    assert ("index", "list") in rel.syn and ("dish", "plate") in rel.syn
    assert ("over", "under") in rel.ant and ("decrease", "increase") in rel.ant
    assert rel.counts["normalized"] == 0


def test_negation_switch(tokenizer, tmp_path):
    on = build(tokenizer, tmp_path, KAIKKI, name="on")
    off = build(tokenizer, tmp_path, KAIKKI, name="off", normalize_negation=False)
    sad, happy, unhappy = ids(tokenizer, "sad")[0], ids(tokenizer, "happy")[0], ids(tokenizer, "unhappy")[0]
    assert (happy,) in on.antonyms(sad) and (unhappy,) not in on.synonyms(sad)
    assert (unhappy,) in off.synonyms(sad)
    assert on.meta["counts"]["normalized"] >= 1 and off.meta["counts"]["normalized"] == 0
    assert on.meta["config"]["normalize_negation"] is True and off.meta["config"]["normalize_negation"] is False


# -------------------------------------------------------------------------------------- token mapping


def test_token_mapping_tail_lengths(tokenizer, tmp_path):
    lengths = {w: len(ids(tokenizer, w)) for w in ("red", "crimson", "governmental", "synonymous", "questionable")}
    assert lengths == {"red": 1, "crimson": 1, "governmental": 2, "synonymous": 3, "questionable": 4}
    lex = build(tokenizer, tmp_path, TAILS)
    red = ids(tokenizer, "red")[0]
    syn = lex.synonyms(red)
    assert ids(tokenizer, "crimson") in syn  # 1 token
    assert ids(tokenizer, "governmental") in syn  # 2 tokens, kept as a span
    assert ids(tokenizer, "synonymous") in syn  # 3 tokens
    assert ids(tokenizer, "questionable") not in syn  # 4 tokens: dropped
    assert lex.multi_token_tails() == sorted([ids(tokenizer, "governmental"), ids(tokenizer, "synonymous")])
    # multi-token words are never heads; single and multi-token relations are both kept and counted
    assert set(lex.heads()) == {red, ids(tokenizer, "crimson")[0], ids(tokenizer, "was")[0]}
    c = lex.meta["counts"]
    assert c["single_token_relations"] == 3 and c["multi_token_relations"] == 2 and c["multi_token_tails"] == 2
    assert c["long_words_dropped"] == 1
    # heads shorter than 3 characters are dropped, as tails they stay
    assert ids(tokenizer, "is")[0] not in lex.heads() and lex.synonyms(ids(tokenizer, "was")[0]) == [
        ids(tokenizer, "is")
    ]
    wider = build(tokenizer, tmp_path, TAILS, name="wide", max_tail_tokens=4)
    assert ids(tokenizer, "questionable") in wider.synonyms(red)


def test_refuses_another_tokenizer(tokenizer, tmp_path):
    lex = build(tokenizer, tmp_path, KAIKKI)
    assert lex.tokenizer_fingerprint == lex.meta["tokenizer"]["fingerprint"]
    Lexicon.load(lex.path, make_tokenizer())  # an identical tokenizer is accepted
    with pytest.raises(LexiconError, match="built for another tokenizer"):
        Lexicon.load(lex.path, make_tokenizer(vocab_size=450))


# ----------------------------------------------------------------------------------- format and rebuilds


def test_on_disk_format_and_sidecar(tokenizer, tmp_path):
    lex = build(tokenizer, tmp_path, KAIKKI, ANTONYMS)
    assert sorted(p.name for p in lex.path.iterdir()) == ["meta.json", "relations.json", "words.json"]
    meta = json.loads((lex.path / "meta.json").read_text())
    assert meta["complete"] is True and meta["format"]["name"] == "dskd-lexicon"
    assert [s["spec"] for s in meta["sources"]] == [KAIKKI, ANTONYMS]
    assert meta["config"]["sources"] == [KAIKKI, ANTONYMS]
    for key in ("heads", "syn_relations", "ant_relations", "multi_token_tails", "normalized", "conflicts"):
        assert key in meta["counts"]
    rel = json.loads((lex.path / "relations.json").read_text())
    hot = rel["heads"][str(ids(tokenizer, "hot")[0])]
    assert hot["word"] == "hot" and hot["ant_words"] == ["cold"] and hot["ant"] == [list(ids(tokenizer, "cold"))]
    good = ids(tokenizer, "good")[0]
    assert lex.antonyms(good) == [ids(tokenizer, "bad")] and lex.word(good) == "good"
    assert lex.fingerprint == meta["fingerprint"]


def test_rebuild_with_same_inputs_is_skipped_and_changes_rebuild(tokenizer, tmp_path, capsys):
    src = tmp_path / "pairs.txt"
    src.write_text("hot cold\n")
    cfg = LexiconConfig(sources=[f"pairs:{src}:ant"])
    out = build_lexicon(tokenizer, "toy", cfg, tmp_path / "lex")
    stamp = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    build_lexicon(tokenizer, "toy", cfg, out)
    assert "skipped" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    src.write_text("hot cold\ngood bad\n")
    build_lexicon(tokenizer, "toy", cfg, out, quiet=True)
    assert Lexicon.load(out).meta["counts"]["word_ant"] == 2
    build_lexicon(tokenizer, "toy", LexiconConfig(sources=cfg.sources, min_head_chars=4), out, quiet=True)
    assert Lexicon.load(out).meta["config"]["min_head_chars"] == 4


def test_failed_build_leaves_the_existing_output_whole(tokenizer, tmp_path):
    lex = build(tokenizer, tmp_path, KAIKKI)
    before = {p.name: p.read_bytes() for p in lex.path.iterdir()}
    with pytest.raises(LexiconError):
        build(tokenizer, tmp_path, f"pairs:{FIX / 'pairs_bad.txt'}:ant")
    with pytest.raises(TypeError):
        write_folder_atomic(lex.path, {"relations.json": "{}", "broken.json": 123, "meta.json": "{}"})  # type: ignore[dict-item]
    assert {p.name: p.read_bytes() for p in lex.path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["lex"]  # no temporary folder left behind


def test_refuses_to_replace_a_folder_that_is_not_a_lexicon(tokenizer, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(LexiconError, match="not a dskd lexicon"):
        build_lexicon(tokenizer, "toy", LexiconConfig(sources=[KAIKKI]), out, quiet=True)
    assert (out / "notes.txt").read_text() == "keep me"


def test_load_refuses_incomplete_folder(tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"format": {"name": "dskd-lexicon", "version": 1}, "complete": False}))
    with pytest.raises(LexiconError, match="incomplete"):
        Lexicon.load(d)
    with pytest.raises(LexiconError, match="lexicon folder not found"):
        Lexicon.load(tmp_path / "none")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_build_and_show(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "lex"
    argv = ["lexicon", "build", "--model.teacher", str(tiny_teacher_dir), "--lexicon.sources", f"{KAIKKI},{ANTONYMS}"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "heads" in printed and "negation normalisation" in printed
    assert main(["lexicon", "show", str(out), "hot"]) == 0
    shown = capsys.readouterr().out
    tok = make_tokenizer()
    assert f"head token {ids(tok, 'hot')[0]}" in shown and f"cold {list(ids(tok, 'cold'))}" in shown
    assert main(["lexicon", "show", str(out), "nosuchword"]) == 1
    assert main([*argv, "--out", str(out)]) == 0 and "skipped" in capsys.readouterr().out


def test_cli_bad_source_is_reported_before_loading(capsys, tmp_path):
    assert (
        main(
            [
                "lexicon",
                "build",
                "--model.teacher",
                "no/such/model",
                "--lexicon.sources",
                "wiktionary",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown source" in err and "kaikki:FILE" in err
    missing = tmp_path / "x.txt"
    assert main(["lexicon", "build", "--lexicon.sources", f"pairs:{missing}:syn", "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


# --------------------------------------------------------------------------------- WordNet and mythes


@needs_mythes
def test_mythes_antonym_marks():
    r = read_mythes(MYTHES_FILE, LexiconConfig())
    assert r.malformed == 0
    ant = set(r.pairs["ant"])
    assert ("hot", "cold") in ant and ("good", "bad") in ant and ("increase", "decrease") in ant
    assert ("sad", "glad") in ant
    assert "a" in r.pos["sad"]


@pytest.mark.slow
@needs_wordnet
@needs_mythes
def test_wordnet_mythes_on_smollm2(tmp_path):
    """The default build on the real SmolLM2 tokenizer (tokenizer only; the WordNet scan is cached)."""
    from dskd.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    out = build_lexicon(tok, "smollm2-135m-instruct", LexiconConfig(), tmp_path / "lex", quiet=True)
    lex = Lexicon.load(out, tok)

    def one(word: str) -> int:
        (i,) = ids(tok, word)
        return i

    assert (one("cold"),) in lex.antonyms(one("hot"))
    assert (one("hot"),) in lex.antonyms(one("cold"))
    assert (one("bad"),) in lex.antonyms(one("good"))
    assert (one("decrease"),) in lex.antonyms(one("increase"))
    assert (one("happy"),) in lex.antonyms(one("sad"))
    assert (one("unhappy"),) not in lex.synonyms(one("sad"))
    c = lex.meta["counts"]
    assert c["heads"] > 5000 and c["normalized"] > 1000 and c["multi_token_tails"] > 1000
    assert lex.multi_token_tails() and all(2 <= len(t) <= 3 for t in lex.multi_token_tails())
