"""Lexical relations: sources -> symmetric word relations -> negation normalisation -> token relations.

Pipeline (section 2 of the method):

1. Read every source into word pairs labelled ``syn`` or ``ant`` (words lower-cased, ``_`` -> space).
   Sources: ``wordnet`` (WordNet 3.0 through nltk; the scan is cached under ``$DSKD_HOME/cache/``),
   ``mythes[:FILE]`` (the mythes thesaurus with its "(antonym)" marks), ``kaikki:FILE`` (Wiktextract
   JSONL) and ``pairs:FILE:syn|ant`` (two words per line, as Dict2Vec ships).
2. Pairs are unordered (so every relation is symmetric); self-pairs are dropped.
3. Negation normalisation: a word made of a base and an odd number of negating affixes (un-, dis-,
   non-, in-/im-/il-/ir-, -less) is replaced by its base and the relation flipped:
   syn(sad, unhappy) -> ant(sad, happy). A word is split only when the base is a known word *and*
   there is evidence that the affix negates it (see :func:`NegationNormalizer.strip_once`), so
   "under", "dish", "index" or "increase" are never split.
4. A pair listed both as synonyms and as antonyms is dropped (counted).
5. Token mapping: a head must be one token when written with a leading space (" hot") and have at
   least ``min_head_chars`` characters; tails may be 1..``max_tail_tokens`` tokens (longer ones are
   dropped); multi-token tails are kept as spans for composed senses. Both single- and multi-token
   relations are stored.

On-disk format (a folder; JSON only, no pickle)::

    relations.json  {"format": {"name": "dskd-lexicon-relations", "version": 1},
                     "heads": {"<token id>": {"word": "hot",
                                              "syn": [[id, ...], ...], "syn_words": ["warm", ...],
                                              "ant": [[id, ...], ...], "ant_words": ["cold", ...]}}}
                    tails are token-id lists of 1..max_tail_tokens ids, sorted by (length, ids);
                    ``*_words`` are the tails' words in the same order.
    words.json      the word-level relations after normalisation and conflict dropping:
                    {"syn": [[a, b], ...], "ant": [[a, b], ...], "tokens": {word: [id, ...]}} with
                    a < b (each pair once); "tokens" holds every related word's token ids (" word").
    meta.json       sidecar: format, dskd_version, config, sources (with file sizes/mtimes),
                    tokenizer spec and fingerprint, counts, per-source statistics, the lexicon
                    fingerprint (hash of relations.json), ``complete: true`` written last.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd.config import DskdError, LexiconConfig, ModelConfig
from dskd.io import (
    Artefact,
    atomic_dir,
    check_files,
    is_built,
    open_artefact,
    read_sidecar,
    write_json,
)
from dskd.io import stable_hash as _sha

FORMAT = {"name": "dskd-lexicon", "version": 1}
RELATIONS_FORMAT = {"name": "dskd-lexicon-relations", "version": 1}
WORDNET_SCAN_VERSION = 1
KINDS = ("syn", "ant")
VALID_SOURCES = ("wordnet", "mythes", "mythes:FILE", "kaikki:FILE", "pairs:FILE:syn", "pairs:FILE:ant")

# Negating prefixes and the letters their base may start with (None: any letter). "in-" assimilates
# to im-/il-/ir- before b, m, p / l / r, so "in" + one of those letters is never a negation.
NEGATING_PREFIXES: tuple[tuple[str, str | None], ...] = (
    ("non-", None),
    ("non", None),
    ("un", None),
    ("dis", None),
    ("im", "bmp"),
    ("il", "l"),
    ("ir", "r"),
    ("in", "acdefghijknoqstuvwxyz"),
)
NEGATING_SUFFIXES = ("less",)
MIN_BASE_CHARS = 3
# Words whose affix looks negating and whose base is a same-POS word, but which do not negate it
# (the part-of-speech evidence alone would split them). Attested antonymy of word and base still wins.
NOT_NEGATIONS = frozenset(
    {
        "inborn", "inbred", "infamous", "inflammable", "ingrown", "inhabitable", "inlaid", "inside",
        "intense", "invaluable", "inward", "priceless", "unloosed", "unloosened", "disannul",
    }
)  # fmt: skip

_WORD_RE = re.compile(r"[a-z](?:[a-z' -]*[a-z])?")
_MYTHES_TAG = re.compile(r"^(.*?)\s*\((similar term|related term|generic term|antonym)\)\s*$")
_MYTHES_POS = {"adj": "a", "noun": "n", "verb": "v", "adv": "r"}
_KAIKKI_POS = {"adj": "a", "noun": "n", "name": "n", "verb": "v", "adv": "r"}


class LexiconError(DskdError, ValueError):
    """A user-facing lexicon error; the message names the flag, source or file."""


ARTEFACT = Artefact(FORMAT["name"], FORMAT["version"], "lexicon folder", "dskd lexicon build", LexiconError)


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source`` value.

    Args:
        text: The spec as given (``pairs:data/ant.txt:ant``).
        kind: ``wordnet``, ``mythes``, ``kaikki`` or ``pairs``.
        path: The file read (None for ``wordnet``).
        relation: ``syn`` or ``ant`` for ``pairs`` sources, else None.
    """

    text: str
    kind: str
    path: Path | None = None
    relation: str | None = None


def _valid_list() -> str:
    return "wordnet, mythes[:FILE], kaikki:FILE, pairs:FILE:syn|ant"


