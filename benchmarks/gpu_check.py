"""GPU check of a recipe at its own shapes: random-weight models built on the GPU, timed through dskd's code.

**This script has never run on a GPU.** It was written and tested (``--tiny``, on a CPU) on a machine
without one; the first run on a GPU node is its first real test. Until then no GPU number in this
project is measured.

It reads the recipe (default ``configs/llama3-8b-instruct_to_16l.yaml``), builds its teacher from the
*configuration* only (``dskd.plan.model_config``: the shipped architecture numbers, no weights, no
network) with random bfloat16 weights directly on the device, and times the project's own functions:

1. senses gather: ``dskd.senses.build.gather_batch`` (teacher forward, the LM-head input captured by the
   same pre-hook as ``_gather``, states filed in a ``Reservoir`` whose rows go to a ``RowFile`` on disk) on
   the recipe's ``senses.batch_size x senses.seq_len`` batches; tokens/s and its ratio to a bare forward;
2. senses k-means: ``dskd.senses.kmeans.cluster_groups`` on 500 groups of 2,000 random rows (1M x d,
   every group runs all of ``senses.kmeans_iters``: the slowest case);
3. distillation: ``dskd.distill.fit`` (the training loop itself: window plans, ``teacher_outputs``,
   ``micro_batch_loss``, backward, clipping, AdamW through accelerate) for the KD arm and the DSKD arm
   (the sense loss on a synthetic store and lexicon, ``benchmarks/distill_speed.py``: its cost depends on
   candidate counts, not values) on sequences of ``data.max_length`` tokens, one optimiser step =
   ``batch_size x grad_accum`` of them as the recipe says; step times from the loop's own metrics.jsonl;
4. evaluation: ``dskd.loglik.score_groups`` (what ``dskd eval`` scores with) on letter questions of
   ~700 tokens at ``eval.batch_size``.

Each stage's peak GPU memory is ``torch.cuda.max_memory_allocated`` (reset before it); a stage that runs
out of memory is reported as such and the others still run. Then it projects the recipe's wall time on
1 and 8 GPUs from the measured rates and ``dskd plan``'s counts, and writes, under ``--out_dir``
(``results/benchmarks/`` by default): ``gpu_check.json``, ``gpu_check.md`` (measured beside planned, per
stage) and ``gpu_check_plan.txt`` / ``gpu_check_plan.json`` (``dskd plan`` of the same recipe).

Usage::

    python benchmarks/gpu_check.py                       # on one GPU: writes results/benchmarks/gpu_check.*
    python benchmarks/gpu_check.py --tiny --device cpu   # scaled-down shapes on a CPU, seconds (the test)

``--tiny`` shrinks every shape (d 64, 4 -> 2 layers, vocab 1,000, short sequences) so the script is
tested without a GPU; its numbers say nothing about a GPU and it writes nothing unless ``--out_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
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
DEFAULT_CONFIG = ROOT / "configs" / "llama3-8b-instruct_to_16l.yaml"


@dataclass
class Shapes:
    """What the checks run at: the recipe's numbers (or the tiny ones)."""

    gather_batch: int
    gather_len: int
    train_len: int
    kmeans_groups: int
    kmeans_per_group: int
    eval_items: int
    eval_ctx: int
    eval_batch: int
    repeats: int


def recipe_shapes(cfg, tiny: bool) -> Shapes:
    if tiny:
        return Shapes(4, 64, 96, 20, 200, 12, 48, 4, 2)
    return Shapes(
        cfg.senses.batch_size, cfg.senses.seq_len, cfg.data.max_length, 500, 2000, 96, 700, cfg.eval.batch_size, 5
    )


