"""KD and DSKD training: :func:`setup` -> :func:`fit` (the one loop; its body is in one place) -> :func:`export`.

``distill(cfg, out)`` trains the student of ``cfg.model`` on the data of ``cfg.data`` with the loss of
``cfg.loss`` and writes a run folder::

    config.yaml            the resolved config
    data/recipe.json       the training-set recipe (and data/dataset.safetensors without a cache)
    metrics.jsonl          one line per logged optimiser step: every loss term, sense diagnostics,
                           lr, grad norm, tokens/s
    checkpoints/step-N/    trainable weights, optimiser, scheduler, RNG states, data position
    checkpoints/latest     name of the newest complete checkpoint
    student/               the final student, a plain Hugging Face folder, with a README.md model card
    tracking/              the tracker's files (``distill.report_to tensorboard``)
    meta.json              fingerprints, sense-table info, counts, timing, complete: true (last)

One optimiser step is one *window* of ``grad_accum x processes`` micro-batches of the epoch's seeded
permutation. Every loss is a sum over the window's positions divided by the window's real token count
(and the sense loss by its number of sampled terms), counted from the data before any forward pass, so
the step's gradient does not depend on how the window is cut into micro-batches or processes. The
window index fully determines the data position; the sense positions of a sequence are drawn from a
generator seeded by (seed, epoch, sequence), so resume and re-batching see the same positions.

Multi-process runs go through accelerate (DDP; gloo on CPU). On GPUs::

    accelerate launch --num_processes 8 -m dskd distill --config configs/PAPER.yaml

On CPU ``accelerate launch`` needs mpirun for several processes; torchrun works instead::

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m dskd distill --config C.yaml

Keep ``grad_accum x processes`` fixed to keep the same optimisation (2 processes with accumulation 2
follow 1 process with accumulation 4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd import data as D
from dskd.config import ConfigError, LossConfig, RunConfig, TrainConfig, config_diff, dump_yaml, to_dict
from dskd.io import Artefact, is_built, sidecar, write_sidecar
from dskd.losses import (
    IGNORE_INDEX,
    SenseTable,
    SparseTeacher,
    antonym_teacher_mse,
    aux_and_main,
    ce_loss,
    combine,
    grad_comparison,
    hidden_loss,
    kd_loss,
    plan_positions,
    sense_loss,
    summarize_sense_stats,
)
from dskd.models import lm_head_logits
from dskd.prefix import layer_range

RUN_FORMAT = {"name": "dskd-run", "version": 1}
RUN_ARTEFACT = Artefact(RUN_FORMAT["name"], RUN_FORMAT["version"], "distillation run", "dskd distill", ConfigError)
_TERMS = ("loss", "ce", "kd", "sense", "hidden")
_SENSE_STATS = ("pos_mse_sum", "pos_n", "neg_mse_sum", "neg_n", "hinge_active", "terms")


# ----------------------------------------------------------------------------- sense candidates


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


def _teacher_states(cache, teacher, acc):
    """``f(idx, batch) -> (B, T, d)``: the teacher's last hidden states of a batch (cache or online, no grad)."""

    def states(idx: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if cache is not None:
            return cache.get(idx, batch["labels"].shape[1])[1].to(acc.device)
        with torch.no_grad():
            return D.teacher_forward(teacher, {k: v.to(acc.device) for k, v in batch.items()})[1]

    return states


def open_sense_sources(lexicon_dir: Path, senses_dir: Path, tokenizer, teacher_fingerprint: str):
    """The real lexicon and sense store of a run (refused when made for another tokenizer/teacher)."""
    from dskd.lexicon import Lexicon
    from dskd.senses import open_store

    return open_store(senses_dir, teacher_fingerprint), Lexicon.load(lexicon_dir, tokenizer)


def _source_info(obj) -> dict[str, Any]:
    return {k: getattr(obj, k, None) for k in ("fingerprint", "teacher_fingerprint", "tokenizer_fingerprint")}


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (``checkpoints/latest`` names it)."""
    p = _ckpt_dir(out) / "latest"
    if not p.is_file():
        return None
    d = _ckpt_dir(out) / p.read_text().strip()
    return d if (d / "state.json").is_file() else None


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into safetensors-ready tensors and JSON (no pickle)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(js["scalars"].items()):
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    return {"state": state, "param_groups": js["param_groups"]}


def save_checkpoint(out: Path, step: int, model, opt, sched, acc, extra: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-N`` atomically: built in a temporary folder, renamed, then ``latest``."""
    from safetensors.torch import save_file

    ck = _ckpt_dir(out)
    name = f"step-{step:08d}"
    tmp = ck / f".tmp-{name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rng-{acc.process_index}.safetensors"))
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        save_file(
            {k: v.detach().contiguous() for k, v in _trainable(unwrapped).items()}, str(tmp / "trainable.safetensors")
        )
        t, js = _optimizer_tensors(opt)
        save_file(t, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(js, indent=1))
        (tmp / "scheduler.json").write_text(json.dumps(sched.state_dict(), default=str))
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = ck / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = ck / ".latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, ck / "latest")  # a kill leaves either the old or the new pointer
        done = sorted(p for p in ck.glob("step-*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return ck / name


def load_checkpoint(path: Path, model, opt, sched, acc) -> dict[str, Any]:
    """Restore trainable weights, optimiser, scheduler and this process's RNG; returns state.json."""
    from safetensors.torch import load_file

    unwrapped = acc.unwrap_model(model)
    weights = load_file(str(path / "trainable.safetensors"))
    expected = set(_trainable(unwrapped))
    if set(weights) != expected:
        raise ConfigError(
            f"--resume: checkpoint {path} holds other trainable parameters "
            f"({sorted(set(weights) ^ expected)[:4]}); was model.trainable_layers changed?"
        )
    with torch.no_grad():
        params = dict(unwrapped.named_parameters())
        for k, v in weights.items():
            params[k].copy_(v)
    opt.load_state_dict(
        _optimizer_state(
            load_file(str(path / "optimizer.safetensors")), json.loads((path / "optimizer.json").read_text())
        )
    )
    sched.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng-{acc.process_index}.safetensors"
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "state.json").read_text())


# ----------------------------------------------------------------------------- helpers