def parse_source(spec: str) -> SourceSpec:
    """Parse one ``--source`` value and check that its file exists.

    Raises:
        LexiconError: an unknown source name (the message lists the valid ones) or a missing file
            (the message names it).
    """
    if spec == "wordnet":
        return SourceSpec(spec, "wordnet")
    if spec == "mythes":
        from dskd import assets

        try:
            return SourceSpec(spec, "mythes", assets.mythes_file())
        except assets.AssetError as e:
            raise LexiconError(f"--lexicon.sources mythes: {e}") from e
    kind, _, rest = spec.partition(":")
    relation = None
    if kind == "pairs":
        path_text, _, relation = rest.rpartition(":")
        if relation not in KINDS or not path_text:
            raise LexiconError(
                f"--lexicon.sources {spec!r}: a pairs source is pairs:FILE:syn or pairs:FILE:ant (valid sources: {_valid_list()})"
            )
        rest = path_text
    elif kind not in ("kaikki", "mythes") or not rest:
        import difflib

        near = difflib.get_close_matches(kind, ["wordnet", "mythes", "kaikki", "pairs"], n=1)
        hint = f"; did you mean {near[0]!r}?" if near and near[0] != kind else ""
        raise LexiconError(f"--lexicon.sources {spec!r}: unknown source{hint} Valid sources: {_valid_list()}")
    path = Path(rest).expanduser()
    if not path.is_file():
        raise LexiconError(f"--lexicon.sources {spec!r}: file not found: {path}")
    return SourceSpec(spec, kind, path, relation)


@functools.lru_cache(maxsize=1 << 20)
def clean_word(word: str) -> str | None:
    """Normalise a lexicon entry: lower-case, ``_`` -> space, collapsed spaces; None if it is not a word
    (digits, symbols)."""
    w = " ".join(word.replace("_", " ").strip().lower().split())
    return w if _WORD_RE.fullmatch(w) else None


@dataclass
class SourceResult:
    """Word pairs read from one source, before normalisation.

    Args:
        pairs: ``{"syn": [(a, b), ...], "ant": [...]}``, words already cleaned, possibly repeated.
        pos: Part-of-speech letters per word where the source says (``a``, ``n``, ``v``, ``r``).
        lines: Lines read (non-blank; for ``wordnet``, synsets scanned).
        malformed: Lines that could not be parsed.
        first_malformed: 1-based number of the first malformed line.
        dropped_words: Entries that were not words (digits, symbols).
        other_language: Kaikki entries in another language, skipped.
    """

    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: {"syn": [], "ant": []})
    pos: dict[str, set[str]] = field(default_factory=dict)
    lines: int = 0
    malformed: int = 0
    first_malformed: int | None = None
    dropped_words: int = 0
    other_language: int = 0

    def add(self, kind: str, a: str, b: str) -> None:
        ca, cb = clean_word(a), clean_word(b)
        if ca is None or cb is None:
            self.dropped_words += 1
            return
        self.pairs[kind].append((ca, cb))

    def add_pos(self, word: str, pos: str | None) -> None:
        w = clean_word(word)
        if w is not None and pos:
            self.pos.setdefault(w, set()).add(pos)

    def bad_line(self, lineno: int) -> None:
        self.malformed += 1
        if self.first_malformed is None:
            self.first_malformed = lineno

    def stats(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "syn_pairs": len(self.pairs["syn"]),
            "ant_pairs": len(self.pairs["ant"]),
            "malformed": self.malformed,
            "first_malformed_line": self.first_malformed,
            "dropped_words": self.dropped_words,
            "other_language": self.other_language,
        }


def _file_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _wordnet_files() -> list[Path]:
    from dskd import assets

    root = assets.wordnet_root()
    d = root / "corpora" / "wordnet"
    if d.is_dir():
        return sorted(p for p in d.iterdir() if p.is_file())
    return [root / "corpora" / "wordnet.zip"]


def _wordnet_identity() -> list[dict[str, Any]]:
    try:
        return [_file_identity(p) for p in _wordnet_files()]
    except DskdError as e:
        raise LexiconError(f"--lexicon.sources wordnet: {e}") from e


def wordnet_scan(show_progress: bool = True) -> dict[str, Any]:
    """All WordNet relations, from the cache when the WordNet files are unchanged.

    The cache (``$DSKD_HOME/cache/wordnet-scan-<key>.json``) is keyed by the WordNet files' sizes and
    mtimes and the scan version.

    Returns:
        ``{"syn": [[a, b], ...]`` (lemmas sharing a synset), ``"near": [...]`` (adjective similar-to and
        also-see links), ``"ant": [...]`` (lemma antonyms), ``"pos": {word: letters}``, ``"synsets": n}``;
        words as WordNet spells them (``ice_cream``).
    """
    from dskd import assets

    key = _sha({"version": WORDNET_SCAN_VERSION, "files": _wordnet_identity()})
    cache = assets.dskd_home() / "cache" / f"wordnet-scan-{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt below
    from tqdm import tqdm

    wn = assets.wordnet()
    syn: set[tuple[str, str]] = set()
    near: set[tuple[str, str]] = set()
    ant: set[tuple[str, str]] = set()
    pos: dict[str, set[str]] = {}
    n = 0
    for s in tqdm(wn.all_synsets(), total=117_659, desc="scan WordNet", unit="synset", disable=not show_progress):
        n += 1
        p = "a" if s.pos() in ("a", "s") else s.pos()
        names = [lemma.name() for lemma in s.lemmas()]
        for i, a in enumerate(names):
            pos.setdefault(a, set()).add(p)
            for b in names[i + 1 :]:
                syn.add((a, b))
        for lemma in s.lemmas():
            for other in lemma.antonyms():
                ant.add((lemma.name(), other.name()))
        if p == "a":
            for other in s.similar_tos() + s.also_sees():
                for a in names:
                    for lemma in other.lemmas():
                        near.add((a, lemma.name()))
    data = {
        "synsets": n,
        "syn": sorted(syn),
        "near": sorted(near),
        "ant": sorted(ant),
        "pos": {w: "".join(sorted(ps)) for w, ps in sorted(pos.items())},
    }
    write_json(cache, data, indent=None)  # a concurrent reader sees the old file or the whole new one
    return data


