"""Peak resident memory of a sense build at 1x and 4x the corpus: it must not grow with the corpus.

The reservoir's rows live in a file, the checkpoints hold only bookkeeping, and the store is written
from the files, so the same build over 4x the tokens should need about the same peak resident memory
(target: ratio <= 1.2x) while the sample rows on disk grow ~4x. Each size runs in its own process
(peak RSS is per process), with a tiny random Llama teacher (hidden ``--hidden``) built in-process
and a byte-level BPE tokenizer trained on the corpus. States are filed under the actual next token
(natural-text frequencies: a random teacher's predictions pile onto a few tokens) with the default
per-token cap of 2,000, which only the most frequent tokens reach, so the rows on disk grow nearly
4x. (The cap is what bounds the largest token's k-means group; with no cap that group, and the
memory k-means needs for it, would grow with the corpus.)

Usage::

    python benchmarks/senses_memory.py                      # 60k and 240k tokens of bbc, hidden 512
    python benchmarks/senses_memory.py --tokens 3000 --hidden 128   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout's dskd, not an installed copy
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_teacher(folder: Path, corpus: str, hidden: int, vocab: int) -> None:
    """A random 2-layer Llama and a BPE tokenizer trained on the first documents of ``corpus``."""
    import itertools

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from dskd.senses.corpus import corpus_sources

    docs = [d for _, fn in corpus_sources([corpus]) for d in itertools.islice(fn(), 300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def child(a: argparse.Namespace) -> None:
    """One build; prints a JSON line with its peak RSS and the bytes of sample rows it gathered."""
    from dskd.config import SenseConfig
    from dskd.senses import build_senses

    cfg = SenseConfig(
        corpus=[a.corpus],
        k=5,
        max_samples=a.cap,
        key="actual",
        max_tokens=a.tokens,
        seq_len=256,
        batch_size=4,
        checkpoint_every=20,
    )
    t0 = time.perf_counter()
    out = build_senses(a.teacher, cfg, None, Path(a.out), force=True, progress=False, device="cpu")
    meta = json.loads((out / "meta.json").read_text())
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
    rows_bytes = meta["counts"]["samples"] * meta["dim"] * 4  # float32 sample rows on the CPU
    print(
        json.dumps(
            {
                "tokens": meta["counts"]["positions"],
                "peak_rss_mb": round(peak_kb / 1024, 1),
                "rows_on_disk_mb": round(rows_bytes / 2**20, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=60_000, help="Corpus positions of the 1x build.")
    p.add_argument("--scale", type=int, default=4, help="The larger build gathers this many times more.")
    p.add_argument("--hidden", type=int, default=512, help="Hidden size of the tiny teacher (bytes per row).")
    p.add_argument("--vocab", type=int, default=4096, help="Vocabulary of the BPE tokenizer trained here.")
    p.add_argument("--corpus", default="bbc", help="Corpus spec (as --corpus of dskd senses build).")
    p.add_argument("--cap", type=int, default=2000, help="Per-token reservoir cap (--max-samples).")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher"
        make_teacher(teacher, a.corpus, a.hidden, a.vocab)
        rows = []
        for scale in (1, a.scale):
            cmd = [sys.executable, __file__, "--child", "--teacher", str(teacher), "--corpus", a.corpus]
            cmd += ["--tokens", str(a.tokens * scale), "--cap", str(a.cap), "--out", str(Path(tmp) / f"store{scale}")]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                sys.exit(res.stderr[-3000:])
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"{scale}x: {r['tokens']:>9,} positions | sample rows on disk {r['rows_on_disk_mb']:8.1f} MB | "
                f"peak RSS {r['peak_rss_mb']:8.1f} MB | {r['seconds']:.0f} s"
            )
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    disk = rows[1]["rows_on_disk_mb"] / max(rows[0]["rows_on_disk_mb"], 1e-9)
    print(f"peak RSS ratio {a.scale}x / 1x: {ratio:.3f} (target <= 1.2) | rows on disk ratio {disk:.2f}")


if __name__ == "__main__":
    main()