# tiny stand-in for the recipe's teacher architecture (same family, toy sizes)
TINY_ARCH = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
}


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


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_stage(name: str, fn, dev: torch.device) -> dict:
    """``fn()``'s result with the stage's peak GPU memory; an out-of-memory error is the stage's result."""
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError as e:  # reported, the other stages still run
        out = {"error": f"out of memory: {str(e).splitlines()[0][:300]}"}
    except Exception as e:  # noqa: BLE001 - one broken stage must not cost the node's run of the others
        out = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    out["stage_seconds"] = time.perf_counter() - t0
    out["peak_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
    _free(dev)
    print(f"{name}: {_summary(name, out)}", flush=True)
    return out


def _summary(name: str, r: dict) -> str:
    peak = f"; peak {r['peak_gb']:.2f} GB" if r.get("peak_gb") is not None else ""
    if "error" in r:
        return f"FAILED ({r['error']}){peak}"
    if name == "gather":
        return (
            f"{r['gather_tokens_per_s']:,.0f} tok/s vs bare forward {r['bare_tokens_per_s']:,.0f} tok/s "
            f"({r['ratio']:.1%}){peak}"
        )
    if name == "kmeans":
        return f"{r['rows']:,} rows x d {r['dim']}, k {r['k']}: {r['seconds']:.1f}s{peak}"
    if name.startswith("distill"):
        return (
            f"{r['step_s'] * 1e3:.0f} ms per optimiser step ({r['sequences_per_step']} x {r['seq_len']} tokens){peak}"
        )
    if name == "eval":
        return f"{r['items_per_s']:.1f} items/s ({r['context_tokens']}-token questions){peak}"
    return str(r)


def build_teacher(cfg, tiny: bool, dev: torch.device, dtype: torch.dtype):
    """The recipe's teacher architecture (its configuration only, no weights) with random weights, on ``dev``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dskd.plan import model_config

    conf, source = model_config(cfg.model.teacher, cfg.model.trust_remote_code)
    if tiny:
        conf = AutoConfig.for_model(conf.model_type, **{**TINY_ARCH, "tie_word_embeddings": conf.tie_word_embeddings})
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, source


def check_gather(teacher, cfg, sh: Shapes, dev: torch.device, work: Path) -> dict:
    """``gather_batch`` as ``senses.build._gather`` calls it, vs a bare forward on the same batch."""
    from dskd.devices import DTYPES
    from dskd.senses.build import _sample_dtype, gather_batch
    from dskd.senses.reservoir import Reservoir, RowFile

    V = teacher.get_output_embeddings().weight.shape[0]
    d = teacher.config.hidden_size
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, V, (sh.gather_batch, sh.gather_len), device=dev, generator=g)
    n = ids.numel()
    rows = RowFile(work / "rows.bin", d, DTYPES[_sample_dtype(cfg.senses.sample_dtype, dev, cfg.senses.store_dtype)])
    res = Reservoir.empty(V, d, cfg.senses.max_samples, cfg.senses.seed, rows, dev)
    captured: dict[str, torch.Tensor] = {}
    hook = teacher.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("h", args[0])
    )
    dist = torch.zeros(0, device=dev)
    pos = torch.arange(n, device=dev).reshape(ids.shape)

    @torch.no_grad()
    def bare():
        return teacher(input_ids=ids).logits

    def gather():
        nonlocal dist, pos
        dist = gather_batch(teacher, ids, None, res, dist, captured, pos)
        pos = pos + n  # the next batch's stream positions
        captured.clear()

    try:
        hook.remove()
        t_bare = _timed(bare, dev, sh.repeats)
        hook = teacher.get_output_embeddings().register_forward_pre_hook(
            lambda _m, args: captured.__setitem__("h", args[0])
        )
        t_gather = _timed(gather, dev, sh.repeats)
        res.commit()
    finally:
        hook.remove()
    return {
        "function": "dskd.senses.build.gather_batch",
        "batch": [sh.gather_batch, sh.gather_len],
        "bare_tokens_per_s": n / t_bare,
        "gather_tokens_per_s": n / t_gather,
        "ratio": t_bare / t_gather,
        "reservoir_rows": int(rows.n_rows),
    }


def check_kmeans(cfg, d: int, sh: Shapes, dev: torch.device) -> dict:
    """``cluster_groups`` on random rows (every group runs all its iterations)."""
    from dskd.senses.kmeans import cluster_groups

    rows = sh.kmeans_groups * sh.kmeans_per_group
    g = torch.Generator(device=dev).manual_seed(0)
    samples = torch.randn(rows, d, device=dev, generator=g)  # (N, d) float32
    sizes = torch.full((sh.kmeans_groups,), sh.kmeans_per_group, dtype=torch.long, device=dev)
    sc = cfg.senses
    _sync(dev)
    t0 = time.perf_counter()
    senses, _, _ = cluster_groups(samples, sizes, sc.k, sc.kmeans_iters, sc.seed, sc.kmeans_init, device=dev)
    _sync(dev)
    dt = time.perf_counter() - t0
    if len(senses) != sh.kmeans_groups:
        raise RuntimeError(f"cluster_groups returned {len(senses)} groups, not {sh.kmeans_groups}")
    return {"function": "dskd.senses.kmeans.cluster_groups", "rows": rows, "dim": d, "k": sc.k, "seconds": dt}


class _PadOnly:
    """The loop reads only the pad id of the tokenizer (``Training.pad_id``)."""

    pad_token_id = 0


def check_distill(teacher, cfg, sh: Shapes, dev: torch.device, arm: str, work: Path, tiny: bool = False) -> dict:
    """``dskd.distill.fit`` on random sequences: the recipe's arm (DSKD) or its KD arm (lambda 0)."""
    from accelerate import Accelerator
    from distill_speed import SyntheticLexicon, SyntheticStore

    from dskd import data as D
    from dskd.accelerator import make_accelerator
    from dskd.distill import Training, _optimiser, fit
    from dskd.models import Pair, freeze_except_top, head_at_targets_ok, num_layers, truncate
    from dskd.sense_targets import build_sense_table

    dc = cfg.distill
    lam = cfg.loss.lam if arm == "dskd" else 0.0
    per_step = dc.batch_size * dc.grad_accum
    steps = 1 + sh.repeats  # the first is the warm-up
    cfg = dataclasses.replace(
        cfg,
        loss=dataclasses.replace(cfg.loss, lam=lam),
        distill=dataclasses.replace(
            dc, epochs=1, max_steps=0, save_every=0, log_every=1, report_to="none", teacher_cache=False
        ),
        model=dataclasses.replace(cfg.model, device=dev.type, require_accelerator=dev.type != "cpu"),
    )
    V = teacher.get_output_embeddings().weight.shape[0]
    L = num_layers(teacher)
    n_layers = max(1, L // 2) if tiny or not cfg.model.student_layers else min(cfg.model.student_layers, L)
    student = truncate(teacher, n_layers, share=True)  # as dskd.models.build_pair
    freeze_except_top(student, min(cfg.model.trainable_layers, n_layers))
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.clone()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, V, (sh.train_len,), generator=g) for _ in range((steps + 1) * per_step)]
    data = D.TokenData(seqs, {"hash": "gpu-check"})
    out = work / f"run-{arm}"
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(Accelerator, cfg, out)
    pair = Pair(teacher, student, _PadOnly(), V, "random", "random", [], {})
    run = Training(cfg, out, acc, pair, teacher, student.to(acc.device), data, None, None, {"hash": "gpu-check"})
    run.head_at_targets = head_at_targets_ok(student)
    run.diagnose = False  # the gradient diagnostic changes no result and runs only at logging steps
    if lam > 0:
        d = teacher.config.hidden_size
        targets = sorted({int(t) for s in seqs for t in s[1:].tolist()})
        run.table = build_sense_table(SyntheticStore(d, k=cfg.senses.k), SyntheticLexicon(V), targets, cfg.loss)
        run.table = run.table.to(acc.device)
    _optimiser(run)
    fit(run, stop_after=steps, progress=False)
    _sync(dev)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    dts = [r["tokens"] / r["tokens_per_s"] for r in recs[1:steps]]  # the loop's own step time, warm-up left out
    return {
        "function": "dskd.distill.fit",
        "arm": arm,
        "lam": lam,
        "seq_len": sh.train_len,
        "sequences_per_step": per_step,
        "step_s": statistics.median(dts),
        "steps_timed": len(dts),
        "trainable_params": sum(p.numel() for p in run.params),
        "head_at_targets": run.head_at_targets,
        **({"sense_table": run.table.info} if run.table is not None else {}),
    }


