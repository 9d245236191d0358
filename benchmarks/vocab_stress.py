"""The vocabulary's cost: the senses gather and the exact-KD step of two teachers, measured in one run.

The paths whose cost grows with the vocabulary V are the gather's LM head (the store files each state
under the teacher's argmax, so the head runs at every position: (B*T, V) logits) and the exact KD of a
truncated student that shares the teacher's head (both heads at every target position, softmax over V,
backward through the student's). Gemma-3-270M (V = 262,144, hidden 640) against SmolLM2-135M
(V = 49,152, hidden 576) is the stress test: about the same decoder size, 5.3x the vocabulary.

For each teacher, in a fresh process each (so VmHWM is that part's own peak):

- ``gather``: :func:`dskd.senses.build.gather_batch` (teacher forward, argmax key, states filed in a
  reservoir) on ``--gather-batch`` windows of ``--seq-len`` tokens; positions per second (median over
  ``--steps`` batches after one warm-up) and peak resident memory above the loaded model;
- ``kd``: one exact-KD micro-batch as ``dskd distill`` runs it for a truncated student with the shared
  head (``micro_batch_loss`` with the teacher's logits computed from its cached final-norm states at the
  targets, ``head_at_targets``), forward and backward over ``--kd-batch`` rows of ``--seq-len`` tokens;
  seconds per micro-batch and peak resident memory above the loaded models.

Prints the table and the Gemma / SmolLM2 ratios; writes JSON with ``--out``. Inputs are random token ids
(costs do not depend on the text). Run it alone: two torch jobs on 2 cores slow each other 5-10x.

    python benchmarks/vocab_stress.py --out results/benchmarks/vocab_stress.json
    python benchmarks/vocab_stress.py --tiny          # tiny random Llama and Gemma-3 text models (tests/archs.py), a smoke test (the suite runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_proc.py, however this file is loaded
from _proc import status_mb  # noqa: E402

HOME = Path(os.environ.get("DSKD_HOME", Path.home() / ".cache" / "dskd")) / "models"
TINY = {"smollm2-135m": ("llama", 1024), "gemma3-270m": ("gemma3-text", 4096)}  # --tiny: family, vocabulary
TEACHERS = {"smollm2-135m": (str(HOME / "smollm2-135m-instruct"), 15), "gemma3-270m": (str(HOME / "gemma3-270m"), 14)}


def _teacher(name: str, tiny: bool):
    from dskd.models import load_model

    if tiny:  # the suite's architecture matrix (tests/archs.py): 6 layers, hidden 64
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from archs import build

        return build(*TINY[name])
    return load_model(TEACHERS[name][0], "float32").eval()


def part_gather(name: str, a) -> dict:
    from dskd.senses.build import gather_batch
    from dskd.senses.reservoir import Reservoir

    model = _teacher(name, a.tiny)
    V, d = model.config.vocab_size, model.config.hidden_size
    captured: dict = {}
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: captured.__setitem__("h", args[0]))
    res = Reservoir.empty(V, d, 2000, seed=0)  # rows in memory (the build's go to a file)
    g = torch.Generator().manual_seed(0)
    base = status_mb("VmRSS")
    dist, times = torch.zeros(0), []
    for step in range(a.steps + 1):
        ids = torch.randint(0, V, (a.gather_batch, a.seq_len), generator=g)
        t0 = time.perf_counter()
        dist = gather_batch(model, ids, None, res, dist, captured)
        if step:  # the first batch warms up
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "vocab": V,
        "hidden": d,
        "positions_per_s": a.gather_batch * a.seq_len / sec,
        "seconds_per_batch": sec,
        "peak_extra_mb": status_mb("VmHWM") - base,
    }


def part_kd(name: str, a) -> dict:
    from dskd.config import LossConfig
    from dskd.distill import _States, micro_batch_loss
    from dskd.models import truncate

    teacher = _teacher(name, a.tiny)
    n = 2 if a.tiny else TEACHERS[name][1]
    student = truncate(teacher, n, share=True)
    for p in student.parameters():
        p.requires_grad_(False)
    layers = student.model.layers
    for p in layers[len(layers) - (1 if a.tiny else 3) :].parameters():
        p.requires_grad_(True)
    V, d = teacher.config.vocab_size, teacher.config.hidden_size
    g = torch.Generator().manual_seed(0)
    base = status_mb("VmRSS")
    times = []
    for step in range(a.steps + 1):
        ids = torch.randint(0, V, (a.kd_batch, a.seq_len), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((a.kd_batch, 1), -100)], 1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with torch.no_grad():  # the cache keeps the teacher's final-norm states; its logits come from them
            t_h = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        t0 = time.perf_counter()
        n_tok = float((labels != -100).sum())
        loss, _, _ = micro_batch_loss(
            student,
            batch,
            _States(t_h),
            None,
            LossConfig(lam=0.0),
            V,
            n_tok,
            0.0,
            [],
            None,
            contextlib.nullcontext(),
            None,
            head_at_targets=True,
        )
        loss.backward()
        if step:
            times.append(time.perf_counter() - t0)
        student.zero_grad(set_to_none=True)
    sec = statistics.median(times)
    return {
        "vocab": V,
        "hidden": d,
        "targets": a.kd_batch * (a.seq_len - 1),
        "seconds_per_micro_batch": sec,
        "peak_extra_mb": status_mb("VmHWM") - base,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--seq-len", type=int, default=256, help="the recipes' senses.seq_len and data.max_length")
    ap.add_argument("--gather-batch", type=int, default=8, help="the recipes' senses.batch_size")
    ap.add_argument("--kd-batch", type=int, default=2, help="the recipes' distill.batch_size (one micro-batch)")
    ap.add_argument("--steps", type=int, default=4, help="timed repetitions after one warm-up")
    ap.add_argument("--tiny", action="store_true", help="random tiny models (smoke test)")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.part:  # a worker: one teacher, one part, its own process
        name, part = a.part.split(":")
        torch.manual_seed(0)
        print(json.dumps((part_gather if part == "gather" else part_kd)(name, a)))
        return
    rows: dict[str, dict] = {}
    for name in a.teachers.split(","):
        for part in ("gather", "kd"):
            cmd = [
                sys.executable,
                __file__,
                "--part",
                f"{name}:{part}",
                "--seq-len",
                str(a.seq_len),
                "--gather-batch",
                str(a.gather_batch),
                "--kd-batch",
                str(a.kd_batch),
                "--steps",
                str(a.steps),
            ]
            out = subprocess.run(cmd + (["--tiny"] if a.tiny else []), capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} {part} failed:\n{out.stderr[-3000:]}")
            rows.setdefault(name, {})[part] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name} {part}: {rows[name][part]}", flush=True)
    print(
        "\n| teacher | vocab | gather pos/s | gather peak +MB | KD s/micro-batch | KD peak +MB |\n|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        print(
            f"| {name} | {r['gather']['vocab']:,} | {r['gather']['positions_per_s']:.0f} | "
            f"{r['gather']['peak_extra_mb']:.0f} | {r['kd']['seconds_per_micro_batch']:.2f} | {r['kd']['peak_extra_mb']:.0f} |"
        )
    names = list(rows)
    if len(names) == 2:
        x, y = (rows[n] for n in names)
        print(
            f"\n{names[1]} / {names[0]}: vocab {y['gather']['vocab'] / x['gather']['vocab']:.2f}x; "
            f"gather time per position {x['gather']['positions_per_s'] / y['gather']['positions_per_s']:.2f}x, "
            f"peak {y['gather']['peak_extra_mb'] / x['gather']['peak_extra_mb']:.2f}x; "
            f"KD time per micro-batch {y['kd']['seconds_per_micro_batch'] / x['kd']['seconds_per_micro_batch']:.2f}x, "
            f"peak {y['kd']['peak_extra_mb'] / x['kd']['peak_extra_mb']:.2f}x"
        )
    if a.out:
        meta = {
            "command": " ".join(sys.argv),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "seq_len": a.seq_len,
            "gather_batch": a.gather_batch,
            "kd_batch": a.kd_batch,
            "steps": a.steps,
        }
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
