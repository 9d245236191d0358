"""Loss terms of KD and DSKD as pure tensor functions (no trainer, no state).

Conventions shared by every function here:

* Targets are *aligned*: ``labels[..., t]`` is the token the model should predict at position ``t``
  (the caller shifts), and :data:`IGNORE_INDEX` marks positions without a target (padding, the last
  position). A position counts iff its label is not :data:`IGNORE_INDEX`.
* Everything is computed in float32, whatever the dtype of the inputs (bf16 logits lose too much in
  ``log_softmax``).
* Every loss is a *sum over positions divided by a caller-provided count* (``num_tokens`` /
  ``num_terms``). The training loop passes the count of the whole gradient-accumulation window (and of
  all processes), so a window of 4 micro-batches gives exactly the gradient of one batch 4x as large.
  When the count is omitted the function divides by its own count (a plain mean). A fully masked input
  gives 0, never NaN.

The total objective (method.md section 5) is

    L = ce_weight * CE + alpha * T^2 * D(p_teacher^T || p_student^T) + lam * L_sense + hidden_weight * L_hidden

and ``lam = 0`` (with ``hidden_weight = 0``) is the KD baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")


def _denominator(count: torch.Tensor | float | int | None, fallback: torch.Tensor) -> torch.Tensor:
    """The count to divide by; at least 1 so an empty window gives 0 / 1 = 0, not NaN."""
    n = fallback if count is None else torch.as_tensor(count, dtype=torch.float32, device=fallback.device)
    return n.to(torch.float32).clamp(min=1.0)


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with the convention 0 * (anything) = 0 (a zero-mass bucket adds nothing)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probabilities. (..., K) -> (...)."""
    return _xlogy_diff(log_p.exp(), log_p, log_q).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, w_p: float) -> torch.Tensor:
    """log(w_p * p + (1 - w_p) * q), computed in log space. (..., K) -> (..., K)."""
    if w_p <= 0.0:
        return log_q
    if w_p >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(w_p), log_q + math.log1p(-w_p))


def divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """A divergence between the teacher p and the student q at every position.

    Args:
        log_p: Teacher log-probabilities (already at temperature T). (..., K)
        log_q: Student log-probabilities on the same support. (..., K)
        kind: ``forward_kl`` KL(p||q); ``reverse_kl`` KL(q||p); ``jsd`` the generalised JSD
            beta * KL(p||m) + (1 - beta) * KL(q||m) with m = beta p + (1 - beta) q, whose endpoints are
            its normalised limits (beta = 0 -> KL(p||q), beta = 1 -> KL(q||p)), as in GKD / TRL;
            ``skew_forward_kl`` KL(p || skew p + (1 - skew) q) and ``skew_reverse_kl``
            KL(q || skew q + (1 - skew) p) (DistiLLM; skew = 0 gives the plain KLs, skew = 1 gives 0);
            ``tv`` total variation 0.5 * sum |p - q|.
        beta: Interpolation of ``jsd``.
        skew: Skew of the skew KLs.

    Returns:
        The divergence per position, float32. (...)
    """
    log_p = log_p.float()
    log_q = log_q.float()
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(log_p, log_q)
        if beta >= 1.0:
            return _kl(log_q, log_p)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew_forward_kl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    if kind == "skew_reverse_kl":
        return _kl(log_q, _log_mix(log_q, log_p, skew))
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token cross-entropy, summed over target positions and divided by ``num_tokens``.

    Args:
        logits: Student logits. (..., V)
        labels: Aligned targets, IGNORE_INDEX where none. (...)
        num_tokens: Divisor (default: the number of target positions here).

    Returns:
        A float32 scalar.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    y = labels.reshape(-1)  # (N,)
    total = F.cross_entropy(flat, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / _denominator(num_tokens, (y != IGNORE_INDEX).sum())


@dataclass
class SparseTeacher:
    """The teacher's distribution at temperature T on a top-k support plus one bucket for the rest.

    This is what the teacher cache holds when ``distill.cache_topk`` is smaller than the vocabulary.
    KD then compares k + 1 buckets: the teacher's top-k tokens one by one, and the remaining mass of
    both models as a single extra bucket. The divergence is exact on the top-k tokens and lumps the
    tail together, so it is a lower bound of the full divergence (lumping never increases an
    f-divergence); with k = V it is the full divergence.

    Attributes:
        ids: Token ids of the teacher's top-k logits. (..., k) int
        logp: The teacher's log-probabilities of those tokens at temperature T. (..., k)
        rest_logp: log of the teacher's remaining mass at temperature T (-inf when none). (...)
    """

    ids: torch.Tensor
    logp: torch.Tensor
    rest_logp: torch.Tensor


def sparse_teacher(logits: torch.Tensor, k: int, T: float) -> SparseTeacher:
    """Top-k teacher log-probabilities at temperature T and the log of the remaining mass.

    Args:
        logits: Teacher logits. (..., V)
        k: Tokens kept per position.
        T: Temperature.
    """
    logp = torch.log_softmax(logits.float() / T, dim=-1)  # (..., V)
    top, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (..., k)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (...)
    return SparseTeacher(ids=ids, logp=top, rest_logp=rest)


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    labels: torch.Tensor,
    kind: str = "forward_kl",
    T: float = 2.0,
    beta: float = 0.5,
    skew: float = 0.1,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The KD divergence D(p_teacher^T || p_student^T), summed over target positions / ``num_tokens``.

    The weight alpha * T^2 is applied by the caller (:func:`combine`), so this is the raw divergence.

    Args:
        student_logits: Student logits. (..., V)
        teacher: Teacher logits (..., V), or a :class:`SparseTeacher` with fields (..., k) / (...).
        labels: Aligned targets; only their mask is used. (...)
        kind, beta, skew: See :func:`divergence`.
        T: Temperature applied to both models.
        num_tokens: Divisor (default: the number of target positions here).
    """
    mask = (labels != IGNORE_INDEX).reshape(-1)  # (N_all,)
    s = student_logits.reshape(-1, student_logits.shape[-1])[mask].float()  # (N, V)
    log_q = torch.log_softmax(s / T, dim=-1)  # (N, V)
    if isinstance(teacher, SparseTeacher):
        k = teacher.ids.shape[-1]
        ids = teacher.ids.reshape(-1, k)[mask].long()  # (N, k)
        t_top = teacher.logp.reshape(-1, k)[mask].float()  # (N, k)
        t_rest = teacher.rest_logp.reshape(-1)[mask].float()  # (N,)
        q_top = log_q.gather(-1, ids)  # (N, k)
        q_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (N,)
        log_p = torch.cat([t_top, t_rest[:, None]], dim=-1)  # (N, k+1)
        log_q = torch.cat([q_top, q_rest[:, None]], dim=-1)  # (N, k+1)
    else:
        t = teacher.reshape(-1, teacher.shape[-1])[mask].float()  # (N, V)
        log_p = torch.log_softmax(t / T, dim=-1)
    d = divergence(log_p, log_q, kind, beta, skew)  # (N,)
    return d.sum() / _denominator(num_tokens, mask.sum())


def hidden_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "mse",
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Direct hidden-state matching: the ablation without a sense dictionary.

    Args:
        student_h: Student last hidden states (after the final norm). (..., d)
        teacher_h: Teacher last hidden states. (..., d)
        labels: Aligned targets; only their mask is used. (...)
        kind: ``mse`` (||h_s - h_t||^2 / d) or ``cosine`` (1 - cos(h_s, h_t)).
        num_tokens: Divisor (default: the number of target positions here).
    """
    mask = (labels != IGNORE_INDEX).reshape(-1)
    s = student_h.reshape(-1, student_h.shape[-1])[mask].float()  # (N, d)
    t = teacher_h.reshape(-1, teacher_h.shape[-1])[mask].float()  # (N, d)
    if kind == "mse":
        per = (s - t).pow(2).mean(-1)  # (N,)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"unknown hidden loss {kind!r}; choose mse or cosine")
    return per.sum() / _denominator(num_tokens, mask.sum())


# ----------------------------------------------------------------------------- the sense loss


@dataclass
class SenseTable:
    """Sense candidates of the tokens of one training set, as padded index tables into one bank.

    Built once per run (:func:`dskd.sense_targets.build_sense_table`) from the sense store and the lexicon,
    restricted to the tokens that occur as targets, so that the training step only gathers rows.

    Attributes:
        bank: Every sense vector any candidate set refers to, each once. (R, d)
        row_of: Token id -> row of the index tables, -1 for tokens without senses. (V,)
        self_idx: Bank rows of the token's own senses, -1 padded. (U, S)
        pos_idx: Bank rows of the positive set P: own senses + (sampled) synonyms' senses. (U, P)
        neg_idx: Bank rows of the negative set N: (sampled) antonyms' senses [+ own senses with
            ``reference_antonyms``]. (U, N)
        related: Whether the token has synonym or antonym senses in use (the set V of method.md 5). (U,)
        margin: The antonym hinge margin m in MSE units (resolved from ``margin_mode``).
        info: Counts and provenance for the run's meta.json.
    """

    bank: torch.Tensor
    row_of: torch.Tensor
    self_idx: torch.Tensor
    pos_idx: torch.Tensor
    neg_idx: torch.Tensor
    related: torch.Tensor
    margin: float
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> SenseTable:
        """The same table on another device (the bank keeps its storage dtype)."""
        return SenseTable(
            *(t.to(device) for t in (self.bank, self.row_of, self.self_idx, self.pos_idx, self.neg_idx, self.related)),
            margin=self.margin,
            info=self.info,
        )


@dataclass
class SensePlan:
    """Sampled positions of one sequence: related positions get P and N, self positions only own senses.

    Attributes:
        related: Positions (indices into the sequence) whose target has synonyms/antonyms. (n,)
        self_: Positions sampled from all target positions for the self-sense pull. (n_self,)
    """

    related: torch.Tensor
    self_: torch.Tensor

    @property
    def n_terms(self) -> int:
        return int(self.related.numel() + self.self_.numel())


def plan_positions(
    labels: torch.Tensor,
    table: SenseTable,
    min_positions: int = 25,
    position_frac: float = 0.4,
    self_sense: bool = True,
    generator: torch.Generator | None = None,
) -> SensePlan:
    """The position-sampling rule of method.md section 5 for one sequence.

    Among V = {i : y_i has synonyms or antonyms} sample n = max(min(min_positions, |V|),
    floor(position_frac * |V|)) positions; with ``self_sense`` also sample n positions among all
    target positions whose token has senses (fewer if there are fewer), where only the self-sense pull
    applies.

    Args:
        labels: Aligned targets of one sequence, on CPU. (T,)
        table: The run's sense table (its ``row_of`` and ``related`` are read on CPU).
        min_positions, position_frac, self_sense: The rule's parameters (LossConfig).
        generator: Seeded CPU generator, so a sequence gets the same positions however it is batched.
    """
    row_of, related = table.row_of.cpu(), table.related.cpu()
    empty = torch.zeros(0, dtype=torch.long)
    if related.numel() == 0:
        return SensePlan(related=empty, self_=empty)
    y = labels.cpu()
    valid = y != IGNORE_INDEX
    rows = torch.where(valid, row_of[y.clamp(min=0, max=row_of.numel() - 1)], torch.full_like(y, -1))
    has = rows >= 0
    v = (has & related[rows.clamp(min=0)]).nonzero().squeeze(-1)  # (|V|,)
    n = max(min(min_positions, v.numel()), math.floor(position_frac * v.numel()))
    pick = v[torch.randperm(v.numel(), generator=generator)[:n]].sort().values
    if self_sense and n > 0:
        has_own = table.self_idx[:, 0].cpu() >= 0 if table.self_idx.numel() else torch.zeros(0, dtype=torch.bool)
        pool = (has & has_own[rows.clamp(min=0)]).nonzero().squeeze(-1)
        own = pool[torch.randperm(pool.numel(), generator=generator)[:n]].sort().values
    else:
        own = empty
    return SensePlan(related=pick, self_=own)


@dataclass
class SenseOutput:
    """The sense loss and its diagnostics, as sums so that windows and processes can be added.

    Attributes:
        loss: Sum of the per-position terms divided by ``num_terms``.
        stats: Sums and counts: ``pos_mse_sum``/``pos_n`` (MSE of the kept positives to the
            student state), ``neg_mse_sum``/``neg_n`` (same for negatives), ``hinge_active`` (negatives
            inside the margin), ``terms`` (positions contributing).
    """

    loss: torch.Tensor
    stats: dict[str, torch.Tensor]


def _nearest(
    cand_idx: torch.Tensor, bank: torch.Tensor, anchor: torch.Tensor, kappa: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kappa candidates nearest (L2) to ``anchor``, per position.

    Args:
        cand_idx: Bank rows of the candidates, -1 padded. (n, C)
        bank: Sense vectors. (R, d)
        anchor: The teacher states the selection is made against (already scaled when ``scale`` is given). (n, d)
        kappa: Candidates kept.
        scale: Per-dimension factor applied to the candidates (``loss.sense_scale: variance``). (d,)

    Returns:
        (vectors (n, kappa', d) float32, valid mask (n, kappa')), kappa' = min(kappa, C).
    """
    valid = cand_idx >= 0  # (n, C)
    vec = bank[cand_idx.clamp(min=0)].float()  # (n, C, d)
    if scale is not None:
        vec = vec * scale
    dist = (vec - anchor[:, None, :]).pow(2).sum(-1).masked_fill(~valid, float("inf"))  # (n, C)
    k = min(kappa, cand_idx.shape[1])
    d_sel, sel = dist.topk(k, dim=-1, largest=False)  # (n, k)
    vec_sel = vec.gather(1, sel[..., None].expand(-1, -1, vec.shape[-1]))  # (n, k, d)
    return vec_sel, torch.isfinite(d_sel)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of x over its last dim where m, 0 for rows without any. (n, k) -> (n,)"""
    return (x * m).sum(-1) / m.sum(-1).clamp(min=1)


def sense_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    labels: torch.Tensor,
    plans: list[SensePlan],
    table: SenseTable,
    kappa: int = 5,
    positive_margin: float = 0.0,
    num_terms: torch.Tensor | float | None = None,
    scale: torch.Tensor | None = None,
    teacher_margin: bool = False,
) -> SenseOutput:
    """The DSKD sense loss (method.md section 5) of one micro-batch.

    At a related position i with target y, P holds y's senses and its synonyms' senses and N its
    antonyms' senses; at a self position P holds only y's senses and N is empty. Each set is cut to
    the kappa candidates nearest (L2) to the *teacher's* state h^t_i (the selection carries no
    gradient), then, with MSE(a, b) = ||a - b||^2 / d,

        l_i = mean_{p in P} max(0, MSE(p, h^s_i) - beta_p) + mean_{n in N} max(0, m - MSE(n, h^s_i)).

    Args:
        student_h: Student last hidden states (after the final norm). (B, T, d)
        teacher_h: Teacher last hidden states. (B, T, d)
        labels: Aligned targets. (B, T)
        plans: One :class:`SensePlan` per sequence of the batch.
        table: Candidate senses of the run (on the device of the states).
        kappa: Candidates kept per set.
        positive_margin: beta_p; positives within this MSE are not pulled further.
        num_terms: Divisor (default: the number of sampled positions here).
        scale: Per-dimension factor (d,) applied to the student state, the teacher state and every
            sense before the selection and the MSEs: with 1 / std of the teacher's states per dimension
            (``loss.sense_scale: variance``) each MSE is sum_j (a_j - b_j)^2 / var_j / d. None: plain MSE.
        teacher_margin: beta_p = MSE(p, h^t_i) + positive_margin per positive (``positive_margin_mode:
            teacher``): a positive is pulled only while the student's state is farther from it than the
            teacher's state is.

    Returns:
        :class:`SenseOutput` with the loss and diagnostics sums.
    """
    dev = student_h.device
    b_rel = torch.cat([torch.full_like(p.related, i) for i, p in enumerate(plans)]).to(dev)
    t_rel = torch.cat([p.related for p in plans]).to(dev)
    b_self = torch.cat([torch.full_like(p.self_, i) for i, p in enumerate(plans)]).to(dev)
    t_self = torch.cat([p.self_ for p in plans]).to(dev)
    n_terms = b_rel.numel() + b_self.numel()
    zero = student_h.new_zeros((), dtype=torch.float32)
    stats = {k: zero.detach().clone() for k in ("pos_mse_sum", "pos_n", "neg_mse_sum", "neg_n", "hinge_active")}
    stats["terms"] = torch.tensor(float(n_terms), device=dev)
    if n_terms == 0:
        # keeps the graph connected (DDP expects every trainable parameter to receive a gradient)
        return SenseOutput(loss=student_h.float().sum() * 0.0, stats=stats)

    b = torch.cat([b_rel, b_self])
    t = torch.cat([t_rel, t_self])
    hs = student_h[b, t].float()  # (n, d)
    if scale is not None:
        hs = hs * scale
    with torch.no_grad():
        ht = teacher_h[b, t].float()  # (n, d)
        if scale is not None:
            ht = ht * scale
        rows = table.row_of[labels[b, t]]  # (n,)
        n_rel = b_rel.numel()
        pos_idx = table.pos_idx[rows]  # (n, P)
        own = table.self_idx[rows]  # (n, S)
        # self positions use only the token's own senses: put them in the positive slots, padded
        pad = pos_idx.shape[1] - own.shape[1]
        own = F.pad(own, (0, max(pad, 0)), value=-1)[:, : pos_idx.shape[1]]
        pos_idx = torch.cat([pos_idx[:n_rel], own[n_rel:]])
        neg_idx = table.neg_idx[rows].clone()  # (n, N)
        neg_idx[n_rel:] = -1
        p_vec, p_ok = _nearest(pos_idx, table.bank, ht, kappa, scale)  # (n, k, d), (n, k)
        n_vec, n_ok = _nearest(neg_idx, table.bank, ht, kappa, scale)

    d = hs.shape[-1]
    p_mse = (p_vec - hs[:, None, :]).pow(2).sum(-1) / d  # (n, k)
    n_mse = (n_vec - hs[:, None, :]).pow(2).sum(-1) / d  # (n, k)
    beta_p: torch.Tensor | float = positive_margin
    if teacher_margin:
        with torch.no_grad():
            beta_p = (p_vec - ht[:, None, :]).pow(2).sum(-1) / d + positive_margin  # (n, k)
    p_term = _masked_mean((p_mse - beta_p).clamp(min=0), p_ok)  # (n,)
    n_term = _masked_mean((table.margin - n_mse).clamp(min=0), n_ok)  # (n,)
    per = p_term + n_term  # (n,)
    loss = per.sum() / _denominator(num_terms, torch.tensor(float(n_terms), device=dev))

    with torch.no_grad():
        stats["pos_mse_sum"] = (p_mse * p_ok).sum()
        stats["pos_n"] = p_ok.sum().float()
        stats["neg_mse_sum"] = (n_mse * n_ok).sum()
        stats["neg_n"] = n_ok.sum().float()
        stats["hinge_active"] = ((n_mse < table.margin) & n_ok).sum().float()
    return SenseOutput(loss=loss, stats=stats)


def antonym_teacher_mse(
    teacher_h: torch.Tensor,
    labels: torch.Tensor,
    plans: list[SensePlan],
    table: SenseTable,
    kappa: int = 5,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE(n, h^t_i) of the antonym terms the sense loss would use, measured at the teacher's own states.

    At each planned related position i, the negatives are the kappa candidates of N nearest the
    teacher's state h^t_i (the selection of :func:`sense_loss`); this returns their MSE to h^t_i,
    the distribution an antonym margin can be calibrated on (``margin_mode: antonym_quantile``).

    Args:
        teacher_h: Teacher last hidden states. (B, T, d)
        labels: Aligned targets. (B, T)
        plans: One :class:`SensePlan` per sequence of the batch.
        table: Candidate senses of the run.
        kappa: Candidates kept per set.
        scale: Per-dimension factor, as in :func:`sense_loss`.

    Returns:
        The MSEs of all kept antonym terms, float32. (m,)
    """
    dev = teacher_h.device
    b = torch.cat([torch.full_like(p.related, i) for i, p in enumerate(plans)]).to(dev)
    t = torch.cat([p.related for p in plans]).to(dev)
    if b.numel() == 0:
        return torch.zeros(0, device=dev)
    ht = teacher_h[b, t].float()  # (n, d)
    if scale is not None:
        ht = ht * scale
    rows = table.row_of[labels[b, t]]  # (n,)
    n_vec, n_ok = _nearest(table.neg_idx[rows], table.bank, ht, kappa, scale)  # (n, k, d), (n, k)
    mse = (n_vec - ht[:, None, :]).pow(2).sum(-1) / ht.shape[-1]  # (n, k)
    return mse[n_ok]


def summarize_sense_stats(stats: dict[str, float]) -> dict[str, float]:
    """Turn summed sense diagnostics into the logged means.

    Returns:
        ``hinge_active_share`` (share of kept negatives inside the margin), ``pos_mse``, ``neg_mse``
        (mean MSE of kept positives/negatives to the student state), ``sense_terms``.
    """
    out = {"sense_terms": stats.get("terms", 0.0)}
    pn, nn_ = stats.get("pos_n", 0.0), stats.get("neg_n", 0.0)
    out["pos_mse"] = stats.get("pos_mse_sum", 0.0) / pn if pn else float("nan")
    out["neg_mse"] = stats.get("neg_mse_sum", 0.0) / nn_ if nn_ else float("nan")
    out["hinge_active_share"] = stats.get("hinge_active", 0.0) / nn_ if nn_ else float("nan")
    return out


def grad_comparison(
    aux: torch.Tensor, main: torch.Tensor, params: list[torch.Tensor], retain_graph: bool = True
) -> dict[str, float]:
    """Norms and cosine of the gradients of two parts of one loss on ``params``, without touching ``.grad``.

    Used for the training diagnostic: ``aux`` is the lambda-weighted sense term (plus the weighted
    hidden-state term) and ``main`` the KD + CE part of the same micro-batch's loss.

    Args:
        aux: The auxiliary part (a scalar of the graph).
        main: The KD + CE part (a scalar of the graph).
        params: The trained parameters.
        retain_graph: Keep the graph (the step's own backward follows).

    Returns:
        ``aux_grad_norm``, ``main_grad_norm``, ``aux_grad_ratio`` (aux / main norm; 0 when the aux
        gradient is 0, inf when only main's is) and ``aux_grad_cos`` (NaN when either gradient is 0).
    """
    none = [None] * len(params)
    ga = torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True) if aux.requires_grad else none
    gm = torch.autograd.grad(main, params, retain_graph=retain_graph, allow_unused=True) if main.requires_grad else none
    na = nm = dot = 0.0
    for a, m in zip(ga, gm, strict=True):
        a = a.double() if a is not None else None
        m = m.double() if m is not None else None
        if a is not None:
            na += float((a * a).sum())
        if m is not None:
            nm += float((m * m).sum())
        if a is not None and m is not None:
            dot += float((a * m).sum())
    na, nm = math.sqrt(na), math.sqrt(nm)
    ratio = na / nm if nm > 0 else (0.0 if na == 0 else float("inf"))
    cos = dot / (na * nm) if na > 0 and nm > 0 else float("nan")
    return {"aux_grad_norm": na, "main_grad_norm": nm, "aux_grad_ratio": ratio, "aux_grad_cos": cos}


def aux_and_main(terms: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The parts of :func:`combine`'s total: (lam * sense + hidden_weight * hidden, ce_weight * CE + alpha T^2 KD)."""
    main = combine({k: v for k, v in terms.items() if k in ("ce", "kd")}, cfg)
    aux = combine({k: v for k, v in terms.items() if k in ("sense", "hidden")}, cfg)
    zero = next(iter(terms.values())).new_zeros(())
    return (aux if torch.is_tensor(aux) else zero), (main if torch.is_tensor(main) else zero)


def combine(terms: dict[str, torch.Tensor], cfg) -> torch.Tensor:
    """The weighted total of the terms a step computed (missing terms count 0).

    Args:
        terms: ``ce``, ``kd`` (raw divergence), ``sense``, ``hidden`` scalars.
        cfg: A :class:`~dskd.config.LossConfig` (ce_weight, alpha, T, lam, hidden_weight).
    """
    total = terms["ce"] * cfg.ce_weight if "ce" in terms else 0.0
    if "kd" in terms:
        total = total + cfg.alpha * cfg.T**2 * terms["kd"]
    if "sense" in terms:
        total = total + cfg.lam * terms["sense"]
    if "hidden" in terms:
        total = total + cfg.hidden_weight * terms["hidden"]
    return total  # type: ignore[return-value]
