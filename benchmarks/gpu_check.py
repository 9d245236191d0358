"""GPU check at the paper's scale: random-weight models with Llama-3-8B's shapes, built on the GPU.

Measures, in bfloat16, with the project's own code paths:

1. gathering: teacher forward + final-norm states + predicted-token keys + a reservoir-like scatter
   of the states to pinned host memory, in tokens/s, and its ratio to a bare forward on the same batches;
2. k-means: seconds for 1M rows at d = 4096, k = 10 (500 tokens x 2,000 samples, random rows: the
   slowest case, every group runs all its iterations), through the project's ``cluster_groups``;
3. distillation: KD and DSKD step time at sequence length 2,048 (teacher online, 16-layer student with
   its top 2 layers trained in float32 master weights, AdamW), their ratio, and the peak GPU memory;
4. evaluation: letter-scored 5-shot-sized questions per second through ``dskd.evaluate.score_groups``;

then projects the wall time of the paper recipe (``configs/llama3-8b-instruct_to_16l.yaml``, token and
step counts from ``dskd plan``) on 1 and on 8 GPUs. The sense loss reads a synthetic store and lexicon
(``benchmarks/distill_speed.py``): its cost depends on candidate-set sizes, not on their values.

Usage::

    python benchmarks/gpu_check.py --out results/benchmarks/gpu_check.json   # one H200: ~3-5 min
    python benchmarks/gpu_check.py --tiny                                     # scaled-down, on CPU, seconds

``--tiny`` shrinks every shape (d 64, 4 -> 2 layers, vocab 1,000, short sequences) so the script is
tested without a GPU; its numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # this checkout's dskd, then distill_speed


@dataclass
class Shapes:
    hidden: int
    layers: int
    student_layers: int
    trainable: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    gather_batch: int
    gather_len: int
    train_len: int
    kmeans_groups: int
    kmeans_per_group: int
    k: int
    eval_items: int
    eval_ctx: int
    repeats: int


PAPER = Shapes(4096, 32, 16, 2, 32, 8, 14336, 128256, 8, 1024, 2048, 500, 2000, 10, 96, 700, 5)
TINY = Shapes(64, 4, 2, 1, 4, 2, 128, 1000, 4, 64, 96, 20, 200, 10, 12, 48, 2)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one untimed warm-up call."""
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_teacher(sh: Shapes, dev: torch.device, dtype: torch.dtype):
    """A Llama with random weights, created directly on ``dev`` (no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=sh.vocab,
        hidden_size=sh.hidden,
        intermediate_size=sh.intermediate,
        num_hidden_layers=sh.layers,
        num_attention_heads=sh.heads,
        num_key_value_heads=sh.kv_heads,
        max_position_embeddings=max(8192, sh.train_len),
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_gather(teacher, sh: Shapes, dev: torch.device) -> dict:
    """Gathering vs a bare forward on the same batches, tokens/s."""
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, sh.vocab, (sh.gather_batch, sh.gather_len), device=dev, generator=g)
    n = ids.numel()
    pin = dev.type == "cuda"
    host = torch.empty(n, sh.hidden, dtype=torch.bfloat16, pin_memory=pin)  # a file-backed reservoir's staging rows

    @torch.no_grad()
    def bare():
        return teacher(input_ids=ids, use_cache=False).logits

    @torch.no_grad()
    def gather():
        h = teacher.model(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, d), after the final norm
        keys = teacher.lm_head(h).argmax(-1).flatten()  # predicted next token, (B*T,)
        # reservoir-like scatter: a random subset of slots replaced, rows grouped by key, copied to the host
        order = torch.argsort(keys, stable=True)
        keep = order[torch.rand(n, device=dev, generator=g)[order] < 0.5]
        rows = h.reshape(n, -1).index_select(0, keep).to(torch.bfloat16)
        host[: rows.shape[0]].copy_(rows, non_blocking=pin)

    t_bare = _timed(bare, dev, sh.repeats)
    t_gather = _timed(gather, dev, sh.repeats)
    return {
        "batch": [sh.gather_batch, sh.gather_len],
        "bare_tokens_per_s": n / t_bare,
        "gather_tokens_per_s": n / t_gather,
        "ratio": t_bare / t_gather,
    }


def _cluster_fn():
    """The project's k-means over groups, wherever it lives."""
    for name in ("dskd.senses.kmeans", "dskd.senses"):
        try:
            mod = __import__(name, fromlist=["cluster_groups"])
        except ImportError:
            continue
        if hasattr(mod, "cluster_groups"):
            return mod.cluster_groups, name
    raise ImportError("no cluster_groups in dskd.senses.kmeans or dskd.senses")


