"""The sense commands as library functions: ``dskd senses build`` and ``dskd senses show`` (the parsers
are built from these signatures by :mod:`dskd.cli`)."""

from __future__ import annotations

from pathlib import Path

from dskd.config import DataConfig, ModelConfig, SenseConfig
from dskd.io import Artefact, open_artefact
from dskd.senses.build import build_senses
from dskd.senses.store import FORMAT, SenseError, SenseStore, nearest_tokens, word_senses

# The sense store as an artefact of the common contract (dskd.io): its sidecar and its .safetensors files
# are checked before the store is memory-mapped, so a damaged store is one line naming the file.
STORE_ARTEFACT = Artefact(FORMAT["name"], FORMAT["version"], "sense store", "dskd senses build", SenseError)


def open_store(path: str | Path, teacher_fingerprint: str | None = None) -> SenseStore:
    """:meth:`SenseStore.open` behind the artefact open-check (sidecar, whole files, one-line errors)."""
    return open_artefact(path, STORE_ARTEFACT, lambda _meta: SenseStore.open(path, teacher_fingerprint))


def _open_for_cli(path: str, teacher: str | None):
    from dskd.models import load_tokenizer

    store = open_store(path)
    spec = teacher or store.meta["teacher"]["spec"]
    return store, load_tokenizer(spec)


def senses_build_command(
    model: ModelConfig, senses: SenseConfig, out: Path, lexicon_dir: Path | None = None, force: bool = False
) -> Path:
    """The sense dictionary: gather teacher states, cluster them per token, compose multi-token senses, store.

    The teacher is ``--model.teacher``; where and in which dtype it runs is ``--senses.device`` /
    ``--senses.dtype`` (states are gathered in float32). See the README for the corpus mix and the store
    layout. Several processes:
      torchrun --nproc-per-node N -m dskd senses build ... (or accelerate launch): each process gathers
      its own blocks of the corpus, process 0 merges and clusters.

    Example: dskd senses build --config configs/smollm2-135m_to_15l.yaml --lexicon_dir runs/x/lexicon --out runs/x/senses

    Args:
        model: Teacher (``teacher``).
        senses: Sense dictionary (corpus, k, gathering placement and layout, ...).
        out: Output folder of the sense store.
        lexicon_dir: Lexicon folder (``dskd lexicon build``) whose multi-token tails get composed senses.
        force: Rebuild even if ``out`` matches (a partial gather still resumes).
    """
    if lexicon_dir is not None and not Path(lexicon_dir).is_dir():
        raise SenseError(f"--lexicon_dir {lexicon_dir}: no such folder (build it with `dskd lexicon build`)")
    lex = Path(lexicon_dir) if lexicon_dir is not None else None
    from dskd.devices import check_required_accelerator

    check_required_accelerator(model.require_accelerator)
    return build_senses(model.teacher, senses, lex, Path(out), force=force)


def senses_show_command(store: Path, word: str, /, top: int = 5, teacher: str | None = None) -> int:
    """Print a word's senses (written with a leading space, as in running text): the samples each sense
    holds and, per sense, the nearest other tokens (by their closest sense, MSE = ||a - b||^2 / d).

    Example: dskd senses show runs/x/senses bank

    Args:
        store: Sense store folder (``dskd senses build --out``).
        word: The word; multi-token words use their composed senses.
        top: Nearest tokens printed per sense.
        teacher: Tokenizer spec (default: the store's teacher).
    """
    opened, tok = _open_for_cli(str(store), teacher)
    ids, senses, counts, how = word_senses(opened, tok, word)
    pieces = [tok.decode([t]) for t in ids]
    total = int(counts.sum())
    print(f"{word!r}: tokens {ids} {pieces} ({how}), {len(senses)} senses, {total:,} samples")
    exclude = {ids[0]} if len(ids) == 1 else set()
    near = nearest_tokens(opened, senses, exclude, top)
    for i, (c, nn) in enumerate(zip(counts.tolist(), near, strict=True)):
        share = 100 * c / max(total, 1)
        words = ", ".join(f"{tok.decode([t])!r} {v:.2f}" for t, v in nn)
        print(f"  sense {i}: {c:>6,} samples ({share:4.1f}%)  nearest: {words}")
    return 0


