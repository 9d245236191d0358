"""A training run's ``metrics.jsonl``: one line per logged optimiser step, and what ``meta.json`` sums up of it.

Each line holds every loss term (``loss``, ``ce``, ``kd``, ``sense``, ``hidden``), the sense diagnostics
(:func:`dskd.losses.summarize_sense_stats`), ``step``, ``epoch``, ``lr``, ``grad_norm``, ``tokens``,
``tokens_per_s``, ``time`` and, where measured, ``sense_above_floor``, ``aux_grad_ratio`` / ``aux_grad_cos``
and ``lam``. NaN is written as null.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from dskd.losses import summarize_sense_stats

TERMS = ("loss", "ce", "kd", "sense", "hidden")
SENSE_STATS = ("pos_mse_sum", "pos_n", "neg_mse_sum", "neg_n", "hinge_active", "terms")


def logged_values(terms: dict[str, torch.Tensor], sstats, device) -> torch.Tensor:
    """One micro-batch's loss terms and sense diagnostics as a vector (:data:`TERMS` then :data:`SENSE_STATS`)."""
    with torch.no_grad():
        vals = [terms[k].detach().float() if k in terms else torch.zeros((), device=device) for k in TERMS]
        vals += [sstats[k].float() if sstats else torch.zeros((), device=device) for k in SENSE_STATS]
        return torch.stack([v.to(device) for v in vals])


def step_record(logged, use_sense, done, epoch, lr, grad_norm, n_tok, dt, elapsed) -> dict[str, Any]:
    """The metrics line of one optimiser step, from the window's summed :func:`logged_values`."""
    rec = {k: float(v) for k, v in zip(TERMS, logged[: len(TERMS)].tolist(), strict=True)}
    if use_sense:
        rec.update(summarize_sense_stats(dict(zip(SENSE_STATS, logged[len(TERMS) :].tolist(), strict=True))))
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


def append_record(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """Append one metrics line; returns it as written (NaN as None: strict JSON readers choke on NaN)."""
    with open(path, "a") as f:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}
        f.write(json.dumps(clean) + "\n")
    return clean


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint a run resumes from."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(x + "\n" for x in keep))


def logged_summary(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
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


def sense_summary(path: Path, margin: float) -> dict[str, Any]:
    """The sense diagnostics of a run's logged steps: the margin, and the share of antonym terms inside it
    (``hinge_active_share``) and the mean positive/negative MSE, at the first and last logged step and
    averaged over all of them."""
    return {"margin": margin, **logged_summary(path, ("hinge_active_share", "pos_mse", "neg_mse"))}


def diagnostics_summary(path: Path, floor: dict[str, Any]) -> dict[str, Any]:
    """What the run's logged steps say about the sense (or hidden-state) term against KD + CE: the sense
    floor, and first / last / mean of ``sense_above_floor``, ``aux_grad_ratio`` (||grad of lam x sense
    (+ hidden)|| / ||grad of KD + CE|| on one micro-batch) and ``aux_grad_cos`` (their cosine)."""
    out = logged_summary(path, ("sense_above_floor", "aux_grad_ratio", "aux_grad_cos"))
    if floor:
        out["sense_floor"] = floor
    return out


__all__ = [
    "SENSE_STATS",
    "TERMS",
    "append_record",
    "diagnostics_summary",
    "logged_summary",
    "logged_values",
    "sense_summary",
    "step_record",
    "truncate_metrics",
]
