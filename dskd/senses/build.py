"""Building a sense store: gather teacher states into per-token reservoirs, cluster, compose, write.

Run by :func:`build_senses` and ``dskd senses build`` (method.md section 1):

1. **Corpus** (:mod:`dskd.corpus`, :mod:`dskd.senses.corpus`): read as a stream, cut after
   ``max_tokens`` positions, in
   the ``stream`` layout (one process) or the ``blocks`` layout (``block_chars`` > 0; required for,
   and the default under, several processes).

2. **Gathering.** The teacher runs without grad over windows of ``seq_len`` tokens, ``batch_size``
   at a time, on the chosen device and dtype. At each position i the state h_i is the input of the
   LM head, i.e. the last hidden state after the final norm (for HF Llama this equals
   ``output_hidden_states[-1]``). h_i is filed under the token the teacher predicts next
   (``key=predicted``, argmax of the LM head) or the actual next token (``key=actual``). Each token
   keeps a uniform reservoir sample of at most ``max_samples`` states (:mod:`dskd.senses.reservoir`),
   whose rows live in a file in the hidden sibling folder ``.<out>.partial/``. A progress
   checkpoint (bookkeeping only, not the rows) is written every ``checkpoint_every`` batches; a
   killed build rerun with the same arguments resumes from it and gives the same store, bit for bit.

   Under ``torchrun`` / ``accelerate launch`` with N processes, process r reads, tokenizes and
   gathers only the blocks g with g % N == r (blocks are listed without reading text, see
   :mod:`dskd.corpus`), into its own reservoir and rows file; then process 0 merges
   the reservoirs and clusters while the others wait. With a per-token cap above every count, the
   store equals the one-process store of the same layout exactly; with sampling, process 0 draws a
   uniform sample of the union (a multivariate hypergeometric split of each token's cap over the
   processes, then a uniform choice inside each), seeded.

3. **Clustering** (:mod:`dskd.senses.kmeans`): every token with more than k samples is clustered
   with k-means, batched across tokens of similar sample counts, on the gathering device, reading
   the rows from the files bucket by bucket; a token with <= k samples keeps its samples as senses.

4. **Composed senses.** For every multi-token tail (t_1..t_L) of the lexicon: K chains start from the
   senses of t_1; at step l each chain appends the sense of t_l nearest (L2) to the chain's running
   mean; the composed sense is the chain's mean. Its sample count is the smallest count along the
   chain. Span entries get ids ``vocab_size, vocab_size + 1, ...`` in the order of
   ``Lexicon.multi_token_tails()``; spans with a token that has no senses are skipped.

5. **Store** (:mod:`dskd.senses.store`): the senses go to a file as they are clustered, and the
   store's safetensors file is written from it in entry order: no stage holds all rows in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.config import SenseConfig
from dskd.corpus import iter_blocks
from dskd.devices import DTYPES, dtype_name, resolve_device, resolve_dtype
from dskd.io import replace_dir, write_text_atomic
from dskd.io import stable_hash as _sha
from dskd.senses.corpus import TokenStream, block_tokens, windows
from dskd.senses.kmeans import cluster_groups
from dskd.senses.reservoir import MultiRowSource, Reservoir, RowFile
from dskd.senses.store import (
    FORMAT,
    MAX_SPAN,
    META_FILE,
    SAMPLES_FILE,
    STORE_FILE,
    SenseError,
    compose_senses,
    write_safetensors,
)

_DIST_CAP = 100_000  # MSE values kept for the distance statistics
_DIST_PER_BATCH = 512
# Options that do not change the store (left out of the identity used to skip a rebuild).
# The runtime options (device, dtypes, block size) enter the identity as resolved values instead.
_RUNTIME = ("device", "dtype", "sample_dtype", "block_chars")
# A store holding senses for fewer than this share of its lexicon's heads is refused, not written: the
# sense loss would find almost no related position (the main job's stores cover about 30-40%).
MIN_HEAD_SHARE = 0.01
_NON_IDENTITY = ("checkpoint_every", *_RUNTIME)
# Options that do not change the gathered samples (a partial gather survives a change of these).
_NON_GATHER = ("k", "kmeans_iters", "kmeans_init", "store_dtype", "checkpoint_every", "keep_samples", *_RUNTIME)
# Blocks of the ``blocks`` layout when several processes run and none was asked for (~16k tokens).
DEFAULT_BLOCK_CHARS = 65_536
# A stream of at most this many tokens is kept (int32, 64 MB) between planning and gathering.
_KEEP_TOKENS = 1 << 24


# --------------------------------------------------------------------------------- device and dtype


def _sample_dtype(spec: str, device: torch.device, store_dtype: str) -> str:
    """Dtype of the gathered sample rows: ``auto`` is float32 on the CPU (the clustering sees the
    teacher's float32 states), the store dtype on an accelerator (half the disk at scale)."""
    if spec in (None, "", "auto"):
        return store_dtype if device.type != "cpu" else "float32"
    if spec not in DTYPES:
        raise SenseError(f"--sample-dtype {spec!r}: choose auto, {', '.join(DTYPES)}")
    return spec


# ------------------------------------------------------------------------------------ processes


@dataclasses.dataclass
class _Dist:
    """This process's place among the processes of a launch (torchrun / accelerate launch)."""

    rank: int = 0
    world: int = 1
    owned: bool = False  # this build started the process group (and ends it)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owned = False


def _dist_init(device: torch.device) -> _Dist:
    """Join the launch's process group (started here from the torchrun environment if needed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return _Dist()
    import torch.distributed as td

    owned = False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives of an NCCL group started by the caller use it
    if not td.is_initialized():
        # Gloo carries the metadata (small objects); rows go through files. Process 0 clusters while
        # the others wait at a barrier, so the timeout must cover the whole clustering.
        td.init_process_group("gloo", timeout=timedelta(hours=48))
        owned = True
    return _Dist(td.get_rank(), td.get_world_size(), owned)


# ------------------------------------------------------------------------------------- gathering


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
        raise SenseError(f"--lexicon_dir {lexicon_dir}: no such folder (build it with `dskd lexicon build`)")
    return Lexicon.load(lexicon_dir, tokenizer)


def gather_batch(
    model,
    ids: torch.Tensor,
    nxt: torch.Tensor | None,
    res: Reservoir,
    dist: torch.Tensor,
    captured: dict,
    pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """One gathering step: teacher forward, states filed under their key, distance sample extended.

    Args:
        model: The teacher, with a forward pre-hook on its LM head storing the head's input in ``captured["h"]``.
        ids: (B, T) input token ids, on the teacher's device.
        nxt: (B, T) actual next tokens for ``key=actual``, or None for ``key=predicted``.
        res: The reservoir to fill (on the same device).
        dist: (m,) MSE values between states of different positions gathered so far.
        pos: (B, T) stream positions of the states (default: 0..B*T-1).
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
        i = torch.randint(0, h.shape[0], (m,), generator=res.gen, device=h.device)
        j = (i + torch.randint(1, h.shape[0], (m,), generator=res.gen, device=h.device)) % h.shape[0]  # j != i
        dist = torch.cat([dist, ((h[i] - h[j]) ** 2).mean(-1).to(dist.device)])
    res.add(key, h, None if pos is None else pos.reshape(-1))
    return dist


@dataclasses.dataclass
class _Plan:
    """What this process gathers, fixed before gathering (so a resumed run cuts the same windows).

    Attributes:
        layout: ``stream`` or ``blocks``.
        n_pos: Positions gathered by all processes together.
        fingerprint: SHA-256 prefix of the gathered tokens (``blocks``: the same for every process count).
        per_corpus: Per corpus, tokens (``stream``) or positions (``blocks``), all processes together.
        blocks: ``blocks`` layout: this process's blocks as (block index, first position, positions).
        tokens: The tokens to gather, kept from planning when few (so they are not tokenized twice):
            ``stream``: the stream in pieces; ``blocks``: this process's blocks, in order.
    """

    layout: str
    n_pos: int
    fingerprint: str
    per_corpus: dict[str, int]
    blocks: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    tokens: list[np.ndarray] | None = None


def _plan(tok, cfg: SenseConfig, block_chars: int, dist: _Dist) -> _Plan:
    """One pass over the corpus (tokenized, not run) that fixes the cut at ``max_tokens`` and the fingerprint."""
    if block_chars <= 0:
        ts = TokenStream(tok, cfg.corpus, cfg.max_tokens + 1)
        h, n = hashlib.sha256(), 0
        kept: list[np.ndarray] | None = []
        for ids in ts:
            a = np.asarray(ids, dtype=np.int64)
            h.update(a.tobytes())
            n += len(ids)
            if kept is not None:
                kept.append(a.astype(np.int32))
                if n > _KEEP_TOKENS:
                    kept = None  # a large corpus is tokenized again while gathering
        plan = _Plan("stream", min(cfg.max_tokens, n - 1), h.hexdigest()[:16], dict(ts.per_corpus))
        plan.tokens = kept
        return plan
    # blocks: in rounds of one block per process, every process reads and tokenizes only its own
    # block and all learn the sizes, so each can cut the global stream at max_tokens exactly as one
    # process would. Blocks are listed without reading text, so skipping the others' costs nothing.
    h, total, per_corpus = hashlib.sha256(), 0, {}
    mine: list[tuple[int, int, int]] = []
    kept: list[np.ndarray] | None = []
    it = iter_blocks(cfg.corpus, block_chars)
    while total < cfg.max_tokens:
        own = None  # (block index, corpus, tokens) of this process's block in this round
        for _ in range(dist.world):
            nxt = next(it, None)
            if nxt is None:
                break
            g, blk = nxt
            if g % dist.world == dist.rank:
                own = (g, blk.corpus, block_tokens(tok, list(blk.read())))
        infos = dist.all_gather(None if own is None else (own[0], own[1], max(0, own[2].numel() - 1)))
        infos = sorted((x for x in infos if x is not None), key=lambda x: x[0])
        if not infos:
            break
        digest = None
        for g, name, n in infos:
            take = min(n, cfg.max_tokens - total)
            if take <= 0:
                continue
            if own is not None and g == own[0]:
                mine.append((g, total, take))
                digest = hashlib.sha256(own[2][: take + 1].numpy().tobytes()).hexdigest()
                if kept is not None:
                    kept.append(own[2][: take + 1].numpy().astype(np.int32))
                    if sum(a.size for a in kept) > _KEEP_TOKENS:
                        kept = None
            per_corpus[name] = per_corpus.get(name, 0) + take
            total += take
        for d in dist.all_gather(digest):  # in process order = block order within the round
            if d is not None:
                h.update(d.encode())
    return _Plan("blocks", total, h.hexdigest()[:16], per_corpus, mine, kept)


def _windows(tok, cfg: SenseConfig, plan: _Plan, block_chars: int) -> Iterator[tuple[int, torch.Tensor]]:
    """This process's windows: (first position, window (T + 1,) int64), in gathering order."""
    if plan.layout == "stream":
        if plan.tokens is not None:
            pieces = (torch.from_numpy(a.astype(np.int64)) for a in plan.tokens)
        else:
            pieces = iter(TokenStream(tok, cfg.corpus, plan.n_pos + 1))
        yield from windows(pieces, cfg.seq_len)
        return
    if plan.tokens is not None:
        for (_, start, _), a in zip(plan.blocks, plan.tokens, strict=True):
            yield from windows(iter([torch.from_numpy(a.astype(np.int64))]), cfg.seq_len, start)
        return
    todo = {g: (start, n) for g, start, n in plan.blocks}
    last = max(todo, default=-1)
    for g, blk in iter_blocks(cfg.corpus, block_chars):
        if g > last:
            return
        if g in todo:  # only this process's blocks are read
            start, n = todo[g]
            yield from windows(iter([block_tokens(tok, list(blk.read()))[: n + 1]]), cfg.seq_len, start)


def _batches(win: Iterator[tuple[int, torch.Tensor]], batch_size: int) -> Iterator[list[tuple[int, torch.Tensor]]]:
    batch: list[tuple[int, torch.Tensor]] = []
    for w in win:
        batch.append(w)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress_name(dist: _Dist) -> str:
    return "progress.json" if dist.world == 1 else f"progress.rank{dist.rank}.json"


def _gather(
    model,
    tok,
    plan: _Plan,
    cfg: SenseConfig,
    block_chars: int,
    vocab: int,
    dim: int,
    work: Path,
    gather_key: str,
    device: torch.device,
    sample_dtype: torch.dtype,
    dist: _Dist,
    progress: bool,
) -> tuple[Reservoir, torch.Tensor, dict]:
    """Run the teacher over this process's windows and fill its reservoir, checkpointing into ``work``.

    Returns:
        (reservoir, distance sample (m,) float32 MSE values on the CPU, timing info).
    """
    from safetensors.torch import load_file, save_file

    rows_file = work / f"rows.rank{dist.rank}.bin"
    seed = cfg.seed if dist.world == 1 else cfg.seed + 1_000_003 * dist.rank
    res = dist_t = None
    start_batch, done, elapsed = 0, 0, 0.0
    prog_file = work / _progress_name(dist)
    if prog_file.is_file() and rows_file.is_file():
        prog = json.loads(prog_file.read_text())
        d = load_file(str(work / prog["file"])) if (work / str(prog.get("file"))).is_file() else {}
        if prog.get("gather_key") == gather_key and "n_rows" in d:  # (an earlier layout had no n_rows)
            res = Reservoir.from_state(d, cfg.max_samples, RowFile(rows_file, dim, sample_dtype), device)
            dist_t = d["dist"].to(device)
            start_batch, done, elapsed = prog["next_batch"], prog["tokens"], prog["seconds"]
            if progress:
                print(f"resuming from {work}: {done:,} positions of this process already gathered")
    if res is None:
        rows_file.unlink(missing_ok=True)
        res = Reservoir.empty(vocab, dim, cfg.max_samples, seed, RowFile(rows_file, dim, sample_dtype), device)
        dist_t = torch.zeros(0, device=device)
    res.copy_on_write = cfg.checkpoint_every > 0
    captured: dict[str, torch.Tensor] = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("h", args[0]))
    bar = None
    if progress:
        from tqdm import tqdm

        share = plan.n_pos if dist.world == 1 else sum(n for _, _, n in plan.blocks)
        bar = tqdm(total=share, initial=done, unit="tok", unit_scale=True, desc="gather", dynamic_ncols=True)
    t0 = time.perf_counter()
    b = start_batch - 1
    try:
        for b, batch in enumerate(_batches(_windows(tok, cfg, plan, block_chars), cfg.batch_size)):
            if b < start_batch:
                continue
            groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for s, w in batch:
                groups.setdefault(w.numel() - 1, []).append((s, w))  # a short last window runs on its own
            for t_len, group in sorted(groups.items(), reverse=True):
                win = torch.stack([w for _, w in group]).to(device, non_blocking=True)  # (B, T + 1)
                ids = win[:, :-1]
                nxt = win[:, 1:] if cfg.key == "actual" else None
                pos = torch.tensor([s for s, _ in group], device=device)[:, None] + torch.arange(t_len, device=device)
                dist_t = gather_batch(model, ids, nxt, res, dist_t, captured, pos)
                done += ids.numel()
                if bar is not None:
                    bar.update(ids.numel())
            if cfg.checkpoint_every and (b + 1) % cfg.checkpoint_every == 0:
                res.commit()  # rows replaced before this checkpoint may be reused after it
                res.store.flush()  # the rows the checkpoint refers to are on disk before it is
                name = f"progress.rank{dist.rank}-{b + 1:07d}.safetensors"
                save_file({**res.state_dict(), "dist": dist_t.cpu()}, str(work / f".{name}.tmp"))
                os.replace(work / f".{name}.tmp", work / name)
                secs = elapsed + time.perf_counter() - t0
                prog = {"gather_key": gather_key, "file": name, "next_batch": b + 1, "tokens": done, "seconds": secs}
                write_text_atomic(prog_file, json.dumps(prog, indent=2))
                for old in work.glob(f"progress.rank{dist.rank}-*.safetensors"):
                    if old.name != name:
                        old.unlink()
            _on_batch_end(b)
    finally:
        hook.remove()
        if bar is not None:
            bar.close()
    res.commit()
    seconds = elapsed + time.perf_counter() - t0
    timing = {"gather_seconds": round(seconds, 2), "tokens_per_second": round(done / max(seconds, 1e-9), 1)}
    return res, dist_t.float().cpu(), timing