def cosine_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _seq_generator(seed: int, epoch: int, seq: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + seq)


def config_changes(out: Path, cfg: RunConfig) -> list[str]:
    """The fields (:func:`dskd.config.config_diff`) in which ``cfg`` differs from the config the run in
    ``out`` started with (its ``config.yaml``), :data:`RUNTIME_FIELDS` left out; empty when there is none."""
    import yaml

    saved = Path(out) / "config.yaml"
    if not saved.is_file():
        return []
    return [d for d in config_diff(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg)) if d not in RUNTIME_FIELDS]


# fields that change neither the data order nor the maths: a resumed or re-run run may change them
RUNTIME_FIELDS = ("distill.timeout_minutes", "distill.report_to")


def _check_resume_config(out: Path, cfg: RunConfig, ckpt: Path | None = None) -> None:
    diffs = config_changes(out, cfg)
    if ckpt is not None and "processes" in json.loads((ckpt / "state.json").read_text()):
        # checked against the checkpoint's window once the process count is known (_check_resume_window)
        diffs = [d for d in diffs if d != "distill.grad_accum"]
    if diffs:
        raise ConfigError(
            f"--resume: the config differs from the one the run in {out} started with ({', '.join(diffs)}); "
            "resume with the same config or pick another --out"
        )


def _sense_dirs(dc: TrainConfig, lexicon_dir, senses_dir) -> tuple[Path, Path]:
    lex = lexicon_dir or dc.lexicon_dir
    sen = senses_dir or dc.senses_dir
    for flag, p in (("distill.lexicon_dir", lex), ("distill.senses_dir", sen)):
        if not p:
            raise ConfigError(f"--{flag}: needed when loss.lam > 0 (set loss.lam 0 for the KD baseline)")
        if not Path(p).is_dir():
            raise ConfigError(f"--{flag}: no such folder: {p}")
    return Path(lex), Path(sen)


# ----------------------------------------------------------------------------- one micro-batch


def window_plans(data, seqs: list[int], table: SenseTable, lc: LossConfig, seed: int, epoch: int, pad_id: int):
    """Sense positions of the window's sequences, each from its own seeded generator (CPU only)."""
    plans = {}
    for i in seqs:
        labels_i = D.collate([data.seqs[i]], pad_id)["labels"][0]
        g = _seq_generator(seed, epoch, i)
        plans[i] = plan_positions(labels_i, table, lc.min_positions, lc.position_frac, lc.self_sense, g)
    return plans


def teacher_outputs(
    teacher, cache, idx: list[int], batch: dict[str, torch.Tensor], V: int, autocast, head=None, states_only=False
):
    """The teacher's logits (B, T, V) or SparseTeacher, and last hidden states (B, T, d), on the batch's device.

    From the cache when there is one, else from a no-grad forward of the teacher. A cache that
    stores no logits (``kd == "head"``) gives the full logits as ``head`` (the student's frozen LM
    head, identical to the teacher's) applied to the cached states: exact KD over the vocabulary; with
    ``states_only`` it gives those states, wrapped, for :func:`micro_batch_loss` to apply the head at
    target positions only.
    """
    dev = batch["input_ids"].device
    with torch.no_grad(), autocast:
        if cache is not None:
            t_logits, t_h = cache.get(idx, batch["labels"].shape[1])
            t_h = t_h.to(dev)  # (B, T, d)
            if t_logits is None:
                if states_only:
                    return _States(t_h), t_h
                if head is None:
                    raise ValueError("this teacher cache stores no logits: pass the shared LM head")
                return head(t_h)[..., :V], t_h  # (B, T, V)
            t_logits = t_logits.to(dev) if torch.is_tensor(t_logits) else _to(t_logits, dev)
            return t_logits, t_h
        t_logits, t_h = D.teacher_forward(teacher, batch)
        return t_logits[..., :V], t_h


