"""Pictures of the teacher's senses: the paper's Figure 1 from contextual states.

The paper's Figure 1 shows contextual states of a few words (red and its synonyms crimson, scarlet,
ruby beside unrelated words) and their sense clusters. :func:`senses_figure` draws it from the
teacher itself rather than from a sense store, so that every word can be shown however the store
covers it:

1. Sentences containing each word (written lower-case after a space, as the lexicon maps words) are
   taken from a text corpus (the same specs as ``dskd senses build --senses.corpus``), at most ``per_word``
   per word.
2. The teacher runs over each sentence. A word's *contextual state* is the state the sense
   dictionary would file under it: the last hidden state after the final norm (the LM head's input)
   at the position that predicts the word's token. A word of several tokens (`` crimson`` is
   `` crim`` + ``son`` in SmolLM2) gets the mean of the states predicting each of its tokens, the
   contextual analogue of the dictionary's composed senses (a chain's mean).
3. Each word's states are clustered with k-means into at most ``k`` centroids: its senses here.
4. States and centroids are embedded together in 2-D with t-SNE; the caption says what is plotted
   and from how many states, and which other word each word sits nearest to (MSE between the
   words' mean states, in the original space, not in the picture).

``dskd plot senses`` runs it; ``figures/senses_tsne.png`` of ``dskd run`` is this figure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd.config import DEFAULT_TEACHER, DskdError

FIGURE1_WORDS = ("red", "crimson", "scarlet", "ruby", "bus", "car")
_MAX_CHARS = 400  # a longer sentence is cut to a window ending shortly after the word


class PlotError(DskdError, ValueError):
    """A figure that cannot be drawn as asked; the message names the flag."""


@dataclass
class Occurrence:
    """A word inside a sentence: the sentence and the word's character span in it."""

    word: str
    text: str
    start: int
    end: int


def _sentences(doc: str) -> Iterator[str]:
    for s in re.split(r"(?<=[.!?])\s+|\n+", doc):
        s = s.strip()
        if s:
            yield s


def find_occurrences(docs: Iterator[str], words: Sequence[str], per_word: int) -> dict[str, list[Occurrence]]:
    """Up to ``per_word`` sentences per word, scanning ``docs`` in order until every word has enough.

    A match is the word in lower case after a space, not inside a longer word (``red`` does not match
    ``reddish`` or ``Red``), so it tokenizes as the lexicon's `` word``. Repeated sentences count once.
    """
    pats = {w: re.compile(r"(?<= )" + re.escape(w) + r"(?![\w-])") for w in words}
    found: dict[str, list[Occurrence]] = {w: [] for w in words}
    seen: set[str] = set()  # a repeated sentence would add the very same state again
    for doc in docs:
        for sent in _sentences(doc):
            if sent in seen:
                continue
            seen.add(sent)
            for w, pat in pats.items():
                if len(found[w]) >= per_word:
                    continue
                m = pat.search(sent)
                if m is None:
                    continue
                a = max(0, m.end() + 40 - _MAX_CHARS)
                text = sent[a : m.end() + 40]
                found[w].append(Occurrence(w, text, m.start() - a, m.end() - a))
        if all(len(v) >= per_word for v in found.values()):
            break
    return found


@torch.no_grad()
def word_states(model, tokenizer, occs: Sequence[Occurrence], batch_size: int = 16) -> tuple[torch.Tensor, list[int]]:
    """The contextual state of each occurrence (see the module docstring).

    Args:
        model: The teacher (a causal LM).
        tokenizer: Its (fast) tokenizer.
        occs: Occurrences of words in sentences.
        batch_size: Sentences per forward.

    Returns:
        (states (n, d) float32 for the occurrences that could be used, their indices into ``occs``).
        An occurrence is skipped when the word starts the tokenized sentence (no state predicts it)
        or when the sentence tokenizes it differently from `` word`` alone.
    """
    from dskd.fidelity import _hidden

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items: list[tuple[int, list[int], list[int]]] = []  # (occurrence, token ids, predicting positions)
    # the word's tokens: those overlapping it or its leading space (byte-level BPE attaches the space to
    # the word's first token, or makes it a token of its own); the id check below keeps exact matches only
    for i, o in enumerate(occs):
        enc = tokenizer(o.text, return_offsets_mapping=True)
        want = tokenizer(" " + o.word, add_special_tokens=False)["input_ids"]
        span = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < o.end and b >= o.start and b > a]
        if not span or span[0] < 1 or [enc["input_ids"][j] for j in span] != want:
            continue
        items.append((i, enc["input_ids"], [j - 1 for j in span]))
    states, used = [], []
    for a in range(0, len(items), batch_size):
        chunk = items[a : a + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, x, _) in enumerate(chunk):
            ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        h = _hidden(model, ids, mask).float().cpu()  # (B, T, d)
        for r, (i, _, pos) in enumerate(chunk):
            states.append(h[r, pos].mean(0))  # mean over the positions predicting the word's tokens
            used.append(i)
    dim = model.get_output_embeddings().weight.shape[1]
    return (torch.stack(states) if states else torch.zeros(0, dim)), used


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    k = min(k, len(np.unique(x, axis=0)))  # identical contexts give identical states
    if k <= 1:
        return x.mean(0, keepdims=True)
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=4, random_state=seed).fit(x).cluster_centers_


