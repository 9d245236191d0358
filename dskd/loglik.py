"""Multiple-choice scoring by log-likelihood: tokenisation, packed rows, shared prefixes, the self-checks.

One of the two scorers of :mod:`dskd.evaluate` (the other, greedy generation, is :mod:`dskd.generate`,
beside this one); both build on :mod:`dskd.prompts` (requests) and :mod:`dskd.metrics` (task entries).
Two scoring modes:

* ``loglik`` (lm-eval's ``multiple_choice``): each choice is a continuation of the question's cloze
  query; its score is the summed log-probability of its tokens. ``acc`` takes the best sum,
  ``acc_norm`` the best sum divided by the continuation's length in characters.
* ``letter`` (the paper's style): the prompt lists the choices as ``A. ... B. ...`` and ends with
  ``Answer:``; the prediction is the letter with the highest log-probability at the answer position,
  i.e. greedy one-token exact match restricted to the letters.

Speed: every question is one *group* (a context and all its continuations) and is packed into one
row ``[context | cont_1[:-1] | cont_2[:-1] | ...]`` whose 4D attention mask lets each continuation
see the context and itself only, with positions restarting after the context. The context is thus
encoded once per question instead of once per choice, the last token of each continuation is never
fed (nothing reads its output), and the LM head runs only at the positions that are scored. Rows are
sorted by length so batches carry little padding. A self-check on the first question compares the
packed scores with a plain per-choice forward and falls back to per-choice scoring when a model
ignores custom masks. Questions shown the same few-shot exemplars (MMLU's dev shots, or any fixed
set) go one step further: the token prefix their contexts share is encoded once, and its KV cache
(a transformers ``DynamicCache``) is expanded over each batch, so the exemplars are not re-encoded
for every question (:func:`shared_prefixes`, checked once per model against the plain path).

Tokenisation follows lm-eval exactly: trailing spaces of the context move to the continuation, the
context is encoded alone, and the continuation tokens are the tail of the encoded context +
continuation, with no special tokens added.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dskd.config import ConfigError, EvalConfig
from dskd.metrics import progress_bar, setup_label, task_entry
from dskd.models import check_rope_length
from dskd.models import lm_head_logits as _head
from dskd.prompts import letter_requests, loglik_requests
from dskd.tasks import Item, Task

if TYPE_CHECKING:
    from dskd.prefix import PrefixMemo


# ---- tokenisation --------------------------------------------------------------------------------
@dataclass
class Group:
    """One packed row: a shared context and the continuations scored after it.

    Args:
        item: Index of the question this group belongs to.
        choices: Choice index of each continuation.
        ctx: Context token ids, (L,).
        conts: Continuation token ids, each (l_i,) with l_i >= 1.
    """

    item: int
    choices: list[int]
    ctx: list[int]
    conts: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for c in self.conts)


def build_groups(tokenizer, requests: list[list[tuple[str, str]]], bos: bool = False) -> list[Group]:
    """Tokenise per-item (context, continuation) lists as lm-eval does, one group per distinct context.

    Args:
        tokenizer: A Hugging Face tokenizer.
        requests: For item i, its (context, continuation) per choice.
        bos: Start every context with the tokenizer's BOS token (unless it already does, as a rendered
            chat template may): lm-eval's rule for the Gemma family (:func:`wants_bos`). The
            continuation tokens are the same either way.
    """
    pairs = []
    for reqs in requests:
        for ctx, cont in reqs:
            n = len(ctx) - len(ctx.rstrip())
            if n:
                ctx, cont = ctx[:-n], ctx[-n:] + cont
            pairs.append((ctx, cont))
    ctxs = sorted({c for c, _ in pairs})
    ctx_ids = dict(zip(ctxs, tokenizer(ctxs, add_special_tokens=False)["input_ids"], strict=True))
    wholes = tokenizer([c + k for c, k in pairs], add_special_tokens=False)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    groups: list[Group] = []
    k = 0
    for i, reqs in enumerate(requests):
        by_ctx: dict[str, Group] = {}
        for j in range(len(reqs)):
            ctx, _ = pairs[k]
            c_ids = ctx_ids[ctx]
            cont = wholes[k][len(c_ids) :]
            k += 1
            if not c_ids:  # lm-eval scores an empty context after the end-of-text token
                c_ids = [start]
            elif bos and tokenizer.bos_token_id is not None and c_ids[0] != tokenizer.bos_token_id:
                c_ids = [tokenizer.bos_token_id, *c_ids]
            if not cont:
                raise ConfigError(f"item {i}: choice {j} tokenises to nothing after its context")
            g = by_ctx.setdefault(ctx, Group(i, [], list(c_ids), []))
            g.choices.append(j)
            g.conts.append(list(cont))
        groups += by_ctx.values()
    return groups


def wants_bos(model: nn.Module) -> bool:
    """Whether log-likelihood contexts start with BOS for this model: lm-eval's ``HFLM`` rule, a BOS for
    every model type of the Gemma family ("Gemma underperforms without it"), none otherwise (its default
    ``add_bos_token=False``), whatever the tokenizer would add by default."""
    cfg = getattr(model, "config", None)
    types = {getattr(cfg, "model_type", "") or ""}
    if cfg is not None and hasattr(cfg, "get_text_config"):
        types.add(getattr(cfg.get_text_config(), "model_type", "") or "")
    return any("gemma" in t for t in types)


# ---- scoring -------------------------------------------------------------------------------------
def attention_windows(model: nn.Module) -> dict[str, int | None] | None:
    """Per attention type of the model's decoder layers, its sliding window in tokens (None: full).

    Read from the (text) config as transformers' decoders use it: ``layer_types`` names each layer's
    type (``sliding_attention`` layers see the last ``sliding_window`` positions, ``full_attention``
    layers all); without ``layer_types``, a set ``sliding_window`` applies to every layer (Mistral,
    Phi-3, Starcoder2). Returns None for a layer type this scorer cannot mask (chunked or linear
    attention, a sliding type without a window): such a model is scored per choice.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not types:
        return {"full_attention": int(window) if window else None}
    out: dict[str, int | None] = {}
    for t in set(types):
        if t == "full_attention":
            out[t] = None
        elif t == "sliding_attention" and window:
            out[t] = int(window)
        else:
            return None
    return out


