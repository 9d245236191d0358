"""The sense targets of a training run: the candidate table, the margin and scale calibrations, the floor.

What :func:`dskd.distill.setup` builds once per run, before the first step, from the sense store, the
lexicon and the training data, for :func:`dskd.losses.sense_loss`:

- :func:`build_sense_table`: each training target's own, synonym and antonym senses as padded index
  tables into one bank of sense vectors (a :class:`dskd.losses.SenseTable`);
- :func:`calibrate_margin` (``loss.margin_mode: antonym_quantile``): the hinge margin as a quantile of the
  antonym terms' MSE at the teacher's own states; :func:`resolve_margin` takes a resumed run's instead;
- :func:`teacher_state_variance` / :func:`variance_scale` (``loss.sense_scale: variance``);
- :func:`sense_floor`: the sense loss at the teacher's own states (what the logged sense loss cannot go below);
- :func:`window_plans`: the sense positions of a window's sequences (also what training samples each step).

The calibrations read the first ``loss.margin_calibration_seqs`` sequences of epoch 0's order, with the
sense positions training samples there.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from dskd import data as D
from dskd.config import ConfigError, LossConfig, TrainConfig
from dskd.losses import (
    IGNORE_INDEX,
    SenseTable,
    antonym_teacher_mse,
    plan_positions,
    sense_loss,
    summarize_sense_stats,
)


def build_sense_table(
    store, lexicon, tokens: list[int], cfg: LossConfig, seed: int = 0, bank_dtype: torch.dtype = torch.float16
) -> SenseTable:
    """Candidate senses of ``tokens`` as padded index tables into one bank of sense vectors.

    ``store`` needs ``senses(entry) -> (n_e, d)``, ``entry_of(tail) -> int | None`` and, for
    ``margin_mode: state_median``, ``meta["distance"]["median_mse"]`` (a :class:`dskd.senses.SenseStore`);
    ``lexicon`` needs ``synonyms(id)`` / ``antonyms(id)`` returning token-id tuples (a
    :class:`dskd.lexicon.Lexicon`). Synonyms and antonyms without senses are dropped; the caps
    ``max_synonyms`` / ``max_antonyms`` sample among the rest once per run, seeded per token.

    Args:
        store: The sense store.
        lexicon: The lexical relations.
        tokens: Token ids that occur as training targets.
        cfg: Loss settings (caps, ablation switches, reference_antonyms, margin). With
            ``margin_mode: antonym_quantile`` the margin is ``cfg.margin`` until
            :func:`calibrate_margin` sets it from the training data (``distill`` does).
        seed: Seed of the synonym/antonym sampling.
        bank_dtype: Storage dtype of the bank (float16 halves its memory; rows are upcast when used).
    """
    bank: list[torch.Tensor] = []
    rows_of_entry: dict[int, list[int]] = {}
    n_rows = 0

    def rows(entry: int | None) -> list[int]:
        nonlocal n_rows
        if entry is None:
            return []
        if entry not in rows_of_entry:
            s = store.senses(entry)
            rows_of_entry[entry] = list(range(n_rows, n_rows + len(s)))
            if len(s):
                bank.append(s.to(bank_dtype))
            n_rows += len(s)
        return rows_of_entry[entry]

    def related_rows(tails: list[tuple[int, ...]], cap: int, rng: random.Random) -> list[int]:
        usable = sorted({t for t in tails if rows(store.entry_of(tuple(t)))})
        chosen = usable if len(usable) <= cap else rng.sample(usable, cap)
        return [r for t in chosen for r in rows(store.entry_of(tuple(t)))]

    table_rows: list[tuple[int, list[int], list[int], list[int], bool]] = []
    counts_of = getattr(store, "counts", None)
    clustered: list[int] = []  # target tokens whose own senses are k-means centroids (not raw states)
    for y in sorted(set(tokens)):
        rng = random.Random(f"{seed}-{y}")
        own = rows(y)
        if own and callable(counts_of) and int(counts_of(y).sum()) > len(own):  # a centroid holds > 1 state
            clustered.append(y)
        syn = related_rows(list(lexicon.synonyms(y)), cfg.max_synonyms, rng) if cfg.use_synonyms else []
        ant = related_rows(list(lexicon.antonyms(y)), cfg.max_antonyms, rng) if cfg.use_antonyms else []
        neg = ant + (own if cfg.reference_antonyms else [])
        if own or syn or ant:
            table_rows.append((y, own, own + syn, neg, bool(syn or ant)))

    def pad(lists: list[list[int]]) -> torch.Tensor:
        w = max([len(x) for x in lists] + [1])
        return torch.tensor([x + [-1] * (w - len(x)) for x in lists] or [[-1]], dtype=torch.long)[: len(lists)]

    vocab = max(list(tokens) + [0]) + 1
    row_of = torch.full((vocab,), -1, dtype=torch.long)
    for r, (y, *_rest) in enumerate(table_rows):
        row_of[y] = r
    dim = bank[0].shape[-1] if bank else 1
    margin = cfg.margin
    median = None
    if cfg.margin_mode == "state_median":
        median = float(store.meta["distance"]["median_mse"])
        margin = cfg.margin * median
    info = {
        "tokens": len(set(tokens)),
        "rows": len(table_rows),
        "related_tokens": sum(r[4] for r in table_rows),
        "bank_rows": n_rows,
        "bank_mb": round(n_rows * dim * torch.finfo(bank_dtype).bits / 8 / 2**20, 2),
        "max_positives": int(max([len(r[2]) for r in table_rows] + [0])),
        "max_negatives": int(max([len(r[3]) for r in table_rows] + [0])),
        "margin": margin,
        "margin_mode": cfg.margin_mode,
        "store_median_mse": median,
        "margin_calibrated": cfg.margin_mode != "antonym_quantile",
        # own senses of the target tokens: k-means centroids, or the raw states of a token seen <= k times
        "targets_with_senses": sum(1 for r in table_rows if r[1]),
        "targets_clustered": len(clustered) if callable(counts_of) else None,
    }
    return SenseTable(
        bank=torch.cat(bank) if bank else torch.zeros(0, dim, dtype=bank_dtype),
        row_of=row_of,
        self_idx=pad([r[1] for r in table_rows]),
        pos_idx=pad([r[2] for r in table_rows]),
        neg_idx=pad([r[3] for r in table_rows]),
        related=torch.tensor([r[4] for r in table_rows], dtype=torch.bool),
        margin=margin,
        info=info,
    )


def calibrate_margin(
    data, table: SenseTable, lc: LossConfig, seed: int, pad_id: int, teacher_states, scale: torch.Tensor | None = None
) -> dict[str, Any]:
    """Set ``table.margin`` to a quantile of the antonym terms' MSE at the teacher's states.

    The sequences are the first of epoch 0's order, with the sense positions training will sample
    there; their antonym terms (the kappa antonym senses nearest the teacher's state) give
    MSE(n, h^t); the margin is its ``lc.margin_quantile`` quantile, so that share of antonym terms
    lies inside the margin at the teacher's own states (the student starts farther from them).
    ``lc.margin_calibration_seqs`` sequences are read, more while fewer than 100 terms are found.

    Args:
        data: The training set (``seqs``).
        table: The run's sense table; its ``margin`` and ``info`` are updated.
        lc: Loss settings (margin_quantile, margin_calibration_seqs, kappa, position sampling).
        seed: The run's seed (``distill.seed``), for the data order and sense positions.
        pad_id: Padding id.
        teacher_states: ``f(idx, batch) -> (B, T, d)`` teacher last hidden states of a batch.
        scale: Per-dimension factor of the sense MSEs (``loss.sense_scale: variance``), None: plain MSE.

    Returns:
        What was measured (also stored in ``table.info["margin_calibration"]``).
    """
    order = [i for mb in D.epoch_batches(len(data), 1, seed, 0) for i in mb]
    vals: list[torch.Tensor] = []
    seqs = terms = 0
    for i in order:
        if seqs >= lc.margin_calibration_seqs and terms >= 100:
            break
        seqs += 1
        plan = window_plans(data, [i], table, lc, seed, 0, pad_id)[i]
        if plan.related.numel() == 0:
            continue
        batch = D.collate([data.seqs[i]], pad_id)
        t_h = teacher_states([i], batch)
        v = antonym_teacher_mse(t_h, batch["labels"].to(t_h.device), [plan], table, lc.kappa, scale).cpu()
        vals.append(v)
        terms += v.numel()
    allv = torch.cat(vals) if vals else torch.zeros(0)
    info: dict[str, Any] = {"quantile": lc.margin_quantile, "sequences": seqs, "antonym_terms": int(allv.numel())}
    if allv.numel():
        qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9, lc.margin_quantile])
        q = torch.quantile(allv.double(), qs.double()).tolist()
        table.margin = float(q[-1])
        info["teacher_antonym_mse"] = {
            f"p{round(x * 100)}": round(y, 4) for x, y in zip(qs[:5].tolist(), q[:5], strict=True)
        }
    else:
        table.margin = 0.0  # no antonym term in the data: the hinge has nothing to act on
        info["note"] = "no antonym terms in the calibration sequences; margin 0"
    table.info.update(margin=table.margin, margin_calibrated=True, margin_calibration=info)
    return info


def _first_sequences(data, lc: LossConfig, seed: int):
    """The first ``lc.margin_calibration_seqs`` sequences of epoch 0's order (what the calibrations read)."""
    order = [i for mb in D.epoch_batches(len(data), 1, seed, 0) for i in mb]
    return order[: lc.margin_calibration_seqs]


def teacher_state_variance(data, lc: LossConfig, seed: int, pad_id: int, teacher_states) -> torch.Tensor:
    """Per-dimension variance of the teacher's last hidden states at the target positions of the first
    ``lc.margin_calibration_seqs`` training sequences (epoch 0's order): the scale of
    ``loss.sense_scale: variance``.

    Returns:
        (d,) float64 variance (population, over positions), on the CPU.
    """
    n, s1, s2 = 0, None, None
    for i in _first_sequences(data, lc, seed):
        batch = D.collate([data.seqs[i]], pad_id)
        h = teacher_states([i], batch)[0].double().cpu()  # (T, d)
        h = h[batch["labels"][0] != IGNORE_INDEX]  # (n_i, d)
        s1 = h.sum(0) if s1 is None else s1 + h.sum(0)
        s2 = (h * h).sum(0) if s2 is None else s2 + (h * h).sum(0)
        n += h.shape[0]
    if not n:
        raise ConfigError("--loss.sense_scale: variance needs target positions in the first training sequences")
    mean = s1 / n
    return (s2 / n - mean * mean).clamp(min=0.0)


def variance_scale(var: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 / std per dimension (float32), dimensions of (near) zero variance floored at ``eps`` x the mean variance."""
    floor = max(float(var.mean()) * eps, 1e-12)
    return var.clamp(min=floor).rsqrt().float()


def sense_floor(
    data, table: SenseTable, lc: LossConfig, seed: int, pad_id: int, teacher_states, scale: torch.Tensor | None = None
) -> dict[str, Any]:
    """The sense loss at the teacher's own states: the floor of the logged sense loss.

    The student's state is replaced by the teacher's (``sense_loss(h_t, h_t, ...)``) at the sense positions
    training samples in epoch 0 for its first ``lc.margin_calibration_seqs`` sequences, with the run's
    margin and scale. A student that matched the teacher's states exactly would log this; what the sense
    term can still pull is ``sense - floor``.

    Returns:
        ``floor`` (mean per sense term), ``terms``, ``sequences``, and the floor's positive and hinge
        parts (``pos_mse``: mean MSE of the kept positives to the teacher's state).
    """
    total, terms, seqs = 0.0, 0, 0
    stats: dict[str, float] = {}
    with torch.no_grad():
        for i in _first_sequences(data, lc, seed):
            seqs += 1
            plan = window_plans(data, [i], table, lc, seed, 0, pad_id)[i]
            if plan.n_terms == 0:
                continue
            batch = D.collate([data.seqs[i]], pad_id)
            t_h = teacher_states([i], batch)
            so = sense_loss(
                t_h,
                t_h,
                batch["labels"].to(t_h.device),
                [plan],
                table,
                lc.kappa,
                lc.positive_margin,
                1.0,
                scale,
                lc.positive_margin_mode == "teacher",
            )
            total += float(so.loss)
            terms += plan.n_terms
            for k, v in so.stats.items():
                stats[k] = stats.get(k, 0.0) + float(v)
    out: dict[str, Any] = {"floor": total / terms if terms else None, "terms": terms, "sequences": seqs}
    if terms:
        out.update({k: v for k, v in summarize_sense_stats(stats).items() if k in ("pos_mse", "hinge_active_share")})
    return out


def _seq_generator(seed: int, epoch: int, seq: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + seq)


def window_plans(data, seqs: list[int], table: SenseTable, lc: LossConfig, seed: int, epoch: int, pad_id: int):
    """Sense positions of the window's sequences, each from its own seeded generator (CPU only)."""
    plans = {}
    for i in seqs:
        labels_i = D.collate([data.seqs[i]], pad_id)["labels"][0]
        g = _seq_generator(seed, epoch, i)
        plans[i] = plan_positions(labels_i, table, lc.min_positions, lc.position_frac, lc.self_sense, g)
    return plans


def teacher_states(cache, teacher, acc):
    """``f(idx, batch) -> (B, T, d)``: the teacher's last hidden states of a batch (cache or online, no grad)."""

    def states(idx: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if cache is not None:
            return cache.get(idx, batch["labels"].shape[1])[1].to(acc.device)
        with torch.no_grad():
            return D.teacher_forward(teacher, {k: v.to(acc.device) for k, v in batch.items()})[1]

    return states


def resolve_margin(
    table: SenseTable,
    lc: LossConfig,
    data,
    states,
    saved: dict[str, Any] | None,
    acc,
    seed: int,
    pad_id: int,
    scale: torch.Tensor | None = None,
) -> None:
    """The antonym_quantile margin: the one a resumed run saved (``saved``, its checkpoint's
    ``state.json["margin"]``), else calibrated (:func:`calibrate_margin`; rank 0's value for every process).

    Args:
        table: The run's sense table; its ``margin`` and ``info`` are set.
        lc: Loss settings.
        data: The training set.
        states: ``f(idx, batch) -> (B, T, d)`` teacher states (:func:`teacher_states`).
        saved: ``{"value", "calibration"}`` from the checkpoint a run resumes, or None.
        acc: The Accelerator.
        seed: The run's seed.
        pad_id: Padding id.
        scale: Per-dimension factor of the sense MSEs, None: plain MSE.
    """
    if saved is not None:
        table.margin = float(saved["value"])
        table.info.update(margin=table.margin, margin_calibrated=True, margin_calibration=saved["calibration"])
        return
    info = calibrate_margin(data, table, lc, seed, pad_id, states, scale)
    if acc.num_processes > 1:  # every process must use the same margin (online teachers may differ in the last bit)
        from accelerate.utils import broadcast

        table.margin = float(broadcast(torch.tensor([table.margin], device=acc.device), from_process=0).item())
        table.info["margin"] = table.margin
    if acc.is_main_process:
        print(
            f"antonym margin {table.margin:.4g}: the {lc.margin_quantile:g} quantile of MSE(antonym sense, teacher "
            f"state) over {info['antonym_terms']} antonym terms of {info['sequences']} training sequences"
        )


def report_sense_targets(table: SenseTable, data, floor: dict[str, Any], store) -> None:
    """How many training targets (distinct tokens and positions) have k clustered senses, only raw states, none:
    printed, and the position counts added to ``table.info`` (call it on the main process)."""
    info = table.info
    own = (table.self_idx[:, 0] >= 0).cpu() if table.self_idx.numel() else torch.zeros(0, dtype=torch.bool)
    row_of = table.row_of.cpu()
    y = torch.cat([s[1:] for s in data.seqs]) if len(data) else torch.zeros(0, dtype=torch.long)
    rows = row_of[y.clamp(0, row_of.numel() - 1)]
    rows = torch.where(y < row_of.numel(), rows, torch.full_like(rows, -1))
    has = (rows >= 0) & own[rows.clamp(min=0)] if own.numel() else torch.zeros_like(rows, dtype=torch.bool)
    info["target_positions"], info["target_positions_with_senses"] = int(y.numel()), int(has.sum())
    line = f"sense targets: {info['targets_with_senses']:,} of {info['tokens']:,} distinct training targets have senses"
    if info.get("targets_clustered") is not None:
        c = info["targets_clustered"]
        line += f" ({c:,} clustered into k-means senses, {info['targets_with_senses'] - c:,} only raw states)"
    line += f"; {int(has.sum()):,} of {int(y.numel()):,} target positions"
    counts_of = getattr(store, "counts", None)
    if callable(counts_of) and int(has.sum()):
        toks = torch.unique(y[has]).tolist()
        clustered = torch.tensor([int(counts_of(t).sum()) > int(store.n_senses(t)) for t in toks], dtype=torch.bool)
        at = torch.isin(y[has], torch.tensor(toks)[clustered]) if clustered.any() else torch.zeros(0, dtype=torch.bool)
        info["target_positions_clustered"] = int(at.sum())
        line += f" ({int(at.sum()):,} with clustered senses)"
    f = floor.get("floor")
    if f is not None:
        line += f"; sense floor (the loss at the teacher's own states) {f:.4g}"
    print(line)


# ----------------------------------------------------------------------------- sources


def sense_dirs(dc: TrainConfig, lexicon_dir, senses_dir) -> tuple[Path, Path]:
    """The lexicon and sense store folders of a run with a sense loss (arguments, else ``distill.*_dir``),
    checked before any work: a missing one is refused naming its flag."""
    lex = lexicon_dir or dc.lexicon_dir
    sen = senses_dir or dc.senses_dir
    for flag, p in (("distill.lexicon_dir", lex), ("distill.senses_dir", sen)):
        if not p:
            raise ConfigError(f"--{flag}: needed when loss.lam > 0 (set loss.lam 0 for the KD baseline)")
        if not Path(p).is_dir():
            raise ConfigError(f"--{flag}: no such folder: {p}")
    return Path(lex), Path(sen)


def open_sense_sources(lexicon_dir: Path, senses_dir: Path, tokenizer, teacher_fingerprint: str):
    """The real lexicon and sense store of a run (refused when made for another tokenizer/teacher)."""
    from dskd.lexicon import Lexicon
    from dskd.senses import open_store

    return open_store(senses_dir, teacher_fingerprint), Lexicon.load(lexicon_dir, tokenizer)


def source_info(obj) -> dict[str, Any]:
    """The fingerprints of a sense store or lexicon (what meta.json records of them)."""
    return {k: getattr(obj, k, None) for k in ("fingerprint", "teacher_fingerprint", "tokenizer_fingerprint")}


__all__ = [
    "build_sense_table",
    "calibrate_margin",
    "open_sense_sources",
    "report_sense_targets",
    "resolve_margin",
    "sense_dirs",
    "sense_floor",
    "source_info",
    "teacher_state_variance",
    "teacher_states",
    "variance_scale",
    "window_plans",
]