def senses_figure(
    teacher_spec: str,
    words: Sequence[str],
    out: Path | str,
    *,
    corpus: Sequence[str] = ("default",),
    per_word: int = 40,
    k: int = 3,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Draw the Figure 1 picture (module docstring) into ``out`` and its numbers into ``out`` + ``.json``.

    Args:
        teacher_spec: Teacher model spec.
        words: Words to show (single- or multi-token).
        out: Image path (.png, .pdf, .svg).
        corpus: Corpus specs to take sentences from (as ``dskd senses build --senses.corpus``).
        per_word: Sentences per word at most.
        k: Centroids per word at most.
        seed: Seed of k-means and t-SNE.
        dtype: Teacher weights dtype.
        device: ``auto``, ``cpu``, ``cuda`` ...
        progress: Print what was found.

    Returns:
        What the JSON sidecar holds: per word its tokens, sentences, states and nearest other word.
    """
    from dskd.models import load_model, load_tokenizer
    from dskd.senses import corpus_sources

    words = list(dict.fromkeys(w.strip().lower() for w in words if w.strip()))
    if not words:
        raise PlotError("--words: give at least one word")
    if per_word < 1 or k < 1:
        raise PlotError(f"--per_word / --k: must be >= 1 (got {per_word}, {k})")
    out = Path(out)
    sources = corpus_sources(list(corpus), flag="--corpus")  # bad corpus specs fail before the model loads
    tok = load_tokenizer(teacher_spec)
    occs = find_occurrences((d for _, fn in sources for d in fn()), words, per_word)
    flat = [o for w in words for o in occs[w]]
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(teacher_spec, dtype).to(dev)
    states, used = word_states(model, tok, flat)
    labels = [flat[i].word for i in used]
    info: dict[str, Any] = {"teacher": teacher_spec, "corpus": list(corpus), "k": k, "words": {}}
    vecs, cents, cent_labels = [], [], []
    for w in words:
        pieces = [tok.decode([t]) for t in tok(" " + w, add_special_tokens=False)["input_ids"]]
        x = states[[j for j, lab in enumerate(labels) if lab == w]].numpy()
        info["words"][w] = {"tokens": pieces, "sentences_found": len(occs[w]), "states": len(x)}
        if progress:
            print(f"{w}: {len(x)} states from {len(occs[w])} sentences, tokens {pieces}")
        if len(x):
            vecs.append(x)
            c = _kmeans(x, k, seed)
            cents.append(c)
            cent_labels += [w] * len(c)
    shown = [w for w in words if info["words"][w]["states"]]
    if not shown:
        raise PlotError(f"--words: none of {words} occurs in the corpus {list(corpus)}")
    # where words sit relative to each other, measured in the teacher's space (t-SNE distorts distances)
    means = {w: states[[j for j, lab in enumerate(labels) if lab == w]].mean(0) for w in shown}
    mse = {w: {v: float(((means[w] - means[v]) ** 2).mean()) for v in shown} for w in shown}
    for w in shown:
        others = [v for v in shown if v != w]
        info["words"][w]["nearest"] = min(others, key=lambda v: mse[w][v]) if others else None
    info["mean_state_mse"] = mse
    x_all = np.concatenate(vecs)
    c_all = np.concatenate(cents)
    xy = _embed(np.concatenate([x_all, c_all]), seed)
    _draw(xy[: len(x_all)], xy[len(x_all) :], [lab for lab in labels if lab in shown], cent_labels, shown, info, out)
    info["states"] = len(x_all)
    info["sentences"] = len(used)
    from dskd.io import write_json

    write_json(out.with_suffix(".json"), info, indent=1)
    if progress:
        near = ", ".join(f"{w}->{info['words'][w]['nearest']}" for w in shown if info["words"][w]["nearest"])
        print(f"nearest word by mean-state MSE: {near}")
        print(f"wrote {out} ({len(x_all)} states of {len(shown)} words) and {out.with_suffix('.json')}")
    return info


def save_figure(fig, out: Path, dpi: int) -> None:
    """Write ``fig`` to ``out`` atomically (a temporary name, then a rename) and close it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=dpi, format=out.suffix.lstrip(".") or "png")
    tmp.replace(out)
    plt.close(fig)


