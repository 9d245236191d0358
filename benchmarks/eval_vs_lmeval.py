"""dskd eval vs lm-eval on ARC-Easy and ARC-Challenge: throughput, accuracy and per-item agreement.

Both tools score the same items (the ARC test sets of the packaged benchmark data, written to
temporary JSONL files that lm-eval reads through task YAMLs this script writes) with the same cloze
prompt (``Question: ...\\nAnswer:`` continued by `` <choice>``), the same model (the packaged
SmolLM2-135M-Instruct unless ``--model``) in float32 on the same threads. Throughput is items per
second of each tool's evaluation calls with the model already loaded, after one untimed call of each
on the first chunk (the process's first forward pays one-time costs; both warm-up times are printed).
The items are scored in chunks (``--chunk``) that alternate between the tools, so load from other
processes on a shared machine slows both alike and the ratio stays meaningful.

Needs the ``bench`` extra: ``pip install -e ".[bench]"`` (lm-eval 0.4.13). Runs offline::

    python benchmarks/eval_vs_lmeval.py --limit 60   # ~1 min on 2 idle CPU cores (lm-eval takes most)
    python benchmarks/eval_vs_lmeval.py --limit 0    # the full ARC test sets: ~28 min

Prints, per task: items/s of both, the ratio, acc and acc_norm of both and the number of items whose
prediction differs. Target: ratio >= 3 with accuracies within 0.5 points.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(folder: Path, name: str, items, chunk: int) -> list[str]:
    """JSONL chunks of the dskd evaluation items and lm-eval task YAMLs pointing at them."""
    names = []
    for k in range(0, len(items), chunk):
        task = f"lmeval_{name}_{k // chunk}"
        data = folder / f"{task}.jsonl"
        with data.open("w") as f:
            for x in items[k : k + chunk]:
                f.write(json.dumps({"id": x.id, "question": x.question, "choices": list(x.choices), "gold": x.gold}))
                f.write("\n")
        (folder / f"{task}.yaml").write_text(YAML.format(name=task, data=data))
        names.append(task)
    return names


def run_dskd(model, tokenizer, name: str, items, batch_size: int) -> tuple[float, dict]:
    from dskd.config import EvalConfig
    from dskd.evaluate import score_task
    from dskd.tasks import get_task

    cfg = EvalConfig(tasks=[name], batch_size=batch_size, bootstrap=0)
    t0 = time.perf_counter()
    entry = score_task(model, tokenizer, get_task(name), items, cfg)
    return time.perf_counter() - t0, entry


def run_lmeval(lm, manager, task: str) -> tuple[float, list[list[float]]]:
    import lm_eval

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True)
    dt = time.perf_counter() - t0
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return dt, [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def _argmax(v: list[float]) -> int:
    return max(range(len(v)), key=v.__getitem__)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="Model spec (alias, folder).")
    p.add_argument("--tasks", default="arc_easy,arc_challenge", help="Comma-separated tasks (ARC only).")
    p.add_argument("--limit", type=int, default=100, help="Items per task (0: the full test sets).")
    p.add_argument("--batch-size", type=int, default=8, help="Batch size of both tools.")
    p.add_argument("--chunk", type=int, default=20, help="Items per alternation between the two tools.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    p.add_argument("--json", type=Path, default=None, help="Also write the numbers to this JSON file.")
    args = p.parse_args()

    import torch

    from dskd.evaluate import select_items
    from dskd.models import load_model, load_tokenizer, resolve_spec
    from dskd.tasks import get_task

    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SystemExit('lm-eval is not installed: pip install -e ".[bench]"  (lm-eval==0.4.13)') from e

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    model_dir = resolve_spec(args.model)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    lm = HFLM(pretrained=model_dir, dtype="float32", batch_size=args.batch_size, device="cpu")
    print(
        f"model {args.model}, limit {args.limit}, batch size {args.batch_size}, torch threads "
        f"{torch.get_num_threads()}, chunks of {args.chunk} items alternating between the tools"
    )
    header = (
        "| task | n | dskd items/s | lm-eval items/s | ratio | dskd acc | lm-eval acc | dskd acc_norm | "
        "lm-eval acc_norm | disagree (acc) | disagree (acc_norm) | max abs loglik diff |"
    )
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        plan = {t: select_items(get_task(t), args.limit) for t in tasks}
        chunks = {t: write_tasks(folder, t, plan[t], args.chunk) for t in tasks}
        manager = TaskManager(include_path=str(folder))
        # One untimed call of each tool first: the process's first forward pays one-time costs (kernel
        # selection, allocator growth, dskd's packing self-check) that would otherwise be charged to
        # whichever tool happens to run first. Both are printed, not hidden.
        warm = tasks[0]
        dt_ours, _ = run_dskd(model, tok, warm, plan[warm][: args.chunk], args.batch_size)
        dt_theirs, _ = run_lmeval(lm, manager, chunks[warm][0])
        print(f"warm-up on {warm} (not counted): dskd {dt_ours:.2f}s, lm-eval {dt_theirs:.2f}s", flush=True)
        for name in tasks:
            items = plan[name]
            t_ours = t_theirs = 0.0
            pred, pred_norm, ll_ours, ll_theirs = [], [], [], []
            for k, chunk_task in enumerate(chunks[name]):
                part = items[k * args.chunk : (k + 1) * args.chunk]
                # alternate which tool goes first, so load changes on a shared machine hit both alike
                for tool in ("dskd", "lmeval") if k % 2 == 0 else ("lmeval", "dskd"):
                    if tool == "dskd":
                        dt, entry = run_dskd(model, tok, name, part, args.batch_size)
                        t_ours += dt
                        pred += entry["items"]["pred"]
                        pred_norm += entry["items"]["pred_norm"]
                        ll_ours += entry["items"]["loglik"]
                    else:
                        dt, lls = run_lmeval(lm, manager, chunk_task)
                        t_theirs += dt
                        ll_theirs += lls
                print(
                    f"  {name}: {(k + 1) * args.chunk} items, dskd {t_ours:.1f}s, lm-eval {t_theirs:.1f}s", flush=True
                )
            gold = [x.gold for x in items]
            # lm-eval's predictions from its log-likelihoods, with its acc / acc_norm rules
            p_theirs = [_argmax(v) for v in ll_theirs]
            pn_theirs = [
                _argmax([s / len(c) for s, c in zip(v, x.choices, strict=True)])
                for v, x in zip(ll_theirs, items, strict=True)
            ]
            n = len(items)

            def acc(p, gold=gold, n=n):
                return sum(a == b for a, b in zip(p, gold, strict=True)) / n

            r = {
                "n": n,
                "dskd_items_per_s": n / t_ours,
                "lmeval_items_per_s": n / t_theirs,
                "ratio": t_theirs / t_ours,
                "dskd_acc": acc(pred),
                "lmeval_acc": acc(p_theirs),
                "dskd_acc_norm": acc(pred_norm),
                "lmeval_acc_norm": acc(pn_theirs),
                "disagree_acc": sum(a != b for a, b in zip(pred, p_theirs, strict=True)),
                "disagree_acc_norm": sum(a != b for a, b in zip(pred_norm, pn_theirs, strict=True)),
                "max_abs_loglik_diff": max(
                    abs(a - b) for u, v in zip(ll_ours, ll_theirs, strict=True) for a, b in zip(u, v, strict=True)
                ),
            }
            summary[name] = r
            rows.append(
                f"| {name} | {n} | {r['dskd_items_per_s']:.2f} | {r['lmeval_items_per_s']:.2f} | {r['ratio']:.2f}x | "
                f"{100 * r['dskd_acc']:.2f} | {100 * r['lmeval_acc']:.2f} | {100 * r['dskd_acc_norm']:.2f} | "
                f"{100 * r['lmeval_acc_norm']:.2f} | {r['disagree_acc']} | {r['disagree_acc_norm']} | "
                f"{r['max_abs_loglik_diff']:.2e} |"
            )
    print("\n" + header + "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