def read_wordnet(cfg: LexiconConfig, show_progress: bool = True) -> SourceResult:
    """Synonyms (shared synsets, plus similar-to/also-see links when ``near_synonyms``) and antonyms."""
    scan = wordnet_scan(show_progress)
    r = SourceResult(lines=scan["synsets"])
    for a, b in scan["syn"]:
        r.add("syn", a, b)
    if cfg.near_synonyms:
        for a, b in scan["near"]:
            r.add("syn", a, b)
    for a, b in scan["ant"]:
        r.add("ant", a, b)
    for w, letters in scan["pos"].items():
        for letter in letters:
            r.add_pos(w, letter)
    return r


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            yield i, line.rstrip("\n")


def read_mythes(path: Path, cfg: LexiconConfig) -> SourceResult:
    """A mythes thesaurus (``.dat``): ``word|n`` followed by n lines ``(pos)|term|term (tag)|...``.

    Plain terms are synonyms; ``(similar term)`` and, on adjective lines, ``(related term)`` are
    synonyms when ``near_synonyms``; ``(antonym)`` marks antonyms; ``(generic term)`` is skipped.
    """
    r = SourceResult()
    head: str | None = None
    left = 0
    for lineno, line in _lines(path):
        if not line.strip() or (lineno == 1 and "|" not in line):
            continue  # the first line names the encoding
        r.lines += 1
        if left > 0 and line.startswith("("):
            left -= 1
            fields = line.split("|")
            pos_tag = fields[0].strip("()").strip()
            pos = _MYTHES_POS.get(pos_tag)
            assert head is not None
            r.add_pos(head, pos)
            for term in fields[1:]:
                m = _MYTHES_TAG.match(term)
                word, tag = (m.group(1), m.group(2)) if m else (term, None)
                if not word.strip():
                    continue
                if tag is None:
                    r.add("syn", head, word)
                    r.add_pos(word, pos)
                elif tag == "antonym":
                    r.add("ant", head, word)
                elif cfg.near_synonyms and (tag == "similar term" or (tag == "related term" and pos == "a")):
                    r.add("syn", head, word)
            continue
        parts = line.rsplit("|", 1)
        if len(parts) == 2 and parts[1].strip().isdigit() and parts[0].strip():
            if left > 0:
                r.bad_line(lineno)  # the previous entry announced more sense lines than it had
            head, left = parts[0], int(parts[1])
        else:
            r.bad_line(lineno)
            left = 0
    return r


def _kaikki_words(items: Any) -> Iterator[str] | None:
    if items is None:
        return iter(())
    if not isinstance(items, list):
        return None
    out = []
    for it in items:
        if isinstance(it, dict) and isinstance(it.get("word"), str):
            out.append(it["word"])
        elif isinstance(it, str):
            out.append(it)
        else:
            return None
    return iter(out)


def read_kaikki(path: Path) -> SourceResult:
    """Wiktextract/Kaikki JSONL: one entry per line with ``word``, ``lang``, ``pos`` and ``senses``;
    the ``synonyms``/``antonyms`` lists of each sense and of the entry itself are read. Entries in
    another language than English are skipped."""
    r = SourceResult()
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        r.lines += 1
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            r.bad_line(lineno)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("word"), str):
            r.bad_line(lineno)
            continue
        lang, code = obj.get("lang"), obj.get("lang_code")
        if (lang is not None and lang != "English") or (code is not None and code != "en"):
            r.other_language += 1
            continue
        senses = obj.get("senses", [])
        if not isinstance(senses, list) or not all(isinstance(s, dict) for s in senses):
            r.bad_line(lineno)
            continue
        found: dict[str, list[str]] = {"syn": [], "ant": []}
        ok = True
        for holder in [obj, *senses]:
            for kind, key in (("syn", "synonyms"), ("ant", "antonyms")):
                words = _kaikki_words(holder.get(key))
                if words is None:
                    ok = False
                    break
                found[kind].extend(words)
        if not ok:
            r.bad_line(lineno)
            continue
        head = obj["word"]
        r.add_pos(head, _KAIKKI_POS.get(str(obj.get("pos", ""))))
        for kind in KINDS:
            for w in found[kind]:
                r.add(kind, head, w)
    return r


def read_pairs(path: Path, relation: str) -> SourceResult:
    """Two words per line (separated by a tab, or by white space when there is no tab, as Dict2Vec
    ships); blank lines and ``#`` comments are skipped."""
    r = SourceResult()
    for lineno, line in _lines(path):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        r.lines += 1
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [f.strip() for f in fields]
        if len(fields) != 2 or not all(fields):
            r.bad_line(lineno)
            continue
        r.add(relation, fields[0], fields[1])
    return r