def micro_batch_loss(
    model,
    batch,
    t_logits,
    t_h,
    lc: LossConfig,
    V: int,
    n_tok: float,
    n_terms: float,
    plans,
    table,
    autocast,
    prefix: tuple[int, torch.Tensor] | None = None,
    head_at_targets: bool = False,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Student forward and every loss term of one micro-batch, each normalised by the window's counts.

    Args:
        prefix: (n, states): run only the student's layers from n, on the states entering it (B, T, d)
            (the teacher cache's, when the bottom n layers are the teacher's, frozen); None: the whole student.
        head_at_targets: Apply the student's (frozen) LM head, and the teacher's when recomputed, only at
            target positions, not at padding (:func:`dskd.models.head_at_targets_ok`); the same losses.
        scale: Per-dimension factor of the sense MSEs (``loss.sense_scale: variance``); None: plain MSE.

    Returns:
        (weighted total, {ce, kd[, sense][, hidden]}, sense diagnostics sums or None)
    """
    from accelerate.utils import extract_model_from_parallel

    labels = batch["labels"]  # (B, T)
    use_sense = lc.lam > 0
    use_hidden = lc.hidden != "none" and lc.hidden_weight > 0
    inputs = {"input_ids": batch["input_ids"]}
    split = contextlib.nullcontext()
    core = extract_model_from_parallel(model)
    if prefix is not None:
        # the wrapped model's forward runs the student's own layers: slice them on the unwrapped one
        inputs, split = {"inputs_embeds": prefix[1]}, layer_range(core, prefix[0])
    keep = {}
    if head_at_targets:  # the forward's own head runs nowhere; it is applied below where there are targets
        keep = {"logits_to_keep": torch.zeros(0, dtype=torch.long, device=labels.device)}
    with autocast, split:
        o = model(
            **inputs,
            attention_mask=batch["attention_mask"],
            output_hidden_states=use_sense or use_hidden or head_at_targets,
            **keep,
        )
        if head_at_targets:
            at = labels != IGNORE_INDEX  # (B, T)
            logits, kd_labels = lm_head_logits(core, o.hidden_states[-1][at])[:, :V], labels[at]  # (N, V), (N,)
            t_logits = _at_targets(t_logits, at, core, V)
        else:
            logits, kd_labels = o.logits[..., :V], labels  # (B, T, V), (B, T)
    terms = {
        "ce": ce_loss(logits, kd_labels, n_tok),
        "kd": kd_loss(logits, t_logits, kd_labels, lc.divergence, lc.T, lc.beta, lc.skew, n_tok),
    }
    sstats = None
    if use_sense:
        h = o.hidden_states[-1]  # (B, T, d), after the final norm
        so = sense_loss(
            h, t_h, labels, plans, table, lc.kappa, lc.positive_margin, n_terms, scale,
            lc.positive_margin_mode == "teacher",
        )  # fmt: skip
        terms["sense"], sstats = so.loss, so.stats
    if use_hidden:
        terms["hidden"] = hidden_loss(o.hidden_states[-1], t_h, labels, lc.hidden, n_tok)
    return combine(terms, lc), terms, sstats


def _at_targets(t_logits, at: torch.Tensor, core, V: int):
    """The teacher's KD input at target positions ``at`` (B, T): logits (N, V) or a SparseTeacher with (N, k)
    fields; the recomputed teacher logits of a head-only cache (``t_logits`` = its states (B, T, d), see
    :func:`teacher_outputs` with ``states_only``) go through the shared head here."""
    if isinstance(t_logits, SparseTeacher):
        return SparseTeacher(ids=t_logits.ids[at], logp=t_logits.logp[at], rest_logp=t_logits.rest_logp[at])
    if isinstance(t_logits, _States):
        with torch.no_grad():
            return lm_head_logits(core, t_logits.h[at])[:, :V]  # (N, V)
    return t_logits[at]


@dataclass
class _States:
    """The teacher's cached last hidden states (B, T, d) standing for its logits: the shared head is applied
    at target positions only (:func:`micro_batch_loss` with ``head_at_targets``)."""

    h: torch.Tensor


@dataclass
class Training:
    """What :func:`setup` makes and :func:`fit` / :func:`export` use: one run's models, data, sense
    table, optimiser and position (fields are the loop's names)."""

    cfg: RunConfig
    out: Path
    acc: Any  # accelerate.Accelerator
    pair: Any  # dskd.models.Pair
    teacher: Any  # the online teacher, or None with a cache
    model: Any  # the student as accelerate prepared it
    data: Any  # D.TokenData
    cache: Any  # D.TeacherCache or None
    head: Any  # the shared frozen LM head when the cache holds no logits
    recipe: dict[str, Any]
    prefix: int = 0  # bottom layers not run: their output comes from the cache (data.cache_prefix)
    head_at_targets: bool = False  # the frozen LM head applied at target positions only (not padding)
    table: SenseTable | None = None
    sources: dict[str, Any] = field(default_factory=dict)
    opt: Any = None
    sched: Any = None
    params: list[torch.Tensor] = field(default_factory=list)
    weights_dtype: torch.dtype = torch.float32
    autocast: Any = None
    total: int = 0
    steps_per_epoch: int = 1
    start: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    t_start: float = 0.0
    scale: torch.Tensor | None = None  # 1 / std per dimension of the sense MSEs (loss.sense_scale: variance)
    floor: dict[str, Any] = field(default_factory=dict)  # the sense loss at the teacher's states (sense_floor)
    lam: float | None = None  # lambda as set by loss.sense_scale grad_share (None: loss.lam)
    lam_info: dict[str, Any] = field(default_factory=dict)  # how it was set (meta.json, checkpoints)
    diagnose: bool = True  # the gradient diagnostic at logging steps (it changes no result)

    @property
    def pad_id(self) -> int:
        tok = self.pair.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0


def distill(
    cfg: RunConfig,
    out: Path | str | None = None,
    lexicon_dir: Path | str | None = None,
    senses_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    resume: bool = True,
    *,
    store=None,
    lexicon=None,
    stop_after: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a student with KD (+ the sense loss when ``loss.lam > 0``) and export it: setup -> fit -> export.

    Args:
        cfg: The recipe.
        out: Run folder (default ``cfg.out_dir``).
        lexicon_dir: Lexicon folder (default ``distill.lexicon_dir``); needed when lam > 0.
        senses_dir: Sense store folder (default ``distill.senses_dir``); needed when lam > 0.
        cache_dir: Teacher cache folder (default ``distill.cache_dir``, else a shared folder next to
            ``out``); used when ``distill.teacher_cache``.
        resume: Continue from the newest checkpoint of ``out``; when False a folder holding
            checkpoints is refused.
        store: An opened sense store (instead of ``senses_dir``), for tests or custom sources.
        lexicon: An opened lexicon (instead of ``lexicon_dir``).
        stop_after: Stop, as if killed, once this optimiser step is done (for tests and time-boxed jobs).
        progress: Show the progress bar.

    Returns:
        The run folder.
    """
    out = Path(out or cfg.out_dir)
    run = setup(cfg, out, lexicon_dir, senses_dir, cache_dir, resume, store=store, lexicon=lexicon)
    if run is not None:
        if fit(run, stop_after=stop_after, progress=progress):
            export(run)
        for tracker in run.acc.trackers:  # not acc.end_training: it would also end the process group
            tracker.finish()
    return out


# ----------------------------------------------------------------------------- setup


def setup(
    cfg: RunConfig,
    out: Path,
    lexicon_dir=None,
    senses_dir=None,
    cache_dir=None,
    resume=True,
    *,
    store=None,
    lexicon=None,
) -> Training | None:
    """Check the run folder, start accelerate, load models and data, build the sense table and the
    optimiser, restore the newest checkpoint; None when ``out`` holds a finished run to keep."""
    from accelerate import Accelerator

    from dskd.devices import check_required_accelerator

    t_start = time.time()
    check_required_accelerator(cfg.model.require_accelerator)
    _check_tracker(cfg.distill.report_to)
    use_sense = cfg.loss.lam > 0
    if use_sense and (store is None or lexicon is None):
        lexicon_dir, senses_dir = _sense_dirs(cfg.distill, lexicon_dir, senses_dir)
    if is_built(out, RUN_ARTEFACT):
        if resume:
            return None  # finished already
        raise ConfigError(f"--out: {out} already holds a finished run; pick another --out")
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ConfigError(f"--out: {out} holds checkpoints of an unfinished run; pass --resume or pick another --out")
    if ckpt is not None:
        _check_resume_config(out, cfg, ckpt)
    acc = _accelerator(Accelerator, cfg, out)
    if acc.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            "launched as several processes but accelerate sees one (each would write the same run folder): "
            "on CPU set ACCELERATE_USE_CPU=1 with torchrun, on GPUs use `accelerate launch`"
        )
    torch.manual_seed(cfg.distill.seed)
    if acc.is_main_process:
        dump_yaml(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    if cfg.distill.report_to != "none":
        acc.init_trackers(cfg.name, config=_tracker_config(cfg))  # on the main process only

    run = _models_and_data(cfg, out, acc, cache_dir)
    run.t_start = t_start
    if use_sense:
        if store is None or lexicon is None:
            store, lexicon = open_sense_sources(
                lexicon_dir, senses_dir, run.pair.tokenizer, run.pair.teacher_fingerprint
            )
        targets = sorted({int(t) for s in run.data.seqs for t in s[1:].tolist()})
        run.table = build_sense_table(store, lexicon, targets, cfg.loss, cfg.distill.seed).to(acc.device)
        states = _teacher_states(run.cache, run.teacher, acc)
        if cfg.loss.sense_scale == "variance":
            var = teacher_state_variance(run.data, cfg.loss, cfg.distill.seed, run.pad_id, states)
            run.scale = variance_scale(var).to(acc.device)
            top = var.sort(descending=True).values
            run.lam_info = {
                "mode": "variance",
                "lam": cfg.loss.lam,
                "mean_variance": float(var.mean()),
                "max_variance": float(top[0]),
                "top10_variance_share": float(top[:10].sum() / top.sum()) if float(top.sum()) > 0 else None,
                "sequences": min(len(run.data), cfg.loss.margin_calibration_seqs),
            }
        if cfg.loss.margin_mode == "antonym_quantile":
            _resolve_margin(
                run.table,
                cfg.loss,
                run.data,
                run.cache,
                run.teacher,
                ckpt,
                acc,
                cfg.distill.seed,
                run.pair.tokenizer,
                run.scale,
            )
        run.floor = sense_floor(run.data, run.table, cfg.loss, cfg.distill.seed, run.pad_id, states, run.scale)
        run.table.info["sense_floor"] = run.floor
        _print_sense_targets(run, acc, store)
        run.sources = {"store": _source_info(store), "lexicon": _source_info(lexicon), "table": run.table.info}
    _optimiser(run)
    if ckpt is not None:
        _check_resume_window(ckpt, run)
        st = load_checkpoint(ckpt, run.model, run.opt, run.sched, acc)
        run.start, run.tokens_seen, run.elapsed = st["step"], st["tokens"], st["seconds"]
        if st.get("sense_lam"):
            run.lam, run.lam_info = float(st["sense_lam"]["lam"]), st["sense_lam"]
        if acc.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", run.start)
    return run


def _models_and_data(cfg: RunConfig, out: Path, acc, cache_dir) -> Training:
    """Teacher and student on this process's device, the training set, and the teacher cache."""
    from dskd.models import build_pair, head_at_targets_ok, num_layers, tokenizer_fingerprint

    dc = cfg.distill
    pair = build_pair(cfg.model, device=acc.device)
    _check_widths(cfg.loss, pair.teacher, pair.student)
    tok = pair.tokenizer
    teacher, student = pair.teacher.to(acc.device), pair.student.to(acc.device)
    recipe = D.data_recipe(cfg.data, tokenizer_fingerprint(tok), pair.teacher_fingerprint)
    cache = None
    with acc.main_process_first():
        if dc.teacher_cache:
            cache_path = D.ensure_cache(cfg.data, dc, cfg.loss.T, pair, cache_dir or dc.cache_dir, run_dir=out)
            settings = D.run_cache_settings(dc, cfg.loss.T, pair)
            cache = D.TeacherCache.open(cache_path, D.cache_key(pair.teacher_fingerprint, recipe["hash"], settings))
            data = cache.data
            if acc.is_main_process:
                D.write_recipe(out / "data", recipe)
        else:
            data = D.prepare_data(cfg.data, out / "data", tok, teacher, recipe)
    if cache is not None:
        teacher = None  # the teacher is not needed any more: free its memory
        pair.teacher = None
        if acc.is_main_process:
            print(f"teacher cache {cache.path}: {D.describe_cache_kd(cache.meta)}")
    # a cache without logits recomputes them through the student's frozen head (checked identical)
    head = student.get_output_embeddings() if cache is not None and cache.kd == "head" else None
    prefix = cache.prefix_layers if cache is not None else 0
    if prefix and acc.is_main_process:
        print(
            f"training runs the student's layers {prefix}-{num_layers(student) - 1} from the cached state entering "
            f"layer {prefix} (layers 0-{prefix - 1} are the teacher's, frozen; --distill.cache_prefix off: all)"
        )
    # padding has no target: a frozen head (and the teacher's recomputed one) runs at target positions only
    hat = head_at_targets_ok(student)
    return Training(
        cfg, out, acc, pair, teacher, student, data, cache, head, recipe, prefix=prefix, head_at_targets=hat
    )


def _state_width(model) -> int:
    """The width of the last hidden state (what the LM head reads)."""
    return int(model.get_output_embeddings().weight.shape[-1])


def _check_widths(lc: LossConfig, teacher, student) -> None:
    """Hidden-state losses (the sense loss, ``loss.hidden``) compare student and teacher states: refused, in
    one line, for a student of another width; KD and CE (logits) train any width."""
    t, s = _state_width(teacher), _state_width(student)
    if t == s:
        return
    flag = "--loss.lam" if lc.lam > 0 else "--loss.hidden" if lc.hidden != "none" and lc.hidden_weight > 0 else None
    if flag:
        raise ConfigError(
            f"{flag}: the student's hidden size ({s}) differs from the teacher's ({t}); the sense and hidden-state "
            "losses compare states of one width: train KD only (--loss.lam 0 --loss.hidden none)"
        )


def _optimiser(run: Training) -> None:
    """Float32 master weights, autocast, AdamW over the trainable parameters, the schedule's length."""
    from dskd.models import keep_float32_master

    dc, acc, student = run.cfg.distill, run.acc, run.model
    run.weights_dtype = next(student.parameters()).dtype
    n_master = keep_float32_master(student)
    amp = _autocast_dtype(dc.precision, run.weights_dtype)
    if _accelerate_precision(amp) != acc.mixed_precision:  # the Accelerator was built from the same rule
        raise ConfigError(
            f"--model.dtype: the weights came out {run.weights_dtype} on {acc.device}, but the Accelerator was "
            f"built for mixed precision {acc.mixed_precision!r}; set --model.dtype explicitly"
        )
    _log_distill_placement(acc, run.weights_dtype, n_master, amp, run.cache is not None)
    student.train()
    if dc.grad_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    run.params = [p for p in student.parameters() if p.requires_grad]
    if not run.params:
        raise ConfigError("--model.trainable_layers: the student has no trainable parameters")
    opt = torch.optim.AdamW(run.params, lr=dc.lr, weight_decay=dc.weight_decay)
    micro_per_epoch = math.ceil(len(run.data) / dc.batch_size)
    run.steps_per_epoch = math.ceil(micro_per_epoch / (dc.grad_accum * acc.num_processes))
    run.total = run.steps_per_epoch * dc.epochs
    if dc.max_steps:
        run.total = min(run.total, dc.max_steps)
    sched = cosine_schedule(opt, int(dc.warmup_frac * run.total), run.total)
    run.model = acc.prepare_model(student)
    # through accelerate (device placement of their state; a scaler would go here): the scheduler steps once
    # per optimiser step (step_scheduler_with_optimizer=False), as ``total`` already counts the processes
    run.opt, run.sched = acc.prepare(opt, sched)
    # float32 master weights next to lower-precision frozen ones need autocast to mix in one forward
    run.autocast = torch.autocast(device_type=acc.device.type, dtype=amp) if amp else contextlib.nullcontext()


# ----------------------------------------------------------------------------- fit


def fit(run: Training, stop_after: int | None = None, progress: bool = True) -> bool:
    """The training loop from ``run.start``; True when it reached the last step (False: ``stop_after``)."""
    from tqdm import tqdm

    cfg, acc, data, table, model = run.cfg, run.acc, run.data, run.table, run.model
    dc, lc, W, rank, pad_id = cfg.distill, cfg.loss, run.acc.num_processes, run.acc.process_index, run.pad_id
    use_sense, V, per_window = lc.lam > 0, run.pair.vocab_size, dc.grad_accum * W
    use_aux = use_sense or (lc.hidden != "none" and lc.hidden_weight > 0)
    if run.lam is not None:  # grad_share: the lambda set (and checkpointed) after the warm-up
        lc = dataclasses.replace(lc, lam=run.lam)
    share_step = int(dc.warmup_frac * run.total) if lc.sense_scale == "grad_share" and use_sense else None
    bar = tqdm(total=run.total, initial=run.start, desc="distill", disable=not (progress and acc.is_main_process))
    batches: list[list[int]] = []
    batches_epoch = -1
    for step in range(run.start, run.total):
        t0 = time.time()
        epoch, window = divmod(step, run.steps_per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = D.epoch_batches(len(data), dc.batch_size, dc.seed, epoch), epoch
        win = batches[window * per_window : (window + 1) * per_window]
        # the whole window's counts, from the data alone: each process computes them identically
        n_tok = float(data.num_targets(i for mb in win for i in mb))
        plans = (
            window_plans(data, [i for mb in win for i in mb], table, lc, dc.seed, epoch, pad_id) if use_sense else {}
        )
        n_terms = float(sum(p.n_terms for p in plans.values()))
        mine = win[rank::W]
        logged = torch.zeros(len(_TERMS) + len(_SENSE_STATS), device=acc.device)
        logging = (step + 1) % dc.log_every == 0 or step + 1 == run.total
        set_lam = share_step is not None and run.lam is None and step >= share_step
        diag: dict[str, float] = {}
        # the diagnostic's micro-batch: the first with sense terms (a sequence may have none)
        diag_j = next(
            (j for j, mb in enumerate(mine) if mb is not None and sum(plans[i].n_terms for i in mb if i in plans)), 0
        )
        if not mine:  # a short last window: this process still joins the gradient all-reduce
            mine = [None]  # type: ignore[list-item]
        for j, mb in enumerate(mine):
            last = j == len(mine) - 1
            sync = contextlib.nullcontext() if last or W == 1 else acc.no_sync(model)
            with sync:
                if mb is None:
                    dummy = torch.tensor([[pad_id, pad_id]], device=acc.device)
                    (model(input_ids=dummy).logits.float().sum() * 0.0).backward()
                    continue
                batch = {k: v.to(acc.device) for k, v in D.collate([data.seqs[i] for i in mb], pad_id).items()}
                t_logits, t_h = teacher_outputs(
                    run.teacher, run.cache, mb, batch, V, run.autocast, run.head, run.head_at_targets
                )
                mb_plans = [plans[i] for i in mb if i in plans]
                prefix = None
                if run.prefix:  # the frozen bottom layers' output, from the cache
                    prefix = (run.prefix, run.cache.prefix(mb, batch["labels"].shape[1]).to(acc.device))
                loss, terms, sstats = micro_batch_loss(
                    model,
                    batch,
                    t_logits,
                    t_h,
                    lc,
                    V,
                    n_tok,
                    n_terms,
                    mb_plans,
                    table,
                    run.autocast,
                    prefix,
                    run.head_at_targets,
                    run.scale,
                )
                if j == diag_j and (set_lam or (logging and use_aux and run.diagnose and acc.is_main_process)):
                    # on a copy of the gradients (torch.autograd.grad): .grad, the step and the RNG are untouched
                    diag = grad_comparison(*aux_and_main(terms, lc), run.params)
                    if set_lam:
                        lc, loss = _set_grad_share_lam(run, lc, terms, diag, step, W)
                        set_lam = False
                        if not logging or not acc.is_main_process:
                            diag = {}
                # DDP averages gradients over processes; the loss is already normalised by the global count.
                # Not acc.backward: it divides by gradient_accumulation_steps, which the counts already hold
                # (there is no loss scaler: float16 autocast is refused in _accelerator)
                (loss * W).backward()
                terms["loss"] = loss
                logged += _logged_values(terms, sstats, acc.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.params, dc.max_grad_norm if dc.max_grad_norm > 0 else float("inf")
        )
        lr = run.sched.get_last_lr()[0]
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        if W > 1:
            logged = acc.reduce(logged, reduction="sum")
        dt = time.time() - t0
        run.elapsed += dt
        run.tokens_seen += int(n_tok)
        done = step + 1
        rec = _step_record(logged, use_sense, done, epoch, lr, grad_norm, n_tok, dt, run.elapsed)
        if use_sense and run.floor.get("floor") is not None:
            rec["sense_above_floor"] = rec["sense"] - run.floor["floor"]
        if diag:
            rec.update({k: diag[k] for k in ("aux_grad_ratio", "aux_grad_cos")})
        if share_step is not None:
            rec["lam"] = lc.lam
        _show_and_log(run, bar, rec, done)
        if (dc.save_every and done % dc.save_every == 0) or done == run.total:
            _save(run, done, epoch, window)
        if stop_after is not None and done >= stop_after and done < run.total:
            bar.close()
            return False
    bar.close()
    return True


def _set_grad_share_lam(run: Training, lc: LossConfig, terms, diag: dict[str, float], step: int, W: int):
    """``loss.sense_scale: grad_share``: lambda such that ||lambda grad sense|| = sense_share x ||grad (KD + CE)||
    on this micro-batch (process 0's, for every process), frozen from here; returns (the loss config with it,
    this micro-batch's loss recomputed with it). A micro-batch without sense gradient postpones it a step."""
    lam_old, ratio = lc.lam, diag["aux_grad_ratio"]
    lam = lc.sense_share * lam_old / ratio if ratio > 0 and math.isfinite(ratio) else float("nan")
    if W > 1:
        from accelerate.utils import broadcast

        lam = float(broadcast(torch.tensor([lam], device=run.acc.device), from_process=0).item())
    if not math.isfinite(lam) or lam <= 0:
        if run.acc.is_main_process:
            print(f"grad_share: no sense gradient at step {step + 1}; lambda {lam_old:g} kept one more step")
        return lc, combine(terms, lc)
    run.lam = lam
    run.lam_info = {
        "mode": "grad_share",
        "share": lc.sense_share,
        "lam": lam,
        "step": step + 1,
        "lam_before": lam_old,
        "measured_ratio": ratio,
        "cosine": diag["aux_grad_cos"],
    }
    if run.acc.is_main_process:
        print(
            f"grad_share: lambda {lam:.4g} from step {step + 1} on (the sense gradient was {ratio:.3g}x KD + CE's "
            f"at lambda {lam_old:g}; target share {lc.sense_share:g})"
        )
    diag["aux_grad_ratio"] = ratio * lam / lam_old
    lc = dataclasses.replace(lc, lam=lam)
    return lc, combine(terms, lc)


def _logged_values(terms: dict[str, torch.Tensor], sstats, device) -> torch.Tensor:
    """One micro-batch's loss terms and sense diagnostics as a vector (_TERMS then _SENSE_STATS)."""
    with torch.no_grad():
        vals = [terms[k].detach().float() if k in terms else torch.zeros((), device=device) for k in _TERMS]
        vals += [sstats[k].float() if sstats else torch.zeros((), device=device) for k in _SENSE_STATS]
        return torch.stack([v.to(device) for v in vals])


def _step_record(logged, use_sense, done, epoch, lr, grad_norm, n_tok, dt, elapsed) -> dict[str, Any]:
    """The metrics line of one optimiser step."""
    rec = {k: float(v) for k, v in zip(_TERMS, logged[: len(_TERMS)].tolist(), strict=True)}
    if use_sense:
        rec.update(summarize_sense_stats(dict(zip(_SENSE_STATS, logged[len(_TERMS) :].tolist(), strict=True))))
    rec.update(
        step=done,
        epoch=epoch,
        lr=lr,
        grad_norm=float(grad_norm),
        tokens=int(n_tok),
        tokens_per_s=n_tok / max(dt, 1e-9),
        time=round(elapsed, 3),
    )
    return rec


def _show_and_log(run: Training, bar, rec: dict[str, Any], done: int) -> None:
    """Progress bar postfix, and the metrics line every ``log_every`` steps and at the end."""
    use_sense = run.cfg.loss.lam > 0
    bar.update(1)
    shown = ("loss", "ce", "kd", "sense", "hinge_active_share") if use_sense else ("loss", "ce", "kd")
    bar.set_postfix({k: f"{rec[k]:.3g}" for k in shown} | {"tok/s": f"{rec['tokens_per_s']:.0f}"})
    if run.acc.is_main_process and (done % run.cfg.distill.log_every == 0 or done == run.total):
        with open(run.out / "metrics.jsonl", "a") as f:
            # NaN (e.g. no antonym term in a window) is written as null: strict JSON readers choke on NaN
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
            f.write(json.dumps(clean) + "\n")
        if run.cfg.distill.report_to != "none":
            run.acc.log({k: v for k, v in clean.items() if isinstance(v, int | float) and v is not None}, step=done)


def _save(run: Training, done: int, epoch: int, window: int) -> None:
    state = {
        "epoch": epoch,
        "window": window,
        "tokens": run.tokens_seen,
        "seconds": run.elapsed,
        "total_steps": run.total,
        # the optimiser step's window: a resume must keep processes x grad_accum (_check_resume_window)
        "processes": run.acc.num_processes,
        "grad_accum": run.cfg.distill.grad_accum,
        "batch_size": run.cfg.distill.batch_size,
    }
    if run.table is not None and run.cfg.loss.margin_mode == "antonym_quantile":
        # a resumed run keeps the margin it started with
        state["margin"] = {"value": run.table.margin, "calibration": run.table.info.get("margin_calibration")}
    if run.lam is not None:  # a resumed grad_share run keeps its lambda
        state["sense_lam"] = run.lam_info
    save_checkpoint(run.out, done, run.model, run.opt, run.sched, run.acc, state, run.cfg.distill.keep_checkpoints)


# ----------------------------------------------------------------------------- export


def export(run: Training) -> Path:
    """The student as a plain Hugging Face folder (loadable without dskd), then the run's sidecar."""
    acc, out, cfg, pair, data, cache, table = run.acc, run.out, run.cfg, run.pair, run.data, run.cache, run.table
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(run.model)
        if cfg.distill.grad_checkpointing:
            final.gradient_checkpointing_disable()
        final.config.use_cache = True
        final.to(run.weights_dtype)  # the master weights go back to the model's dtype for export
        final.eval()
        tmp = out / ".student.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp)
        pair.tokenizer.save_pretrained(tmp)
        shutil.rmtree(out / "student", ignore_errors=True)
        os.replace(tmp, out / "student")
        meta = sidecar(
            RUN_ARTEFACT,
            fingerprint=pair.student_fingerprint,
            config=to_dict(cfg),
            teacher_fingerprint=pair.teacher_fingerprint,
            student_fingerprint=pair.student_fingerprint,
            model=pair.info,
            data={
                "recipe_hash": run.recipe["hash"],
                "sequences": len(data),
                "tokens_per_epoch": data.num_targets(range(len(data))),
            },
            teacher_cache={
                "path": str(cache.path),
                "key": cache.meta["key"],
                "settings": cache.meta["settings"],
                "kd": D.describe_cache_kd(cache.meta),
                "tail_mass": cache.meta.get("tail_mass"),
            }
            if cache is not None
            else None,
            senses=run.sources or None,
            sense_summary=_sense_summary(out / "metrics.jsonl", table.margin) if table is not None else None,
            diagnostics=_diagnostics_summary(out / "metrics.jsonl", run.floor),
            sense_scale={"mode": cfg.loss.sense_scale, **run.lam_info} if table is not None else None,
            processes=acc.num_processes,
            steps=run.total,
            tokens=run.tokens_seen,
            train_seconds=round(run.elapsed, 2),
            wall_seconds=round(time.time() - run.t_start, 2),
            loss=asdict(cfg.loss),
        )
        from dskd.card import render
        from dskd.io import write_text_atomic

        # the model card (README.md, Hub front matter) before the sidecar that marks the run complete
        write_text_atomic(out / "student" / "README.md", render(meta, out / "metrics.jsonl"))
        write_sidecar(out, meta)
    acc.wait_for_everyone()
    return out


def _autocast_dtype(precision: str, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of training: bfloat16 when ``distill.precision`` is bf16, else the frozen weights'
    dtype when it is not float32 (float32 master weights beside them need autocast to mix); None: off."""
    if precision == "bf16":
        return torch.bfloat16
    return None if weights_dtype == torch.float32 else weights_dtype


def _accelerate_precision(amp: torch.dtype | None) -> str:
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def _accelerator(factory, cfg: RunConfig, out: Path):
    """The Accelerator of a run, built from the recipe whatever the node's accelerate config says.

    Device: ``--model.device`` (``auto`` lets accelerate pick: each process its GPU, else the CPU; ``cpu``
    forces the CPU; an accelerator that is not there is an error naming the flag, never a silent
    fallback). Mixed precision: the recipe's (``distill.precision`` and ``model.dtype``), passed explicitly
    so ``ACCELERATE_MIXED_PRECISION`` cannot change it; float16 autocast is refused (dskd keeps no loss
    scaler). Accumulation: ``distill.grad_accum`` through a plugin, so ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``
    cannot change it (the loop accumulates itself; see :func:`fit`). No torch.compile; DeepSpeed, FSDP,
    Megatron and XLA launch configs are refused. The process group's timeout is ``distill.timeout_minutes``.
    """
    from datetime import timedelta

    from accelerate.state import AcceleratorState
    from accelerate.utils import (
        DistributedType,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
        ProjectConfiguration,
        parse_flag_from_env,
    )

    from dskd.devices import resolve_device, resolve_dtype

    mc, dc = cfg.model, cfg.distill
    device_spec = mc.device or "auto"
    want = resolve_device(device_spec, flag="--model.device")  # raises when the device is absent
    cpu = device_spec == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
    weights = resolve_dtype(mc.dtype, torch.device("cpu") if cpu else want, flag="--model.dtype")
    amp = _autocast_dtype(dc.precision, weights)
    if amp == torch.float16:
        raise ConfigError(
            "--model.dtype: training under float16 autocast needs a loss scaler, which dskd does not keep; "
            "use --model.dtype bfloat16 (or float32), or --distill.precision bf16"
        )
    mixed = _accelerate_precision(amp)
    for backend in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):  # what `accelerate launch` exports from such a config
        if parse_flag_from_env(f"ACCELERATE_USE_{backend}"):
            raise ConfigError(
                f"accelerate launch: the accelerate config asks for {backend} (ACCELERATE_USE_{backend}); dskd distill "
                "trains with DDP only: launch with a multi-GPU (DDP) accelerate config"
            )
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()  # an earlier run in this process used another precision
    acc = factory(
        cpu=device_spec == "cpu",
        mixed_precision=mixed,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=dc.grad_accum, adjust_scheduler=False, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        dynamo_backend="no",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=dc.timeout_minutes))],
        log_with=None if dc.report_to == "none" else dc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tracking")),
    )
    if acc.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    ):
        raise ConfigError(
            f"accelerate launch: the accelerate config asks for {acc.distributed_type.value}; dskd distill trains "
            "with DDP only: launch with a multi-GPU (DDP) accelerate config"
        )
    if mc.require_accelerator and acc.device.type == "cpu":
        raise ConfigError(
            "--model.require_accelerator: accelerate runs this process on the CPU (ACCELERATE_USE_CPU, "
            "--model.device cpu or the accelerate config); pass --model.require_accelerator false to allow it"
        )
    if device_spec != "auto" and acc.device.type != want.type:
        raise ConfigError(
            f"--model.device: {device_spec!r} asked for, but accelerate runs this process on {acc.device}"
        )
    if want.index is not None and acc.num_processes == 1 and acc.device.index not in (None, want.index):
        raise ConfigError(
            f"--model.device: {device_spec!r}: accelerate picked {acc.device}; "
            f"select the GPU with CUDA_VISIBLE_DEVICES={want.index} instead"
        )
    return acc


def _check_resume_window(ckpt: Path, run: Training) -> None:
    """A resumed run continues the same data order and schedule, or is refused: the optimiser step's window
    (``processes x grad_accum`` micro-batches of ``batch_size``) and the number of steps must be the ones
    the checkpoint was trained with. 2 processes with accumulation 2 continue 1 process with accumulation 4."""
    st = json.loads((ckpt / "state.json").read_text())
    W, G = run.acc.num_processes, run.cfg.distill.grad_accum
    if "processes" in st and st["processes"] * st["grad_accum"] != W * G:
        window = st["processes"] * st["grad_accum"]
        hint = f"--distill.grad_accum {window // W}" if window % W == 0 else f"a process count that divides {window}"
        raise ConfigError(
            f"--resume: {ckpt} was trained with {st['processes']} process(es) x grad_accum {st['grad_accum']} = "
            f"{window} micro-batches per step, this launch has {W} x {G} = {W * G}: use {hint} to continue the "
            "same data order and schedule"
        )
    if st.get("total_steps", run.total) != run.total:
        raise ConfigError(
            f"--resume: {ckpt} belongs to a schedule of {st['total_steps']} steps, this launch makes "
            f"{run.total} (another process count or batch): resume with the launch it started with"
        )


_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _check_tracker(report_to: str) -> None:
    """``distill.report_to`` names a tracker whose package is installed (one line before any work)."""
    if report_to == "none":
        return
    import importlib.util

    pkg = _TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(pkg) is None:
        raise ConfigError(f"--distill.report_to {report_to}: the {pkg} package is not installed (pip install {pkg})")


def _tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as flat scalar hyper-parameters (``loss.lam``: 1.0) for the trackers."""
    flat: dict[str, Any] = {}
    for sec, val in to_dict(cfg).items():
        for k, v in val.items() if isinstance(val, dict) else [("", val)]:
            key = f"{sec}.{k}" if k else sec
            flat[key] = v if isinstance(v, bool | int | float | str) else json.dumps(v)
    return flat


def _log_distill_placement(acc, weights_dtype: torch.dtype, n_master: int, amp, cached: bool) -> None:
    from dskd.devices import dtype_name, log_placement

    log_placement(
        "distill",
        acc.device,
        weights_dtype,
        f"process {acc.process_index + 1}/{acc.num_processes}, trainable weights float32"
        + (f" ({n_master / 1e6:.1f}M upcast)" if n_master else "")
        + f", autocast {dtype_name(amp) if amp else 'off'}, teacher {'from the cache' if cached else 'online'}",
    )


def _print_sense_targets(run: Training, acc, store) -> None:
    """How many training targets (distinct tokens and positions) have k clustered senses, only raw states, none."""
    info, table = run.table.info, run.table
    if not acc.is_main_process:
        return
    own = (table.self_idx[:, 0] >= 0).cpu() if table.self_idx.numel() else torch.zeros(0, dtype=torch.bool)
    row_of = table.row_of.cpu()
    y = torch.cat([s[1:] for s in run.data.seqs]) if len(run.data) else torch.zeros(0, dtype=torch.long)
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
    floor = run.floor.get("floor")
    if floor is not None:
        line += f"; sense floor (the loss at the teacher's own states) {floor:.4g}"
    print(line)


def _resolve_margin(
    table: SenseTable, lc: LossConfig, data, cache, teacher, ckpt, acc, seed: int, tok, scale=None
) -> None:
    """The antonym_quantile margin: from the checkpoint a run resumes, else calibrated (rank 0's value)."""
    saved = json.loads((ckpt / "state.json").read_text()).get("margin") if ckpt is not None else None
    if saved is not None:
        table.margin = float(saved["value"])
        table.info.update(margin=table.margin, margin_calibrated=True, margin_calibration=saved["calibration"])
        return
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def states(idx: list[int], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if cache is not None:
            return cache.get(idx, batch["labels"].shape[1])[1].to(acc.device)
        with torch.no_grad():
            return D.teacher_forward(teacher, {k: v.to(acc.device) for k, v in batch.items()})[1]

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


def _sense_summary(path: Path, margin: float) -> dict[str, Any]:
    """The sense diagnostics of a run's logged steps: the margin, and the share of antonym terms inside it
    (``hinge_active_share``) and the mean positive/negative MSE, at the first and last logged step and
    averaged over all of them."""
    return {"margin": margin, **_logged_summary(path, ("hinge_active_share", "pos_mse", "neg_mse"))}


def _logged_summary(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """``logged_steps`` and, for each of ``keys`` logged in the metrics file ``path``, its first / last /
    mean value and the first / last step that logged it."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    out: dict[str, Any] = {"logged_steps": len(rows)}
    for key in keys:
        vals = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if vals:
            out[key] = {
                "first": vals[0][1],
                "last": vals[-1][1],
                "mean": sum(v for _, v in vals) / len(vals),
                "first_step": vals[0][0],
                "last_step": vals[-1][0],
            }
    return out


def _diagnostics_summary(path: Path, floor: dict[str, Any]) -> dict[str, Any]:
    """What the run's logged steps say about the sense (or hidden-state) term against KD + CE: the sense
    floor, and first / last / mean of ``sense_above_floor``, ``aux_grad_ratio`` (||grad of lam x sense
    (+ hidden)|| / ||grad of KD + CE|| on one micro-batch) and ``aux_grad_cos`` (their cosine)."""
    out = _logged_summary(path, ("sense_above_floor", "aux_grad_ratio", "aux_grad_cos"))
    if floor:
        out["sense_floor"] = floor
    return out


def _to(sp, device):
    from dskd.losses import SparseTeacher

    return SparseTeacher(ids=sp.ids.to(device), logp=sp.logp.to(device), rest_logp=sp.rest_logp.to(device))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(x + "\n" for x in keep))


def _version() -> str:
    from dskd import __version__

    return __version__


# ----------------------------------------------------------------------------- command


def distill_command(cfg: RunConfig, resume: bool = False) -> Path:
    """Train a student with KD (loss.lam 0) or DSKD and export it to <out>/student.

    Example: dskd distill --config configs/smollm2-135m_to_15l.yaml --loss.lam 0 --out runs/kd

    Args:
        cfg: The recipe.
        resume: Continue the unfinished run in ``out`` from its newest checkpoint.
    """
    out = distill(cfg, cfg.out_dir, resume=resume)
    print(f"run folder: {out}\nstudent: {out / 'student'}")
    return out


__all__ = ["IGNORE_INDEX", "build_sense_table", "distill", "distill_command", "latest_checkpoint"]