def _embed(x: np.ndarray, seed: int) -> np.ndarray:
    if len(x) < 4:
        return np.pad(x[:, :2], ((0, 0), (0, max(0, 2 - x.shape[1]))))
    from sklearn.manifold import TSNE

    perplexity = max(1.0, min(30.0, (len(x) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _draw(
    xy: np.ndarray,
    cxy: np.ndarray,
    labels: list[str],
    cent_labels: list[str],
    words: list[str],
    info: dict[str, Any],
    out: Path,
) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7.2))
    cmap = plt.get_cmap("tab10" if len(words) <= 10 else "tab20")
    lab, clab = np.asarray(labels), np.asarray(cent_labels)
    for i, w in enumerate(words):
        col = cmap(i % cmap.N)
        m, cm = lab == w, clab == w
        toks = info["words"][w]["tokens"]
        name = f"{w} ({m.sum()} states" + (f", {'+'.join(repr(t) for t in toks)}" if len(toks) > 1 else "") + ")"
        ax.scatter(xy[m, 0], xy[m, 1], s=14, color=col, alpha=0.55, edgecolors="none", label=name)
        ax.scatter(cxy[cm, 0], cxy[cm, 1], s=150, color=col, marker="X", edgecolors="black", linewidths=0.8)
        for px, py in cxy[cm]:
            ax.annotate(w, (px, py), fontsize=9, weight="bold", xytext=(5, 4), textcoords="offset points")
    ax.legend(fontsize=8, loc="best", markerscale=1.5)
    ax.set_title(f"Contextual states and senses of the teacher ({Path(info['teacher']).name})")
    ax.set_xticks([])
    ax.set_yticks([])
    near = ", ".join(f"{w} -> {info['words'][w]['nearest']}" for w in words if info["words"][w].get("nearest"))
    caption = (
        f"t-SNE of {len(labels)} contextual states of the teacher, one per sentence of "
        f"{', '.join(Path(c).name for c in info['corpus'])} containing the word: "
        "the final-norm last hidden state (the LM head's input) at the position predicting the word; words of "
        "several tokens: the mean over the positions predicting each token. Dots: states; X: k-means centroids "
        f"(at most {info['k']} per word), the word's senses. Nearest other word by MSE between mean states in "
        f"the teacher's space: {near}."
    )
    fig.text(0.01, 0.01, "\n".join(textwrap.wrap(caption, 130)), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    save_figure(fig, out, dpi=150)


def plot_senses_command(
    out: Path,
    store: Path | None = None,
    words: list[str] = list(FIGURE1_WORDS),  # noqa: B006  (read only; the parser shows it as the default)
    teacher: str | None = None,
    corpus: list[str] | None = None,
    per_word: int = 40,
    k: int = 3,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Draw the paper's Figure 1: the teacher's contextual states of some words (sentences containing them
    from a corpus; multi-token words as the mean of the states predicting their tokens), their k-means
    centroids (senses) marked, embedded together with t-SNE. Also writes the numbers as <out>.json.

    Example: dskd plot senses --teacher smollm2-135m-instruct --words red,crimson,scarlet,ruby,bus,car --out fig.png

    Args:
        out: Output image (.png, .pdf or .svg).
        store: Optional sense store folder: its teacher and corpus become the defaults of ``teacher`` / ``corpus``.
        words: The words.
        teacher: Teacher spec (default: the store's, else smollm2-135m-instruct).
        corpus: Where sentences come from, as ``senses.corpus`` (default: the store's, else default).
        per_word: Sentences per word at most.
        k: k-means centroids per word at most.
        seed: Seed of k-means and t-SNE.
        device: auto, cpu, cuda ...
    """
    if store is not None:
        meta_file = Path(store) / "meta.json"
        if not meta_file.is_file():
            raise PlotError(f"--store {store}: no meta.json (not a sense store)")
        meta = json.loads(meta_file.read_text())
        teacher = teacher or meta["teacher"]["spec"]
        corpus = corpus or meta["corpus"]["specs"]
    return senses_figure(
        teacher or DEFAULT_TEACHER,
        list(words),
        out,
        corpus=corpus or ["default"],
        per_word=per_word,
        k=k,
        seed=seed,
        device=device,
    )


DIAGNOSTIC_KEYS = {
    "sense_above_floor": "sense - floor (the sense loss above its value at the teacher's states)",
    "aux_grad_ratio": "||grad lambda x sense (+ hidden)|| / ||grad KD + CE||",
    "aux_grad_cos": "cosine(grad lambda x sense (+ hidden), grad KD + CE)",
}


def plot_diagnostics(runs: dict[str, Path], out: Path) -> Path | None:
    """The training diagnostic of several runs from their ``metrics.jsonl``: ``sense - floor``, and the norm
    ratio and cosine of the weighted sense (or hidden-state) gradient against KD + CE's, per logged step.
    None (nothing written) when no run logged them (KD alone)."""
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for name, run_dir in runs.items():
        f = Path(run_dir) / "metrics.jsonl"
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            for k in DIAGNOSTIC_KEYS:
                if isinstance(rec.get(k), int | float) and "step" in rec:
                    xs, ys = series.setdefault(k, {}).setdefault(name, ([], []))
                    xs.append(rec["step"])
                    ys.append(rec[k])
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in DIAGNOSTIC_KEYS if k in series]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=True):
        for name, (xs, ys) in series[k].items():
            ax.plot(xs, ys, marker=".", label=name)
        ax.axhline(1.0 if k == "aux_grad_ratio" else 0.0, color="grey", lw=0.6, ls="--")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(DIAGNOSTIC_KEYS[k], fontsize=6)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=110)
    return out
