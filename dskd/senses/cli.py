"""The sense commands: ``dskd senses build``, ``dskd senses show`` and ``dskd plot senses``."""

from __future__ import annotations

from pathlib import Path

from dskd.config import SenseConfig
from dskd.senses.build import DEFAULT_BLOCK_CHARS, build_senses
from dskd.senses.store import SenseError, SenseStore, nearest_tokens, word_senses

_SUMMARY = "The sense dictionary: gather teacher states, cluster them per token, compose multi-token senses, store."


def _open_for_cli(path: str, teacher: str | None):
    from dskd.models import load_tokenizer

    store = SenseStore.open(path)
    spec = teacher or store.meta["teacher"]["spec"]
    return store, load_tokenizer(spec)


def build_main(argv: list[str]) -> int:
    """``dskd senses build``: gather, cluster, compose and store the teacher's senses."""
    from dskd.cli import parser

    d = SenseConfig()
    p = parser(
        "senses build",
        _SUMMARY + "\n\nSee the README for the corpus mix and the store layout. Several processes:\n"
        "  torchrun --nproc-per-node N -m dskd senses build ... (or accelerate launch): each process\n"
        "  gathers its own blocks of the corpus, process 0 merges and clusters.",
    )
    p.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="Teacher model spec: alias, local folder or hub id."
    )
    p.add_argument(
        "--corpus",
        action="append",
        help="Corpus: a .txt/.jsonl file, a folder or glob of them, a Hugging Face dataset (hf:NAME[:CONFIG]"
        "[@SPLIT], streamed, or a save_to_disk folder), bbc, wordnet, boolq or default (the offline mix). "
        "Repeat for several; they are interleaved by tokens (by blocks with --block-chars). Default: default.",
    )
    p.add_argument(
        "--lexicon",
        default=None,
        help="Lexicon folder (dskd lexicon build) whose multi-token tails get composed senses.",
    )
    p.add_argument("--out", required=True, help="Output folder of the sense store.")
    p.add_argument("--k", type=int, default=d.k, help=f"Senses (k-means centroids) per token (default {d.k}).")
    p.add_argument(
        "--max-samples", type=int, default=d.max_samples, help=f"Per-token reservoir cap (default {d.max_samples})."
    )
    p.add_argument(
        "--key",
        choices=("predicted", "actual"),
        default=d.key,
        help="File states under the predicted or the actual next token.",
    )
    p.add_argument(
        "--max-tokens", type=int, default=d.max_tokens, help=f"Corpus positions gathered (default {d.max_tokens})."
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"Tokens per sequence (default {d.seq_len}).")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"Sequences per teacher forward (default {d.batch_size})."
    )
    p.add_argument("--seed", type=int, default=d.seed, help="Seed of the reservoir and k-means.")
    p.add_argument(
        "--kmeans-iters", type=int, default=d.kmeans_iters, help=f"Lloyd iterations (default {d.kmeans_iters})."
    )
    p.add_argument("--kmeans-init", type=int, default=d.kmeans_init, help="k-means++ seedings per token, best kept.")
    p.add_argument(
        "--store-dtype", choices=("float16", "bfloat16"), default=d.store_dtype, help="Dtype of the stored senses."
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="Batches between progress checkpoints (0: off).",
    )
    p.add_argument(
        "--keep-samples", action="store_true", help="Keep the gathered samples (samples.safetensors) for re-clustering."
    )
    p.add_argument(
        "--device",
        default="auto",
        help="Where the teacher, the reservoir and k-means run: auto (the accelerator when there is one, "
        "else the CPU), cpu, cuda or cuda:N. Under several processes each takes cuda:LOCAL_RANK.",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="Teacher weights dtype (auto: bfloat16 on an accelerator, float32 on the CPU); states are "
        "gathered in float32.",
    )
    p.add_argument(
        "--sample-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="Dtype of the gathered sample rows on disk (auto: float32 on the CPU, the store dtype on an accelerator).",
    )
    p.add_argument(
        "--block-chars",
        type=int,
        default=None,
        help="Corpus blocks of about this many characters, round-robin over corpora and processes: the "
        "store is then the same for any number of processes (when no token reaches --max-samples). "
        f"0: one stream (one process only). Default: 0 for one process, {DEFAULT_BLOCK_CHARS} for several.",
    )
    p.add_argument(
        "--force", action="store_true", help="Rebuild even if --out matches (a partial gather still resumes)."
    )
    a = p.parse_args(argv)
    from dskd.config import from_dict

    cfg = from_dict(
        {
            "corpus": a.corpus or ["default"],
            "k": a.k,
            "max_samples": a.max_samples,
            "key": a.key,
            "max_tokens": a.max_tokens,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "seed": a.seed,
            "kmeans_iters": a.kmeans_iters,
            "kmeans_init": a.kmeans_init,
            "store_dtype": a.store_dtype,
            "checkpoint_every": a.checkpoint_every,
            "keep_samples": a.keep_samples,
        },
        SenseConfig,
    )
    lex = Path(a.lexicon) if a.lexicon else None
    if lex is not None and not lex.is_dir():
        raise SenseError(f"--lexicon {lex}: no such folder (build it with `dskd lexicon build`)")
    build_senses(
        a.teacher,
        cfg,
        lex,
        Path(a.out),
        force=a.force,
        teacher_dtype=a.dtype,
        device=a.device,
        sample_dtype=a.sample_dtype,
        block_chars=a.block_chars,
    )
    return 0


def show_main(argv: list[str]) -> int:
    """``dskd senses show``: a word's senses, samples per sense and nearest other tokens."""
    from dskd.cli import parser

    p = parser(
        "senses show",
        "Print a word's senses (written with a leading space, as in running text): the samples each sense\n"
        "holds and, per sense, the nearest other tokens (by their closest sense, MSE = ||a - b||^2 / d).",
    )
    p.add_argument("store", help="Sense store folder (dskd senses build --out).")
    p.add_argument("word", help="The word; multi-token words use their composed senses.")
    p.add_argument("--top", type=int, default=5, help="Nearest tokens printed per sense.")
    p.add_argument("--teacher", default=None, help="Tokenizer spec (default: the store's teacher).")
    a = p.parse_args(argv)
    store, tok = _open_for_cli(a.store, a.teacher)
    ids, senses, counts, how = word_senses(store, tok, a.word)
    pieces = [tok.decode([t]) for t in ids]
    total = int(counts.sum())
    print(f"{a.word!r}: tokens {ids} {pieces} ({how}), {len(senses)} senses, {total:,} samples")
    exclude = {ids[0]} if len(ids) == 1 else set()
    near = nearest_tokens(store, senses, exclude, a.top)
    for i, (c, nn) in enumerate(zip(counts.tolist(), near, strict=True)):
        share = 100 * c / max(total, 1)
        words = ", ".join(f"{tok.decode([t])!r} {v:.2f}" for t, v in nn)
        print(f"  sense {i}: {c:>6,} samples ({share:4.1f}%)  nearest: {words}")
    return 0


def plot_main(argv: list[str]) -> int:
    """``dskd plot senses``: the paper's Figure 1, drawn by :func:`dskd.plots.senses_main`."""
    from dskd.plots import senses_main

    return senses_main(argv)