def check_kmeans(sh: Shapes, dev: torch.device) -> dict:
    fn, where = _cluster_fn()
    rows = sh.kmeans_groups * sh.kmeans_per_group
    g = torch.Generator(device=dev).manual_seed(0)
    samples = torch.randn(rows, sh.hidden, device=dev, generator=g)  # (N, d) float32
    sizes = torch.full((sh.kmeans_groups,), sh.kmeans_per_group, dtype=torch.long, device=dev)
    kw = {"device": dev} if "device" in inspect.signature(fn).parameters else {}
    _sync(dev)
    t0 = time.perf_counter()
    senses, counts, _ = fn(samples, sizes, sh.k, 25, 0, **kw)
    _sync(dev)
    dt = time.perf_counter() - t0
    assert len(senses) == sh.kmeans_groups and senses[0].device.type == dev.type
    return {"function": f"{where}.cluster_groups", "rows": rows, "dim": sh.hidden, "k": sh.k, "seconds": dt}


def check_distill(teacher, sh: Shapes, dev: torch.device, dtype: torch.dtype, loss=None) -> dict:
    """KD and DSKD steps of ``dskd.distill``'s loop body, interleaved, at ``train_len`` tokens, with the
    recipe's loss section (``loss``; default: the config defaults) and its KD arm (lambda = 0)."""
    import dataclasses

    from distill_speed import SyntheticLexicon, SyntheticStore

    from dskd import data as D
    from dskd.config import LossConfig
    from dskd.distill import micro_batch_loss, teacher_outputs
    from dskd.models import freeze_except_top, head_at_targets_ok, keep_float32_master, truncate
    from dskd.prefix import prefix_states, shared_prefix_layers
    from dskd.sense_targets import build_sense_table, window_plans

    student = truncate(teacher, sh.student_layers, share=True)
    freeze_except_top(student, sh.trainable)
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.clone()
    keep_float32_master(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, sh.vocab, (sh.train_len,), generator=g)
    data = D.TokenData([seq], {"hash": "gpu-check"})
    lc_dskd = loss or LossConfig()
    lc_kd = dataclasses.replace(lc_dskd, lam=0.0)
    table = build_sense_table(
        SyntheticStore(sh.hidden, k=sh.k), SyntheticLexicon(sh.vocab), seq[1:].tolist(), lc_dskd
    ).to(dev)
    plans = window_plans(data, [0], table, lc_dskd, 0, 0, 0)
    n_terms = float(sum(p.n_terms for p in plans.values()))
    batch = {k: v.to(dev) for k, v in D.collate([seq], 0).items()}
    n_tok = float(data.num_targets([0]))
    autocast = torch.autocast(device_type=dev.type, dtype=dtype)
    # as the loop runs from a teacher cache: the student's layers above the frozen ones, from the state
    # entering them (what the cache stores), and the frozen head at target positions only
    n_pre = shared_prefix_layers(teacher, student)
    with torch.no_grad():
        states = prefix_states(teacher, n_pre, **{k: batch[k] for k in ("input_ids", "attention_mask")})
    at_targets = head_at_targets_ok(student)

    def step(lc) -> None:
        t_logits, t_h = teacher_outputs(teacher, None, [0], batch, sh.vocab, autocast)
        loss, _, _ = micro_batch_loss(
            student,
            batch,
            t_logits,
            t_h,
            lc,
            sh.vocab,
            n_tok,
            n_terms,
            [plans[0]],
            table,
            autocast,
            (n_pre, states) if n_pre else None,
            at_targets,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out: dict = {"seq_len": sh.train_len, "trainable_params": sum(p.numel() for p in params)}
    out.update(prefix_layers=n_pre, head_at_targets=at_targets)
    times: dict[str, list[float]] = {"kd": [], "dskd": []}
    peaks: dict[str, float | None] = {}
    for arm, lc in (("kd", lc_kd), ("dskd", lc_dskd)):  # warm-up and peak memory, one arm at a time
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        step(lc)
        _sync(dev)
        peaks[arm] = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    for i in range(sh.repeats):  # interleaved, alternating order, so drift hits both arms alike
        for arm in ("kd", "dskd") if i % 2 == 0 else ("dskd", "kd"):
            t0 = time.perf_counter()
            step(lc_kd if arm == "kd" else lc_dskd)
            _sync(dev)
            times[arm].append(time.perf_counter() - t0)
    kd, dskd = statistics.median(times["kd"]), statistics.median(times["dskd"])
    out.update(
        kd_step_s=kd,
        dskd_step_s=dskd,
        ratio=dskd / kd,
        kd_peak_gb=peaks["kd"],
        dskd_peak_gb=peaks["dskd"],
        sense_table=table.info,
    )
    return out


def check_eval(teacher, sh: Shapes, dev: torch.device) -> dict:
    """Letter scoring (4 one-token continuations per question) of ``eval_items`` questions."""
    from dskd.evaluate import Group, score_groups

    g = torch.Generator().manual_seed(2)
    groups = [
        Group(
            item=i,
            choices=[0, 1, 2, 3],
            ctx=torch.randint(5, sh.vocab, (sh.eval_ctx,), generator=g).tolist(),
            conts=[[int(x)] for x in torch.randint(5, sh.vocab, (4,), generator=g)],
        )
        for i in range(sh.eval_items)
    ]
    with torch.no_grad():
        score_groups(teacher, groups[:2], batch_size=16, pad_id=0)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        score_groups(teacher, groups, batch_size=16, pad_id=0)
        _sync(dev)
    dt = time.perf_counter() - t0
    return {"items": sh.eval_items, "context_tokens": sh.eval_ctx, "items_per_s": sh.eval_items / dt}


def project(res: dict, config: Path, gpus: int) -> dict:
    """Wall time of the paper recipe on ``gpus`` GPUs from the measured rates and the plan's counts."""
    from dskd.config import load_yaml
    from dskd.plan import make_plan

    cfg = load_yaml(config)
    plan = make_plan(cfg, ["--config", str(config)], gpus=gpus, counts=res.get("_counts"))
    stages = {st["name"]: st for st in plan["stages"]}
    data = plan["data"]
    sc = cfg.senses
    gather_h = sc.max_tokens / res["gather"]["gather_tokens_per_s"] / gpus / 3600  # each rank its own shard
    reservoir_rows = min(plan["teacher"]["vocab"] * sc.max_samples, sc.max_tokens)
    km = res["kmeans"]
    kmeans_h = km["seconds"] * reservoir_rows / km["rows"] / 3600 if "seconds" in km else 0.0  # rank 0 clusters
    avg_len = data["positions"] / max(data["sequences"], 1)
    per_seq = res["distill"]["dskd_step_s"] * avg_len / res["distill"]["seq_len"]  # step time ~ linear in length
    per_seq_kd = res["distill"]["kd_step_s"] * avg_len / res["distill"]["seq_len"]
    epochs = cfg.distill.epochs
    train_h = data["sequences"] * epochs * (per_seq + per_seq_kd) / gpus / 3600
    # eval: teacher + 3 students (16 of 32 layers: ~half the time each); 4 models spread over the GPUs
    per_item_tokens = data["eval_tokens"] / max(data["eval_items"], 1)
    eval_item_s = per_item_tokens / res["eval"]["context_tokens"] / res["eval"]["items_per_s"]  # ~ linear in length
    eval_h = data["eval_items"] * eval_item_s * (1 + 3 * 0.55) / min(gpus, 4) / 3600
    out = {
        "gpus": gpus,
        "senses_gather_h": gather_h,
        "senses_kmeans_h": kmeans_h,
        "distill_kd_plus_dskd_h": train_h,
        "eval_4_models_h": eval_h,
    }
    out["total_h"] = sum(v for k, v in out.items() if k.endswith("_h"))
    out["steps_per_arm"] = stages["distill:dskd"]["steps"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (the GPU), cuda, cuda:1; cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="Scaled-down shapes (runs on CPU in seconds; a smoke test).")
    ap.add_argument("--out", type=Path, default=None, help="Also write the results as JSON here.")
    ap.add_argument(
        "--config", type=Path, default=ROOT / "configs" / "llama3-8b-instruct_to_16l.yaml", help="Recipe to project."
    )
    args = ap.parse_args(argv)
    from dskd.devices import describe, resolve_device

    dev = resolve_device(args.device)
    if dev.type != "cuda" and not args.tiny:
        print(
            f"gpu_check: no GPU here ({dev}); run on a GPU node, or pass --tiny for a CPU smoke test", file=sys.stderr
        )
        return 2
    sh = TINY if args.tiny else PAPER
    dtype = torch.bfloat16
    t_all = time.perf_counter()
    res: dict = {
        "device": describe(dev),
        "tiny": args.tiny,
        "dtype": "bfloat16",
        "shapes": asdict(sh),
        "torch": torch.__version__,
    }
    print(f"gpu_check on {res['device']}{' (TINY shapes: not GPU numbers)' if args.tiny else ''}", flush=True)
    t0 = time.perf_counter()
    teacher = build_teacher(sh, dev, dtype)
    res["build_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in teacher.parameters())
    print(f"teacher: {n_params / 1e9:.2f}B parameters built on {dev} in {res['build_s']:.1f}s", flush=True)

    res["gather"] = check_gather(teacher, sh, dev)
    r = res["gather"]
    print(
        f"gather: {r['gather_tokens_per_s']:,.0f} tok/s vs bare forward {r['bare_tokens_per_s']:,.0f} tok/s "
        f"({r['ratio']:.1%})",
        flush=True,
    )
    from dskd.config import load_yaml

    res["distill"] = check_distill(teacher, sh, dev, dtype, load_yaml(args.config).loss)
    r = res["distill"]
    peak = (
        f"; peak {r['kd_peak_gb']:.1f} GB (KD) / {r['dskd_peak_gb']:.1f} GB (DSKD)"
        if r["kd_peak_gb"] is not None
        else ""
    )
    print(
        f"distill @ {r['seq_len']} tokens: KD {r['kd_step_s'] * 1e3:.0f} ms/step, DSKD {r['dskd_step_s'] * 1e3:.0f} "
        f"ms/step, ratio {r['ratio']:.3f}{peak}",
        flush=True,
    )
    res["eval"] = check_eval(teacher, sh, dev)
    print(f"eval: {res['eval']['items_per_s']:.1f} items/s ({sh.eval_ctx}-token questions, letter scoring)", flush=True)
    del teacher
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    try:
        res["kmeans"] = check_kmeans(sh, dev)
        r = res["kmeans"]
        print(
            f"k-means: {r['rows']:,} rows x d {r['dim']}, k {r['k']}: {r['seconds']:.1f}s ({r['function']})", flush=True
        )
    except (RuntimeError, ImportError, AssertionError, TypeError) as e:  # reported, never replaced by a CPU run
        res["kmeans"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"k-means on {dev}: FAILED ({res['kmeans']['error'][:300]}); left out of the projection", flush=True)

    from dskd.config import load_yaml
    from dskd.plan import count_data

    counts = count_data(load_yaml(args.config))
    res["_counts"] = counts
    res["projection"] = [project(res, args.config, g) for g in (1, 8)]
    del res["_counts"]
    res["projection_counts"] = asdict(counts)
    print(
        f"\nprojected wall time of {args.config.name} (sense corpus {load_yaml(args.config).senses.max_tokens:,} tokens):"
    )
    for p in res["projection"]:
        print(
            f"  {p['gpus']} GPU(s): senses {p['senses_gather_h']:.2f} h gather + {p['senses_kmeans_h']:.2f} h k-means, "
            f"KD + DSKD training {p['distill_kd_plus_dskd_h']:.2f} h, eval (4 models) {p['eval_4_models_h']:.2f} h: "
            f"total {p['total_h']:.2f} h"
        )
    if args.tiny:
        print("  (TINY shapes on this device: the projection only checks the arithmetic)")
    res["seconds"] = time.perf_counter() - t_all
    print(f"gpu_check done in {res['seconds']:.0f}s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
