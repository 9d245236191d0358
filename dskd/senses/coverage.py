"""How big a sense store must be for the training targets to get clustered senses, counted from tokens.

A store files the state of every gathered position under one token, its *key* (``senses.key``): the
actual next token, or the teacher's argmax prediction. A token whose key count over the gathered
positions is above ``k`` gets k-means senses; one seen 1..k times keeps its raw states (at most ``k``);
one never seen has none (:func:`dskd.senses.kmeans.cluster_groups`: groups of <= k samples keep their
samples; the reservoir keeps ``min(seen, max_samples) >= min(seen, k)`` samples, so "clustered" is
``seen > k`` whatever the cap). So which tokens a store of N positions clusters is a function of the
first N keys alone, and the N positions are the build's own: :func:`gather_keys` cuts the corpus with the
build's planning pass (:func:`dskd.senses.build._plan`: the same corpora, interleaving, layout and cut),
and a store of N positions gathers exactly the first N positions of a store of more (the cut only
shortens the last document or block). With ``key: actual`` the keys are the tokens themselves and the
count needs no teacher; with ``key: predicted`` they are the teacher's argmax, computed here by running
the teacher over the build's windows in the build's batches (the gathering's own cost, without the
reservoir), or read for one size from a built store (:func:`store_seen`).

:func:`coverage_rows` turns the keys into the table ``dskd senses coverage`` prints: per store size, the
distinct training targets (and those that are lexicon heads) with senses and with clustered senses, as
a share of distinct targets and weighted by their training positions, and the store's sense rows and
disk size (an upper bound: k-means drops empty clusters).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.config import SenseConfig
from dskd.senses.store import MAX_SPAN, SenseError

# Bytes of a store per sense row beyond the float16 row itself: its int64 sample count.
_COUNT_BYTES = 8


def gather_keys(
    tok, cfg: SenseConfig, block_chars: int = 0, teacher=None, fingerprint_sizes: Sequence[int] = ()
) -> tuple[np.ndarray, dict[str, Any]]:
    """The key of every position a build of ``cfg`` gathers (``cfg.max_tokens`` at most), in stream order.

    Args:
        tok: The teacher's tokenizer.
        cfg: Sense options (``corpus`` already resolved to files / built-in names; ``max_tokens`` the largest
            store asked for).
        block_chars: The build's layout: 0 for the one-process ``stream`` layout, else the block size.
        teacher: The teacher (needed for ``key: predicted``); it runs over the build's windows, in the
            build's batches (``cfg.batch_size`` windows of ``cfg.seq_len``), on its own device.
        fingerprint_sizes: Sizes whose corpus fingerprint (what a store of that size records as
            ``corpus.fingerprint``) goes into ``info["fingerprints"]`` (``stream`` layout only).

    With ``key: predicted``, the first N keys of a count at a larger size are those a build of N positions
    computes except, possibly, in that build's last batch (fewer or shorter windows there: a different
    float summation order can flip an argmax at a near-tie); the largest size is counted as built.

    Returns:
        (keys (n,) int64 with n <= cfg.max_tokens the positions the corpus holds, plan info: layout,
        positions, corpus fingerprint and tokens per corpus).

    Raises:
        SenseError: ``key: predicted`` without a teacher; a corpus too large to keep its tokens.
    """
    from dskd.senses.build import _batches, _Dist, _plan, _windows

    if cfg.key == "predicted" and teacher is None:
        raise SenseError(
            "--senses.key predicted: the keys are the teacher's argmax at every position; give --teacher_keys "
            "(runs the teacher over the corpus: the gathering's time) or count --senses.key actual"
        )
    plan = _plan(tok, cfg, block_chars, _Dist())
    info = {"layout": plan.layout, "positions": plan.n_pos, "fingerprint": plan.fingerprint, **plan.per_corpus}
    if plan.tokens is None:
        raise SenseError(f"--senses.max_tokens {cfg.max_tokens}: too many tokens to keep for counting (at most 2**24)")
    if plan.layout == "stream" and plan.tokens:
        import hashlib

        stream = np.concatenate(plan.tokens).astype(np.int64)  # the build hashes the stream cut at n + 1 tokens
        info["fingerprints"] = {
            int(n): hashlib.sha256(stream[: int(n) + 1].tobytes()).hexdigest()[:16] for n in fingerprint_sizes
        }
    if cfg.key == "actual":
        if plan.layout == "stream":
            keys = np.concatenate(plan.tokens).astype(np.int64)[1 : plan.n_pos + 1] if plan.tokens else np.zeros(0)
        else:  # each block keeps its positions + 1 tokens; block order is position order
            keys = np.concatenate([a[1:] for a in plan.tokens]).astype(np.int64) if plan.tokens else np.zeros(0)
        return keys.astype(np.int64), info
    keys = np.full(plan.n_pos, -1, dtype=np.int64)
    dev = next(teacher.parameters()).device
    for batch in _batches(_windows(tok, cfg, plan, block_chars), cfg.batch_size):
        groups: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for s, w in batch:
            groups.setdefault(w.numel() - 1, []).append((s, w))  # a short last window runs on its own, as built
        for t_len, group in sorted(groups.items(), reverse=True):
            ids = torch.stack([w for _, w in group])[:, :-1].to(dev)
            with torch.inference_mode():
                pred = teacher(input_ids=ids).logits.argmax(-1).cpu().numpy()
            for (s, _), p in zip(group, pred, strict=True):
                keys[s : s + t_len] = p
    if (keys < 0).any():
        raise SenseError("internal: some positions got no key")  # the windows cover every position
    return keys, info


def store_seen(store_dir: str | Path, vocab: int) -> np.ndarray:
    """Samples per token of a built store, (vocab,) int64: ``min(seen, max_samples)``, so ``> 0`` and ``> k``
    tell the same as the key counts (the check of a counted size against a store that was built)."""
    from dskd.senses.store import SenseStore

    store = SenseStore.open(store_dir)
    owner = store.owner()
    counts = store._counts.to(torch.int64)
    tok = owner < store.vocab_size
    out = torch.zeros(max(vocab, store.vocab_size), dtype=torch.int64)
    out.index_add_(0, owner[tok], counts[tok])
    return out.numpy()


def coverage_row(
    seen: np.ndarray,
    k: int,
    cap: int,
    targets: np.ndarray,
    heads: Sequence[int],
    tails: Sequence[tuple[int, ...]] = (),
    dim: int = 0,
) -> dict[str, Any]:
    """What a store with these per-token key counts gives the training targets.

    Args:
        seen: (V,) int64 states filed per token (key counts over the gathered positions).
        k: Senses per token (``senses.k``).
        cap: Per-token reservoir cap (``senses.max_samples``).
        targets: (P,) int64 the target token of every training position (repeats kept: the weights).
        heads: The lexicon's head tokens.
        tails: The lexicon's multi-token tails (composed senses, for the store's size).
        dim: The state width (for the store's size; 0: not computed).

    Returns:
        Counts: ``targets`` / ``targets_with_senses`` / ``targets_clustered`` (distinct), ``positions`` /
        ``positions_with_senses`` / ``positions_clustered`` (weighted by training positions); the same with
        prefix ``head_`` for the targets that are lexicon heads; ``tokens_with_senses`` /
        ``tokens_clustered`` (whole vocabulary), ``samples`` (rows gathered), ``clustered_samples`` (rows
        k-means reads); ``senses_max`` / ``bytes_max`` (store rows and size, upper bounds) when ``dim``.
    """
    seen = np.asarray(seen, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    s_t = np.where(targets < seen.size, seen[np.minimum(targets, seen.size - 1)], 0)  # per position
    uniq, first = np.unique(targets, return_index=True)
    s_u = s_t[first]
    is_head = np.isin(targets, np.asarray(list(heads), dtype=np.int64))
    h_u = is_head[first]
    samples = np.minimum(seen, cap)
    row: dict[str, Any] = {
        "targets": int(uniq.size),
        "targets_with_senses": int((s_u > 0).sum()),
        "targets_clustered": int((s_u > k).sum()),
        "positions": int(targets.size),
        "positions_with_senses": int((s_t > 0).sum()),
        "positions_clustered": int((s_t > k).sum()),
        "head_targets": int(h_u.sum()),
        "head_targets_with_senses": int((s_u[h_u] > 0).sum()),
        "head_targets_clustered": int((s_u[h_u] > k).sum()),
        "head_positions": int(is_head.sum()),
        "head_positions_with_senses": int((s_t[is_head] > 0).sum()),
        "head_positions_clustered": int((s_t[is_head] > k).sum()),
        "tokens_with_senses": int((seen > 0).sum()),
        "tokens_clustered": int((seen > k).sum()),
        "samples": int(samples.sum()),
        "clustered_samples": int(samples[seen > k].sum()),
    }
    if dim:
        per_tok = np.minimum(samples, k)  # senses per token: k-means gives at most k, a small group its samples
        span_senses, spans = 0, 0
        for tail in tails:
            if len(tail) <= MAX_SPAN and all(0 <= t < seen.size and seen[t] > 0 for t in tail):
                spans += 1
                span_senses += int(per_tok[tail[0]])  # one chain per sense of the first token
        n = int(per_tok.sum()) + span_senses
        entries = seen.size + spans
        row["spans"] = spans
        row["senses_max"] = n
        # float16 rows + int64 counts + int64 offsets + int64 span table (the safetensors header aside)
        row["bytes_max"] = n * (2 * dim + _COUNT_BYTES) + 8 * (entries + 1) + 8 * MAX_SPAN * spans
    return row


def coverage_rows(
    keys: np.ndarray,
    sizes: Sequence[int],
    k: int,
    cap: int,
    targets: np.ndarray,
    heads: Sequence[int],
    vocab: int,
    tails: Sequence[tuple[int, ...]] = (),
    dim: int = 0,
) -> list[dict[str, Any]]:
    """:func:`coverage_row` for stores of the first ``size`` keys, per size (``size`` capped at ``len(keys)``:
    the positions the corpus holds; ``row["positions_gathered"]`` says how many were counted)."""
    rows = []
    for n in sizes:
        m = min(int(n), int(keys.size))
        seen = np.bincount(keys[:m], minlength=vocab).astype(np.int64)
        rows.append({"size": int(n), "positions_gathered": m, **coverage_row(seen, k, cap, targets, heads, tails, dim)})
    return rows


def recipe_keys(
    model,
    senses: SenseConfig,
    data,
    tok,
    max_positions: int,
    prompts: Path | None = None,
    fingerprint_sizes: Sequence[int] = (),
) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`gather_keys` for a recipe: its ``prompts`` corpus resolved as ``dskd run`` resolves it (the file
    ``prompts``, else the training prompts of ``data`` written as :func:`dskd.pipeline.write_prompts` writes
    them), the teacher loaded for ``key: predicted`` as the build loads it, up to ``max_positions``."""
    import dataclasses
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        corpus = list(senses.corpus)
        if "prompts" in corpus:
            if prompts is None:  # as dskd.pipeline.write_prompts writes them (not imported: an import cycle)
                from dskd.data import task_prompts

                prompts = Path(tmp) / "prompts.jsonl"
                lines = [json.dumps({"text": p}) for p in task_prompts(data, tok)]
                if not lines:
                    raise SenseError("--senses.corpus: 'prompts' needs training prompts, but data.tasks is empty")
                prompts.write_text("\n".join(lines) + "\n")
            corpus = [str(prompts) if c == "prompts" else c for c in corpus]
        cfg = dataclasses.replace(senses, corpus=corpus, max_tokens=max_positions)
        teacher = None
        if senses.key == "predicted":
            from dskd.devices import resolve_device, resolve_dtype
            from dskd.models import check_rope_length, load_model

            dev = resolve_device(senses.device, flag="--senses.device")
            teacher = load_model(model.teacher, resolve_dtype(senses.dtype, dev, flag="--senses.dtype")).to(dev)
            check_rope_length(teacher, senses.seq_len, "--senses.seq_len", "gathering windows")
        return gather_keys(tok, cfg, senses.block_chars or 0, teacher, fingerprint_sizes)


def store_check(
    store: Path,
    timing: Path | None,
    senses: SenseConfig,
    targets: np.ndarray,
    lex,
    vocab: int,
    fingerprint: str | None = None,
) -> tuple[dict[str, Any], dict[str, float], int, int, str]:
    """The row of a built store (from its own samples, :func:`store_seen`) and the cost rates it gives.

    The rates: gathering seconds per position and the stage's time besides gathering and k-means, from
    ``timing`` (a store's ``meta.json``; default the store's own), and k-means seconds per clustered
    sample row (its ``cluster_seconds`` over the store's clustered samples).

    Args:
        fingerprint: The corpus fingerprint of the recipe's first positions, as many as the store holds
            (:func:`gather_keys`); a store gathered from other text is refused. None: not checked.

    Returns:
        (row, cost rates for :func:`coverage_markdown`, state width, vocabulary, the store's key).
    """
    import json

    meta = json.loads((Path(store) / "meta.json").read_text())
    if fingerprint is not None and meta["corpus"]["fingerprint"] != fingerprint:
        raise SenseError(
            f"--store {store}: gathered from other text (corpus fingerprint {meta['corpus']['fingerprint']}) than "
            f"this recipe's first {meta['counts']['positions']:,} positions ({fingerprint}); --senses.corpus?"
        )
    if int(meta["config"]["max_samples"]) < senses.k:
        raise SenseError(f"--store {store}: keeps at most {meta['config']['max_samples']} samples a token, < k")
    dim, vocab = int(meta["dim"]), max(vocab, int(meta["vocab_size"]))
    seen = store_seen(store, vocab)
    n = int(meta["counts"]["positions"])
    row = coverage_row(seen, senses.k, senses.max_samples, targets, lex.heads(), lex.multi_token_tails(), dim)
    check = {"size": n, "positions_gathered": n, **row}
    tm = json.loads(Path(timing or Path(store) / "meta.json").read_text())
    t = tm["timing"]
    cost = {
        "seconds_per_position": t["gather_seconds"] / int(tm["counts"]["positions"]),
        "kmeans_seconds_per_sample": t["cluster_seconds"] / max(1, check["clustered_samples"]),
        "fixed_seconds": t["total_seconds"] - t["gather_seconds"] - t["cluster_seconds"],
    }
    return check, cost, dim, vocab, str(meta["config"]["key"])


def training_targets(seqs: Sequence[torch.Tensor]) -> np.ndarray:
    """The target token of every training position (every token of a sequence but the first), as the run's
    sense table and its ``sense targets`` line take them."""
    parts = [s[1:].numpy() for s in seqs if len(s) > 1]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def recipe_targets(data, tok, data_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """:func:`training_targets` of a recipe's training set: the one in ``data_dir`` (a folder with
    ``dataset.safetensors`` + ``recipe.json``: a run's teacher cache), else the sequences of ``data``
    without the teacher's continuations (those need the teacher).

    Returns:
        (targets (P,) int64, where they came from, in words).
    """
    if data_dir is not None:
        from dskd.data import TokenData

        return training_targets(TokenData.load(Path(data_dir)).seqs), f"the training set in {data_dir}"
    from dskd.data import prompt_and_text_sequences

    p, w = prompt_and_text_sequences(data, tok)
    return training_targets(p + w), "the training prompts' tokens (the teacher's continuations left out: no --data_dir)"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def coverage_markdown(rows: list[dict[str, Any]], k: int, cost: dict[str, float] | None = None) -> str:
    """The table of :func:`coverage_rows` (and, given ``cost``, each size's estimated build time) as markdown.

    Args:
        cost: ``seconds_per_position`` (gathering), ``fixed_seconds`` (the stage's time besides gathering and
            k-means), ``kmeans_seconds_per_sample`` (k-means time per clustered sample row).
    """
    head = (
        f"| store positions | targets with senses | clustered (> k = {k} states) | clustered, weighted by "
        "training positions | lexicon-head targets with senses | head targets clustered | head targets "
        "clustered, weighted | tokens clustered (vocabulary) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        n = f"{r['size']:,}" + ("" if r["positions_gathered"] == r["size"] else f" ({r['positions_gathered']:,} held)")
        lines.append(
            f"| {n} | {r['targets_with_senses']:,} / {r['targets']:,} | {r['targets_clustered']:,} "
            f"({_pct(r['targets_clustered'], r['targets'])}) | {_pct(r['positions_clustered'], r['positions'])} | "
            f"{r['head_targets_with_senses']:,} / {r['head_targets']:,} | {r['head_targets_clustered']:,} "
            f"({_pct(r['head_targets_clustered'], r['head_targets'])}) | "
            f"{_pct(r['head_positions_clustered'], r['head_positions'])} | {r['tokens_clustered']:,} |"
        )
    if cost is None or "senses_max" not in rows[0]:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| store positions | samples gathered | samples k-means reads | sense rows (at most) | store on disk "
        "(at most) | gathering (est.) | k-means (est.) | senses stage (est.) |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        g = r["positions_gathered"] * cost["seconds_per_position"]
        km = r["clustered_samples"] * cost["kmeans_seconds_per_sample"]
        total = g + km + cost["fixed_seconds"]
        lines.append(
            f"| {r['positions_gathered']:,} | {r['samples']:,} | {r['clustered_samples']:,} | {r['senses_max']:,} | "
            f"{r['bytes_max'] / 2**20:.1f} MiB | {g / 60:.1f} min | {km:.1f} s | {total / 60:.1f} min |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "coverage_markdown",
    "coverage_row",
    "coverage_rows",
    "gather_keys",
    "recipe_keys",
    "recipe_targets",
    "store_check",
    "store_seen",
    "training_targets",
]
