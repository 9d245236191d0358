"""The on-disk sense store: its layout, a streaming safetensors writer, the memory-mapped reader, and
the queries on it (composed senses, a word's senses, nearest tokens).

Store layout (folder ``--out``)::

    senses.safetensors   senses  (total, d) float16|bfloat16   all sense vectors, entry by entry
                         offsets (n_entries + 1,) int64        entry e owns rows offsets[e]:offsets[e+1]
                         counts  (total,) int64                samples held by each sense
                         spans   (n_spans, 8) int64            token ids of span entry vocab_size + i, -1 padded
    meta.json            format, dskd_version, config, teacher spec and fingerprint, lexicon
                         fingerprint, corpus fingerprint, counts, coverage, distance statistics
                         (median / p10 / p90 MSE between teacher states of different positions),
                         timings; ``complete: true`` is written last
    samples.safetensors  only with ``keep_samples``: the gathered samples grouped by token
                         (``samples`` (R, d), ``tokens`` (R,) int64, ``seen`` (V,) int64, ``dist``)

:class:`SenseStore` opens it lazily (:class:`dskd.tensorfile.TensorFile`): looking up one entry reads
only that entry's rows.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from dskd.config import DskdError

FORMAT = {"name": "dskd-senses", "version": 1}
STORE_FILE = "senses.safetensors"
META_FILE = "meta.json"
SAMPLES_FILE = "samples.safetensors"
MAX_SPAN = 8

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.uint8: "U8",
}


class SenseError(DskdError, ValueError):
    """A sense store that cannot be built or used as asked; the message names the flag or file."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bfloat16 included), without a copy when contiguous."""
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor | tuple[torch.dtype, tuple[int, ...], Iterable[torch.Tensor]]]
) -> None:
    """Write a safetensors file tensor by tensor, streaming large ones from an iterator of chunks.

    A value is a tensor, or ``(dtype, shape, chunks)`` whose chunks (tensors of ``dtype``, in order)
    together hold ``prod(shape)`` values: a matrix larger than memory is written without being
    assembled. The file is the one ``safetensors`` writes (header, then the data in header order)
    and opens with ``safe_open`` and :class:`SenseStore`.

    Raises:
        SenseError: a streamed tensor whose chunks do not add up to its shape.
    """
    header: dict[str, dict] = {}
    start = 0
    for name, v in tensors.items():
        dtype, shape = (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else (v[0], tuple(v[1]))
        n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [start, start + n]}
        start += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, v in tensors.items():
            a, b = header[name]["data_offsets"]
            if isinstance(v, torch.Tensor):
                f.write(tensor_bytes(v.cpu()))
            else:
                written = 0
                for chunk in v[2]:
                    mv = tensor_bytes(chunk.cpu().to(v[0]))
                    f.write(mv)
                    written += mv.nbytes
                if written != b - a:
                    raise SenseError(f"{path}: tensor {name} got {written} bytes, its shape needs {b - a}")
        f.flush()
        os.fsync(f.fileno())