# --------------------------------------------------------------------------------------- merging


def _merge(
    states: list[dict[str, torch.Tensor]], cap: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge the reservoirs of several processes into one uniform sample of at most ``cap`` per token.

    Token t's cap is split over the processes by a multivariate hypergeometric draw on the states
    each process saw (sequential hypergeometric draws), then each process's share is drawn
    uniformly from what its reservoir kept (a uniform sample of a uniform sample is uniform). With
    every count under the cap, everything is kept. Samples are ordered by token, then stream position.

    Args:
        states: Per process: ``seen`` (V,), ``keys``/``rows``/``pos`` (R_p,) (see :class:`Reservoir`).
    Returns:
        (tokens (R,) int64 sorted, process of each sample (R,), its row in that process's file (R,),
        seen (V,) summed over processes).
    """
    rng = np.random.default_rng(seed)
    seen = np.stack([s["seen"].numpy() for s in states])  # (P, V)
    total = seen.sum(0)
    left_n, left_c = total.copy(), np.minimum(total, cap)
    toks, files, rows, poss = [], [], [], []
    for p, s in enumerate(states):
        n_p = seen[p]
        live = left_n > 0
        k_p = np.zeros_like(n_p)
        # sequential hypergeometric: of the c samples still to draw from the n states left, how many are p's
        k_p[live] = rng.hypergeometric(n_p[live], left_n[live] - n_p[live], left_c[live])
        left_n -= n_p
        left_c -= k_p
        tok = (s["keys"] // cap).numpy()
        u = rng.random(tok.size)
        o = np.lexsort((u, tok))  # by token, then a random order
        tok_o = tok[o]
        first = np.searchsorted(tok_o, tok_o, side="left")
        pick = o[(np.arange(tok_o.size) - first) < k_p[tok_o]]
        toks.append(tok[pick])
        files.append(np.full(pick.size, p))
        rows.append(s["rows"].numpy()[pick])
        poss.append(s["pos"].numpy()[pick])
    tok, f, r, ps = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (toks, files, rows, poss))
    o = np.lexsort((ps, tok))
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a[o], dtype=np.int64))  # noqa: E731
    return t(tok), t(f), t(r), torch.from_numpy(total.astype(np.int64))


# -------------------------------------------------------------------------------------- the store


class _SenseSink:
    """Clustered senses appended to a float32 row file as they come; where each entry's senses went."""

    def __init__(self, path: Path, dim: int, n_entries: int) -> None:
        self.file = RowFile(path, dim, torch.float32)
        self.n = 0
        self.start = [0] * n_entries
        self.count = [0] * n_entries
        self.counts: list[torch.Tensor | None] = [None] * n_entries

    def put(self, entries: list[int], senses: list[torch.Tensor], counts: list[torch.Tensor]) -> None:
        sizes = [s.shape[0] for s in senses]
        if not entries or not sum(sizes):
            for e, c in zip(entries, counts, strict=True):
                self.counts[e] = c
            return
        block = torch.cat([s.float().cpu() for s in senses])
        self.file.write(torch.arange(self.n, self.n + block.shape[0]), block)
        for e, sz, c in zip(entries, sizes, counts, strict=True):
            self.start[e], self.count[e], self.counts[e] = self.n, sz, c.cpu()
            self.n += sz

    def senses(self, e: int) -> torch.Tensor:
        return self.file.take(torch.arange(self.start[e], self.start[e] + self.count[e]))

    def get_counts(self, e: int) -> torch.Tensor:
        c = self.counts[e]
        return c if c is not None else torch.zeros(0, dtype=torch.int64)


def _chunks(source, order: torch.Tensor, dtype: torch.dtype, nbytes: int = 1 << 23) -> Iterator[torch.Tensor]:
    """Rows ``order`` of a row source, in order, about ``nbytes`` (8 MB) of float32 at a time, cast to ``dtype``."""
    step = max(1, nbytes // (4 * max(1, source.shape[1])))
    for a in range(0, order.numel(), step):
        yield source.take_raw(order[a : a + step]).to(dtype)


class _TensorRows:
    """A tensor as a row source (the samples a store kept in the format of version 0.1 of this module)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.t[rows].float()

    def take_raw(self, rows: torch.Tensor) -> torch.Tensor:
        return self.t[rows]


def _samples_source(path: Path) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples a store kept: (row source, tokens (R,), seen (V,), dist (m,)), rows read from the file."""
    from dskd.tensorfile import TensorFile, TensorRows

    with TensorFile(path) as f:
        if "pool" in f:  # earlier layout: the reservoir's state with its whole pool
            return None, f.get("keys"), f.get("rows"), f.get("pool")  # resolved by the caller, which knows the cap
        tokens, seen, dist = f.get("tokens"), f.get("seen"), f.get("dist")
    return TensorRows(path, "samples"), tokens, seen, dist


def load_samples(path: str | Path, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples a store kept (``--keep-samples``), or those of a gathering checkpoint, grouped by token.

    Args:
        path: A store folder, or a ``progress-*.safetensors`` file of an earlier ``.<out>.partial`` folder.
        cap: The per-token cap (``--max-samples``) of a checkpoint file; a store folder records it.
    Returns:
        (tokens (R,) int64 sorted, samples (R, d) float32), read into memory.
    """
    path = Path(path)
    f = path if path.is_file() else path / SAMPLES_FILE
    if not f.is_file():
        raise SenseError(f"{f} is missing: build the store with --keep-samples")
    src, a, b, c = _samples_source(f)
    if src is None:  # earlier layout: keys, rows, pool
        if cap is None:
            cap = int(json.loads((f.parent / META_FILE).read_text())["config"]["max_samples"])
        return a // cap, c[b].float()
    return a, src.take(torch.arange(a.numel()))


def _legacy_source(f: Path, cap: int) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    d = load_file(str(f))
    samples = d["pool"][d["rows"]]
    return _TensorRows(samples), d["keys"] // cap, d["seen"], d["dist"]


def _write_store(
    work: Path,
    source,
    tokens: torch.Tensor,
    seen: torch.Tensor,
    dist: torch.Tensor,
    cfg: SenseConfig,
    vocab: int,
    dim: int,
    lex,
    device: torch.device,
    progress: bool,
) -> dict:
    """Cluster, compose and write ``senses.safetensors`` (and ``samples.safetensors``) into ``work``.

    Args:
        work: The folder the store is built in.
        source: Row source of the samples (rows in the order of ``tokens``).
        tokens: (R,) int64 the token of each sample, sorted.
        seen: (V,) states seen per token.
        dist: (m,) MSE values between states of different positions.
        cfg: Sense options.
        vocab: Token entries of the store.
        dim: Width of a sense.
        lex: The lexicon whose multi-token tails get composed senses, or None.
        device: Where k-means runs.
        progress: Show a progress bar while clustering.
    Returns:
        The counts / coverage / timing parts of the meta.
    """
    t_cluster = time.perf_counter()
    sink, sizes, inertia = _cluster_tokens(work, source, tokens, cfg, vocab, dim, device, progress)
    cluster_seconds = time.perf_counter() - t_cluster
    tails = lex.multi_token_tails() if lex is not None else []
    spans = _compose_spans(sink, tails, vocab)
    n_entries = vocab + len(spans)
    sizes_e, offsets = _write_senses(work, sink, spans, cfg.store_dtype, vocab, dim)
    if cfg.keep_samples:
        _write_samples(work, source, tokens, seen, dist, dim)
    with_senses = int((sizes_e[:vocab] > 0).sum())
    heads = lex.heads() if lex is not None else []
    heads_cov = sum(1 for h in heads if 0 <= h < vocab and sizes_e[h] > 0)
    return {
        "counts": {
            "samples": int(tokens.numel()),
            "tokens_seen": int((seen > 0).sum()),
            "tokens_clustered": int((sizes > cfg.k).sum()),
            "senses": int(offsets[vocab]),
            "spans": len(spans),
            "span_senses": int(offsets[-1] - offsets[vocab]),
            "entries": n_entries,
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
        "cluster_seconds": round(cluster_seconds, 2),
    }


def _cluster_tokens(
    work: Path,
    source,
    tokens: torch.Tensor,
    cfg: SenseConfig,
    vocab: int,
    dim: int,
    device: torch.device,
    progress: bool,
) -> tuple[_SenseSink, torch.Tensor, torch.Tensor]:
    """Cluster each token's samples (:func:`cluster_groups`) into a sense file in ``work``.

    Returns:
        (the sink holding every token's senses, samples per clustered token (U,), inertia (U,)
        float64), for the U tokens that have samples, in token order.
    """
    uniq, sizes = torch.unique_consecutive(tokens, return_counts=True)
    sink = _SenseSink(work / ".senses.tmp.bin", dim, vocab)
    groups = uniq.tolist()
    _, _, inertia = cluster_groups(
        source,
        sizes,
        cfg.k,
        cfg.kmeans_iters,
        cfg.seed,
        cfg.kmeans_init,
        progress=progress,
        device=device,
        sink=lambda gs, s, c: sink.put([groups[g] for g in gs], s, c),
    )
    return sink, sizes, inertia


def _compose_spans(sink: _SenseSink, tails: list[tuple[int, ...]], vocab: int) -> list[tuple[int, ...]]:
    """Compose the senses of the multi-token tails whose tokens all have senses; add them to ``sink``.

    Composed senses go to the end of the sense file, as entries ``vocab``, ``vocab + 1``, ..., in the
    order of ``tails``; a tail longer than ``MAX_SPAN`` or with a token without senses is skipped.

    Returns:
        The composed spans, in entry order.
    """
    spans: list[tuple[int, ...]] = []
    span_s: list[torch.Tensor] = []
    span_c: list[torch.Tensor] = []
    for tail in tails:
        if len(tail) > MAX_SPAN or any(not 0 <= t < vocab or sink.count[t] == 0 for t in tail):
            continue
        c, n = compose_senses([sink.senses(t) for t in tail], [sink.get_counts(t) for t in tail])
        span_s.append(c)
        span_c.append(n)
        spans.append(tuple(tail))
    sink.start += [0] * len(spans)
    sink.count += [0] * len(spans)
    sink.counts += [None] * len(spans)
    for i in range(0, len(spans), 4096):
        sink.put(list(range(vocab + i, vocab + min(i + 4096, len(spans)))), span_s[i : i + 4096], span_c[i : i + 4096])
    return spans


def _write_senses(
    work: Path, sink: _SenseSink, spans: list[tuple[int, ...]], store_dtype: str, vocab: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the store's ``senses.safetensors`` from the sense file, in entry order; remove the sense file.

    Earlier store files in ``work`` are removed first.

    Args:
        work: The folder the store is built in.
        sink: Every entry's senses (tokens, then ``spans``).
        spans: The composed spans (entries ``vocab``, ``vocab + 1``, ...).
        store_dtype: ``float16`` or ``bfloat16``.
        vocab: Token entries.
        dim: Width of a sense.
    Returns:
        (senses per entry (E,) int64, offsets (E + 1,) int64 of each entry's first sense).
    """
    n_entries = vocab + len(spans)
    sizes_e = torch.tensor(sink.count, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_e, 0)])
    starts_e = torch.tensor(sink.start, dtype=torch.int64)
    order = torch.repeat_interleave(starts_e - offsets[:-1], sizes_e) + torch.arange(int(offsets[-1]))
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[store_dtype]
    span_t = torch.full((len(spans), MAX_SPAN), -1, dtype=torch.int64)
    for i, s in enumerate(spans):
        span_t[i, : len(s)] = torch.tensor(s)
    all_counts = torch.cat([sink.get_counts(e) for e in range(n_entries)]) if n_entries else torch.zeros(0)
    for f in (META_FILE, STORE_FILE, SAMPLES_FILE):
        (work / f).unlink(missing_ok=True)
    write_safetensors(
        work / STORE_FILE,
        {
            "counts": all_counts.to(torch.int64),
            "offsets": offsets,
            "spans": span_t,
            "senses": (dtype, (int(offsets[-1]), dim), _chunks(sink.file, order, dtype)),
        },
    )
    sink.file.close()
    (work / ".senses.tmp.bin").unlink()
    return sizes_e, offsets


def _write_samples(work: Path, source, tokens: torch.Tensor, seen: torch.Tensor, dist: torch.Tensor, dim: int) -> None:
    """Write ``samples.safetensors`` (``keep_samples``): the samples in token order, in their dtype on disk."""
    s_dtype = getattr(source, "dtype", torch.float32)
    write_safetensors(
        work / SAMPLES_FILE,
        {
            "dist": dist.float(),
            "seen": seen.to(torch.int64),
            "tokens": tokens,
            "samples": (s_dtype, (tokens.numel(), dim), _chunks(source, torch.arange(tokens.numel()), s_dtype)),
        },
    )


# ---------------------------------------------------------------------------------------- build


def build_senses(
    teacher_spec: str,
    cfg: SenseConfig,
    lexicon_dir: Path | None,
    out: Path,
    force: bool = False,
    teacher_dtype: str | None = None,
    progress: bool = True,
    device: str | None = None,
    sample_dtype: str | None = None,
    block_chars: int | None = None,
) -> Path:
    """Build a sense store (see the module docstring), or return at once if ``out`` already matches.

    Under ``torchrun`` / ``accelerate launch`` every process calls this with the same arguments;
    process 0 writes the store, the others return once it is written.

    Args:
        teacher_spec: Teacher model spec (alias, local folder or hub id).
        cfg: Sense options.
        lexicon_dir: Lexicon folder whose multi-token tails get composed senses (None: no spans).
        out: Output folder.
        force: Rebuild even when ``out`` matches (a partial gather is still resumed).
        teacher_dtype: ``cfg.dtype`` when None (the others below likewise): the teacher's weights dtype.
        progress: Print progress bars and a summary.
        device: Where the teacher, the reservoir and k-means run (``cfg.device``).
        sample_dtype: Dtype of the gathered sample rows on disk (``cfg.sample_dtype``).
        block_chars: Block size of the ``blocks`` corpus layout; 0 for the one-process ``stream``
            layout (``cfg.block_chars``; when both are None: 0 for one process,
            ``DEFAULT_BLOCK_CHARS`` for several).
    Returns:
        ``out``.
    """
    out = Path(out)
    t_start = time.perf_counter()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise SenseError(f"--out {out}: exists and is not a sense store; refusing to replace it")
    teacher_dtype = cfg.dtype if teacher_dtype is None else teacher_dtype
    device = cfg.device if device is None else device
    sample_dtype = cfg.sample_dtype if sample_dtype is None else sample_dtype
    block_chars = cfg.block_chars if block_chars is None else block_chars
    dev = resolve_device(device, flag="--senses.device")
    if dev.type == "cuda" and dev.index is None:  # under several processes, each its own GPU
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    t_dtype = dtype_name(resolve_dtype(teacher_dtype, dev, flag="--dtype"))
    s_dtype = _sample_dtype(sample_dtype, dev, cfg.store_dtype)
    dist = _dist_init(dev)
    try:
        if block_chars is None:
            block_chars = DEFAULT_BLOCK_CHARS if dist.world > 1 else 0
        if block_chars < 0:
            raise SenseError(f"--block-chars {block_chars}: must be >= 0")
        if dist.world > 1 and block_chars == 0:
            raise SenseError(
                f"--block-chars 0: the one-process stream layout cannot be shared by {dist.world} processes; "
                f"give --block-chars > 0 (default {DEFAULT_BLOCK_CHARS} under several processes)"
            )
        job = _Job(
            teacher_spec, cfg, lexicon_dir, out, force, t_dtype, progress, dev, s_dtype, block_chars, dist, t_start
        )
        return _build(job)
    finally:
        dist.close()


@dataclasses.dataclass
class _Job:
    """One process's build: the arguments of :func:`build_senses` with the runtime options resolved.

    Attributes:
        teacher_spec: Teacher model spec (alias, local folder or hub id).
        cfg: Sense options.
        lexicon_dir: Lexicon folder whose multi-token tails get composed senses (None: no spans).
        out: Output folder.
        force: Rebuild even when ``out`` matches.
        teacher_dtype: The teacher's weights dtype (a key of ``DTYPES``).
        progress: Print progress bars and a summary (process 0 only: see ``show``).
        device: Where the teacher, the reservoir and k-means run.
        sample_dtype: Dtype of the gathered sample rows on disk (a key of ``DTYPES``).
        block_chars: Block size of the ``blocks`` corpus layout; 0 for the ``stream`` layout.
        dist: This process's place among the launch's processes.
        t_start: When the build began (``time.perf_counter``).
    """

    teacher_spec: str
    cfg: SenseConfig
    lexicon_dir: Path | None
    out: Path
    force: bool
    teacher_dtype: str
    progress: bool
    device: torch.device
    sample_dtype: str
    block_chars: int
    dist: _Dist
    t_start: float

    @property
    def show(self) -> bool:
        """Whether this process prints (progress asked for, and process 0)."""
        return self.progress and self.dist.rank == 0

    @property
    def work(self) -> Path:
        """The hidden sibling folder the store is built in (``.<out>.partial``), renamed over ``out`` at the end."""
        return self.out.parent / f".{self.out.name}.partial"

    @property
    def corpus_flag(self) -> str:
        """``--senses.corpus`` and its value, as the errors name it."""
        return f"--senses.corpus {','.join(self.cfg.corpus)}"


@dataclasses.dataclass
class _Gathered:
    """What gathering leaves for clustering: the samples grouped by token, and the loaded teacher's shapes.

    Attributes:
        source: Row source of the samples, in the order of ``tokens``.
        tokens: (R,) int64 the token of each sample, sorted.
        seen: (V,) states seen per token.
        dist: (m,) MSE values between states of different positions.
        timing: Gathering times (``gather_seconds``, ``tokens_per_second``, ...).
        vocab: Token entries of the store (the larger of the tokenizer's and the LM head's size).
        dim: Width of a state.
        teacher_fp: The loaded teacher's fingerprint (what later stages will compute).
    """

    source: Any
    tokens: torch.Tensor
    seen: torch.Tensor
    dist: torch.Tensor
    timing: dict
    vocab: int
    dim: int
    teacher_fp: str


def _build(job: _Job) -> Path:
    """Build the store (module docstring): plan, skip when up to date, gather, cluster, compose, write.

    Under several processes every process gathers; process 0 then writes the store while the others
    wait, and they return once it is in place.

    Returns:
        ``job.out``.
    """
    tok, teacher_fp = _teacher_identity(job.teacher_spec)
    lex = _lexicon(job.lexicon_dir, tok)
    lex_fp = lex.fingerprint if lex is not None else None
    plan = _plan(tok, job.cfg, job.block_chars, job.dist)
    _check_plan(job, plan, lex)
    identity = _identity(job, teacher_fp, lex_fp, plan)
    build_id = _sha(identity)
    if not job.force and _up_to_date(job.out, build_id):
        if job.show:
            print(f"dskd senses: {job.out} is up to date (skipped)")
        return job.out
    gather_key = _gather_key(job, identity)
    if job.show:
        print(
            f"dskd senses: gathering on {job.device} ({job.teacher_dtype} teacher, {job.sample_dtype} samples on "
            f"disk), {job.dist.world} process(es), {plan.layout} layout, {plan.n_pos:,} positions; "
            f"k-means on {job.device}"
        )
    got = _samples(job, tok, plan, gather_key)
    if got is None:  # another process writes the store, and it is in place
        return job.out
    parts = _write_store(
        job.work, got.source, got.tokens, got.seen, got.dist, job.cfg, got.vocab, got.dim, lex, job.device, job.show
    )
    _check_coverage(job, parts["coverage"])
    meta = _meta(job, plan, lex_fp, build_id, gather_key, got, parts)
    _install(job, meta)
    if job.show:
        _print_summary(job.out, meta)
    return job.out


def _check_plan(job: _Job, plan: _Plan, lex) -> None:
    """Refuse a corpus too short to gather from, or (``key=actual``, tokens kept, one process) one in which
    too few of the lexicon's heads occur, before the teacher runs.

    States are filed under the token that follows, so a head absent from the corpus gets no sense: the
    store's head coverage is known (bounded) from the tokens.

    Raises:
        SenseError: Naming ``--senses.corpus``.
    """
    cfg = job.cfg
    if plan.n_pos < 1:
        raise SenseError(f"{job.corpus_flag}: fewer than 2 tokens of text")
    if lex is None or cfg.key != "actual" or plan.tokens is None or job.dist.world != 1:
        return
    heads = lex.heads()
    present = np.isin(np.asarray(heads, dtype=np.int64), np.concatenate(plan.tokens)).sum() if heads else 0
    if heads and present < MIN_HEAD_SHARE * len(heads):
        raise SenseError(
            f"{job.corpus_flag}: only {int(present):,} of the lexicon's {len(heads):,} heads "
            f"occur in its first {plan.n_pos + 1:,} tokens (under {100 * MIN_HEAD_SHARE:g}%): the store would "
            f"cover almost none of --lexicon_dir {job.lexicon_dir}; not written to {job.out}"
        )


def _identity(job: _Job, teacher_fp: str, lex_fp: str | None, plan: _Plan) -> dict[str, Any]:
    """What the store is a function of; its hash is the ``build_id`` a rebuild is skipped on.

    The runtime options that change the store beyond the config (layout, process count when sampling,
    accelerator, sample dtype) are left out at the defaults of a one-process CPU build, so stores built
    before these options existed are still recognised as up to date.
    """
    options = dataclasses.asdict(job.cfg)
    identity: dict[str, Any] = {
        "teacher": teacher_fp,
        "teacher_dtype": job.teacher_dtype,
        "lexicon": lex_fp,
        "corpus": plan.fingerprint,
        "config": {k: v for k, v in options.items() if k not in _NON_IDENTITY},
    }
    if plan.layout != "stream":
        identity["block_chars"] = job.block_chars
    if job.dist.world > 1 and not _no_sampling_possible(job.cfg):
        identity["world"] = job.dist.world
    if job.device.type != "cpu":
        identity["device"] = job.device.type
    if job.sample_dtype != "float32":
        identity["sample_dtype"] = job.sample_dtype
    return identity


def _gather_key(job: _Job, identity: dict[str, Any]) -> str:
    """What the gathered samples are a function of (a partial gather or kept samples with this key are
    reused): the identity without the lexicon and the clustering options, with each process's own
    reservoir under several processes."""
    options = dataclasses.asdict(job.cfg)
    return _sha(
        {
            **identity,
            **({"world": job.dist.world} if job.dist.world > 1 else {}),
            "lexicon": None,
            "config": {k: v for k, v in options.items() if k not in _NON_GATHER},
        }
    )


def _up_to_date(out: Path, build_id: str) -> bool:
    """Whether ``out`` holds a complete store of this ``build_id``."""
    if not (out / META_FILE).is_file():
        return False
    try:
        old = json.loads((out / META_FILE).read_text())
    except json.JSONDecodeError:
        return False
    return bool(old.get("complete") and old.get("build_id") == build_id)


def _load_teacher(job: _Job, tok) -> tuple[torch.nn.Module, int, int, str]:
    """The teacher on the build's device.

    Returns:
        (model, vocab: the larger of the tokenizer's and the LM head's size, dim: the LM head's input
        width, the loaded model's fingerprint: loading may change the config, and the store records
        what later stages will compute).
    """
    from dskd.models import check_rope_length, fingerprint, load_model

    model = load_model(job.teacher_spec, job.teacher_dtype).to(job.device)
    check_rope_length(model, job.cfg.seq_len, "--senses.seq_len", "gathering windows")
    vocab = max(len(tok), model.get_output_embeddings().weight.shape[0])
    dim = model.get_output_embeddings().weight.shape[1]
    return model, vocab, dim, fingerprint(model, tok)


def _samples(job: _Job, tok, plan: _Plan, gather_key: str) -> _Gathered | None:
    """The samples to cluster: those an earlier store kept with this ``gather_key`` (one process), else
    gathered by the teacher, merged over the processes under several.

    The teacher is released before clustering.

    Returns:
        The samples, or None on a process other than 0 of several (it returns once process 0 has
        written the store).
    """
    cfg, dist, dev = job.cfg, job.dist, job.device
    model, vocab, dim, teacher_fp = _load_teacher(job, tok)
    if dist.rank == 0:
        job.work.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    reused = _reuse_samples(job.out, gather_key, cfg.max_samples) if dist.world == 1 else None
    if reused is not None:
        del model
        if job.show:
            print(f"dskd senses: reusing the samples kept in {job.out / SAMPLES_FILE} (same teacher, corpus, options)")
        return _Gathered(*reused, vocab, dim, teacher_fp)
    s_dtype = DTYPES[job.sample_dtype]
    res, dist_t, timing = _gather(
        model, tok, plan, cfg, job.block_chars, vocab, dim, job.work, gather_key, dev, s_dtype, dist, job.show
    )
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if dist.world == 1:
        rows = res.rows.cpu()
        tokens = (res.keys // cfg.max_samples).cpu()
        if plan.layout == "blocks":  # by token, then position, as the merge of several processes orders them
            o = torch.from_numpy(np.lexsort((res.pos.cpu().numpy(), tokens.numpy())))
            tokens, rows = tokens[o], rows[o]
        source = MultiRowSource([res.store], torch.zeros_like(rows), rows)
        return _Gathered(source, tokens, res.seen.cpu(), dist_t, timing, vocab, dim, teacher_fp)
    merged = _merge_processes(job, res, dist_t, timing, dim)
    return None if merged is None else _Gathered(*merged, vocab, dim, teacher_fp)


def _merge_processes(
    job: _Job, res: Reservoir, dist_t: torch.Tensor, timing: dict, dim: int
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, dict] | None:
    """Under several processes: every process files its reservoir's bookkeeping in ``work``; process 0
    merges them (:func:`_merge`) while the others wait until the store is written.

    Returns:
        On process 0 (row source over every process's rows file, tokens (R,), seen (V,), dist (m,),
        timing of the slowest process with the summed rate); None on the others, once the store is in place.
    """
    from safetensors.torch import load_file, save_file

    cfg, dist, work = job.cfg, job.dist, job.work
    save_file({**res.state_dict(), "dist": dist_t}, str(work / f"final.rank{dist.rank}.safetensors"))
    res.store.close()
    allt = dist.all_gather(timing)
    dist.barrier()  # every process's rows and bookkeeping are on disk
    if dist.rank != 0:
        dist.barrier()  # wait while process 0 merges, clusters and writes
        return None
    states = [load_file(str(work / f"final.rank{r}.safetensors")) for r in range(dist.world)]
    tokens, file_of, row_of, seen = _merge(states, cfg.max_samples, cfg.seed)
    files = [RowFile(work / f"rows.rank{r}.bin", dim, DTYPES[job.sample_dtype]) for r in range(dist.world)]
    timing = {
        "gather_seconds": max(t["gather_seconds"] for t in allt),
        "tokens_per_second": round(sum(t["tokens_per_second"] for t in allt), 1),
        "processes": dist.world,
    }
    dist_t = torch.cat([s["dist"] for s in states])[:_DIST_CAP]
    return MultiRowSource(files, file_of, row_of), tokens, seen, dist_t, timing


def _check_coverage(job: _Job, cov: dict[str, Any]) -> None:
    """Refuse a store holding senses for under ``MIN_HEAD_SHARE`` of its lexicon's heads: nothing is
    written, and the partial folder (keyed by this corpus, so never reused) is removed.

    Raises:
        SenseError: Naming ``--senses.corpus`` and ``--lexicon_dir``.
    """
    if not cov["lexicon_heads"] or cov["lexicon_heads_with_senses"] >= MIN_HEAD_SHARE * cov["lexicon_heads"]:
        return
    if job.dist.world > 1:
        job.dist.barrier()  # release the processes waiting for the store; this one fails the launch
    shutil.rmtree(job.work, ignore_errors=True)
    raise SenseError(
        f"{job.corpus_flag}: the store would hold senses for "
        f"{cov['lexicon_heads_with_senses']:,} of the lexicon's {cov['lexicon_heads']:,} heads "
        f"(under {100 * MIN_HEAD_SHARE:g}%; {cov['vocab_tokens_with_senses']:,} tokens in all): too little "
        f"or no real text for --lexicon_dir {job.lexicon_dir}; not written to {job.out}"
    )


def _meta(
    job: _Job,
    plan: _Plan,
    lex_fp: str | None,
    build_id: str,
    gather_key: str,
    got: _Gathered,
    parts: dict[str, Any],
) -> dict[str, Any]:
    """The store's ``meta.json`` (without ``complete``): identity, inputs, counts, coverage, the distance
    statistics of the gathered states, timing and runtime."""
    from dskd import __version__

    dist_t = got.dist
    q = (
        torch.quantile(dist_t.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        if dist_t.numel()
        else [0.0] * 3
    )
    meta = {
        "format": FORMAT,
        "dskd_version": __version__,
        "build_id": build_id,
        "gather_key": gather_key,
        "config": dataclasses.asdict(job.cfg),
        "teacher": {"spec": job.teacher_spec, "fingerprint": got.teacher_fp, "dtype": job.teacher_dtype},
        "lexicon": {"path": str(job.lexicon_dir) if job.lexicon_dir else None, "fingerprint": lex_fp},
        "corpus": {"specs": job.cfg.corpus, "fingerprint": plan.fingerprint, "tokens_per_corpus": plan.per_corpus},
        "vocab_size": got.vocab,
        "dim": got.dim,
        "counts": {"positions": plan.n_pos, **parts["counts"]},
        "coverage": parts["coverage"],
        "distance": {"median_mse": q[1], "p10_mse": q[0], "p90_mse": q[2], "pairs": int(dist_t.numel())},
        "timing": {**got.timing, "cluster_seconds": parts["cluster_seconds"]},
        "runtime": {
            "device": str(job.device),
            "sample_dtype": job.sample_dtype,
            "processes": job.dist.world,
            "layout": plan.layout,
            "block_chars": job.block_chars,
        },
    }
    meta["timing"]["total_seconds"] = round(time.perf_counter() - job.t_start, 2)
    return meta


def _install(job: _Job, meta: dict[str, Any]) -> None:
    """Remove the gathering's files from ``work``, write the meta (``complete`` last) and rename ``work``
    over ``out``; then release the processes waiting for the store."""
    work = job.work
    for f in [*work.glob("progress*"), *work.glob(".progress*"), *work.glob("rows.rank*"), *work.glob("final.rank*")]:
        f.unlink()
    write_text_atomic(work / META_FILE, json.dumps({**meta, "complete": False}, indent=2))
    write_text_atomic(work / META_FILE, json.dumps({**meta, "complete": True}, indent=2))
    replace_dir(work, job.out)
    job.dist.barrier()  # the others may go on: the store is in place


def _print_summary(out: Path, meta: dict[str, Any]) -> None:
    """The one-line summary of a written store."""
    c, with_senses = meta["coverage"], meta["coverage"]["vocab_tokens_with_senses"]
    heads, heads_cov = c["lexicon_heads"], c["lexicon_heads_with_senses"]
    print(
        f"dskd senses: wrote {out}: {meta['counts']['senses']:,} senses for {with_senses:,}/{meta['vocab_size']:,} "
        f"tokens ({100 * c['vocab_share']:.1f}% of the vocabulary), {meta['counts']['spans']:,} composed spans"
        + (f", lexicon heads covered {heads_cov:,}/{heads:,}" if heads else "")
        + f"; median MSE {meta['distance']['median_mse']:.3f}; {meta['timing']['total_seconds']:.0f}s"
    )


def _no_sampling_possible(cfg: SenseConfig) -> bool:
    """Whether no token can exceed the cap (then the store does not depend on the process count)."""
    return cfg.max_samples >= cfg.max_tokens


def _reuse_samples(out: Path, gather_key: str, cap: int):
    """The samples kept by ``keep_samples`` in an existing store, when they were gathered identically.

    Returns:
        (row source, tokens (R,), seen (V,), dist (m,), timing) or None.
    """
    try:
        old = json.loads((out / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    f = out / SAMPLES_FILE
    if old.get("gather_key") != gather_key or not f.is_file():
        return None
    src, tokens, seen, dist = _samples_source(f)
    if src is None:
        src, tokens, seen, dist = _legacy_source(f, cap)
    timing = {k: old["timing"][k] for k in ("gather_seconds", "tokens_per_second") if k in old.get("timing", {})}
    return src, tokens, seen, dist, {**timing, "gather_reused": True}
