"""``dskd demo``: a quick look at the teacher and a truncated student (no training)."""

from __future__ import annotations

import time

from dskd.config import ModelConfig

PROMPTS = ("The opposite of hot is", "The capital of France is", "A synonym of big is")


def demo_command(model: ModelConfig, max_new_tokens: int = 6, prompts: list[str] = list(PROMPTS)) -> int:  # noqa: B006
    """Load the teacher, truncate it into a student, and let both complete a few prompts greedily.
    Shows that the packaged model works offline and what truncation alone does to it.

    Example: dskd demo --model.student_layers 10 --prompts "The opposite of hot is"

    Args:
        model: Teacher and the truncated student (``teacher``, ``student_layers`` ...).
        max_new_tokens: Tokens to generate per prompt.
        prompts: The prompts.
    """
    from dskd.models import build_pair, complete

    t0 = time.time()
    pair = build_pair(model)
    info = pair.info
    print(
        f"teacher {info['teacher']}: {info['teacher_layers']} layers, fingerprint {pair.teacher_fingerprint}\n"
        f"student: first {info['student_layers']} layers, top {info['trainable_layers']} trainable "
        f"({info['trainable_params']:,} of {info['total_params']:,} parameters), fingerprint {pair.student_fingerprint}\n"
        f"loaded in {time.time() - t0:.1f}s"
    )
    for prompt in prompts:
        t = complete(pair.teacher, pair.tokenizer, prompt, max_new_tokens)
        s = complete(pair.student, pair.tokenizer, prompt, max_new_tokens)
        print(f"\nprompt : {prompt!r}\nteacher: {t!r}\nstudent: {s!r}")
    return 0