class SenseStore:
    """A sense store opened memory-mapped: an entry's lookup reads only that entry's rows.

    Attributes:
        vocab_size: Token entries 0..vocab_size-1; composed spans are entries vocab_size and up.
        dim: d, the teacher's hidden size.
        n_entries: Token entries plus span entries.
        teacher_fingerprint: Fingerprint of the teacher the store was built from.
        meta: The ``meta.json`` sidecar.
        offsets: (n_entries + 1,) int64; entry e owns rows offsets[e]:offsets[e+1].
        spans: (n_spans, 8) int64 token ids of the span entries, -1 padded.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        from dskd.tensorfile import TensorFile

        self.path = Path(path)
        self.meta = meta
        self._file = TensorFile(self.path / STORE_FILE)  # kept open: an entry's lookup reads its rows
        self.offsets = self._file.get("offsets")
        self._counts = self._file.get("counts")
        self.spans = self._file.get("spans")
        self.total, self.dim = self._file.shape("senses")
        self.dtype = self._file.dtype("senses")
        self.vocab_size = int(meta["vocab_size"])
        self.n_entries = self.offsets.numel() - 1
        self.teacher_fingerprint = meta["teacher"]["fingerprint"]
        self._span_entry = {
            tuple(t for t in row.tolist() if t >= 0): self.vocab_size + i for i, row in enumerate(self.spans)
        }

    @classmethod
    def open(cls, path: str | Path, teacher_fingerprint: str | None = None) -> SenseStore:
        """Open a store folder memory-mapped.

        Args:
            path: The folder ``dskd senses build --out`` wrote.
            teacher_fingerprint: When given, refuse a store built with another teacher.
        Raises:
            SenseError: missing or incomplete store, unknown format, or another teacher.
        """
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file() or not (path / STORE_FILE).is_file():
            raise SenseError(f"--senses {path}: not a sense store (no {META_FILE} / {STORE_FILE}); build one first")
        meta = json.loads(meta_file.read_text())
        if meta.get("format", {}).get("name") != FORMAT["name"] or not meta.get("complete"):
            raise SenseError(f"--senses {path}: incomplete or foreign store (rebuild it with `dskd senses build`)")
        if meta["format"].get("version") != FORMAT["version"]:
            raise SenseError(f"--senses {path}: store format version {meta['format'].get('version')} is not supported")
        have = meta["teacher"]["fingerprint"]
        if teacher_fingerprint is not None and have != teacher_fingerprint:
            raise SenseError(
                f"--senses {path}: built with teacher {meta['teacher'].get('spec')!r} (fingerprint {have}), "
                f"but this teacher's fingerprint is {teacher_fingerprint}; rebuild the store for this teacher"
            )
        return cls(path, meta)

    def _rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a:b of the sense matrix, (b - a, d) in the store dtype (only they are read)."""
        return self._file.rows("senses", a, b)

    def _check(self, entry: int) -> None:
        if not 0 <= entry < self.n_entries:
            raise SenseError(f"entry {entry} out of range [0, {self.n_entries})")

    def senses(self, entry: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Senses of an entry as (n_e, d) in ``dtype`` (float32 by default), possibly (0, d)."""
        self._check(entry)
        return self._rows(int(self.offsets[entry]), int(self.offsets[entry + 1])).to(dtype)

    def counts(self, entry: int) -> torch.Tensor:
        """Samples held by each sense of an entry, (n_e,) int64."""
        self._check(entry)
        return self._counts[int(self.offsets[entry]) : int(self.offsets[entry + 1])]

    def n_senses(self, entry: int) -> int:
        self._check(entry)
        return int(self.offsets[entry + 1] - self.offsets[entry])

    def entry_of(self, tail: tuple[int, ...]) -> int | None:
        """The entry of a tail: its token id for a 1-tuple, its span entry for longer (None if absent)."""
        if len(tail) == 1:
            return int(tail[0]) if 0 <= tail[0] < self.vocab_size else None
        return self._span_entry.get(tuple(int(t) for t in tail))

    def owner(self) -> torch.Tensor:
        """(total,) int64: the entry owning each row."""
        return torch.repeat_interleave(torch.arange(self.n_entries), self.offsets.diff())


def compose_senses(per_token: list[torch.Tensor], per_token_counts: list[torch.Tensor] | None = None):
    """Compose the senses of a multi-token span with the chain algorithm (method.md 1.5).

    K chains start from the K senses of t_1; at step l each chain takes the sense of t_l nearest (L2)
    to the mean of the chain so far; each composed sense is the mean of its chain.

    Args:
        per_token: L tensors, senses of t_1..t_L, each (n_l, d) with n_l >= 1.
        per_token_counts: Optional L tensors (n_l,) of sample counts.
    Returns:
        (composed (K, d) float32, counts (K,) int64: the smallest count along each chain, or ones).
    """
    if not per_token or any(s.shape[0] == 0 for s in per_token):
        raise SenseError("compose_senses: every token of the span needs at least one sense")
    first = per_token[0].float()
    total = first.clone()  # (K, d) running sum of each chain
    cnt = per_token_counts[0].clone() if per_token_counts is not None else torch.ones(len(first), dtype=torch.int64)
    for step, s in enumerate(per_token[1:], start=1):
        s = s.float()
        pick = torch.cdist(total / step, s).argmin(1)  # (K,) nearest sense of t_l to each running mean
        total += s[pick]
        if per_token_counts is not None:
            cnt = torch.minimum(cnt, per_token_counts[step][pick])
    return total / len(per_token), cnt


def word_senses(store: SenseStore, tokenizer, word: str) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor, str]:
    """Senses of a word written with a leading space (`` word``), as the lexicon maps heads and tails.

    A single token reads its entry; a multi-token word reads its composed span entry, or is composed
    on the fly from its tokens' senses when the store has no span for it.

    Returns:
        (token ids, senses (n, d) float32, counts (n,) int64, how: ``token``, ``span`` or ``composed``).
    Raises:
        SenseError: a token of the word has no senses.
    """
    ids = tuple(tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"])
    entry = store.entry_of(ids)
    if entry is not None:
        if store.n_senses(entry) == 0:
            raise SenseError(
                f"{word!r} (token {ids[0]}) has no senses in {store.path}: it never occurred in the corpus"
            )
        return ids, store.senses(entry), store.counts(entry), "token" if len(ids) == 1 else "span"
    missing = [t for t in ids if store.entry_of((t,)) is None or store.n_senses(t) == 0]
    if missing:
        pieces = [tokenizer.decode([t]) for t in missing]
        raise SenseError(f"{word!r}: its tokens {pieces} have no senses in {store.path}")
    c, n = compose_senses([store.senses(t) for t in ids], [store.counts(t) for t in ids])
    return ids, c, n, "composed"


def nearest_tokens(
    store: SenseStore, queries: torch.Tensor, exclude: set[int], top: int = 5, chunk: int = 65536
) -> list[list[tuple[int, float]]]:
    """For each query vector, the nearest token entries by their closest sense (MSE), reading the matrix in chunks.

    Args:
        queries: (q, d) float32.
        exclude: Entries left out (the word itself).
    Returns:
        Per query, up to ``top`` (token id, MSE) pairs, nearest first.
    """
    owner = store.owner()
    n_tok_rows = int(store.offsets[store.vocab_size])
    best = torch.full((queries.shape[0], store.vocab_size), float("inf"))
    for a in range(0, n_tok_rows, chunk):
        b = min(a + chunk, n_tok_rows)
        rows = store._rows(a, b).float()  # (c, d)
        d2 = torch.cdist(queries, rows).pow(2) / rows.shape[1]  # (q, c) MSE
        best.scatter_reduce_(1, owner[a:b].expand(queries.shape[0], -1), d2, reduce="amin")
    for e in exclude:
        if 0 <= e < store.vocab_size:
            best[:, e] = float("inf")
    vals, idx = best.topk(min(top, store.vocab_size), largest=False)
    return [
        [(int(i), float(v)) for i, v in zip(ri, rv, strict=True) if math.isfinite(v)]
        for ri, rv in zip(idx, vals, strict=True)
    ]