def senses_coverage_command(
    model: ModelConfig,
    senses: SenseConfig,
    data: DataConfig,
    lexicon_dir: Path,
    sizes: list[int] | None = None,
    prompts: Path | None = None,
    data_dir: Path | None = None,
    store: Path | None = None,
    timing: Path | None = None,
    teacher_keys: bool = False,
    out: Path | None = None,
    recipe_argv: list[str] | None = None,
) -> int:
    """How many training targets a store of each size would give clustered senses (> k states), counted
    from the build's own positions (no store is built; :mod:`dskd.senses.coverage`).

    With ``--senses.key actual`` only the corpus is tokenized; with ``predicted`` (the recipes' default)
    the keys are the teacher's argmax, so ``--teacher_keys`` runs the teacher over the corpus (the
    gathering's time, without the reservoir), else the command refuses.

    Example: dskd senses coverage --config configs/smollm2-135m_to_24l.yaml --senses.key actual
    --lexicon_dir runs/x/lexicon --prompts runs/x/prompts.jsonl --data_dir runs/teacher_cache/KEY
    --store runs/x/senses --timing results/smollm2-135m_to_24l/senses_meta.json --out coverage.md

    Args:
        model: Teacher (``teacher``).
        senses: Sense options (corpus, k, max_samples, key, layout); ``max_tokens`` is replaced by ``sizes``.
        data: The training set (its prompts: the ``prompts`` corpus, and the targets without ``--data_dir``).
        lexicon_dir: Lexicon folder (its heads, and its multi-token tails for the store's size).
        sizes: Store sizes in positions (default 100k, 200k, 400k, 800k, 1.6M).
        prompts: The ``prompts`` corpus as a run wrote it (``<run>/prompts.jsonl``); default: written
            from ``data`` into a temporary file, as ``dskd run`` writes it.
        data_dir: A folder holding the training set (``dataset.safetensors`` + ``recipe.json``: a run's
            teacher cache); default: the prompts' tokens alone (the teacher's continuations left out).
        store: A built store of this recipe: its own per-token samples are counted too (the check row).
        timing: A store's ``meta.json`` whose gathering and k-means times give the cost columns (k-means
            per sample from ``--store``'s clustered samples); default: ``--store``'s.
        teacher_keys: With ``--senses.key predicted``: run the teacher to get its argmax keys.
        out: Write the tables (markdown, with this command) here, and their numbers as ``.json`` beside.
        recipe_argv: The flags that set the recipe (given by the parser), repeated in the command written.
    """
    import json

    from dskd.lexicon import Lexicon
    from dskd.models import load_tokenizer
    from dskd.senses.coverage import coverage_markdown, coverage_rows, recipe_keys, recipe_targets, store_check

    sizes = sorted(sizes or [100_000, 200_000, 400_000, 800_000, 1_600_000])
    if sizes[0] < 1:
        raise SenseError(f"--sizes {sizes}: positions must be >= 1")
    if senses.key == "predicted" and not teacher_keys:
        raise SenseError(
            "--senses.key predicted: the keys are the teacher's argmax; pass --teacher_keys (runs the teacher "
            "over the corpus) or count --senses.key actual"
        )
    if not Path(lexicon_dir).is_dir():
        raise SenseError(f"--lexicon_dir {lexicon_dir}: no such folder (build it with `dskd lexicon build`)")
    for flag, p in (("--data_dir", data_dir), ("--store", store), ("--timing", timing), ("--prompts", prompts)):
        if p is not None and not Path(p).exists():
            raise SenseError(f"{flag} {p}: no such file or folder")
    tok = load_tokenizer(model.teacher, model.trust_remote_code)
    lex = Lexicon.load(lexicon_dir, tok)
    n_store = int(json.loads((Path(store) / "meta.json").read_text())["counts"]["positions"]) if store else 0
    keys, info = recipe_keys(model, senses, data, tok, max(sizes[-1], n_store), prompts, [n_store] if store else [])
    targets, where = recipe_targets(data, tok, data_dir)
    vocab = len(tok)
    dim, check, cost, store_key = 0, None, None, None
    if store is not None:
        fp = info.pop("fingerprints", {}).get(n_store)  # stream layout: the store must be this recipe's
        check, cost, dim, vocab, store_key = store_check(store, timing, senses, targets, lex, vocab, fp)
    rows = coverage_rows(
        keys, sizes, senses.k, senses.max_samples, targets, lex.heads(), vocab, lex.multi_token_tails(), dim
    )
    text = (
        f"Key: {senses.key}; k = {senses.k}; the corpus holds {info['positions']:,} positions up to "
        f"{sizes[-1]:,} ({info['layout']} layout; tokens per corpus: "
        + ", ".join(f"{c} {n:,}" for c, n in info.items() if c not in ("layout", "positions", "fingerprint"))
        + f"). Targets: {where}.\n\n"
        + coverage_markdown(rows, senses.k, cost)
    )
    if check is not None:
        text += (
            f"\nThe store {store} ({check['size']:,} positions, key {store_key}), counted from its own "
            "samples:\n\n" + coverage_markdown([check], senses.k, cost)
        )
    print(text)
    if out is not None:
        own = [("--lexicon_dir", lexicon_dir), ("--sizes", ",".join(map(str, sizes))), ("--prompts", prompts)]
        own += [("--data_dir", data_dir), ("--store", store), ("--timing", timing), ("--out", out)]
        flags = [*(recipe_argv or [])]
        flags += [a for f, v in own if v is not None and f not in flags for a in (f, str(v))]
        _write_coverage(Path(out), flags + (["--teacher_keys"] if teacher_keys else []), text, rows, check, cost, info)
    return 0


def _write_coverage(out: Path, flags: list[str], text: str, rows, check, cost, info) -> None:
    """``dskd senses coverage --out``: the tables with the command that made them, and their numbers as .json."""
    import json
    import shlex

    from dskd.io import write_text_atomic

    cmd = "dskd senses coverage " + " ".join(map(shlex.quote, flags))
    write_text_atomic(out, f"Made by:\n\n    {cmd}\n\n{text}")
    numbers = {"rows": rows, "check": check, "cost": cost, "corpus": info}
    write_text_atomic(out.with_suffix(".json"), json.dumps(numbers, indent=1))
