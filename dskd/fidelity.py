"""Held-out fidelity of students to their teacher, and a sense probe.

Accuracy on 4-way benchmarks moves little at the demo's scale; how closely a student reproduces its
teacher's next-token distribution on text it never trained on moves a lot. ``dskd fidelity``
(and the ``fidelity`` stage of ``dskd run``) measures, on two held-out sets:

* **text**: the evaluation questions of ``fidelity.text_tasks`` (ARC-Easy test by default) as raw
  text, one document per question. The split protocol (docs/splits.md) keeps these items out of
  every training prompt and exemplar.
* **prompts**: evaluation items of ``fidelity.prompt_tasks`` as prompts built exactly like the
  distillation prompts (the same ``data.style``, letter or cloze, the same ``data.chat`` template,
  exemplars drawn from training items), so the student sees the format it was trained on, with
  questions it was not.

Per model and set, over every position of every document (positions are weighted equally; the
bootstrap resamples documents, so its error reflects document-to-document variation):

* ``kl``: KL(teacher || student) at T = 1 in nats per token, over the whole vocabulary;
* ``agree``: share of positions where the student's argmax equals the teacher's;
* ``ppl``: the student's perplexity on the actual next tokens (every position but the last);
* ``probe`` (with a sense store and a lexicon): at positions whose actual next token y has antonyms
  with senses in the store, the share where the model's final-norm hidden state (the LM head's
  input) is nearer, by MSE = ||a - b||^2 / d to the nearest sense, to y's senses than to its
  antonyms' senses. The teacher's rate is reported for reference: the store is made from its states.

The result is a JSON file (format ``dskd-fidelity``) with per-document sums, so any two models can be
compared with a paired bootstrap over the same documents, and a markdown table next to it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dskd.config import ConfigError, DataConfig, DskdError, EvalConfig, FidelityConfig, ModelConfig
from dskd.io import Artefact, read_sidecar, write_json, write_text_atomic
from dskd.models import head_problem
from dskd.models import lm_head_logits as _head

if TYPE_CHECKING:
    from dskd.prefix import PrefixMemo

FORMAT = {"name": "dskd-fidelity", "version": 1}
SUMS = ("n", "kl", "agree", "n_tgt", "nll", "probe_n", "probe_hit")
METRICS = ("kl", "agree", "ppl", "probe")
SETS = ("text", "prompts")


class FidelityError(DskdError, ValueError):
    """A fidelity evaluation that cannot run as asked; the message names the flag or file."""


RESULT_ARTEFACT = Artefact(FORMAT["name"], FORMAT["version"], "dskd fidelity result", "dskd fidelity", FidelityError)


# ---- held-out documents --------------------------------------------------------------------------
@dataclass
class Doc:
    """One held-out document.

    Args:
        id: ``task:item id``.
        ids: Token ids (L,), at most ``max_length`` long.
    """

    id: str
    ids: torch.Tensor


def _items(task_name: str, limit: int, flag: str):
    from dskd.prompts import select_items
    from dskd.tasks import get_task

    task = get_task(task_name, flag=flag)
    return task, select_items(task, limit)


def heldout_text(
    tokenizer, tasks: Sequence[str], limit: int, max_length: int, flag: str = "--fidelity.text_tasks"
) -> list[Doc]:
    """The evaluation questions of ``tasks`` as raw text, one document each (tokenizer defaults);
    an unknown task is an error naming ``flag``."""
    docs = []
    for name in tasks:
        task, items = _items(name, limit, flag)
        for it in items:
            ids = torch.tensor(tokenizer(it.question.strip())["input_ids"], dtype=torch.long)[:max_length]
            if len(ids) >= 2:
                docs.append(Doc(f"{task.name}:{it.id}", ids))
    return docs


def heldout_prompts(
    tokenizer,
    tasks: Sequence[str],
    limit: int,
    shots: int,
    seed: int,
    max_length: int,
    chat: bool = True,
    flag: str = "--fidelity.prompt_tasks",
    style: str = "letter",
) -> list[Doc]:
    """Evaluation items of ``tasks`` as prompts built like the training prompts (:func:`dskd.prompts.training_prompt`).

    ``style`` ``letter``: the prompt ends where the answer letter goes; ``cloze``: it ends where the
    answer text goes (``... Answer:``). Exemplars come from training items only. As in training, chat
    prompts carry their special tokens as text, and long prompts are cut from the left. An unknown
    task is an error naming ``flag``.
    """
    from dskd.prompts import training_prompt

    docs = []
    for name in tasks:
        task, items = _items(name, limit, flag)
        for it in items:
            prompt = training_prompt(task, it, task.exemplars(it, shots, seed), tokenizer, chat, style)
            ids = torch.tensor(tokenizer(prompt, add_special_tokens=not chat)["input_ids"], dtype=torch.long)
            docs.append(Doc(f"{task.name}:{it.id}", ids[-max_length:]))
    return docs


# ---- the sense probe -----------------------------------------------------------------------------
class SenseProbe:
    """Per next-token candidates of the probe: the token's own senses and its antonyms' senses.

    Args:
        store: A sense store (``SenseStore`` or anything with ``senses(entry)`` and ``entry_of(tail)``).
        lexicon: A lexicon (anything with ``antonyms(token_id)``).
    """

    def __init__(self, store: Any, lexicon: Any) -> None:
        self.store = store
        self.lexicon = lexicon
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def candidates(self, y: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(own senses (p, d), antonym senses (n, d)) float32, or None when either set is empty."""
        if y in self._cache:
            return self._cache[y]
        found = None
        ants = self.lexicon.antonyms(y)
        if ants:
            entry = self.store.entry_of((y,))
            own = self.store.senses(entry).float() if entry is not None else None
            neg = []
            for tail in ants:
                e = self.store.entry_of(tuple(tail))
                if e is not None:
                    s = self.store.senses(e).float()
                    if s.shape[0]:
                        neg.append(s)
            if own is not None and own.shape[0] and neg:
                found = (own, torch.cat(neg))
        self._cache[y] = found
        return found

    def hits(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probe each state against its next token.

        Args:
            h: States (N, d), the LM head's input at each position.
            targets: The actual next token of each position (N,).

        Returns:
            (applicable (N,) bool: the next token has own and antonym senses,
             hit (N,) bool: the nearest own sense is nearer than the nearest antonym sense).
        """
        h = h.float().cpu()
        applicable = torch.zeros(len(targets), dtype=torch.bool)
        hit = torch.zeros(len(targets), dtype=torch.bool)
        for i, y in enumerate(targets.tolist()):
            c = self.candidates(int(y))
            if c is None:
                continue
            own, neg = c
            d_own = ((own - h[i]) ** 2).mean(-1).min()
            d_neg = ((neg - h[i]) ** 2).mean(-1).min()
            applicable[i] = True
            hit[i] = bool(d_own < d_neg)
        return applicable, hit


# ---- measuring -----------------------------------------------------------------------------------
def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Documents grouped by length (longest first) so that rows x longest <= ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, memo: PrefixMemo | None = None) -> torch.Tensor:
    """The LM head's input at every position (B, T, d): the decoder's last state after its final norm
    (through ``memo`` when given: bottom layers shared with the teacher are computed once per batch)."""
    if memo is not None:
        return memo.hidden(model, input_ids=ids, attention_mask=mask)
    dev = next(model.parameters()).device
    return model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).last_hidden_state


def _pack(docs: Sequence[Doc], batch: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of documents, right-padded: ``ids``, ``mask`` (B, W); per valid position, row-major,
    ``rows``, ``cols``, ``next`` (the actual next token, padding after a document's end), ``has_next``
    and ``doc`` (the document's index), each (P,)."""
    width = len(docs[batch[0]].ids)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        ids[r, : len(docs[i].ids)] = docs[i].ids
        mask[r, : len(docs[i].ids)] = 1
    rows, cols = mask.nonzero(as_tuple=True)  # valid positions, row-major
    nxt = torch.cat([ids[:, 1:], torch.full((len(batch), 1), pad_id)], 1)[rows, cols]  # (P,)
    has_next = (cols + 1 < mask.sum(1)[rows]).cpu()  # (P,)
    return {"ids": ids, "mask": mask, "rows": rows, "cols": cols, "next": nxt, "has_next": has_next,
            "doc": torch.tensor(batch)[rows]}  # fmt: skip


def _add_chunk(
    sums: dict[str, dict[str, np.ndarray]],
    per: dict[str, torch.Tensor],
    lp_t: torch.Tensor,
    d_of: np.ndarray,
    tgt: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    """Add one chunk of positions to the per-document sums of each model in ``per`` (name -> log-probs (c, V));
    ``lp_t`` the teacher's; the entry ``teacher`` (when present) is the reference itself."""
    top_t = lp_t.argmax(-1).cpu()
    for m, lp in per.items():
        s = sums[m]
        np.add.at(s["n"], d_of, 1.0)
        if m == "teacher":
            np.add.at(s["agree"], d_of, 1.0)
        else:
            kl = (lp_t.exp() * (lp_t - lp)).sum(-1).clamp_min(0).cpu().double().numpy()
            np.add.at(s["kl"], d_of, kl)
            np.add.at(s["agree"], d_of, (lp.argmax(-1).cpu() == top_t).double().numpy())
        nll = -lp.gather(1, tgt.to(lp.device)[:, None])[:, 0].cpu().double()
        np.add.at(s["n_tgt"], d_of[ok.numpy()], 1.0)
        np.add.at(s["nll"], d_of[ok.numpy()], nll[ok].numpy())


def _add_probe(
    sums: dict[str, dict[str, np.ndarray]],
    states: dict[str, torch.Tensor],
    probe: SenseProbe,
    d_of: np.ndarray,
    tgt: torch.Tensor,
    ok: torch.Tensor,
) -> None:
    """Add one chunk's sense-probe counts of each model in ``states`` (name -> LM-head inputs (c, d))."""
    for m, h in states.items():
        app, hit = probe.hits(h[ok.to(h.device)], tgt[ok])
        d_ok = d_of[ok.numpy()]
        np.add.at(sums[m]["probe_n"], d_ok, app.double().numpy())
        np.add.at(sums[m]["probe_hit"], d_ok, hit.double().numpy())


@torch.no_grad()
def measure(
    teacher: nn.Module,
    models: dict[str, nn.Module],
    docs: Sequence[Doc],
    vocab: int,
    pad_id: int = 0,
    batch_tokens: int = 2048,
    probe: SenseProbe | None = None,
    chunk: int = 256,
    desc: str | None = None,
    memo: PrefixMemo | None = None,
    teacher_states: list[torch.Tensor] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-document sums of the fidelity statistics for the teacher and each model.

    Args:
        teacher: The reference causal LM.
        models: name -> causal LM sharing the teacher's tokenizer.
        docs: Held-out documents.
        vocab: Logit columns compared (the tokenizer's size; padded heads are sliced).
        pad_id: Padding id (padding is masked and never counted).
        batch_tokens: Tokens per batch (rows x longest row).
        probe: The sense probe, or None.
        chunk: Positions sent through the LM heads at once (bounds memory at chunk x vocab floats).
        desc: Label of a progress bar (None: no bar).
        memo: Bottom-layer states shared by the models (:class:`dskd.prefix.PrefixMemo`): computed
            once per batch for every model with the same frozen bottom layers; results unchanged.
        teacher_states: The teacher's LM-head inputs at the valid positions of each batch, kept in CPU
            memory between calls (tokens x hidden size values): an empty list is filled; a filled one
            (from a call on the same ``docs`` and ``batch_tokens``) stands in for the teacher's decoder,
            whose head still runs, and the teacher's own sums are then not measured again. Models
            measured one call at a time this way get the very numbers of one call with all of them.

    Returns:
        ``{"teacher": sums, name: sums, ...}``, each sums a dict of (D,) arrays over documents:
        ``n`` positions, ``kl`` summed KL(teacher || model), ``agree`` argmax matches, ``n_tgt``
        positions with a next token, ``nll`` summed -log p(next token), ``probe_n`` probed positions,
        ``probe_hit`` probe hits. The teacher's own ``kl`` and ``agree`` are 0 and ``n``; it has no
        entry when ``teacher_states`` came filled.
    """
    reuse = bool(teacher_states)
    names = [*([] if reuse else ["teacher"]), *models]
    for name, mod in (("teacher", teacher), *models.items()):
        # fidelity applies the head to the decoder's last state: refuse a model where that is not its logits
        if (problem := head_problem(mod)) is not None:
            raise FidelityError(f"fidelity cannot score {name}: {problem}")
    sums = {m: {k: np.zeros(len(docs)) for k in SUMS} for m in names}
    bar = None
    if desc:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(d.ids) for d in docs), desc=desc, unit="tok", file=sys.stderr, dynamic_ncols=True)
    t_dev = next(teacher.parameters()).device
    for b, batch in enumerate(plan_batches([len(d.ids) for d in docs], batch_tokens)):
        x = _pack(docs, batch, pad_id)
        ids, mask, rows, cols = x["ids"], x["mask"], x["rows"], x["cols"]
        if reuse:
            h_t = teacher_states[b].to(t_dev)  # (P, d), the very tensor an earlier call computed
        else:
            h_t = _hidden(teacher, ids, mask, memo)[rows, cols]  # (P, d)
            if teacher_states is not None:
                teacher_states.append(h_t.cpu())
        h_s = {m: _hidden(mod, ids, mask, memo)[rows, cols] for m, mod in models.items()}  # (P, d) each
        for a in range(0, len(rows), chunk):
            sl = slice(a, a + chunk)
            d_of, tgt, ok = x["doc"][sl].numpy(), x["next"][sl], x["has_next"][sl]
            lp_t = torch.log_softmax(_head(teacher, h_t[sl])[:, :vocab], -1)  # (c, V)
            per = {} if reuse else {"teacher": lp_t}
            for m, h in h_s.items():
                per[m] = torch.log_softmax(_head(models[m], h[sl])[:, :vocab], -1).to(lp_t.device)  # (c, V)
            _add_chunk(sums, per, lp_t, d_of, tgt, ok)
            if probe is not None:
                states = {**({} if reuse else {"teacher": h_t[sl]}), **{m: h[sl] for m, h in h_s.items()}}
                _add_probe(sums, states, probe, d_of, tgt, ok)
        if bar is not None:
            bar.update(int(mask.sum()))
    if bar is not None:
        bar.close()
    return sums


# ---- statistics ----------------------------------------------------------------------------------
def _value(s: dict[str, np.ndarray], metric: str, idx: np.ndarray | None = None) -> np.ndarray | float:
    """A metric from per-document sums; ``idx`` (R, D) resamples documents (one value per row)."""

    def tot(k: str) -> np.ndarray | float:
        return s[k][idx].sum(-1) if idx is not None else s[k].sum()

    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "kl":
            return tot("kl") / tot("n")
        if metric == "agree":
            return tot("agree") / tot("n")
        if metric == "ppl":
            return np.exp(tot("nll") / tot("n_tgt"))
        if metric == "probe":
            return tot("probe_hit") / tot("probe_n")
    raise ValueError(metric)


def _draws(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_docs, size=(n_boot, n_docs))


def summarize(s: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, float | None]:
    """Each metric and its bootstrap standard error over documents (None where undefined)."""
    out: dict[str, float | None] = {}
    idx = _draws(len(s["n"]), n_boot, seed) if n_boot and len(s["n"]) else None
    for m in METRICS:
        v = float(_value(s, m))
        out[m] = v if math.isfinite(v) else None
        if idx is not None:
            reps = np.asarray(_value(s, m, idx), dtype=float)
            reps = reps[np.isfinite(reps)]
            out[f"{m}_stderr"] = float(reps.std()) if out[m] is not None and len(reps) > 1 else None
    out["tokens"] = float(s["n"].sum())
    out["probe_positions"] = float(s["probe_n"].sum())
    return out


def paired_diff(
    a: dict[str, np.ndarray], b: dict[str, np.ndarray], metric: str, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``metric(a) - metric(b)`` over the same documents and its paired bootstrap 95% interval."""
    if len(a["n"]) != len(b["n"]):
        raise FidelityError(f"paired bootstrap needs the same documents ({len(a['n'])} vs {len(b['n'])})")
    diff = float(_value(a, metric)) - float(_value(b, metric))
    idx = _draws(len(a["n"]), max(n_boot, 1), seed)
    d = np.asarray(_value(a, metric, idx), dtype=float) - np.asarray(_value(b, metric, idx), dtype=float)
    d = d[np.isfinite(d)]
    if not len(d):
        return diff, float("nan"), float("nan")
    lo, hi = np.quantile(d, [0.025, 0.975])
    return diff, float(lo), float(hi)


# ---- the evaluation ------------------------------------------------------------------------------
def _parse_models(entries: Sequence[str]) -> dict[str, str]:
    """``["kd=runs/x/students/kd/student", "runs/y"]`` -> name -> spec (name: the folder's name)."""
    out: dict[str, str] = {}
    for e in entries:
        name, sep, spec = e.partition("=")
        if not sep:
            p = Path(e.rstrip("/"))
            name, spec = (p.parent.name if p.name == "student" else p.name) or e, e
        if not name or not spec:
            raise ConfigError(f"--students: expected NAME=SPEC or SPEC (got {e!r})")
        if name in out or name == "teacher":
            raise ConfigError(f"--students: name {name!r} given twice or reserved; use NAME=SPEC")
        out[name] = spec
    return out


def _check_request(
    out: Path, models: dict[str, str], baseline: str | None, cfg: FidelityConfig, senses_dir, lexicon_dir
) -> None:
    """Refuse, before any work, an output that is no .json file, no models, an unknown baseline, a missing
    probe folder."""
    if out.suffix != ".json":
        raise ConfigError(f"--out: expected a .json file (got {out})")
    if not models:
        raise ConfigError("--model: give at least one model to compare with the teacher")
    if baseline is not None and baseline not in models:
        raise ConfigError(f"--baseline: {baseline!r} is none of the models ({', '.join(models)})")
    for flag, p in (("--senses", senses_dir), ("--lexicon", lexicon_dir)):
        if cfg.probe and p is not None and not Path(p).is_dir():
            raise FidelityError(f"{flag} {p}: no such folder")


def _heldout_sets(
    tok, cfg: FidelityConfig, ptasks: list[str], n_shots: int, chat: bool, style: str
) -> dict[str, list[Doc]]:
    """The held-out sets that have documents (``text``, ``prompts``); none at all is an error."""
    sets = {
        "text": heldout_text(tok, cfg.text_tasks, cfg.text_limit, cfg.max_length),
        # the prompt tasks are the run's eval.tasks unless fidelity.prompt_tasks names its own
        "prompts": heldout_prompts(
            tok,
            ptasks,
            cfg.prompt_limit,
            n_shots,
            cfg.seed,
            cfg.max_length,
            chat=chat,
            flag="--fidelity.prompt_tasks" if cfg.prompt_tasks else "--eval.tasks",
            style=style,
        ),
    }
    sets = {k: v for k, v in sets.items() if v}
    if not sets:
        raise ConfigError("--fidelity.text_tasks / --fidelity.prompt_tasks: no held-out documents")
    return sets


def _open_probe(senses_dir, lexicon_dir, teacher_fp: str, tok) -> tuple[SenseProbe, dict[str, str]]:
    """The sense probe on the teacher's store and the lexicon, and its entry in the result."""
    from dskd.lexicon import Lexicon
    from dskd.senses import open_store

    probe = SenseProbe(open_store(senses_dir, teacher_fp), Lexicon.load(lexicon_dir, tok))
    return probe, {"senses": str(senses_dir), "lexicon": str(lexicon_dir)}


def _check_vocab(name: str, mod: nn.Module, vocab: int) -> None:
    from dskd.models import output_vocab_size

    if output_vocab_size(mod) < vocab:
        raise FidelityError(f"model {name}: {output_vocab_size(mod)} output rows, the tokenizer has {vocab} tokens")


def _measure_one_at_a_time(
    teacher: nn.Module,
    specs: dict[str, str],
    load: Any,
    sets: dict[str, list[Doc]],
    vocab: int,
    pad_id: int,
    cfg: FidelityConfig,
    probe: SenseProbe | None,
    progress: bool,
    memo: PrefixMemo | None,
) -> tuple[dict[str, dict[str, dict[str, np.ndarray]]], dict[str, Any]]:
    """Per set, the per-document sums of the teacher and of every model, the models loaded (``load(name,
    spec)`` -> (model, whether the caller keeps it, its fingerprint)) and measured one at a time: only the
    teacher and one student are ever in memory. The teacher's decoder runs once per set; its LM-head
    inputs are kept in CPU memory for the later models (:func:`measure`'s ``teacher_states``), so the
    numbers are those of one pass with every model.

    Returns:
        (set -> model name -> sums, the teacher's first; model name -> what ``load`` returned third: the
        model's fingerprint).
    """
    states: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
    sums: dict[str, dict[str, dict[str, np.ndarray]]] = {name: {} for name in sets}
    prints: dict[str, Any] = {}
    for i, (m, spec) in enumerate(specs.items()):
        mod, keep, prints[m] = load(m, spec)
        _check_vocab(m, mod, vocab)
        for name, docs in sets.items():
            label = f"fidelity {name} ({m}, {i + 1}/{len(specs)})" if progress else None
            got = measure(
                teacher, {m: mod}, docs, vocab, pad_id, cfg.batch_tokens, probe, desc=label, memo=memo,
                teacher_states=states[name],
            )  # fmt: skip
            sums[name].update(got)  # the teacher's entry comes with the first model only
        if not keep:
            del mod
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return sums, prints


def fidelity(
    teacher_spec: str,
    models: dict[str, str],
    cfg: FidelityConfig,
    out: Path | str,
    *,
    prompt_tasks: Sequence[str] = (),
    shots: int = 0,
    style: str = "letter",
    chat: bool = True,
    senses_dir: Path | str | None = None,
    lexicon_dir: Path | str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    baseline: str | None = None,
    progress: bool = True,
    loaded: dict[str, nn.Module] | None = None,
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Measure every model against the teacher on the held-out sets; write ``out`` (.json) and ``.md``.

    The teacher stays loaded; the models are loaded and measured one at a time (:func:`_measure_one_at_a_time`),
    so memory holds the teacher and one student whatever their number, with the numbers of one pass.

    Args:
        teacher_spec: Teacher model spec (alias, folder or hub id).
        models: name -> student spec (folder, run folder, alias or hub id).
        cfg: Held-out sets, limits, bootstrap.
        out: Result JSON path.
        prompt_tasks: Prompt tasks used when ``cfg.prompt_tasks`` is empty.
        shots: Exemplars per prompt used when ``cfg.shots`` is None.
        style: Held-out prompt style, as the training prompts' ``data.style`` (letter or cloze).
        chat: Wrap held-out prompts in the chat template, as the training prompts' ``data.chat``.
        senses_dir: Sense store for the probe (None: no probe).
        lexicon_dir: Lexicon for the probe (None: no probe).
        dtype: Weights dtype.
        device: ``auto``, ``cpu``, ``cuda`` ...
        baseline: Name of the model the table compares the others with (None: none).
        progress: Progress bars.
        loaded: Already loaded models by name (``teacher`` included), used instead of loading (and kept).
        memo: Bottom-layer states shared by the teacher and the students (:class:`dskd.prefix.PrefixMemo`):
            computed once per batch; a pure speed-up.

    Returns:
        The result written to ``out``.
    """
    from dskd import __version__
    from dskd.evaluate import resolve_model_spec
    from dskd.models import check_rope_length, check_same_tokenizer, fingerprint, load_model, load_tokenizer

    out = Path(out)
    _check_request(out, models, baseline, cfg, senses_dir, lexicon_dir)
    use_probe = cfg.probe and senses_dir is not None and lexicon_dir is not None
    ptasks = list(cfg.prompt_tasks or prompt_tasks)
    n_shots = cfg.shots if cfg.shots is not None else shots
    loaded = dict(loaded or {})
    tok = load_tokenizer(teacher_spec)
    # build the documents before loading any model, so a bad task name fails at once
    sets = _heldout_sets(tok, cfg, ptasks, n_shots, chat, style)
    specs = {m: resolve_model_spec(s) for m, s in models.items()}
    for m, s in specs.items():
        if m not in loaded:
            check_same_tokenizer(tok, load_tokenizer(s), f"teacher {teacher_spec!r}", f"model {m} ({s!r})")
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = loaded.get("teacher") or load_model(teacher_spec, dtype).to(dev)
    check_rope_length(teacher, cfg.max_length, "--fidelity.max_length", "held-out sequences")
    vocab = len(tok)
    _check_vocab("teacher", teacher, vocab)
    probe, probe_info = (
        _open_probe(senses_dir, lexicon_dir, fingerprint(teacher, tok), tok) if use_probe else (None, None)
    )

    def load(m: str, spec: str) -> tuple[nn.Module, bool, str]:
        mod = loaded.get(m) or load_model(spec, dtype).to(dev)
        check_rope_length(mod, cfg.max_length, "--fidelity.max_length", "held-out sequences")
        return mod, m in loaded, fingerprint(mod, tok)

    t0 = time.perf_counter()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    sums, prints = _measure_one_at_a_time(teacher, specs, load, sets, vocab, pad_id, cfg, probe, progress, memo)
    result: dict[str, Any] = {
        "format": FORMAT,
        "teacher": teacher_spec,
        "models": models,
        "fingerprints": {"teacher": fingerprint(teacher, tok), **prints},
        "config": {**dataclasses.asdict(cfg), "prompt_tasks": ptasks, "shots": n_shots, "style": style, "chat": chat},
        "probe": probe_info,
        "baseline": baseline,
        "dskd_version": __version__,
        "device": dev,
        "sets": {name: _set_result(docs, sums[name], cfg) for name, docs in sets.items()},
        "complete": True,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out, result, indent=1)
    write_text_atomic(out.with_suffix(".md"), markdown(result, baseline))
    return result


def _set_result(docs: Sequence[Doc], sums: dict[str, dict[str, np.ndarray]], cfg: FidelityConfig) -> dict[str, Any]:
    """One held-out set's entry of the result: its documents, tokens, and per model the metrics and sums."""
    return {
        "docs": [d.id for d in docs],
        "tokens": int(sum(len(d.ids) for d in docs)),
        "models": {
            m: {"metrics": summarize(s, cfg.bootstrap, cfg.seed), "sums": {k: v.tolist() for k, v in s.items()}}
            for m, s in sums.items()
        },
    }


def load_result(path: Path | str) -> dict[str, Any]:
    """A fidelity result file, checked for format and completeness."""
    return read_sidecar(Path(path), RESULT_ARTEFACT)  # the result file is its own sidecar


def _sums(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=float) for k, v in entry["sums"].items()}


def _fmt(metric: str, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    if metric in ("agree", "probe"):
        return f"{100 * v:.1f}"
    if metric == "ppl" and abs(v) >= 1e4:  # an untrained truncation's perplexity runs to 1e8
        return f"{v:.3g}"
    return f"{v:.3f}" if metric == "kl" else f"{v:.2f}"


def markdown(result: dict[str, Any], baseline: str | None = None, n_boot: int | None = None) -> str:
    """Tables per held-out set: each metric ± bootstrap s.e., and Δ vs ``baseline`` with its paired 95% CI."""
    n_boot = n_boot or result["config"].get("bootstrap") or 1000
    seed = result["config"].get("seed", 0)
    lines = [
        f"Held-out fidelity to the teacher ({result['teacher']}): KL(teacher || model) at T = 1 in nats/token, "
        "top-1 agreement with the teacher (%), perplexity on the actual next tokens, and the sense probe "
        "(% of positions whose next token has antonyms where the final-norm state is nearer to the token's "
        "senses than to its antonyms'); ± bootstrap s.e. over documents"
        + (f"; Δ vs {baseline} with paired bootstrap 95% CI (* excludes 0)" if baseline else "")
        + ".",
    ]
    for set_name, s in result["sets"].items():
        models = s["models"]
        probe_n = int(models["teacher"]["metrics"].get("probe_positions") or 0)
        lines += [
            "",
            f"**{set_name}** ({len(s['docs'])} documents, {s['tokens']:,} tokens"
            + (f", {probe_n:,} probed positions" if result.get("probe") else "")
            + ")",
            "",
            "| model | KL | agree % | ppl | probe % |",
            "|---|---:|---:|---:|---:|",
        ]
        base = _sums(models[baseline]) if baseline in models else None
        for m, e in models.items():
            cells = []
            for metric in METRICS:
                v, se = e["metrics"].get(metric), e["metrics"].get(f"{metric}_stderr")
                ref = m == "teacher" and metric in ("kl", "agree")
                cell = _fmt(metric, v)
                if se is not None and not ref:
                    cell += f" ± {_fmt(metric, se)}"
                if base is not None and m not in ("teacher", baseline) and not ref and v is not None:
                    d, lo, hi = paired_diff(_sums(e), base, metric, n_boot, seed)
                    if math.isfinite(lo):
                        star = "*" if lo > 0 or hi < 0 else ""
                        cell += f" (Δ {_fmt(metric, d)} [{_fmt(metric, lo)}, {_fmt(metric, hi)}]{star})"
                cells.append(cell)
            label = "teacher (reference)" if m == "teacher" else m
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def pooled_markdown(
    result: dict[str, Any], groups: dict[str, list[str]], baseline: str | None = None, n_boot: int | None = None
) -> str:
    """:func:`markdown` for an experiment: each arm's seeds (``groups``: arm -> model names) pooled into one
    row by adding their per-document sums, so a metric is the mean over seeds (same tokens in each) and
    the paired bootstrap against ``baseline`` resamples documents with every seed of both arms in them.
    Models in no group (teacher, untrained) keep their own rows."""
    grouped = {m for ms in groups.values() for m in ms}
    n_boot = n_boot or result["config"].get("bootstrap") or 1000
    seed = result["config"].get("seed", 0)
    pooled = copy.deepcopy(result)
    for s in pooled["sets"].values():
        models = s["models"]
        rows = {m: e for m, e in models.items() if m not in grouped}
        for arm, names in groups.items():
            missing = [m for m in names if m not in models]
            if missing:
                raise FidelityError(f"fidelity result has no model {missing[0]!r} (arm {arm})")
            per_seed = [_sums(models[m]) for m in names]
            sums = {k: sum(p[k] for p in per_seed) for k in per_seed[0]}
            rows[arm] = {
                "metrics": summarize(sums, n_boot, seed),
                "sums": {k: v.tolist() for k, v in sums.items()},
            }
        s["models"] = rows
    counts = ", ".join(f"{a} {len(ms)}" for a, ms in groups.items())
    head = f"Seeds pooled ({counts}): an arm's per-document sums are added over its seeds.\n\n"
    return head + markdown(pooled, baseline, n_boot)


_fidelity = fidelity  # the command's section parameter is called `fidelity` too


# ---- command ------------------------------------------------------------------------------------
def fidelity_command(
    model: ModelConfig,
    fidelity: FidelityConfig,
    eval: EvalConfig,
    data: DataConfig,
    students: list[str],
    out: Path,
    baseline: str | None = None,
    senses_dir: Path | None = None,
    lexicon_dir: Path | None = None,
) -> dict[str, Any]:
    """Held-out fidelity of students to the teacher: per-token KL(teacher || student) at T = 1, top-1
    agreement, perplexity, each with a bootstrap error over documents, and (with --senses_dir and
    --lexicon_dir) the sense probe. Held-out text: evaluation questions of fidelity.text_tasks as raw
    text; held-out prompts: evaluation items of fidelity.prompt_tasks (empty: eval.tasks) built like
    the training prompts (data.style, data.chat) with fidelity.shots (None: data.shots) exemplars. Models run on
    eval.device in eval.dtype, as in the main job's ``fidelity`` stage.

      dskd fidelity --config configs/smollm2-135m_to_15l.yaml --baseline untrained \\
          --students untrained=runs/x/students/untrained,kd=runs/x/students/kd,dskd=runs/x/students/dskd \\
          --senses_dir runs/x/senses --lexicon_dir runs/x/lexicon --out runs/x/eval/fidelity.json

    Args:
        model: The teacher (``teacher``).
        fidelity: Held-out sets, limits, bootstrap and the probe switch.
        eval: Prompt tasks when ``fidelity.prompt_tasks`` is empty; device and dtype.
        data: Exemplars per prompt when ``fidelity.shots`` is unset; the prompts' style and chat template.
        students: Models to compare with the teacher, ``[NAME=]SPEC`` each; a run folder means its student/.
        out: Result JSON (a .md table is written next to it).
        baseline: Name of the model the others are compared with.
        senses_dir: Sense store folder for the sense probe.
        lexicon_dir: Lexicon folder for the sense probe.
    """
    if (senses_dir is None) != (lexicon_dir is None):
        raise ConfigError("--senses_dir / --lexicon_dir: the sense probe needs both")
    probe = fidelity.probe and senses_dir is not None
    res = _fidelity(
        model.teacher,
        _parse_models(students),
        dataclasses.replace(fidelity, probe=probe),
        out,
        prompt_tasks=eval.tasks,
        shots=data.shots,
        style=data.style,
        chat=data.chat,
        senses_dir=senses_dir if probe else None,
        lexicon_dir=lexicon_dir if probe else None,
        dtype=eval.dtype,
        device=eval.device,
        baseline=baseline,
    )
    print(markdown(res, baseline), end="")
    print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    return res


__all__ = ["Doc", "SenseProbe", "fidelity", "heldout_prompts", "heldout_text", "markdown", "measure", "paired_diff"]