def check_eval(teacher, sh: Shapes, dev: torch.device) -> dict:
    """Letter scoring (4 one-token continuations per question) through ``dskd.loglik.score_groups``."""
    from dskd.loglik import Group, score_groups

    V = teacher.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(2)
    groups = [
        Group(
            item=i,
            choices=[0, 1, 2, 3],
            ctx=torch.randint(5, V, (sh.eval_ctx,), generator=g).tolist(),
            conts=[[int(x)] for x in torch.randint(5, V, (4,), generator=g)],
        )
        for i in range(sh.eval_items)
    ]
    with torch.no_grad():
        score_groups(teacher, groups[:2], batch_size=sh.eval_batch, pad_id=0)  # warm-up
        _sync(dev)
        t0 = time.perf_counter()
        score_groups(teacher, groups, batch_size=sh.eval_batch, pad_id=0)
        _sync(dev)
    dt = time.perf_counter() - t0
    return {
        "function": "dskd.loglik.score_groups",
        "items": sh.eval_items,
        "context_tokens": sh.eval_ctx,
        "batch_size": sh.eval_batch,
        "items_per_s": sh.eval_items / dt,
    }


def project(res: dict, cfg, config_args: list[str], counts, gpus: int) -> dict:
    """Wall time of the recipe on ``gpus`` GPUs from the measured rates and the plan's counts (a stage that
    failed is left out and named)."""
    from dskd.plan import make_plan

    plan = make_plan(cfg, config_args, gpus=gpus, counts=counts)
    data, sc = plan["data"], cfg.senses
    out: dict = {"gpus": gpus, "left_out": []}
    g = res["gather"]
    if "error" not in g:
        out["senses_gather_h"] = sc.max_tokens / g["gather_tokens_per_s"] / gpus / 3600  # each rank its own shard
    km = res["kmeans"]
    if "error" not in km:
        reservoir_rows = min(plan["teacher"]["vocab"] * sc.max_samples, sc.max_tokens)
        out["senses_kmeans_h"] = km["seconds"] * reservoir_rows / km["rows"] / 3600  # rank 0 clusters
    avg_len = data["positions"] / max(data["sequences"], 1)
    for arm in ("kd", "dskd"):
        r = res[f"distill:{arm}"]
        if "error" in r:
            continue
        per_seq = r["step_s"] / r["sequences_per_step"] * avg_len / r["seq_len"]  # step time ~ linear in length
        out[f"distill_{arm}_h"] = data["sequences"] * cfg.distill.epochs * per_seq / gpus / 3600
    e = res["eval"]
    if "error" not in e:
        # teacher + 3 students (the students' shared layers partly served by the memo: ~0.55 of the teacher each)
        per_item = data["eval_tokens"] / max(data["eval_items"], 1) / e["context_tokens"] / e["items_per_s"]
        out["eval_4_models_h"] = data["eval_items"] * per_item * (1 + 3 * 0.55) / min(gpus, 4) / 3600
    for part in ("senses_gather_h", "senses_kmeans_h", "distill_kd_h", "distill_dskd_h", "eval_4_models_h"):
        if part not in out:
            out["left_out"].append(part)
    out["total_h"] = sum(v for k, v in out.items() if k.endswith("_h"))
    out["steps_per_arm"] = next(st["steps"] for st in plan["stages"] if st["name"] == "distill:dskd")
    return out


