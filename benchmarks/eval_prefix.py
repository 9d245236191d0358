"""Speed of evaluation with the shared-prefix memo (:class:`dskd.prefix.PrefixMemo`) against without it.

The main job evaluates the teacher and three students (untrained, KD, DSKD) truncated from it; all
share the teacher's embeddings and frozen bottom ``student_layers - trainable_layers`` layers, so
with the memo the teacher's evaluation stores the state entering the first trained layer and every
student runs only its top layers. This script evaluates, on the recipe's ``eval`` settings with
``--limit`` items per task, the packaged teacher and then its untrained truncation (built with
:func:`dskd.models.truncate`, saved and reloaded as the main job does), each once without and once
with a memo, and checks that every per-item log-likelihood and metric is identical.

Printed: seconds per model and mode, the student's speed-up (its layers above the prefix only), and
the main job's projected ratio (one teacher + three students: the teacher's time stays, each student
takes the untrained one's time).

Usage::

    python benchmarks/eval_prefix.py --limit 4       # quick check
    python benchmarks/eval_prefix.py --limit 300     # the demo's eval.limit; run it alone on the machine

At ``--limit 8`` (4 packed batches per model) on 2 CPU cores shared with other jobs (so only
indicative; fixed costs such as the split probe and the prefix fingerprint weigh heavily at this size)
it printed, in CPU seconds: teacher 11.9 plain, 10.9 filling the memo; student 8.6 plain, 3.3 from
the memo (2.64x); results identical.
"""

from __future__ import annotations

import argparse
import os
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m_to_24l.yaml"))
    p.add_argument("--limit", type=int, default=300, help="Items per task (0: the recipe's eval.limit).")
    a = p.parse_args()

    from dskd.config import load_yaml
    from dskd.devices import resolve_device
    from dskd.evaluate import evaluate
    from dskd.models import load_model, load_tokenizer, num_layers, resolve_spec, truncate
    from dskd.prefix import PrefixMemo

    cfg = load_yaml(a.config)
    ecfg = cfg.eval
    if a.limit:
        ecfg.limit = a.limit
    spec = resolve_spec(cfg.model.teacher)
    device = resolve_device(ecfg.device, flag="--eval.device")
    tok = load_tokenizer(spec)
    teacher = load_model(spec, ecfg.dtype, device=device).eval()
    n_keep = cfg.model.student_layers or max(1, num_layers(teacher) // 2)
    n_shared = n_keep - min(cfg.model.trainable_layers, n_keep)
    work = Path(tempfile.mkdtemp(prefix="dskd-eval-prefix-"))
    truncate(teacher, n_keep).save_pretrained(work / "untrained")  # reloaded like the main job's student
    student = load_model(str(work / "untrained"), ecfg.dtype, device=device).eval()
    models = {"teacher": teacher, "untrained": student}
    print(
        f"{a.config}: tasks {', '.join(ecfg.tasks)}, {ecfg.limit} items each; teacher {num_layers(teacher)} layers, "
        f"student {n_keep}, {n_shared} shared; {device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    with torch.no_grad():  # the first call of a process pays one-time costs
        teacher(input_ids=torch.arange(64, device=teacher.device)[None] + 100)

    secs: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    res: dict[tuple[str, str], dict] = {}
    memo = PrefixMemo(n_shared)
    for mode in ("plain", "memo"):
        for name, model in models.items():
            before = dict(memo.stats)
            t, c = time.perf_counter(), time.process_time()
            r = evaluate(
                name, ecfg, work / f"{mode}_{name}.json", model, tok, progress=False,
                memo=memo if mode == "memo" else None,
            )  # fmt: skip
            secs[mode, name] = time.perf_counter() - t
            cpu[mode, name] = time.process_time() - c
            res[mode, name] = r["tasks"]
            extra = f"  ({memo.describe(before)})" if mode == "memo" else ""
            print(f"{mode:<5} {name:<9} {secs[mode, name]:7.1f} s ({cpu[mode, name]:7.1f} CPU s){extra}", flush=True)

    same = True
    for name in models:
        for task, entry in res["plain", name].items():
            other = res["memo", name][task]
            for key in ("items", "metrics"):
                if entry[key] != other[key]:
                    print(f"DIFFERENT: {name} {task} {key}")
                    same = False
    print(f"\n=== eval_prefix: {ecfg.limit} items per task, {n_shared} of {n_keep} student layers shared ===")
    # CPU seconds (all threads of this process) move less than wall seconds when other jobs share the cores
    for label, d in (("wall", secs), ("CPU", cpu)):
        t_p, s_p = d["plain", "teacher"], d["plain", "untrained"]
        t_m, s_m = d["memo", "teacher"], d["memo", "untrained"]
        print(
            f"{label}: teacher plain {t_p:.1f} s, filling the memo {t_m:.1f} s ({t_m / t_p:.2f}x); "
            f"student plain {s_p:.1f} s, from the memo {s_m:.1f} s ({s_p / s_m:.2f}x faster); "
            f"the main job's 4 evaluations (teacher + 3 students) {t_p + 3 * s_p:.0f} s -> {t_m + 3 * s_m:.0f} s "
            f"({(t_p + 3 * s_p) / (t_m + 3 * s_m):.2f}x)"
        )
    print(f"memo: {memo.stats['stored']:,} batches stored, {memo.stats['bytes'] / 2**20:,.0f} MiB")
    print("results identical with and without the memo: " + ("yes" if same else "NO"))
    assert same, "the memo changed a result"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
