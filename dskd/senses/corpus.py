"""The sense corpus as tokens: documents of the corpora (read by :mod:`dskd.corpus`, the one corpus
reader, whose docstring gives the rules) turned into the windows the teacher runs over.

Two layouts turn documents into teacher windows; neither holds the corpus in memory:

- **stream** (one process): documents of all corpora interleaved by tokens (the corpus that has
  given the fewest tokens so far gives the next document), each followed by EOS, concatenated and
  cut into windows of ``seq_len`` positions (:class:`TokenStream`, :func:`windows`).
- **blocks** (any number of processes, the same windows for every process count): every corpus is
  cut into blocks of about ``block_chars`` bytes (a file) or ``block_chars / 4000`` documents
  (a dataset), listed without reading them and taken round-robin across corpora
  (:func:`dskd.corpus.iter_blocks`); block g belongs to process ``g % world``, which alone reads
  it, tokenizes it and cuts it into windows (:func:`block_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dskd.corpus import BUILTIN_CORPORA, CorpusError, corpus_sources, iter_blocks


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


def block_tokens(tokenizer, docs: list[str]) -> torch.Tensor:
    """A block's tokens: its documents tokenized without special tokens, each followed by EOS, (n,) int64."""
    eos = tokenizer.eos_token_id
    docs = [d for d in docs if d.strip()]
    if not docs:
        return torch.zeros(0, dtype=torch.int64)
    enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for ids in enc for t in ids + ([eos] if eos is not None else [])], dtype=torch.int64)


__all__ = [
    "BUILTIN_CORPORA",
    "CorpusError",
    "TokenStream",
    "block_tokens",
    "corpus_sources",
    "iter_blocks",
    "token_stream",
    "windows",
]
