"""Speed of the cache stage: today's one batched teacher pass vs the path it replaced, in one run.

The stage under test is ``dskd.data.ensure_cache`` on the demo recipe (``configs/smollm2-135m_to_15l.yaml``:
chat 1-shot letter prompts from four tasks' training halves, the teacher's 1-token greedy answer,
then the cache). Both paths start from the same loaded teacher/student pair and build the cache from
scratch (prompt tokenisation included):

* **old**: ``dskd/data.py`` as of commit ``3a0196b`` (read with ``git show``, or from ``--old-source``),
  loaded as a separate module: one full teacher forward per prompt at batch 1 for the continuation,
  then a second pass over prompt + continuation in unsorted batches of 4 that stores top-64 logits;
* **new**: ``dskd.data`` of this checkout: one pass over length-sorted batches in which the
  continuation is the argmax at each prompt's last position, storing hidden states only (the
  truncated student shares the teacher's head, so KD logits are recomputed at training time).

With ``--repeats R`` the two paths alternate (old, new, new, old, ...) so machine load hits both alike;
the ratio printed is the median over repeats of old time / new time. The script also checks that both
paths give the same training sequences and the same teacher states.

Usage::

    python benchmarks/cache_speed.py --limit 2            # quick check: 8 prompts
    python benchmarks/cache_speed.py --repeats 2          # the demo's 400 prompts; run it alone on the machine

At ``--limit 2`` on 2 CPU cores shared with other jobs (so slow, and only indicative) it printed: old
185.6 s, new 47.0 s, 3.95x; same sequences; teacher states within 3.9e-3 (fp16 rows of two batchings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's dskd, not an installed copy
OLD_COMMIT = "3a0196b"


def load_old_data_module(source: str | None, commit: str):
    """``dskd/data.py`` of ``commit`` (or the file ``source``) as the module ``dskd_old_data``."""
    if source:
        code = Path(source).read_text()
    else:
        r = subprocess.run(["git", "show", f"{commit}:dskd/data.py"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            sys.exit(f"git show {commit}:dskd/data.py failed ({r.stderr.strip()}); pass --old-source FILE")
        code = r.stdout
    spec = importlib.util.spec_from_loader("dskd_old_data", loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dskd_old_data"] = mod  # dataclasses look their module up there
    exec(compile(code, f"{commit}:dskd/data.py", "exec"), mod.__dict__)  # noqa: S102
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m_to_15l.yaml"))
    p.add_argument("--limit", type=int, default=0, help="Prompts per task (0: the recipe's data.max_items).")
    p.add_argument("--repeats", type=int, default=1, help="Timed runs of each path, alternating.")
    p.add_argument("--old-commit", default=OLD_COMMIT, help="Commit whose dskd/data.py is the old path.")
    p.add_argument("--old-source", default=None, help="Read the old dskd/data.py from this file instead of git.")
    p.add_argument("--out", default=None, help="Work folder (default: a temporary one, removed at the end).")
    a = p.parse_args()

    from dskd import data as new
    from dskd.config import load_yaml
    from dskd.models import build_pair

    cfg = load_yaml(a.config)
    if a.limit:
        cfg.data.max_items = a.limit
    old = load_old_data_module(a.old_source, a.old_commit)
    work = Path(a.out or tempfile.mkdtemp(prefix="dskd-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pair = build_pair(cfg.model)
    print(
        f"teacher + student loaded in {time.time() - t0:.1f} s; recipe {a.config}, {cfg.data.max_items or 'all'} "
        f"prompts per task of {', '.join(cfg.data.tasks)}",
        flush=True,
    )
    # one untimed forward: the first call of a process pays one-time costs
    with torch.no_grad():
        pair.teacher(input_ids=torch.arange(64)[None] + 100)

    times: dict[str, list[float]] = {"old": [], "new": []}
    folders = {"old": work / "old", "new": work / "new"}
    for r in range(a.repeats):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            mod = old if name == "old" else new
            shutil.rmtree(folders[name], ignore_errors=True)
            t = time.perf_counter()
            if mod is new:
                mod.ensure_cache(cfg.data, cfg.distill, cfg.loss.T, pair, folders[name], force=True)
            else:  # the old module's signature took the whole recipe
                mod.ensure_cache(cfg, pair, folders[name], force=True)
            times[name].append(time.perf_counter() - t)
            print(f"repeat {r}: {name} path {times[name][-1]:.1f} s", flush=True)

    # the same training data and teacher states from both paths
    o_meta = json.loads((folders["old"] / "meta.json").read_text())
    n_meta = json.loads((folders["new"] / "meta.json").read_text())
    o_cache = old.TeacherCache(folders["old"], o_meta)
    n_cache = new.TeacherCache.open(folders["new"])
    seqs_o, seqs_n = o_cache.data.seqs, n_cache.data.seqs
    same_len = len(seqs_o) == len(seqs_n)
    differ = sum(not torch.equal(x, y) for x, y in zip(seqs_o, seqs_n, strict=False)) if same_len else -1
    worst = 0.0
    for i in range(min(8, len(seqs_n))):
        T = len(seqs_n[i])
        ho = o_cache.get([i], T)[1][0, : T - 1]
        hn = n_cache.get([i], T)[1][0, : T - 1]
        worst = max(worst, float((ho - hn).abs().max()))
    tokens = sum(len(s) for s in seqs_n)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(o / n for o, n in zip(times["old"], times["new"], strict=True))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"\n=== cache_speed: {cfg.name}, {len(seqs_n)} sequences, {tokens:,} tokens, device {device} ===")
    print(
        f"old path ({a.old_commit}: per-prompt continuation + top-{cfg.distill.cache_topk} cache pass): "
        f"median {med['old']:.1f} s, {tokens / med['old']:.0f} tokens/s"
    )
    print(
        f"new path (one batched pass, {n_meta['settings']['kd']} mode): median {med['new']:.1f} s, "
        f"{tokens / med['new']:.0f} tokens/s (the pass alone: {n_meta['tokens_per_s']:.0f} tokens/s)"
    )
    print(f"speed-up old / new: {ratio:.2f}x (target >= 2x) {'OK' if ratio >= 2 else 'MISSED'}; repeats {a.repeats}")
    print(
        f"same sequences: {'yes' if differ == 0 else f'NO ({differ} differ)'}; "
        f"teacher states max |old - new| over 8 sequences: {worst:.2e} (old fp16 rows vs new fp16 rows)"
    )
    print(
        f"cache size: old {sum(f.stat().st_size for f in folders['old'].iterdir()) / 2**20:.1f} MB, "
        f"new {sum(f.stat().st_size for f in folders['new'].iterdir()) / 2**20:.1f} MB"
    )
    if not a.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
