"""``dskd demo``: a quick look at the teacher and a truncated student (no training)."""

from __future__ import annotations

import time

from dskd.cli import parser
from dskd.config import ModelConfig


def main(argv: list[str]) -> int:
    p = parser(
        "demo",
        "Load the teacher, truncate it into a student, and let both complete a few prompts greedily.\n"
        "Shows that the packaged model works offline and what truncation alone does to it.",
    )
    p.add_argument("--teacher", default="smollm2-135m-instruct", help="Teacher model spec (default: %(default)s).")
    p.add_argument("--student-layers", type=int, default=None, help="N, layers kept by the student (default: half).")
    p.add_argument(
        "--max-new-tokens", type=int, default=6, help="Tokens to generate per prompt (default: %(default)s)."
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="A prompt (repeatable; default: three built-in prompts).",
    )
    args = p.parse_args(argv)
    from dskd.models import build_pair, complete

    t0 = time.time()
    cfg = ModelConfig(teacher=args.teacher, student_layers=args.student_layers)
    pair = build_pair(cfg)
    info = pair.info
    print(
        f"teacher {info['teacher']}: {info['teacher_layers']} layers, fingerprint {pair.teacher_fingerprint}\n"
        f"student: first {info['student_layers']} layers, top {info['trainable_layers']} trainable "
        f"({info['trainable_params']:,} of {info['total_params']:,} parameters), fingerprint {pair.student_fingerprint}\n"
        f"loaded in {time.time() - t0:.1f}s"
    )
    prompts = args.prompt or ["The opposite of hot is", "The capital of France is", "A synonym of big is"]
    for prompt in prompts:
        t = complete(pair.teacher, pair.tokenizer, prompt, args.max_new_tokens)
        s = complete(pair.student, pair.tokenizer, prompt, args.max_new_tokens)
        print(f"\nprompt : {prompt!r}\nteacher: {t!r}\nstudent: {s!r}")
    return 0