def read_source(src: SourceSpec, cfg: LexiconConfig, show_progress: bool = True) -> SourceResult:
    """Read one source and enforce ``max_malformed_share``.

    Raises:
        LexiconError: more than ``cfg.max_malformed_share`` of the source's lines are malformed; the
            message names the file, the count and the first offending line.
    """
    if src.kind == "wordnet":
        return read_wordnet(cfg, show_progress)
    assert src.path is not None
    if src.kind == "mythes":
        r = read_mythes(src.path, cfg)
    elif src.kind == "kaikki":
        r = read_kaikki(src.path)
    else:
        assert src.relation is not None
        r = read_pairs(src.path, src.relation)
    if r.malformed and r.malformed / max(1, r.lines) > cfg.max_malformed_share:
        raise LexiconError(
            f"--lexicon.sources {src.text!r}: {src.path}: {r.malformed} of {r.lines} lines are malformed "
            f"(first at line {r.first_malformed}), more than --lexicon.max_malformed_share {cfg.max_malformed_share}"
        )
    return r


# --------------------------------------------------------------------------------------------------
# Word relations and negation normalisation


class NegationNormalizer:
    """Map a word to (base, number of negations), e.g. ``unhappy -> (happy, 1)``.

    A word ``w`` = affix + ``b`` is a negation of ``b`` only when ``b`` is a known word (it occurs in
    the sources), has at least 3 characters, the affix fits its first letter (im- before b/m/p, il-
    before l, ir- before r, in- before the others) and there is evidence that the affix negates it:

    - the sources list ``w`` and ``b`` as antonyms (unhappy/happy, illegal/legal, dislike/like), or
    - both are adjectives for un-/in-/im-/il-/ir- (non-: any shared part of speech; dis-: never,
      "disclosed" is no negation of "closed"), or ``w`` is an adjective and ``b`` a noun or verb for
      -less (careless/care); and ``w`` is not in :data:`NOT_NEGATIONS`.

    So "under" (der is no word), "dish" (base too short), "index" (dex is not an adjective) and
    "increase" (crease is not an adjective) are never split. Stripping repeats on the base, so the
    parity of the count decides whether a relation flips.
    """

    def __init__(self, known: set[str], antonyms: set[tuple[str, str]], pos: dict[str, set[str]]) -> None:
        self.known = known
        self.antonyms = antonyms
        self.pos = pos
        self._memo: dict[str, tuple[str, int]] = {}

    def _attested(self, w: str, b: str) -> bool:
        return (min(w, b), max(w, b)) in self.antonyms

    def strip_once(self, w: str) -> str | None:
        """The base of ``w`` if ``w`` negates it with one affix, else None."""
        pos_w = self.pos.get(w, set())
        for prefix, first in NEGATING_PREFIXES:
            if not w.startswith(prefix):
                continue
            b = w[len(prefix) :]
            if len(b) < MIN_BASE_CHARS or b not in self.known or (first is not None and b[0] not in first):
                continue
            if self._attested(w, b):
                return b
            if w in NOT_NEGATIONS:
                continue
            if prefix == "dis":
                continue  # dis- + adjective is too often no negation (disclosed, discharged, dissolved)
            shared = pos_w & self.pos.get(b, set())
            if ("a" in shared) or (prefix.startswith("non") and shared):
                return b
        for suffix in NEGATING_SUFFIXES:
            if not w.endswith(suffix):
                continue
            b = w[: -len(suffix)]
            if len(b) < MIN_BASE_CHARS or b not in self.known:
                continue
            if self._attested(w, b):
                return b
            if w not in NOT_NEGATIONS and "a" in pos_w and self.pos.get(b, set()) & {"n", "v"}:
                return b
        return None

    def base(self, w: str) -> tuple[str, int]:
        """(base, negations): ``w`` with every negating affix stripped, and how many were stripped."""
        if w in self._memo:
            return self._memo[w]
        self._memo[w] = (w, 0)  # guards against cycles
        b = self.strip_once(w)
        if b is not None:
            base, n = self.base(b)
            self._memo[w] = (base, n + 1)
        return self._memo[w]


@dataclass
class WordRelations:
    """Symmetric word relations: each pair once as (a, b) with a < b."""

    syn: set[tuple[str, str]]
    ant: set[tuple[str, str]]
    counts: dict[str, int]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def combine(results: Iterable[SourceResult], normalize_negation: bool = True) -> WordRelations:
    """Merge source pairs into symmetric relations: drop self-pairs, normalise negations, drop conflicts.

    Args:
        results: What the sources read.
        normalize_negation: Replace negated words by their base and flip relations by parity.

    Returns:
        The relations and counts: ``self_pairs`` dropped, ``normalized`` (distinct relations changed
        by normalisation), ``normalized_words`` (words replaced), ``conflicts`` (pairs listed both as
        synonyms and antonyms, dropped).
    """
    rel: dict[str, set[tuple[str, str]]] = {"syn": set(), "ant": set()}
    pos: dict[str, set[str]] = {}
    self_pairs = 0
    for r in results:
        for kind in KINDS:
            for a, b in r.pairs[kind]:
                if a == b:
                    self_pairs += 1
                else:
                    rel[kind].add(_pair(a, b))
        for w, ps in r.pos.items():
            pos.setdefault(w, set()).update(ps)
    counts = {"raw_syn": len(rel["syn"]), "raw_ant": len(rel["ant"])}
    normalized = 0
    replaced: set[str] = set()
    if normalize_negation:
        known = {w for kind in KINDS for pair in rel[kind] for w in pair}
        neg = NegationNormalizer(known, rel["ant"], pos)
        out: dict[str, set[tuple[str, str]]] = {"syn": set(), "ant": set()}
        for kind in KINDS:
            for a, b in rel[kind]:
                (ba, na), (bb, nb) = neg.base(a), neg.base(b)
                # A pair of a word and its own base is the evidence itself (ant(happy, unhappy)): kept.
                if na + nb == 0 or ba == b or bb == a:
                    out[kind].add((a, b))
                    continue
                normalized += 1
                replaced.update(w for w, n in ((a, na), (b, nb)) if n)
                new_kind = kind if (na + nb) % 2 == 0 else ("ant" if kind == "syn" else "syn")
                if ba == bb:
                    self_pairs += 1
                else:
                    out[new_kind].add(_pair(ba, bb))
        rel = out
    conflicts = rel["syn"] & rel["ant"]
    counts.update(
        self_pairs=self_pairs,
        normalized=normalized,
        normalized_words=len(replaced),
        conflicts=len(conflicts),
    )
    syn, ant = rel["syn"] - conflicts, rel["ant"] - conflicts
    counts.update(word_syn=len(syn), word_ant=len(ant))
    return WordRelations(syn, ant, counts)


