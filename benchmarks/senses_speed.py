"""Speed of the sense dictionary, as ratios measured in one run (timings on shared CPUs are noisy).

1. Gathering vs a bare teacher forward over the same batches (target: >= 90% of the throughput).
   Both run on identical batches of the default corpus, interleaved (bare, gather, bare, gather, ...)
   so that load from other processes hits both alike; the first pair is a warm-up. The reservoir is a
   build's: its rows go to a file.
2. Batched k-means (``dskd.senses.cluster_groups``) vs a per-token scikit-learn ``KMeans`` loop (what
   the reference code does) on the samples of a real store built with ``--senses.keep_samples true``
   (target: >= 10x faster at <= 2% higher total inertia).

Usage::

    python benchmarks/senses_speed.py --store /tmp/senses_200k            # both parts
    python benchmarks/senses_speed.py --skip-cluster --batches 6           # gathering only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's dskd, not an installed copy
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from dskd import senses as S  # noqa: E402
from dskd.models import load_model, load_tokenizer  # noqa: E402


def bench_gather(teacher: str, batches: int, batch_size: int, seq_len: int, key: str) -> float:
    tok = load_tokenizer(teacher)
    model = load_model(teacher)
    n = (batches + 1) * batch_size * seq_len
    stream, _ = S.token_stream(tok, ["default"], n + 1)
    head = model.get_output_embeddings()
    vocab, dim = head.weight.shape
    # the reservoir of a build: rows in a file, replaced rows moved while checkpointing
    tmp = tempfile.TemporaryDirectory()
    res = S.Reservoir.empty(vocab, dim, 2000, 0, store=S.RowFile(Path(tmp.name) / "rows.bin", dim, torch.float32))
    res.copy_on_write = True
    dist = torch.zeros(0)
    captured: dict = {}
    hook = head.register_forward_pre_hook(lambda _m, a: captured.__setitem__("h", a[0]))
    t_bare = t_gather = 0.0
    for b in range(batches + 1):
        a = b * batch_size * seq_len
        ids = stream[a : a + batch_size * seq_len].view(batch_size, seq_len)
        nxt = stream[a + 1 : a + 1 + batch_size * seq_len].view(batch_size, seq_len) if key == "actual" else None
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        captured.clear()
        t1 = time.perf_counter()
        dist = S.gather_batch(model, ids, nxt, res, dist, captured)
        t2 = time.perf_counter()
        if b:  # the first pair warms up
            t_bare += t1 - t0
            t_gather += t2 - t1
    hook.remove()
    tmp.cleanup()
    tokens = batches * batch_size * seq_len
    ratio = t_bare / t_gather
    print(
        f"gathering: {tokens:,} tokens in {batches} batches of {batch_size}x{seq_len}, key={key}\n"
        f"  bare forward {tokens / t_bare:7.1f} tok/s | gathering {tokens / t_gather:7.1f} tok/s | "
        f"ratio {100 * ratio:.1f}% (target >= 90%)"
    )
    return ratio


def bench_cluster(store: str, k: int, iters: int, max_tokens: int, seed: int) -> tuple[float, float]:
    tokens, samples = S.load_samples(store, cap=None if os.path.isdir(store) else 2000)
    uniq, sizes = torch.unique_consecutive(tokens, return_counts=True)
    big = (sizes > k).nonzero().flatten()
    if max_tokens and len(big) > max_tokens:
        g = torch.Generator().manual_seed(seed)
        big = big[torch.randperm(len(big), generator=g)[:max_tokens]].sort().values
    starts = torch.cumsum(sizes, 0) - sizes
    groups = [samples[int(starts[i]) : int(starts[i] + sizes[i])] for i in big.tolist()]
    x = torch.cat(groups)
    sz = sizes[big]
    print(
        f"clustering: {len(groups):,} tokens with > {k} samples, {x.shape[0]:,} samples x {x.shape[1]} (from {store})"
    )
    t0 = time.perf_counter()
    _, _, inertia = S.cluster_groups(x, sz, k, iters, seed)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    S.cluster_groups(x, sz, k, iters, seed)  # the same call again: allocator and pages warm
    t_ours = time.perf_counter() - t0
    print(f"  batched torch k-means: first call {t_cold:.2f} s, second call {t_ours:.2f} s")
    # Imported only now: scikit-learn's OpenMP runtime, once loaded, was seen to slow torch's threads here.
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    sk_inertia = 0.0
    for grp in groups:
        sk_inertia += KMeans(k, random_state=seed).fit(grp.numpy()).inertia_
    t_sk = time.perf_counter() - t0
    ours = float(inertia.sum())
    print(
        f"  batched torch k-means {t_ours:7.2f} s (first call {t_cold:.2f} s) | per-token sklearn KMeans "
        f"{t_sk:7.2f} s | speed-up {t_sk / t_ours:.1f}x, first call {t_sk / t_cold:.1f}x (target >= 10x)\n"
        f"  total inertia: batched {ours:.6g} | sklearn {sk_inertia:.6g} | "
        f"batched/sklearn {ours / sk_inertia:.4f} (target <= 1.02)"
    )
    return t_sk / t_ours, ours / sk_inertia


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="Teacher model spec.")
    p.add_argument("--batches", type=int, default=4, help="Timed batches (after one warm-up batch).")
    p.add_argument("--batch-size", type=int, default=8, help="Sequences per batch.")
    p.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence.")
    p.add_argument("--key", choices=("predicted", "actual"), default="predicted", help="Gathering key.")
    p.add_argument(
        "--store",
        default="/tmp/senses_200k",
        help="A store built with --senses.keep_samples true (or a progress-*.safetensors checkpoint, cap 2000).",
    )
    p.add_argument("--k", type=int, default=5, help="Senses per token.")
    p.add_argument("--iters", type=int, default=25, help="Lloyd iterations of the batched k-means.")
    p.add_argument("--max-tokens", type=int, default=0, help="Cluster a random subset of this many tokens (0: all).")
    p.add_argument("--seed", type=int, default=0, help="Seed.")
    p.add_argument("--skip-gather", action="store_true", help="Skip the gathering benchmark.")
    p.add_argument("--skip-cluster", action="store_true", help="Skip the clustering benchmark.")
    a = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    if not a.skip_gather:
        bench_gather(a.teacher, a.batches, a.batch_size, a.seq_len, a.key)
    if not a.skip_cluster:
        bench_cluster(a.store, a.k, a.iters, a.max_tokens, a.seed)


if __name__ == "__main__":
    main()
