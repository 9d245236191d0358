"""What the reservoir's rows on disk cost a sense build: the row traffic of a gather, replayed without a teacher.

A sense build files every gathered state in a per-token reservoir (Algorithm R) whose rows live in a
:class:`dskd.senses.reservoir.RowFile`, written with ``pwrite`` and read back with ``preadv``. This
script replays that traffic alone: token ids drawn from a Zipf law over the vocabulary (natural text
and a teacher's predictions both pile onto a few tokens, which is what makes the cap bite and
replacements happen: at 200k positions the default Zipf 1.1 keeps 145k samples, 10 tokens at the
cap; the real 200k build of SmolLM2-135M on the default corpus keeps 145k, 15 tokens at the cap),
random states, the build's batch size, cap and checkpoint rhythm (commit + fsync), then the reads of
the store writer (every sample, token by token, 8 MB at a time). It runs the same traffic with the
rows in a file and with the rows in memory (``--no-memory`` skips the latter, which needs the whole
pool in RAM), and prints, per phase: wall, user and system seconds (``getrusage``), and the
``pwrite`` / ``preadv`` / ``fsync`` calls made.

The difference between the two is what keeping the rows on disk costs; compare it with the
teacher's time for the same positions (about 400 s for 200k positions of SmolLM2-135M on 2 CPU
cores) to see its share of a build.

Usage::

    python benchmarks/senses_rows.py                          # the 200k-position CPU build's shape
    python benchmarks/senses_rows.py --positions 20000        # a quick check
    python benchmarks/senses_rows.py --dim 4096 --dtype bfloat16 --batch 32768 --vocab 128256 \\
        --positions 1000000 --no-memory                       # the shape of an 8B teacher's gather
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's dskd, not an installed copy

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dskd.senses import reservoir as reservoir_mod  # noqa: E402
from dskd.senses.reservoir import MultiRowSource, Reservoir, RowFile  # noqa: E402

CALLS: Counter[str] = Counter()


class _CountingOs:
    """``os`` as the reservoir module sees it, counting the positional reads, writes and fsyncs."""

    def __getattr__(self, name: str):
        fn = getattr(os, name)
        if name not in ("pwrite", "pwritev", "preadv", "pread", "fsync"):
            return fn

        def counted(*args, **kwargs):
            CALLS[name] += 1
            return fn(*args, **kwargs)

        return counted


def _usage() -> tuple[float, float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime


def _line(label: str, a: tuple[float, float, float], b: tuple[float, float, float]) -> str:
    calls = ", ".join(f"{k} {v:,}" for k, v in sorted(CALLS.items())) or "no file calls"
    return f"  {label:<7} wall {b[0] - a[0]:7.2f} s  user {b[1] - a[1]:7.2f} s  sys {b[2] - a[2]:6.2f} s  ({calls})"


def replay(args: argparse.Namespace, ids: torch.Tensor, store: RowFile | None) -> tuple[float, torch.Tensor]:
    """Gather then read back; prints a line per phase. Returns (checksum of the samples, per-token counts)."""
    dtype = getattr(torch, args.dtype)
    res = Reservoir.empty(args.vocab, args.dim, args.cap, args.seed, store)
    res.copy_on_write = args.checkpoint_every > 0
    base = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
    CALLS.clear()
    t0 = _usage()
    for b, s in enumerate(range(0, ids.numel(), args.batch)):
        part = ids[s : s + args.batch]
        states = base[: part.numel()] + b  # distinct values per batch, so a stale row would change the checksum
        res.add(part, states, torch.arange(s, s + part.numel()))
        if args.checkpoint_every and (b + 1) % args.checkpoint_every == 0:
            res.commit()
            if res.store is not None:
                res.store.flush()
    res.commit()
    t1 = _usage()
    print(_line("gather", t0, t1))
    CALLS.clear()
    rows = res.rows.cpu()
    src = MultiRowSource([res.store], torch.zeros_like(rows), rows) if res.store is not None else None
    step = max(1, (8 << 20) // (4 * args.dim))
    total = 0.0
    for a in range(0, rows.numel(), step):
        got = src.take(torch.arange(a, min(a + step, rows.numel()))) if src else res.read(rows[a : a + step])
        total += float(got.double().sum())
    t2 = _usage()
    print(_line("read", t1, t2))
    return total, torch.bincount(res.keys // args.cap, minlength=args.vocab)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--positions", type=int, default=200_000, help="states gathered")
    p.add_argument("--batch", type=int, default=2048, help="states per batch (batch_size x seq_len)")
    p.add_argument("--cap", type=int, default=2000, help="per-token cap (senses.max_samples)")
    p.add_argument("--dim", type=int, default=576, help="d, values per state")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="rows on disk")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--zipf", type=float, default=1.1, help="exponent of the token frequencies")
    p.add_argument("--checkpoint-every", type=int, default=20, help="batches between commit + fsync (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the run with the rows in memory")
    p.add_argument("--dir", default=None, help="folder for the rows file (default: a temporary folder)")
    args = p.parse_args(argv)
    w = 1.0 / np.arange(1, args.vocab + 1) ** args.zipf
    ids = torch.from_numpy(np.random.default_rng(args.seed).choice(args.vocab, args.positions, p=w / w.sum()))
    print(
        f"row traffic of a gather: {args.positions:,} positions, batches of {args.batch:,}, cap {args.cap}, "
        f"d {args.dim} {args.dtype}, vocab {args.vocab:,} (Zipf {args.zipf}), checkpoint every {args.checkpoint_every}"
    )
    reservoir_mod.os = _CountingOs()  # count the reservoir module's file calls (undone below)
    try:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            print("rows in a file (RowFile):")
            store = RowFile(Path(tmp) / "rows.bin", args.dim, getattr(torch, args.dtype))
            sum_file, counts = replay(args, ids, store)
            size = os.path.getsize(Path(tmp) / "rows.bin") / 2**20
            store.close()
        over = int((torch.bincount(ids, minlength=args.vocab) > args.cap).sum())
        print(
            f"  {int(counts.sum()):,} samples of {int((counts > 0).sum()):,} tokens ({over} over the cap); file {size:,.0f} MB"
        )
        if not args.no_memory:
            print("rows in memory (the same reservoir without a file):")
            sum_mem, _ = replay(args, ids, None)
            print(f"  same samples as the file: {sum_mem == sum_file} (checksums {sum_file:.6e} / {sum_mem:.6e})")
    finally:
        reservoir_mod.os = os


if __name__ == "__main__":
    torch.set_num_threads(1)  # the row traffic is single-threaded; keep the user time comparable
    main()
