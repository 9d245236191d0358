"""Teacher headroom on the training halves: the teacher against its untrained truncations, per task.

Picks a recipe's tasks and student depth without looking at evaluation items: every item scored here
comes from ``Task.train_items`` (the last ``--n`` of them, so the first ones a recipe trains on stay
apart), 0-shot cloze log-likelihood as ``dskd eval`` scores it (acc_norm for HellaSwag).

    python benchmarks/headroom.py --teacher ~/.cache/dskd/models/gemma3-270m --depths 9,12,14,16 --n 60
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from dskd.config import EvalConfig
    from dskd.evaluate import score_task
    from dskd.models import load_model, load_tokenizer, truncate
    from dskd.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--depths", default="9,12,14,16", help="student depths (layers kept), comma-separated")
    ap.add_argument("--tasks", default="arc_easy,sciq,piqa,hellaswag")
    ap.add_argument("--n", type=int, default=60, help="items per task (the last n of its training half)")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tok = load_tokenizer(a.teacher)
    teacher = load_model(a.teacher, "float32").eval()
    cfg = EvalConfig(tasks=a.tasks.split(","), limit=a.n, bootstrap=0, batch_size=8)
    items = {t: get_task(t).train_items()[-a.n :] for t in cfg.tasks}
    n_layers = teacher.config.get_text_config().num_hidden_layers
    rows: dict[str, dict[str, float]] = {}
    for depth in [n_layers, *map(int, a.depths.split(","))]:
        model = teacher if depth == n_layers else truncate(teacher, depth, share=True).eval()
        t0 = time.perf_counter()
        row = {}
        for t in cfg.tasks:
            entry = score_task(model, tok, get_task(t), items[t], cfg)
            m = entry["metrics"]
            row[t] = round(100 * m.get("acc_norm" if t == "hellaswag" else "acc", m["acc"]), 1)
            print(f"  {depth} layers, {t}: {row[t]} ({entry['seconds']:.0f} s)", flush=True)
        row["avg"] = round(sum(row.values()) / len(row), 2)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows["teacher" if depth == n_layers else f"{depth} layers"] = row
        print(f"{depth:>3} layers: {row}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"teacher": a.teacher, "n": a.n, "split": "train_items[-n:]", "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