# --------------------------------------------------------------------------------------------------
# Token mapping


@dataclass
class TokenRelations:
    """Token-level relations: head token id -> kind -> {tail ids: tail word}."""

    heads: dict[int, dict[str, dict[tuple[int, ...], str]]]
    head_words: dict[int, str]
    word_ids: dict[str, tuple[int, ...]]
    counts: dict[str, int]


def encode_words(tokenizer, words: list[str], show_progress: bool = True) -> dict[str, tuple[int, ...]]:
    """Token ids of each word written with a leading space, without special tokens."""
    from tqdm import tqdm

    ids: dict[str, tuple[int, ...]] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers: skip the Python wrapper
    step = 20_000
    for i in tqdm(
        range(0, len(words), step), desc="tokenize", unit="chunk", disable=not show_progress or len(words) < step
    ):
        chunk = words[i : i + step]
        texts = [" " + w for w in chunk]
        if backend is not None:
            enc = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids.update(zip(chunk, map(tuple, enc), strict=True))
    return ids


def map_tokens(tokenizer, words: WordRelations, cfg: LexiconConfig, show_progress: bool = True) -> TokenRelations:
    """Map word relations to the tokenizer (see the module docstring for the rules)."""
    vocab = sorted({w for pairs in (words.syn, words.ant) for pair in pairs for w in pair})
    ids = encode_words(tokenizer, vocab, show_progress)
    head_ok = {w: len(ids[w]) == 1 and len(w) >= cfg.min_head_chars for w in vocab}
    tail_ok = {w: 1 <= len(ids[w]) <= cfg.max_tail_tokens for w in vocab}
    heads: dict[int, dict[str, dict[tuple[int, ...], str]]] = {}
    head_words: dict[int, str] = {}
    for kind, pairs in (("syn", words.syn), ("ant", words.ant)):
        for a, b in pairs:
            for h, t in ((a, b), (b, a)):
                if not (head_ok[h] and tail_ok[t]):
                    continue
                hid = ids[h][0]
                if ids[t] == (hid,):
                    continue
                entry = heads.setdefault(hid, {"syn": {}, "ant": {}})
                entry[kind].setdefault(ids[t], t)
                head_words[hid] = h
    token_conflicts = 0
    for entry in heads.values():
        both = entry["syn"].keys() & entry["ant"].keys()
        token_conflicts += len(both)
        for t in both:
            del entry["syn"][t], entry["ant"][t]
    heads = {h: e for h, e in heads.items() if e["syn"] or e["ant"]}
    tails = [t for e in heads.values() for k in KINDS for t in e[k]]
    counts = {
        "words": len(vocab),
        "single_token_words": sum(len(ids[w]) == 1 for w in vocab),
        "short_heads_dropped": sum(len(ids[w]) == 1 and len(w) < cfg.min_head_chars for w in vocab),
        "long_words_dropped": sum(len(ids[w]) > cfg.max_tail_tokens for w in vocab),
        "heads": len(heads),
        "syn_relations": sum(len(e["syn"]) for e in heads.values()),
        "ant_relations": sum(len(e["ant"]) for e in heads.values()),
        "single_token_relations": sum(len(t) == 1 for t in tails),
        "multi_token_relations": sum(len(t) > 1 for t in tails),
        "multi_token_tails": len({t for t in tails if len(t) > 1}),
        "token_conflicts": token_conflicts,
    }
    return TokenRelations(heads, {h: head_words[h] for h in heads}, ids, counts)


# --------------------------------------------------------------------------------------------------
# Build and load


def _sources(cfg: LexiconConfig) -> list[SourceSpec]:
    specs = [parse_source(s) for s in cfg.sources]
    seen: set[str] = set()
    for s in specs:
        if s.text in seen:
            raise LexiconError(f"--lexicon.sources {s.text!r} is given twice")
        seen.add(s.text)
    return specs


def _source_identity(src: SourceSpec) -> dict[str, Any]:
    if src.kind == "wordnet":
        return {"spec": src.text, "kind": "wordnet", "files": _wordnet_identity()}
    assert src.path is not None
    return {"spec": src.text, "kind": src.kind, "relation": src.relation, **_file_identity(src.path)}


