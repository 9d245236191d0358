"""The sense commands as library functions: ``dskd senses build`` and ``dskd senses show`` (the parsers
are built from these signatures by :mod:`dskd.cli`)."""

from __future__ import annotations

from pathlib import Path

from dskd.config import ModelConfig, SenseConfig
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