def _pack(
    groups: list[Group],
    pad_id: int,
    max_length: int,
    dtype: torch.dtype,
    rows: list[list[int]] | None = None,
    prefix: int = 0,
    windows: dict[str, int | None] | None = None,
):
    """Tensors of one packed batch and, per group, where each continuation token is predicted.

    Args:
        groups: The groups of the batch.
        pad_id: Padding token id.
        max_length: A group longer than this loses context tokens from the left.
        dtype: Dtype of the additive mask.
        rows: Indices into ``groups`` laid side by side in each row (default: one group per row).
            A token attends only within its group: to the group's context and to its own continuation.
        prefix: Length P of a shared prefix already in the KV cache: every token also attends to
            its P cached positions, and positions start at P.
        windows: Per attention type, its sliding window (:func:`attention_windows`; None: one full-attention
            type). A token of a windowed type sees only keys whose position ids are less than the window
            below its own, as it would in its choice's own sequence.
    Returns:
        input_ids (B, T), mask (B, 1, T, P + T) additive float (a dict of such masks by attention type
        when the types' windows differ, as transformers' decoders take them), position_ids (B, T),
        targets: list of (row, position, token id, group index, continuation index).
    """
    if rows is None:
        rows = [[i] for i in range(len(groups))]
    ids_rows, grps, segs, poss, targets = [], [], [], [], []
    for r, members in enumerate(rows):
        ids: list[int] = []
        grp: list[int] = []
        seg: list[int] = []
        pos: list[int] = []
        for b in members:
            g = groups[b]
            ctx = g.ctx
            over = g.length - max_length
            if over > 0:
                ctx = ctx[min(over, len(ctx) - 1) :]
            base, L = len(ids), len(ctx)
            ids += ctx
            seg += [0] * L
            pos += list(range(L))
            for ci, cont in enumerate(g.conts):
                start = len(ids)
                for t, tok in enumerate(cont):
                    # token t of cont is predicted at the last context position (t == 0) or where cont[t-1] sits
                    targets.append((r, base + L - 1 if t == 0 else start + t - 1, tok, b, ci))
                ids += cont[:-1]
                seg += [ci + 1] * (len(cont) - 1)
                pos += list(range(L, L + len(cont) - 1))
            grp += [b] * (len(ids) - base)
        ids_rows.append(ids)
        grps.append(grp)
        segs.append(seg)
        poss.append(pos)
    T = max(len(r) for r in ids_rows)
    B = len(ids_rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    grp_t = torch.full((B, T), -1, dtype=torch.long)
    seg_t = torch.full((B, T), -1, dtype=torch.long)
    pos_t = torch.zeros((B, T), dtype=torch.long)
    for r in range(B):
        n = len(ids_rows[r])
        input_ids[r, :n] = torch.tensor(ids_rows[r])
        grp_t[r, :n] = torch.tensor(grps[r])
        seg_t[r, :n] = torch.tensor(segs[r])
        pos_t[r, :n] = torch.tensor(poss[r])
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    sq, sk = seg_t[:, :, None], seg_t[:, None, :]  # (B, T, 1), (B, 1, T)
    same_group = grp_t[:, :, None] == grp_t[:, None, :]
    allowed = causal[None] & same_group & ((sk == 0) | (sk == sq))  # (B, T, T)
    masks: dict[int | None, torch.Tensor] = {}
    for w in dict.fromkeys((windows or {"full_attention": None}).values()):
        see = allowed if w is None else allowed & (pos_t[:, :, None] - pos_t[:, None, :] < w)
        mask = torch.zeros((B, 1, T, prefix + T), dtype=dtype)  # the P cached columns stay 0 (visible)
        mask[..., prefix:].masked_fill_(~see[:, None], torch.finfo(dtype).min)
        if w is not None and prefix:  # cached key k sits at position k; a row token at pos + P
            far = pos_t[:, :, None] + prefix - torch.arange(prefix)[None, None, :] >= w  # (B, T, P)
            mask[..., :prefix].masked_fill_(far[:, None], torch.finfo(dtype).min)
        masks[w] = mask
    if len(masks) == 1:
        return input_ids, next(iter(masks.values())), pos_t + prefix, targets
    return input_ids, {t: masks[w] for t, w in windows.items()}, pos_t + prefix, targets  # type: ignore[union-attr]


def plan_rows(lengths: Sequence[int], batch_size: int) -> list[list[list[int]]]:
    """Batches of rows of group indices: longest group first, shorter ones fill the rows' slack.

    Each batch has at most ``batch_size`` rows, all as long as the longest group left; every row is
    filled first-fit with the longest remaining groups that still fit, so padding is nearly gone.

    Args:
        lengths: Token length of each group.
        batch_size: Rows per forward pass.
    Returns:
        For each batch, for each row, the indices of its groups.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], -i))  # ascending; ties: lower index last
    keys = [lengths[i] for i in order]
    batches: list[list[list[int]]] = []
    while order:
        cap = keys[-1]
        rows: list[list[int]] = []
        for _ in range(batch_size):
            if not order:
                break
            row, free = [], cap
            while order:
                j = bisect.bisect_right(keys, free) - 1  # the longest group that fits
                if j < 0:
                    break
                row.append(order.pop(j))
                free -= keys.pop(j)
            rows.append(row)
        batches.append(rows)
    return batches


@dataclass
class SharedPrefix:
    """The KV cache of a context prefix that several groups share, computed once.

    Args:
        ids: Prefix token ids, (P,).
        kv: Per layer, the cached keys and values, each (1, H_kv, P, d_head).
    """

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def cache(self, batch: int):
        """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows (the stored tensors stay as they are)."""
        from transformers import DynamicCache

        # expand() is a view; the cache's first update concatenates it with the rows' own keys
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv])


def _cache_kwarg(module: nn.Module) -> str:
    """The name under which ``module.forward`` takes a KV cache (``cache`` in newer transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.no_grad()
def encode_prefix(model: nn.Module, ids: Sequence[int]) -> SharedPrefix:
    """Run the decoder once over ``ids`` (P,) and keep its KV cache for :func:`score_groups`."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    decoder = model.get_decoder()
    cache = DynamicCache()
    decoder(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, **{_cache_kwarg(decoder): cache})
    return SharedPrefix(list(ids), [(layer.keys, layer.values) for layer in cache.layers])


@torch.no_grad()
def _score_packed(
    model: nn.Module,
    groups: list[Group],
    pad_id: int,
    max_length: int,
    rows: list[list[int]] | None = None,
    prefix: SharedPrefix | None = None,
    memo: PrefixMemo | None = None,
) -> list[list[float]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    P = len(prefix.ids) if prefix is not None else 0
    windows = attention_windows(model)
    if windows is None:
        raise ValueError(f"{model.config.model_type}: an attention type packed scoring cannot mask")
    input_ids, mask, pos, targets = _pack(groups, pad_id, max_length, dtype, rows, P, windows)
    if prefix is None and memo is not None and not isinstance(mask, dict):
        # bottom layers shared with a model scored earlier: reused (the memo takes one mask tensor)
        hidden = memo.hidden(model, input_ids=input_ids, attention_mask=mask, position_ids=pos)  # (B, T, d)
    else:
        decoder = model.get_decoder()
        kw: dict[str, Any] = {"use_cache": False}
        if prefix is not None:  # the groups continue after the cached prefix: keys (B, H_kv, P + T, d_head)
            kw = {"use_cache": True, _cache_kwarg(decoder): prefix.cache(input_ids.shape[0])}
        on_dev = {k: m.to(device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
        hidden = decoder(
            input_ids=input_ids.to(device),
            attention_mask=on_dev,
            position_ids=pos.to(device),
            **kw,
        ).last_hidden_state  # (B, T, d)
    rows = torch.tensor([t[0] for t in targets], device=device)
    cols = torch.tensor([t[1] for t in targets], device=device)
    toks = torch.tensor([t[2] for t in targets], device=device)
    logp = torch.log_softmax(_head(model, hidden[rows, cols]), dim=-1)  # (N, V)
    tok_lp = logp.gather(1, toks[:, None])[:, 0].cpu().tolist()
    out = [[0.0] * len(g.conts) for g in groups]
    for (_, _, _, b, ci), lp in zip(targets, tok_lp, strict=True):
        out[b][ci] += lp
    return out


@torch.no_grad()
def score_reference(model: nn.Module, group: Group) -> list[float]:
    """Brute force: one plain forward per continuation, as lm-eval does (for checks and tests)."""
    import inspect

    device = next(model.parameters()).device
    # the head only where the continuation is scored (a 262k vocabulary makes the rest costly)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = []
    for cont in group.conts:
        ids = torch.tensor([group.ctx + cont[:-1]], device=device)
        kw = {"logits_to_keep": len(cont)} if keep else {}
        logp = torch.log_softmax(model(input_ids=ids, **kw).logits[0, -len(cont) :].float(), dim=-1)  # (l, V)
        out.append(float(logp.gather(1, torch.tensor(cont, device=device)[:, None]).sum()))
    return out


def score_groups(
    model: nn.Module,
    groups: list[Group],
    batch_size: int = 8,
    pad_id: int = 0,
    max_length: int = 4096,
    progress: Any = None,
    weights: Sequence[float] | None = None,
    packed: bool = True,
    keys: Sequence[Hashable | None] | None = None,
    memo: PrefixMemo | None = None,
) -> list[list[float]]:
    """Summed log-probability of every continuation of every group.

    Args:
        model: A causal LM in eval mode.
        groups: Groups from :func:`build_groups`.
        batch_size: Rows per forward pass; a row holds the longest group left, and shorter groups
            share rows (each attends only within itself), so little of a batch is padding.
        pad_id: Token id used for padding (never attended to).
        max_length: Rows longer than this lose context tokens from the left.
        progress: A tqdm bar advanced by ``weights`` (items per group) after each batch.
        weights: Progress units per group (default 1).
        packed: Score all continuations of a group in one row; False scores one plain forward per
            continuation (the fallback for models that ignore custom attention masks).
        keys: Per group, a key such as its few-shot exemplars (None: not shared). Groups with the
            same key whose contexts start with the same tokens (:func:`shared_prefixes`) have that
            prefix encoded once; its KV cache is expanded over each batch and the groups are scored
            after it, instead of re-encoding the exemplars for every question.
        memo: Bottom-layer states shared with other models (:class:`dskd.prefix.PrefixMemo`), used
            by the packed batches that follow no shared KV prefix; the scores are those without it.

    Returns:
        For each group, the log-likelihood of each of its continuations.
    """
    w = list(weights) if weights is not None else [1.0] * len(groups)
    out: list[list[float] | None] = [None] * len(groups)
    clusters = shared_prefixes(groups, keys, max_length) if packed and keys is not None else []
    if clusters and not sharing_ok(model, groups, clusters[0], pad_id):
        clusters = []
    for P, members in clusters:
        prefix = encode_prefix(model, groups[members[0]].ctx[:P])  # (P,) once per cluster
        tails = [dataclasses.replace(groups[i], ctx=groups[i].ctx[P:]) for i in members]
        scores = _score_batches(model, tails, batch_size, pad_id, max_length, progress, [w[i] for i in members], prefix)
        for i, sc in zip(members, scores, strict=True):
            out[i] = sc
    rest = [i for i, sc in enumerate(out) if sc is None]
    scores = _score_batches(
        model,
        [groups[i] for i in rest],
        batch_size,
        pad_id,
        max_length,
        progress,
        [w[i] for i in rest],
        None,
        packed,
        memo,
    )
    for i, sc in zip(rest, scores, strict=True):
        out[i] = sc
    return out  # type: ignore[return-value]


def _score_batches(
    model: nn.Module,
    groups: list[Group],
    batch_size: int,
    pad_id: int,
    max_length: int,
    progress: Any,
    weights: Sequence[float],
    prefix: SharedPrefix | None = None,
    packed: bool = True,
    memo: PrefixMemo | None = None,
) -> list[list[float]]:
    """:func:`score_groups` for groups that all follow ``prefix`` (None: no shared prefix)."""
    out: list[list[float] | None] = [None] * len(groups)
    if packed:
        plan = plan_rows([min(g.length, max_length) for g in groups], batch_size)
    else:
        order = sorted(range(len(groups)), key=lambda i: -groups[i].length)
        plan = [[[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    for rows in plan:
        batch = [i for row in rows for i in row]
        if packed:
            local = {i: k for k, i in enumerate(batch)}
            scores = _score_packed(
                model,
                [groups[i] for i in batch],
                pad_id,
                max_length,
                [[local[i] for i in row] for row in rows],
                prefix,
                memo,
            )
        else:
            scores = [score_reference(model, groups[i]) for i in batch]
        for i, sc in zip(batch, scores, strict=True):
            out[i] = sc
        if progress is not None:
            progress.update(sum(weights[i] for i in batch))
    return out  # type: ignore[return-value]


MIN_SHARED_PREFIX = 16  # tokens: a shorter prefix saves less than its extra forward pass costs


def shared_prefixes(
    groups: Sequence[Group],
    keys: Sequence[Hashable | None],
    max_length: int,
    min_length: int = MIN_SHARED_PREFIX,
) -> list[tuple[int, list[int]]]:
    """Clusters of groups that can be scored after one shared, cached prefix.

    Groups with the same non-None key form a cluster when there are at least two. Its prefix is
    the longest common prefix of their context token ids, stopping one token short of the shortest
    context (a continuation's first token is predicted at its context's last position, which must
    be in the scored part). Clusters whose prefix is shorter than ``min_length`` or with a group
    longer than ``max_length`` (it would be cut from the left) are left to the plain path. Taking
    the prefix from the token ids, not from the exemplar text, keeps the tokenisation of every
    context exactly as without sharing.

    Args:
        groups: Groups from :func:`build_groups`.
        keys: A key per group (such as the ids of its item's exemplars); None is never shared.
        max_length: The longest group the model takes.
        min_length: The shortest prefix worth sharing.

    Returns:
        (P, indices of the groups) per cluster.
    """
    import os

    by_key: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        if k is not None:
            by_key.setdefault(k, []).append(i)
    out = []
    for members in by_key.values():
        if len(members) < 2 or max(groups[i].length for i in members) > max_length:
            continue
        ctxs = [groups[i].ctx for i in members]
        length = min(len(os.path.commonprefix(ctxs)), min(len(c) for c in ctxs) - 1)
        if length >= min_length:
            out.append((length, members))
    return out


def _probes(groups: Sequence[Group]) -> list[Group]:
    """The shortest and the longest group with several continuations (or of all, if none has several):
    the shortest checks the mask cheaply, the longest whatever only length shows (sliding windows)."""
    multi = [g for g in groups if len(g.conts) > 1] or list(groups)
    short, long = min(multi, key=lambda g: g.length), max(multi, key=lambda g: g.length)
    return [short] if long is short else [short, long]


def _checked(memo: weakref.WeakKeyDictionary, model: nn.Module, probes: list[Group], check) -> bool:
    """Run ``check(group)`` on the probes longer than any this model passed before; remember the result.

    A failure is final for the model; a pass holds for every group up to the longest checked, so a
    later task with longer groups (a window only long groups reach) is checked again on those.
    """
    ok, done = memo.get(model, (True, -1))
    if not ok:
        return False
    for g in probes:
        if g.length > done:
            if not check(g):
                memo[model] = (False, done)
                return False
            done = g.length
    memo[model] = (True, done)
    return True


# Models already checked by sharing_ok: (passed, longest group checked).
_SHARING_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[bool, int]] = weakref.WeakKeyDictionary()


def sharing_ok(
    model: nn.Module, groups: Sequence[Group], cluster: tuple[int, list[int]], pad_id: int, tol: float = 2e-3
) -> bool:
    """Whether groups scored after the cached shared prefix match them scored whole.

    Checks the shortest and the longest group of ``cluster`` (:func:`_probes`), once per model and length.
    """
    P, members = cluster
    failed: list[str] = []

    def check(g: Group) -> bool:
        try:
            shared = _score_packed(
                model, [dataclasses.replace(g, ctx=g.ctx[P:])], pad_id, 1 << 30, None, encode_prefix(model, g.ctx[:P])
            )[0]
        except Exception as e:  # an architecture whose cache or masks do not take this path
            failed.append(f"shared-prefix scoring unavailable ({type(e).__name__}: {e})")
            return False
        whole = _score_packed(model, [g], pad_id, 1 << 30)[0]
        if all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(shared, whole, strict=True)):
            return True
        failed.append(f"shared-prefix scores differ from plain ones ({g.length} tokens): encoding each context whole")
        return False

    ok = _checked(_SHARING_CHECKED, model, _probes([groups[i] for i in members]), check)
    for msg in failed:
        warnings.warn(msg, stacklevel=2)
    return ok


# Models already checked by packing_ok: (passed, longest group checked).
_PACKING_CHECKED: weakref.WeakKeyDictionary[nn.Module, tuple[bool, int]] = weakref.WeakKeyDictionary()


def packing_ok(model: nn.Module, group: Group | Sequence[Group], pad_id: int, tol: float = 2e-3) -> bool:
    """Whether packed scores of ``group`` (or of each of several) match the per-choice reference.

    A model passes when it honours the custom masks, sliding-window layers included (the group
    that :func:`score_loglik` passes last is its longest, so a window shorter than it is exercised).
    The answer is remembered per model object up to the longest group checked, so evaluating
    several tasks checks again only for a task with longer groups.
    """
    probes = [group] if isinstance(group, Group) else list(group)
    return _checked(_PACKING_CHECKED, model, probes, lambda g: _packing_check(model, g, pad_id, tol))


def _packing_check(model: nn.Module, group: Group, pad_id: int, tol: float) -> bool:
    try:
        packed = _score_packed(model, [group], pad_id, 1 << 30)[0]
    except Exception as e:  # an architecture without get_decoder/custom masks
        warnings.warn(f"packed scoring unavailable ({type(e).__name__}: {e}); scoring per choice", stacklevel=2)
        return False
    ref = score_reference(model, group)
    return all(abs(a - b) <= tol * max(1.0, abs(b)) for a, b in zip(packed, ref, strict=True))


def _argmax(xs: Sequence[float]) -> int:
    return int(max(range(len(xs)), key=lambda i: xs[i]))


# ---- the scorer ---------------------------------------------------------------------------------
def score_loglik(
    model: nn.Module,
    tokenizer,
    task: Task,
    items: Sequence[Item],
    cfg: EvalConfig,
    progress: bool = False,
    packed: bool | None = None,
    memo: PrefixMemo | None = None,
) -> dict[str, Any]:
    """Score ``items`` of ``task`` by log-likelihood (``loglik`` or ``letter``) and compute its metrics.

    Args:
        model: A causal LM in eval mode.
        tokenizer: Its tokenizer.
        task: The task.
        items: Items to score (usually ``select_items(task, cfg.limit)``).
        cfg: Shots, chat, scoring, batch size, bootstrap.
        progress: Show a tqdm bar with items/s on stderr.
        packed: Force packed (True) or per-choice (False) scoring; None runs the self-check.
        memo: Bottom-layer states shared with other models scored on the same batches
            (:class:`dskd.prefix.PrefixMemo`; log-likelihood and letter scoring); a pure speed-up.

    Returns:
        The task's entry of the result file: ``metrics``, ``n``, timings and per-item ``items``.
    """
    if cfg.scoring not in ("loglik", "letter"):
        raise ConfigError(f"--eval.scoring: {cfg.scoring!r} is not a log-likelihood scoring (loglik, letter)")
    t0 = time.perf_counter()
    build = letter_requests if cfg.scoring == "letter" else loglik_requests
    shots = [task.exemplars(x, cfg.shots, cfg.seed) for x in items]
    requests = [build(task, x, ex, tokenizer, cfg.chat) for x, ex in zip(items, shots, strict=True)]
    groups = build_groups(tokenizer, requests, bos=wants_bos(model))
    # questions shown the same exemplars share their encoded prefix (score_groups); 0-shot shares nothing
    keys = [tuple(e.id for e in shots[g.item]) or None for g in groups]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_len = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
    if groups:  # the longest sequence a choice is scored in (a group past max_len loses context)
        longest = max(min(len(g.ctx) + max(len(c) for c in g.conts) - 1, max_len) for g in groups)
        check_rope_length(model, longest, "--eval.shots", f"{task.name} questions")
    if packed is None:
        # the shortest group with several continuations (cheap, tests the mask) and the longest (what
        # only length shows: a sliding window shorter than the group)
        packed = packing_ok(model, _probes(groups), pad_id)
        if not packed:
            warnings.warn("this model ignores packed attention masks: scoring each choice separately", stacklevel=2)
    n_groups = np.bincount([g.item for g in groups], minlength=len(items))
    weights = [1.0 / n_groups[g.item] for g in groups]
    bar = progress_bar(progress, len(items), task.name)
    t1 = time.perf_counter()
    scores = score_groups(model, groups, cfg.batch_size, pad_id, max_len, bar, weights, packed, keys, memo)
    t_score = time.perf_counter() - t1
    if bar is not None:
        bar.close()
    ll = [[0.0] * len(x.choices) for x in items]
    for g, sc in zip(groups, scores, strict=True):
        for j, s in zip(g.choices, sc, strict=True):
            ll[g.item][j] = s
    gold = [x.gold for x in items]
    pred = [_argmax(v) for v in ll]
    rec: dict[str, Any] = {"id": [x.id for x in items], "gold": gold, "pred": pred, "loglik": ll}
    correct = {"acc": np.array([p == g for p, g in zip(pred, gold, strict=True)], dtype=float)}
    if cfg.scoring == "loglik":
        lens = [[max(1, len(c[1:] if c.startswith(" ") else c)) for _, c in r] for r in requests]
        pred_norm = [_argmax([s / n for s, n in zip(v, ln, strict=True)]) for v, ln in zip(ll, lens, strict=True)]
        rec["pred_norm"] = pred_norm
        correct["acc_norm"] = np.array([p == g for p, g in zip(pred_norm, gold, strict=True)], dtype=float)
    return task_entry(
        task,
        items,
        correct,
        rec,
        cfg,
        primary="acc_norm" if cfg.scoring == "loglik" and task.name in _ACC_NORM_TASKS else "acc",
        setup=setup_label(cfg),
        seconds=time.perf_counter() - t0,
        score_seconds=t_score,
        tokens=sum(g.length for g in groups),
        packed=packed,
    )


# lm-eval reports acc_norm as the headline for these (length-biased choices); acc elsewhere.
_ACC_NORM_TASKS = {"arc_easy", "arc_challenge", "hellaswag", "openbookqa", "piqa", "sciq"}
