"""Cost of the training diagnostic (gradient ratio and cosine of the weighted sense / hidden term against KD + CE).

At a logging step the diagnostic takes two extra ``torch.autograd.grad`` passes on one micro-batch (the
forward is the step's own). This times, in one process, interleaved and paired, a micro-batch of the demo
recipe's training loop body (``micro_batch_loss`` from the cached prefix states with the head at targets,
backward) with and without the diagnostic, and prints the extra time as a share of one optimiser step at
the recipe's ``grad_accum`` and ``log_every`` (the diagnostic runs once per logged step).

The aux term here is the hidden-state MSE (no sense store needed); the sense term's backward starts from the
same last hidden states, so its cost is the same up to the gather of the sampled positions. The teacher's
states and the prefix states are random (of the states' scale): times do not depend on their values.

Usage::

    python benchmarks/diagnostic_cost.py --tiny                # tiny random Llama (seconds)
    python benchmarks/diagnostic_cost.py --config configs/smollm2-135m_to_24l.yaml --reps 6   # packaged SmolLM2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from dskd.config import RunConfig, load_yaml  # noqa: E402
from dskd.distill import _States, micro_batch_loss  # noqa: E402
from dskd.losses import aux_and_main, grad_comparison  # noqa: E402


def _model(args, cfg: RunConfig):
    """(student, prefix layers, vocab size): the recipe's truncated student, or a tiny random Llama."""
    from dskd.models import freeze_except_top, load_model, truncate

    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        c = LlamaConfig(
            vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4
        )
        model, layers, trainable = LlamaForCausalLM(c), 4, 1
    else:
        from dskd.models import resolve_spec

        model = truncate(load_model(resolve_spec(cfg.model.teacher)), cfg.model.student_layers)
        layers, trainable = cfg.model.student_layers, cfg.model.trainable_layers
    freeze_except_top(model, trainable)
    model.train()
    return model, layers - trainable, model.config.vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2-135m_to_24l.yaml")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the recipe's student")
    ap.add_argument("--tokens", type=int, default=180, help="tokens per sequence (the demo's prompts: ~100-256)")
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    cfg = load_yaml(args.config)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, prefix, V = _model(args, cfg)
    B, T, d = cfg.distill.batch_size, args.tokens, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, V, (B, T), generator=g),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "labels": torch.randint(0, V, (B, T), generator=g),
    }
    batch["labels"][:, -1] = -100
    t_h = torch.randn(B, T, d, generator=g) * 1.8
    states = torch.randn(B, T, d, generator=g)
    lc = dataclasses.replace(cfg.loss, lam=0.0, hidden="mse", hidden_weight=1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    n_tok = float((batch["labels"] != -100).sum())

    def step(diag: bool) -> float:
        t0 = time.perf_counter()
        loss, terms, _ = micro_batch_loss(
            model, batch, _States(t_h), t_h, lc, V, n_tok, 0.0, [], None, contextlib.nullcontext(),
            (prefix, states), True,
        )  # fmt: skip
        if diag:
            grad_comparison(*aux_and_main(terms, lc), params)
        loss.backward()
        for p in params:
            p.grad = None
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up
    plain, with_diag = [], []
    for r in range(args.reps):  # interleaved, order alternating
        for diag in (False, True) if r % 2 == 0 else (True, False):
            (with_diag if diag else plain).append(step(diag))
    a, b = statistics.median(plain), statistics.median(with_diag)
    extra = b - a
    per_step = cfg.distill.grad_accum * a
    name = "tiny random Llama (4 layers, d 32, top 1 trained)" if args.tiny else f"{cfg.name} student"
    print(f"{name}: batch {B} x {T} tokens, {torch.get_num_threads()} threads, {args.reps} paired reps")
    print(
        f"micro-batch (forward + backward): {a * 1000:.1f} ms; with the diagnostic: {b * 1000:.1f} ms (+{extra / a:.0%})"
    )
    print(
        f"share of training time: {extra / (per_step * cfg.distill.log_every):.1%} at grad_accum "
        f"{cfg.distill.grad_accum}, log_every {cfg.distill.log_every} (one diagnostic per logged step); "
        f"{extra / per_step:.1%} if every step were logged"
    )


if __name__ == "__main__":
    main()