def _tail_sort_key(t: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    return (len(t), t)


def _relations_json(tok: TokenRelations) -> str:
    heads = {}
    for h in sorted(tok.heads):
        e = tok.heads[h]
        item: dict[str, Any] = {"word": tok.head_words[h]}
        for kind in KINDS:
            tails = sorted(e[kind], key=_tail_sort_key)
            item[kind] = [list(t) for t in tails]
            item[f"{kind}_words"] = [e[kind][t] for t in tails]
        heads[str(h)] = item
    return json.dumps({"format": RELATIONS_FORMAT, "heads": heads}, separators=(",", ":"))


def _read_meta(out: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_lexicon_folder(out: Path) -> bool:
    meta = _read_meta(out)
    return meta is not None and meta.get("format", {}).get("name") == FORMAT["name"]


def write_folder_atomic(out: Path, files: dict[str, str]) -> None:
    """Write ``files`` (name -> text; ``meta.json`` last) into a temporary sibling of ``out`` and rename
    it over ``out``, so an existing folder is replaced whole or not at all.

    Raises:
        LexiconError: ``out`` exists, is not empty and is not a dskd lexicon (it is never replaced).
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_lexicon_folder(out))):
        raise LexiconError(f"--out {out}: exists and is not a dskd lexicon folder; refusing to replace it")
    with atomic_dir(out) as tmp:
        for name in sorted(files, key=lambda n: n == "meta.json"):
            (tmp / name).write_text(files[name])


def build_lexicon(
    tokenizer,
    tokenizer_spec: str,
    cfg: LexiconConfig,
    out: Path,
    force: bool = False,
    *,
    quiet: bool = False,
) -> Path:
    """Build a lexicon folder (format in the module docstring); return at once when ``out`` already holds
    a complete lexicon built from the same sources (same file sizes/mtimes), options and tokenizer.

    Args:
        tokenizer: The teacher's tokenizer (a Hugging Face tokenizer).
        tokenizer_spec: The model spec the tokenizer came from (recorded in the sidecar).
        cfg: Sources and options.
        out: Output folder; replaced atomically.
        force: Rebuild even when ``out`` is up to date.
        quiet: Print nothing (no progress bars, no counts).

    Returns:
        ``out``.

    Raises:
        LexiconError: a bad source (unknown, missing file, too many malformed lines) or an ``out`` that
            is not a lexicon folder.
    """
    from dskd import __version__
    from dskd.models import tokenizer_fingerprint

    log: Callable[[str], None] = (lambda _m: None) if quiet else (lambda m: print(m, flush=True))
    out = Path(out)
    t0 = time.time()
    specs = _sources(cfg)  # every source checked before any long work
    tok_fp = tokenizer_fingerprint(tokenizer)
    config = dataclasses.asdict(cfg)
    identities = [_source_identity(s) for s in specs]
    key = _sha({"format": FORMAT, "config": config, "tokenizer": tok_fp, "sources": identities})
    if not force and is_built(out, ARTEFACT, key, field="inputs_key") and (out / "relations.json").is_file():
        log(f"lexicon: {out} is up to date (same sources, options and tokenizer); skipped")
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_lexicon_folder(out))):
        raise LexiconError(f"--out {out}: exists and is not a dskd lexicon folder; refusing to replace it")

    per_source: dict[str, dict[str, Any]] = {}
    results = []
    for s in specs:
        ts = time.time()
        r = read_source(s, cfg, show_progress=not quiet)
        if s.path is not None and not any(r.pairs.values()):
            raise LexiconError(f"--lexicon.sources {s.text!r}: {s.path}: no word pairs in it ({r.lines} lines)")
        per_source[s.text] = {**r.stats(), "seconds": round(time.time() - ts, 2)}
        results.append(r)
        warn = f"; {r.malformed} malformed lines (first at line {r.first_malformed})" if r.malformed else ""
        log(
            f"  source {s.text}: {r.lines} lines, {len(r.pairs['syn'])} synonym and {len(r.pairs['ant'])} "
            f"antonym pairs{warn}"
        )
    source_words = {
        s.text: {w for kind in r.pairs.values() for pair in kind for w in pair}
        for s, r in zip(specs, results, strict=True)
    }
    words = combine(results, cfg.normalize_negation)
    del results
    tok = map_tokens(tokenizer, words, cfg, show_progress=not quiet)
    _check_maps_to_tokens(specs, source_words, tok, cfg)
    counts = {**words.counts, **tok.counts}
    relations = _relations_json(tok)
    words_json = json.dumps(
        {
            "syn": [list(p) for p in sorted(words.syn)],
            "ant": [list(p) for p in sorted(words.ant)],
            "tokens": {w: list(t) for w, t in sorted(tok.word_ids.items())},
        },
        separators=(",", ":"),
    )
    fingerprint = hashlib.sha256(relations.encode()).hexdigest()[:16]
    meta = {
        "format": FORMAT,
        "dskd_version": __version__,
        "config": config,
        "sources": identities,
        "tokenizer": {"spec": tokenizer_spec, "fingerprint": tok_fp, "vocab_size": len(tokenizer)},
        "tokenizer_fingerprint": tok_fp,
        "inputs_key": key,
        "counts": counts,
        "per_source": per_source,
        "fingerprint": fingerprint,
        "seconds": round(time.time() - t0, 2),
        "complete": True,
    }
    write_folder_atomic(
        out, {"relations.json": relations, "words.json": words_json, "meta.json": json.dumps(meta, indent=2)}
    )
    log(format_counts(counts))
    log(f"lexicon: wrote {out} in {time.time() - t0:.1f}s (fingerprint {fingerprint})")
    return out


def _check_maps_to_tokens(
    specs: list[SourceSpec], source_words: dict[str, set[str]], tok: TokenRelations, cfg: LexiconConfig
) -> None:
    """Refuse a lexicon with no head, and a file source none of whose words is a head of this tokenizer
    (a single token of at least ``min_head_chars`` characters): most likely another language or the
    wrong file. Nothing is written then.

    Raises:
        LexiconError: naming the source (and its file) and how many of its words were tried.
    """

    def is_head(w: str) -> bool:
        ids = tok.word_ids.get(w)
        return ids is not None and len(ids) == 1 and len(w) >= cfg.min_head_chars

    for s in specs:
        words = source_words.get(s.text, set())
        if s.path is not None and words and not any(is_head(w) for w in words):
            raise LexiconError(
                f"--lexicon.sources {s.text!r}: {s.path}: none of its {len(words):,} words is a single token "
                f"of the tokenizer (of at least --lexicon.min_head_chars {cfg.min_head_chars} characters), so it "
                "gives no relation; is it the right file for this teacher?"
            )
    if not tok.heads:
        raise LexiconError(
            f"--lexicon.sources {','.join(s.text for s in specs)}: no word of the sources maps to a head token "
            "of the tokenizer; the lexicon would be empty (nothing written)"
        )


def format_counts(counts: dict[str, int]) -> str:
    """A few lines summarising a build's counts."""
    c = counts
    return "\n".join(
        [
            f"  word relations: {c['word_syn']} synonym and {c['word_ant']} antonym pairs "
            f"(from {c['raw_syn']} / {c['raw_ant']}; {c['self_pairs']} self-pairs and {c['conflicts']} "
            f"syn/ant conflicts dropped)",
            f"  negation normalisation: {c['normalized']} relations changed ({c['normalized_words']} words "
            "replaced by their base)",
            f"  tokens: {c['heads']} heads, {c['syn_relations']} synonym and {c['ant_relations']} antonym "
            f"relations ({c['single_token_relations']} single-token, {c['multi_token_relations']} multi-token; "
            f"{c['multi_token_tails']} distinct multi-token tails)",
            f"  dropped: {c['long_words_dropped']} words longer than the tail limit, {c['short_heads_dropped']} "
            f"heads shorter than the minimum, {c['token_conflicts']} token-level conflicts",
        ]
    )


class Lexicon:
    """A built lexicon, read from its folder.

    Attributes:
        path: The folder.
        meta: The sidecar (``meta.json``).
        tokenizer_fingerprint: Fingerprint of the tokenizer it was built for.
        fingerprint: Hash of ``relations.json``.
    """

    def __init__(self, path: Path, meta: dict[str, Any], heads: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta
        self.tokenizer_fingerprint: str = meta["tokenizer_fingerprint"]
        self.fingerprint: str = meta["fingerprint"]
        self._rel: dict[int, dict[str, list[tuple[int, ...]]]] = {}
        self._words: dict[int, dict[str, list[str]]] = {}
        self._head_word: dict[int, str] = {}
        for h, e in heads.items():
            hid = int(h)
            self._rel[hid] = {k: [tuple(t) for t in e[k]] for k in KINDS}
            self._words[hid] = {k: list(e[f"{k}_words"]) for k in KINDS}
            self._head_word[hid] = e["word"]
        self._by_word = {w: h for h, w in self._head_word.items()}

    @classmethod
    def load(cls, path: str | Path, tokenizer=None) -> Lexicon:
        """Read a lexicon folder.

        Args:
            path: The folder written by :func:`build_lexicon`.
            tokenizer: When given, its fingerprint must match the one the lexicon was built for.

        Raises:
            LexiconError: missing or incomplete folder, unknown format, or another tokenizer.
        """
        path = Path(path)
        meta = read_sidecar(path, ARTEFACT)
        if tokenizer is not None:
            from dskd.models import tokenizer_fingerprint

            fp = tokenizer_fingerprint(tokenizer)
            if fp != meta.get("tokenizer_fingerprint"):
                raise LexiconError(
                    f"{path}: built for another tokenizer ({meta.get('tokenizer', {}).get('spec')!r}, fingerprint "
                    f"{meta.get('tokenizer_fingerprint')}) than the one given (fingerprint {fp}); rebuild it with "
                    "`dskd lexicon build --model.teacher ...` for this teacher"
                )
        check_files(path, ARTEFACT, ["relations.json", "words.json"])
        return open_artefact(
            path, ARTEFACT, lambda m: cls(path, m, json.loads((path / "relations.json").read_text())["heads"]), False
        )

    def synonyms(self, token_id: int) -> list[tuple[int, ...]]:
        """Synonym tails of a head token (token-id tuples of 1..max_tail_tokens ids; [] if none)."""
        return list(self._rel.get(token_id, {}).get("syn", []))

    def antonyms(self, token_id: int) -> list[tuple[int, ...]]:
        """Antonym tails of a head token (token-id tuples of 1..max_tail_tokens ids; [] if none)."""
        return list(self._rel.get(token_id, {}).get("ant", []))

    def heads(self) -> list[int]:
        """Head token ids with any relation, sorted."""
        return sorted(self._rel)

    def multi_token_tails(self) -> list[tuple[int, ...]]:
        """Distinct tails of two or more tokens, sorted."""
        return sorted({t for e in self._rel.values() for k in KINDS for t in e[k] if len(t) > 1})

    def head_of(self, word: str) -> int | None:
        """The head token id of a word (as stored: lower case), or None."""
        return self._by_word.get(word)

    def word(self, token_id: int) -> str | None:
        """The word of a head token, or None."""
        return self._head_word.get(token_id)

    def tail_words(self, token_id: int, kind: str) -> list[str]:
        """Words of the tails of ``kind`` (``syn`` or ``ant``), in the order of :meth:`synonyms` /
        :meth:`antonyms`."""
        return list(self._words.get(token_id, {}).get(kind, []))

    def word_relations(self, word: str) -> dict[str, Any]:
        """Word-level relations of any word (also multi-token ones) from ``words.json``.

        Returns:
            ``{"tokens": ids of " word" or None, "syn": [(word, ids), ...], "ant": [...]}``.
        """
        data = json.loads((self.path / "words.json").read_text())
        tokens = data["tokens"]
        out: dict[str, Any] = {"tokens": tokens.get(word)}
        for kind in KINDS:
            others = sorted({b if a == word else a for a, b in data[kind] if word in (a, b)})
            out[kind] = [(w, tokens.get(w)) for w in others]
        return out


# --------------------------------------------------------------------------------------------------
# CLI


def lexicon_build_command(
    model: ModelConfig, lexicon: LexiconConfig, out: Path, force: bool = False, quiet: bool = False
) -> Path:
    """Build synonym/antonym relations for a teacher's tokenizer.

    Reads the lexical sources, makes relations symmetric, drops self-pairs and pairs that are both
    synonyms and antonyms, normalises negations (syn(sad, unhappy) -> ant(sad, happy)), then maps
    words to tokens: heads are single tokens written with a leading space, tails 1..3 tokens.
    Writes OUT/relations.json, OUT/words.json and OUT/meta.json atomically; a rebuild with the
    same inputs returns at once.

    Sources (--lexicon.sources): wordnet | mythes[:FILE] | kaikki:FILE (Wiktextract JSONL) | pairs:FILE:syn|ant
    Example: dskd lexicon build --lexicon.sources wordnet,mythes --out lexicons/smollm2

    Args:
        model: Teacher whose tokenizer is used (``teacher``, ``trust_remote_code``).
        lexicon: Lexical relations.
        out: Output folder (replaced atomically).
        force: Rebuild even when ``out`` is up to date.
        quiet: Print nothing but errors.
    """
    _sources(lexicon)  # bad sources are reported before the tokenizer loads
    from dskd.models import load_tokenizer

    t0 = time.time()
    tokenizer = load_tokenizer(model.teacher, model.trust_remote_code)
    if not quiet:
        print(f"lexicon: tokenizer of {model.teacher} ({len(tokenizer)} tokens) loaded in {time.time() - t0:.1f}s")
    return build_lexicon(tokenizer, model.teacher, lexicon, Path(out), force=force, quiet=quiet)


def _fmt_tails(ids: list[tuple[int, ...]], words: list[str]) -> str:
    return ", ".join(f"{w} {list(t)}" for t, w in zip(ids, words, strict=True)) or "-"


def lexicon_show_command(path: Path, word: str, /, as_json: bool = False) -> int:
    """Print a word's synonyms and antonyms with their token ids.

    For a head (a single-token word) the token-level relations are shown; for any other word the
    word-level relations it has in the lexicon.
    Example: dskd lexicon show lexicons/smollm2 hot

    Args:
        path: A lexicon folder written by ``dskd lexicon build``.
        word: The word to look up (lower-cased as the lexicon stores words).
        as_json: Print JSON instead of text.
    """
    lex = Lexicon.load(path)
    word = clean_word(word) or word.lower()
    hid = lex.head_of(word)
    if hid is not None:
        res = {
            "word": word,
            "token_id": hid,
            "synonyms": [[w, list(t)] for t, w in zip(lex.synonyms(hid), lex.tail_words(hid, "syn"), strict=True)],
            "antonyms": [[w, list(t)] for t, w in zip(lex.antonyms(hid), lex.tail_words(hid, "ant"), strict=True)],
        }
        if as_json:
            print(json.dumps(res, indent=2))
        else:
            print(f"{word}: head token {hid}")
            print(f"  synonyms ({len(res['synonyms'])}): {_fmt_tails(lex.synonyms(hid), lex.tail_words(hid, 'syn'))}")
            print(f"  antonyms ({len(res['antonyms'])}): {_fmt_tails(lex.antonyms(hid), lex.tail_words(hid, 'ant'))}")
        return 0
    rel = lex.word_relations(word)
    if not rel["syn"] and not rel["ant"]:
        print(f"{word!r} has no relations in {path}", file=sys.stderr)
        return 1
    if as_json:
        res = {"word": word, "token_id": None, "tokens": rel["tokens"], "synonyms": rel["syn"], "antonyms": rel["ant"]}
        print(json.dumps(res, indent=2))
    else:
        print(f"{word}: tokens {rel['tokens']}; not a head (a head is one token with a leading space and at least")
        print(f"  {lex.meta['config']['min_head_chars']} characters); word-level relations:")
        for kind, name in (("syn", "synonyms"), ("ant", "antonyms")):
            items = ", ".join(f"{w} {ids}" for w, ids in rel[kind]) or "-"
            print(f"  {name} ({len(rel[kind])}): {items}")
    return 0
