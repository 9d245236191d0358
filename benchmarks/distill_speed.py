"""Cost of the sense loss and gain of the teacher cache, as ratios measured in one run.

On the SmolLM2 demo setup (SmolLM2-135M-Instruct teacher, its first 15 layers as the student, top 2
trainable; batch 1, chat k-shot ARC-Easy prompts with the teacher's 1-token continuation) it prints:

1. DSKD step time / KD step time (target <= 1.05x, aim 1.03x) and the peak memory of both (+-5%),
   with the teacher online;
2. the speed-up of training from the teacher cache over the online teacher (KD and DSKD);
3. the speed-up of running only the student's trained layers from the cache's prefix states (the
   state entering the first trained layer, ``distill.cache_prefix``) over the whole student, both cached.

Step times come from one process that interleaves the four arms step by step on the same sequences
(KD and DSKD: online, cached, cached with prefix states; rotating the order each step), each step being the
loop body of ``dskd.distill`` (``teacher_outputs``, ``window_plans``, ``micro_batch_loss``, backward,
clipping, AdamW): on shared CPUs only such interleaved ratios mean anything; each arm's time is the
median over ``--steps`` steps after a warm-up. Peak memory comes from real ``distill`` runs of KD and
DSKD (online teacher), each in its own process (its VmHWM, or ``torch.cuda.max_memory_allocated`` on
a GPU). All arms train on the same sequences (built once, with the teacher cache).

Without ``--lexicon-dir`` / ``--senses-dir`` the sense loss reads a *synthetic* store and lexicon
(k = 5 random senses of RMS 1.8 per token; 30% of tokens related, with 1-15 synonyms and 0-4
antonyms each), which the output says; candidate-set sizes are what the cost depends on.

Usage::

    python benchmarks/distill_speed.py                     # ~10 minutes on 2 busy CPU cores
    python benchmarks/distill_speed.py --steps 12 --lexicon-dir L --senses-dir S
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_proc.py, however this file is loaded
from _proc import status_mb  # noqa: E402

from dskd.config import from_dict, load_yaml, to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("kd", "dskd", "kd_cached", "dskd_cached", "kd_prefix", "dskd_prefix")


class SyntheticStore:
    """k random senses per token (RMS ~1.8, the scale of SmolLM2's final-norm states)."""

    def __init__(self, dim: int, k: int = 5, seed: int = 0):
        self.dim, self.k, self.seed = dim, k, seed
        self.meta = {"distance": {"median_mse": 3.5}, "synthetic": True}
        self.fingerprint = self.teacher_fingerprint = "synthetic"

    def senses(self, entry: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + entry)
        return torch.randn(self.k, self.dim, generator=g) * 1.8

    def entry_of(self, tail: tuple[int, ...]) -> int | None:
        return tail[0] if len(tail) == 1 else None


class SyntheticLexicon:
    """30% of tokens related: 1-15 random synonyms and 0-4 random antonyms each."""

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.seed = vocab, seed
        self.fingerprint = self.tokenizer_fingerprint = "synthetic"

    def _rel(self, t: int) -> tuple[list, list]:
        rng = random.Random(self.seed * 1_000_003 + t)
        if rng.random() >= 0.3:
            return [], []
        syn = [(x,) for x in rng.sample(range(self.vocab), rng.randint(1, 15))]
        ant = [(x,) for x in rng.sample(range(self.vocab), rng.randint(0, 4))]
        return syn, ant

    def synonyms(self, t: int) -> list[tuple[int, ...]]:
        return self._rel(t)[0]

    def antonyms(self, t: int) -> list[tuple[int, ...]]:
        return self._rel(t)[1]


def worker(arm: str, cfg_path: Path, run_dir: Path, cache_dir: Path, lexicon_dir, senses_dir) -> dict:
    """One arm: a distill run of --steps steps; returns its step times and peak memory."""
    from dskd.distill import distill

    cfg = from_dict(json.loads(cfg_path.read_text()))
    cfg.distill.teacher_cache = arm.endswith("_cached")
    cfg.loss.lam = 1.0 if arm.startswith("dskd") else 0.0
    kw: dict = {"cache_dir": cache_dir, "progress": False}
    if cfg.loss.lam > 0 and not (lexicon_dir and senses_dir):
        kw.update(store=SyntheticStore(576), lexicon=SyntheticLexicon(49152))
    elif cfg.loss.lam > 0:
        kw.update(lexicon_dir=lexicon_dir, senses_dir=senses_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out = distill(cfg, run_dir, **kw)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:], strict=False)]  # drops the warm-up step
    meta = json.loads((out / "meta.json").read_text())
    res = {
        "arm": arm,
        "step_s": statistics.median(times),
        "tokens": sum(r["tokens"] for r in rows[1:]),
        "peak_mb": status_mb("VmHWM"),
        "sense_table": (meta.get("senses") or {}).get("table"),
        "hinge_active_share": rows[-1].get("hinge_active_share"),
    }
    if torch.cuda.is_available():
        res["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def interleaved_step_times(cfg, cache_dir: Path, steps: int, lexicon_dir, senses_dir) -> tuple[dict, dict]:
    """Median step time per arm, the arms interleaved step by step in this process."""
    import contextlib
    import time

    from dskd import data as D
    from dskd.distill import micro_batch_loss, teacher_outputs
    from dskd.models import build_pair
    from dskd.sense_targets import build_sense_table, open_sense_sources, window_plans

    torch.manual_seed(0)
    pair = build_pair(cfg.model)
    cache = D.TeacherCache.open(cache_dir)
    data = cache.data
    if lexicon_dir and senses_dir:
        store, lex = open_sense_sources(Path(lexicon_dir), Path(senses_dir), pair.tokenizer, pair.teacher_fingerprint)
    else:
        store, lex = SyntheticStore(576), SyntheticLexicon(pair.vocab_size)
    targets = sorted({int(t) for s in data.seqs for t in s[1:].tolist()})
    table = build_sense_table(store, lex, targets, cfg.loss, 0)
    student = pair.student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay)
    pad = pair.tokenizer.pad_token_id
    null = contextlib.nullcontext()
    # a cache without logits (the student shares the teacher's head) recomputes them through that head
    head = pair.student.get_output_embeddings() if cache.kd == "head" else None
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for step in range(steps + 1):  # step 0 is a warm-up
        i = step % len(data)
        order = ARMS[step % len(ARMS) :] + ARMS[: step % len(ARMS)]
        for arm in order:
            lc = dataclasses.replace(cfg.loss, lam=1.0 if arm.startswith("dskd") else 0.0)
            t0 = time.perf_counter()
            batch = D.collate([data.seqs[i]], pad)
            n_tok = float(data.num_targets([i]))
            plans = window_plans(data, [i], table, lc, 0, 0, pad) if lc.lam > 0 else {}
            n_terms = float(sum(p.n_terms for p in plans.values()))
            cached = arm.endswith(("_cached", "_prefix"))
            t_logits, t_h = teacher_outputs(
                pair.teacher, cache if cached else None, [i], batch, pair.vocab_size, null, head
            )
            prefix = None
            if arm.endswith("_prefix"):
                prefix = (cache.prefix_layers, cache.prefix([i], batch["labels"].shape[1]))
            loss, _, _ = micro_batch_loss(
                student,
                batch,
                t_logits,
                t_h,
                lc,
                pair.vocab_size,
                n_tok,
                n_terms,
                list(plans.values()),
                table,
                null,
                prefix,
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step > 0:
                times[arm].append(time.perf_counter() - t0)
    med = {arm: statistics.median(v) for arm, v in times.items()}
    # paired: the arms' times of the same step share that step's sequence and machine load
    pairs = [("dskd", "kd"), ("dskd_cached", "kd_cached"), ("kd", "kd_cached"), ("dskd", "dskd_cached")]
    pairs += [("kd_cached", "kd_prefix"), ("dskd_cached", "dskd_prefix")]
    for a, b in pairs:
        med[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
    return med, table.info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m_to_15l.yaml"))
    p.add_argument("--steps", type=int, default=8, help="Timed steps per arm (after one warm-up step).")
    p.add_argument("--items", type=int, default=12, help="Training prompts (ARC-Easy train items).")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--lexicon-dir", default=None)
    p.add_argument("--senses-dir", default=None)
    p.add_argument("--skip-memory", action="store_true", help="Only the interleaved step times.")
    p.add_argument("--out", default=None, help="Work folder (default: a temporary one).")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        res = worker(a.worker, Path(a.cfg_json), Path(a.run_dir), Path(a.cache_dir), a.lexicon_dir, a.senses_dir)
        print("RESULT " + json.dumps(res))
        return 0

    work = Path(a.out or tempfile.mkdtemp(prefix="dskd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = to_dict(load_yaml(a.config))
    base["data"].update(tasks=["arc_easy"], shots=a.shots, max_items=a.items, max_length=512)
    # the memory runs: 3 optimiser steps each
    base["distill"].update(batch_size=1, grad_accum=1, epochs=1, max_steps=3, log_every=1, save_every=0, cache_topk=64)
    cfg = from_dict(base)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(to_dict(cfg)))
    cache_dir = work / "teacher_cache"
    from dskd.data import TeacherCache, build_teacher_cache

    print(f"building the teacher cache (and the training set) in {cache_dir} ...", flush=True)
    build_teacher_cache(cfg.model, cfg.data, cfg.distill, cfg.loss.T, cache_dir)
    data = TeacherCache.open(cache_dir).data
    lens = [len(s) for s in data.seqs]
    print(f"{len(data)} sequences, {min(lens)}-{max(lens)} tokens (mean {sum(lens) / len(lens):.0f})")

    # peak memory: real distill runs, KD and DSKD with the online teacher, each in its own process
    mem: dict[str, dict] = {}
    for arm in () if a.skip_memory else ("kd", "dskd"):
        run_dir = work / f"mem-{arm}"
        data.save(run_dir / "data")  # the online arms reuse the cached training set (same recipe)
        cmd = [sys.executable, __file__, "--worker", arm, "--run-dir", str(run_dir), "--cfg-json", str(cfg_path)]
        cmd += ["--cache-dir", str(cache_dir)]
        if a.lexicon_dir and a.senses_dir:
            cmd += ["--lexicon-dir", a.lexicon_dir, "--senses-dir", a.senses_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            return 1
        mem[arm] = json.loads(line[0][len("RESULT ") :])
        print(f"distill run {arm:5s}: peak {mem[arm]['peak_mb']:.0f} MB", flush=True)

    print(f"interleaved steps ({a.steps} per arm after a warm-up) ...", flush=True)
    step, table = interleaved_step_times(cfg, cache_dir, a.steps, a.lexicon_dir, a.senses_dir)

    synthetic = not (a.lexicon_dir and a.senses_dir)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    cache_prefix = TeacherCache.open(cache_dir).prefix_layers
    mc = cfg.model
    print(
        f"\n=== distill_speed: {mc.teacher} -> first {mc.student_layers} layers, top {mc.trainable_layers} trainable ==="
    )
    print(f"device {device}; batch 1, mean {sum(lens) / len(lens):.0f} tokens per sequence; {a.steps} steps per arm")
    src = "SYNTHETIC sense store + lexicon (real ones not given)" if synthetic else f"store {a.senses_dir}"
    print(
        f"sense candidates: {src}; {table.get('rows')} target tokens with senses, "
        f"{table.get('related_tokens')} related, bank {table.get('bank_rows')} rows ({table.get('bank_mb')} MB), "
        f"max |P| {table.get('max_positives')}, max |N| {table.get('max_negatives')}"
    )
    for arm in ARMS:
        print(f"  {arm:12s} median step {step[arm]:.3f}s")
    st, st_c = step["dskd/kd"], step["dskd_cached/kd_cached"]
    print("ratios are medians of per-step paired ratios (same sequence, same moment):")
    print(f"DSKD / KD step time, online teacher: {st:.3f}x  (target <= 1.05x) {'OK' if st <= 1.05 else 'MISSED'}")
    print(f"DSKD / KD step time, cached teacher: {st_c:.3f}x  (target <= 1.05x) {'OK' if st_c <= 1.05 else 'MISSED'}")
    if mem:
        m = mem["dskd"]["peak_mb"] / mem["kd"]["peak_mb"]
        print(
            f"DSKD / KD peak memory (distill runs, online teacher): {mem['dskd']['peak_mb']:.0f} / "
            f"{mem['kd']['peak_mb']:.0f} MB = {m:.3f}x  (target 0.95-1.05x) {'OK' if 0.95 <= m <= 1.05 else 'MISSED'}"
        )
    print(f"cached vs online teacher speed-up: KD {step['kd/kd_cached']:.2f}x, DSKD {step['dskd/dskd_cached']:.2f}x")
    print(
        f"cached prefix states ({cache_prefix} frozen layers not run) vs the whole student, both cached: "
        f"KD {step['kd_cached/kd_prefix']:.2f}x, DSKD {step['dskd_cached/dskd_prefix']:.2f}x"
    )
    (work / "results.json").write_text(json.dumps({"step_s": step, "memory": mem, "table": table}, indent=1))
    print(f"raw results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