def comparison_md(res: dict, plan: dict) -> str:
    """Measured beside planned, per stage (memory per GPU in GB; the plan's hours at its assumed utilisation)."""
    stages = {st["name"]: st for st in plan["stages"]}

    def planned(name: str) -> str:
        st = stages.get(name)
        return f"{st['memory_total'] / 1e9:.1f}" if st else "-"

    def measured(key: str) -> str:
        r = res[key]
        if "error" in r:
            return f"FAILED: {r['error'][:80]}"
        return f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else "n/a (not CUDA)"

    lines = [
        f"# gpu_check: {res['recipe']} on {res['device']}",
        "",
        "Random weights at the recipe's shapes; dskd's own functions timed (benchmarks/gpu_check.py). "
        + ("TINY shapes: these numbers say nothing about a GPU." if res["tiny"] else ""),
        "",
        "| stage | function | measured | peak memory (GB) | plan's memory per GPU (GB) |",
        "|---|---|---|---:|---:|",
    ]
    rows = [
        ("gather", "senses", lambda r: f"{r['gather_tokens_per_s']:,.0f} tok/s ({r['ratio']:.0%} of a bare forward)"),
        ("kmeans", None, lambda r: f"{r['rows']:,} rows x {r['dim']}: {r['seconds']:.1f} s"),
        ("distill:kd", "distill:kd", lambda r: f"{r['step_s'] * 1e3:.0f} ms / step"),
        ("distill:dskd", "distill:dskd", lambda r: f"{r['step_s'] * 1e3:.0f} ms / step"),
        ("eval", "eval", lambda r: f"{r['items_per_s']:.1f} items/s"),
    ]
    for key, plan_name, fmt in rows:
        r = res[key]
        what = "-" if "error" in r else fmt(r)
        lines.append(
            f"| {key} | `{r.get('function', '-')}` | {what} | {measured(key)} | "
            f"{planned(plan_name) if plan_name else '-'} |"
        )
    lines += ["", "Projected wall time of the recipe (hours):", ""]
    for p in res["projection"]:
        parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in p.items() if k.endswith("_h") and k != "total_h")
        left = f" (left out: {', '.join(p['left_out'])})" if p["left_out"] else ""
        lines.append(f"- {p['gpus']} GPU(s): {parts}; total {p['total_h']:.2f}{left}")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (the GPU), cuda, cuda:1; cpu only with --tiny")
    ap.add_argument("--tiny", action="store_true", help="Scaled-down shapes (runs on CPU in seconds; a smoke test).")
    ap.add_argument(
        "--out_dir",
        type=Path,
        default=None,
        help="Where gpu_check.{json,md} and gpu_check_plan.{txt,json} go (default results/benchmarks; "
        "with --tiny: nothing is written unless given).",
    )
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="The recipe whose shapes are checked.")
    args = ap.parse_args(argv)
    from dskd.config import load_yaml
    from dskd.devices import describe, resolve_device
    from dskd.plan import count_data, make_plan, render

    dev = resolve_device(args.device)
    if dev.type != "cuda" and not args.tiny:
        print(
            f"gpu_check: no GPU here ({dev}); run on a GPU node, or pass --tiny for a CPU smoke test", file=sys.stderr
        )
        return 2
    out_dir = args.out_dir if args.out_dir is not None or args.tiny else ROOT / "results" / "benchmarks"
    cfg = load_yaml(args.config)
    try:
        config_arg = str(args.config.resolve().relative_to(ROOT))
    except ValueError:
        config_arg = str(args.config)
    config_args = ["--config", config_arg]
    counts = count_data(cfg)  # before any weight: a recipe the plan refuses stops here
    sh = recipe_shapes(cfg, args.tiny)
    if args.tiny:  # toy architecture: toy recipe numbers where they would dwarf it
        cfg = dataclasses.replace(cfg, senses=dataclasses.replace(cfg.senses, max_samples=50))
    t_all = time.perf_counter()
    res: dict = {
        "recipe": config_arg,
        "device": describe(dev),
        "tiny": args.tiny,
        "dtype": "bfloat16",
        "shapes": asdict(sh),
        "torch": torch.__version__,
        "never_ran_on_a_gpu_before": True,  # set by hand to false once a GPU run is committed
    }
    print(f"gpu_check of {config_arg} on {res['device']}{' (TINY shapes: not GPU numbers)' if args.tiny else ''}")
    t0 = time.perf_counter()
    teacher, source = build_teacher(cfg, args.tiny, dev, torch.bfloat16)
    held = {"teacher": teacher}  # the stages read it from here, so that dropping it frees the memory
    res["build_s"] = time.perf_counter() - t0
    res["teacher"] = {"source": source, "params": sum(p.numel() for p in teacher.parameters())}
    d = teacher.config.hidden_size
    print(f"teacher: {res['teacher']['params'] / 1e9:.2f}B random parameters on {dev} in {res['build_s']:.1f}s")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        res["gather"] = run_stage("gather", lambda: check_gather(held["teacher"], cfg, sh, dev, work), dev)
        for arm in ("kd", "dskd"):
            res[f"distill:{arm}"] = run_stage(
                f"distill:{arm}",
                lambda arm=arm: check_distill(held["teacher"], cfg, sh, dev, arm, work, args.tiny),
                dev,
            )
        res["eval"] = run_stage("eval", lambda: check_eval(held["teacher"], sh, dev), dev)
        del teacher
        held.clear()
        _free(dev)
        res["kmeans"] = run_stage("kmeans", lambda: check_kmeans(cfg, d, sh, dev), dev)

    res["projection"] = [project(res, cfg, config_args, counts, g) for g in (1, 8)]
    res["projection_counts"] = asdict(counts)
    print(f"\nprojected wall time of {config_arg} (sense corpus {cfg.senses.max_tokens:,} tokens):")
    for p in res["projection"]:
        parts = ", ".join(f"{k[:-2]} {v:.2f} h" for k, v in p.items() if k.endswith("_h") and k != "total_h")
        left = f" (left out: {', '.join(p['left_out'])})" if p["left_out"] else ""
        print(f"  {p['gpus']} GPU(s): {parts}: total {p['total_h']:.2f} h{left}")
    if args.tiny:
        print("  (TINY shapes on this device: the projection only checks the arithmetic)")
    res["seconds"] = time.perf_counter() - t_all
    print(f"gpu_check done in {res['seconds']:.0f}s")
    if out_dir is not None:
        plan = make_plan(cfg, config_args, gpus=1, counts=counts)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write(out_dir / "gpu_check.json", json.dumps(res, indent=1, default=str))
        _write(out_dir / "gpu_check.md", comparison_md(res, plan))
        _write(out_dir / "gpu_check_plan.json", json.dumps(plan, indent=1))
        _write(out_dir / "gpu_check_plan.txt", render(plan) + "\n")
        print(f"wrote {out_dir}/gpu_check.{{json,md}} and gpu_check_plan.{{txt,json}}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
