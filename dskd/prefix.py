"""Frozen bottom layers shared between models: compute them once, run only the layers above.

A student truncated from its teacher and trained only in its top layers keeps the teacher's
embeddings and bottom ``n`` decoder layers bit for bit. The state entering layer ``n`` is then the
same for the teacher, the untrained truncation and every trained student, so it need be computed
once: the teacher cache stores it for training (:mod:`dskd.data`), and evaluation and fidelity reuse it
across the models they score (:class:`PrefixMemo`).

Running part of a decoder works by temporarily replacing its layer list with a slice
(:func:`layer_range`) and passing the state as ``inputs_embeds``: the decoder's own forward then
builds the attention mask and position embeddings exactly as for the whole model. Models whose
forward does more with ``inputs_embeds`` (learned position embeddings, embedding scaling) or indexes
per-layer settings by position in the list fail :func:`split_ok`'s probe and are run whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dskd.models import decoder_layers, eval_mode, mixed_precision, probe_inputs

_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")
# config entries that list one value per layer: only the first n describe the prefix
_PER_LAYER_KEYS = ("layer_types", "sliding_window_pattern_list")


def decoder_parts(model: nn.Module) -> tuple[nn.Module, str, str | None]:
    """The module holding the decoder layer list, the list's attribute name, and the final norm's (or None)."""
    path, _ = decoder_layers(model)
    parent, _, attr = path.rpartition(".")
    dec = model.get_submodule(parent) if parent else model
    norm = next((n for n in _FINAL_NORMS if isinstance(getattr(dec, n, None), nn.Module)), None)
    return dec, attr, norm


@contextlib.contextmanager
def layer_range(
    model: nn.Module, start: int = 0, stop: int | None = None, final_norm: bool = True
) -> Iterator[nn.Module]:
    """For the duration, the model runs only decoder layers ``[start:stop]``.

    Inside, pass the state entering layer ``start`` as ``inputs_embeds`` (when ``start > 0``);
    with ``final_norm=False`` the decoder returns the state leaving layer ``stop - 1`` before the
    final norm, i.e. the state entering layer ``stop``. The layers are the model's own modules
    (no copy); the full list is restored on exit, also after an error. Not thread-safe.

    Yields:
        The decoder module (whose forward returns ``last_hidden_state``).
    """
    dec, attr, norm = decoder_parts(model)
    layers = getattr(dec, attr)
    saved_norm = getattr(dec, norm) if norm else None
    # per-layer settings the decoder's forward looks up by position in the list (Gemma-2/3, OLMo-3, Qwen2,
    # gpt-oss: config.layer_types[i] picks the mask and rope of layer i) follow the sliced layers
    cfg = getattr(dec, "config", None)
    saved_cfg = {k: getattr(cfg, k) for k in _PER_LAYER_KEYS if isinstance(getattr(cfg, k, None), list)}
    if saved_cfg:
        # a KV cache built from the sliced config would not have the kept layers' indices: run without one
        saved_cfg["use_cache"] = getattr(cfg, "use_cache", None)
    setattr(dec, attr, nn.ModuleList(list(layers)[start:stop]))
    if not final_norm and norm:
        setattr(dec, norm, nn.Identity())
    try:
        for k in _PER_LAYER_KEYS:
            if k in saved_cfg:
                setattr(cfg, k, saved_cfg[k][start:stop])
        if saved_cfg:
            cfg.use_cache = False
        yield dec
    finally:
        setattr(dec, attr, layers)
        if norm:
            setattr(dec, norm, saved_norm)
        for k, v in saved_cfg.items():
            setattr(cfg, k, v)


def prefix_states(model: nn.Module, n: int, **inputs: Any) -> torch.Tensor:
    """The state entering decoder layer ``n`` (B, T, d): embeddings and layers ``[0:n]``, no final norm.

    Args:
        model: A causal LM.
        n: Layers to run.
        inputs: ``input_ids``, ``attention_mask``, ``position_ids`` as for the decoder.
    """
    with layer_range(model, 0, n, final_norm=False) as dec:
        return dec(**inputs, use_cache=False).last_hidden_state


def suffix_hidden(model: nn.Module, n: int, states: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The decoder's last hidden state (B, T, d) computed from :func:`prefix_states` ``states`` (B, T, d).

    Args:
        inputs: ``attention_mask`` and ``position_ids`` of the same call (not ``input_ids``).
    """
    with layer_range(model, n) as dec:
        return dec(inputs_embeds=states, **inputs, use_cache=False).last_hidden_state


_SPLIT_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def split_ok(model: nn.Module, n: int) -> bool:
    """Whether running layers ``[0:n]`` then ``[n:]`` gives the whole decoder's state (probe with padding).

    The split repeats the same operations, so the two agree to rounding; a model whose forward treats
    ``inputs_embeds`` specially (adds learned positions, scales embeddings) or indexes per-layer
    settings by list position differs grossly and is refused. Cached per model and ``n``.
    """
    try:
        dec, _, _ = decoder_parts(model)
        L = len(decoder_layers(model)[1])
    except Exception:  # noqa: BLE001 (an architecture this module does not know: run it whole)
        return False
    if not 0 < n <= L:
        return False
    seen = _SPLIT_OK.setdefault(model, {})
    if n not in seen:
        ids, mask = probe_inputs(model)  # longer than the smallest sliding window, right-padded
        # as training runs a model with float32 master weights; without dropout
        with mixed_precision(model), eval_mode(model):
            whole = dec(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
            states = prefix_states(model, n, input_ids=ids, attention_mask=mask)
            split = suffix_hidden(model, n, states, attention_mask=mask)
        real = mask.bool()
        err = (whole[real] - split.float()[real]).abs().max()
        seen[n] = bool(err <= 1e-4 * float(whole[real].abs().max().clamp(min=1.0)))
    return seen[n]


def _is_prefix_param(name: str, attr: str, norm: str | None, n: int) -> bool:
    """Whether decoder parameter/buffer ``name`` takes part in computing the state entering layer n."""
    if norm and (name == norm or name.startswith(norm + ".")):
        return False
    if name.startswith(attr + "."):
        return int(name.split(".")[1]) < n
    return True


def prefix_tensors(model: nn.Module, n: int) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the state entering layer ``n`` depends on, by name in the decoder
    (embeddings, rotary frequencies, layers ``[0:n]``)."""
    dec, attr, norm = decoder_parts(model)
    named = {**dict(dec.named_parameters()), **dict(dec.named_buffers())}
    return {k: v for k, v in named.items() if _is_prefix_param(k, attr, norm, n)}


def _config_part(model: nn.Module, n: int) -> str:
    from dskd.models import _VOLATILE_KEYS

    def part(d: dict[str, Any]) -> dict[str, Any]:
        d = {k: v for k, v in d.items() if k not in _VOLATILE_KEYS and k != "num_hidden_layers"}
        for k in _PER_LAYER_KEYS:
            if isinstance(d.get(k), list):
                d[k] = d[k][:n]
        if isinstance(d.get("text_config"), dict):  # a multimodal model's decoder
            d["text_config"] = repr(sorted(part(d["text_config"]).items()))
        return d

    d = part(model.config.to_dict())
    d["_attn"] = getattr(model.config, "_attn_implementation", None)
    return repr(sorted(d.items()))


_FPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_fingerprint(model: nn.Module, n: int) -> str:
    """A hash of everything the state entering layer ``n`` depends on: the model class, its config
    (but the layer count), and the bytes of every tensor of :func:`prefix_tensors`. Two models with
    the same fingerprint compute the same prefix. Cached per model object (its weights must not change
    while it is used)."""
    seen = _FPS.setdefault(model, {})
    if n not in seen:
        h = hashlib.blake2b(digest_size=16)
        h.update(type(model).__name__.encode())
        h.update(_config_part(model, n).encode())
        for name, t in sorted(prefix_tensors(model, n).items()):
            t = t.detach()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        seen[n] = h.hexdigest()
    return seen[n]


def shared_prefix_layers(teacher: nn.Module, student: nn.Module) -> int:
    """How many bottom decoder layers the student computes exactly as the teacher: frozen, equal to
    the teacher's, over the same frozen embeddings and with the same per-layer settings (0 when the
    embeddings differ or are trained, or the split of either model fails :func:`split_ok`: the teacher
    cache runs the teacher's split, training the student's).

    Each layer is compared tensor by tensor (no hashing: both models are in memory).
    """
    try:
        _, attr, norm = decoder_parts(student)
        n_s, n_t = len(decoder_layers(student)[1]), len(decoder_layers(teacher)[1])
    except Exception:  # noqa: BLE001
        return 0
    if type(student) is not type(teacher) or _config_part(student, 0) != _config_part(teacher, 0):
        return 0
    s_all, t_all = prefix_tensors(student, n_s), prefix_tensors(teacher, n_t)
    s_params = {id(p) for p in student.parameters() if p.requires_grad}

    def same(names: list[str]) -> bool:
        return all(
            k in t_all
            and id(s_all[k]) not in s_params
            and s_all[k].shape == t_all[k].shape
            and s_all[k].dtype == t_all[k].dtype
            and torch.equal(s_all[k].detach(), t_all[k].detach().to(s_all[k].device))
            for k in names
        )

    outside = [k for k in s_all if not k.startswith(attr + ".")]
    if not same(outside):
        return 0
    n = 0
    while n < min(n_s, n_t) and same([k for k in s_all if k.startswith(f"{attr}.{n}.")]):
        n += 1
    # per-layer settings (attention type, window) of the shared layers must agree too
    while n and _config_part(student, n) != _config_part(teacher, n):
        n -= 1
    # the cache splits the teacher at n, training the student: both splits must be exact
    if n and not (split_ok(student, n) and split_ok(teacher, n)):
        return 0
    return n


def _inputs_digest(inputs: dict[str, torch.Tensor]) -> str:
    """A hash of the names, dtypes, shapes and bytes of a call's input tensors (moved to the CPU)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        t = inputs[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())  # no copy: numpy exposes the buffer
    return h.hexdigest()


GiB = 1 << 30


class PrefixMemo:
    """Reuse the state entering decoder layer ``n`` across the models that share the bottom ``n`` layers.

    Evaluating a teacher and students truncated from it (same embeddings, same frozen bottom layers)
    repeats the same bottom-layer forward for every model on every batch. The memo keys that state by
    the prefix's fingerprint (:func:`prefix_fingerprint`: the weights and config it depends on), the
    device, the dtype and the bytes of the call's inputs, so a model whose prefix and inputs match an
    earlier call runs only its layers ``[n:]``. The stored tensor is what the model computes for that
    very batch, so a memo-served model gives what it would alone, bit for bit when the split is exact
    (it is for Llama-family decoders; :func:`split_ok` refuses a split that differs beyond rounding).

    A model with fewer than ``n`` layers, or one that fails :func:`split_ok`, runs whole. Stored states
    are kept in CPU memory (an accelerator's memory stays free for the training between evaluations;
    the copy is exact and small beside a forward); once ``max_bytes`` would be exceeded nothing more
    is stored (logged once) and misses are still computed correctly. Meant for inference (runs under
    ``torch.no_grad``) on models whose weights do not change while the memo is used.

    Args:
        n_layers: n, the bottom decoder layers the models share (0: every model runs whole).
        max_bytes: Most bytes of stored states.
        log: Where the one message about the cap goes.

    Attributes:
        stats: ``hits`` and ``misses`` (calls whose prefix was reused or computed), ``whole`` (calls run
            whole), ``stored`` (entries), ``bytes`` (their size), ``unstored`` (misses not stored: the cap).
    """

    def __init__(self, n_layers: int, max_bytes: int = 4 * GiB, log: Any = print) -> None:
        if n_layers < 0:
            raise ValueError(f"n_layers must be >= 0 (got {n_layers})")
        self.n = int(n_layers)
        self.max_bytes = int(max_bytes)
        self.log = log
        self._states: dict[tuple[str, str, str, str], torch.Tensor] = {}
        self._full = False
        self.stats = {"hits": 0, "misses": 0, "whole": 0, "stored": 0, "bytes": 0, "unstored": 0}

    def splits(self, model: nn.Module) -> bool:
        """Whether ``model`` is served split at n (else it runs whole)."""
        return self.n > 0 and split_ok(model, self.n)

    @torch.no_grad()
    def hidden(self, model: nn.Module, **inputs: torch.Tensor | None) -> torch.Tensor:
        """The decoder's last hidden state (B, T, d), as ``model.get_decoder()(**inputs, use_cache=False)``.

        Args:
            model: A causal LM.
            inputs: ``input_ids`` (B, T) and optionally ``attention_mask`` ((B, T), or an additive
                (B, 1, T, T) float mask) and ``position_ids`` (B, T), on any device (they are moved to
                the model's); None entries are dropped.
        """
        given = {k: v for k, v in inputs.items() if v is not None}
        if "input_ids" not in given:
            raise ValueError("PrefixMemo.hidden needs input_ids")
        p = next(model.parameters())
        on_dev = {k: v.to(p.device) for k, v in given.items()}
        if not self.splits(model):
            self.stats["whole"] += 1
            return model.get_decoder()(**on_dev, use_cache=False).last_hidden_state
        key = (prefix_fingerprint(model, self.n), str(p.device), str(p.dtype), _inputs_digest(given))
        states = self._states.get(key)
        if states is None:
            self.stats["misses"] += 1
            states = prefix_states(model, self.n, **on_dev)  # (B, T, d)
            self._keep(key, states)
        else:
            self.stats["hits"] += 1
            states = states.to(p.device)
        rest = {k: v for k, v in on_dev.items() if k != "input_ids"}
        return suffix_hidden(model, self.n, states, **rest)

    def _keep(self, key: tuple[str, str, str, str], states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if not self._full and self.stats["bytes"] + size > self.max_bytes:
            self._full = True
            self.log(
                f"shared prefix: memory cap of {self.max_bytes / GiB:.2f} GiB reached after "
                f"{self.stats['stored']:,} batches; further prefixes are computed but not stored"
            )
        if self._full:
            self.stats["unstored"] += 1
            return
        self._states[key] = states.to("cpu")
        self.stats["stored"] += 1
        self.stats["bytes"] += size

    def clear(self) -> None:
        """Drop every stored state (the counters of calls stay)."""
        self._states.clear()
        self._full = False
        self.stats["stored"] = self.stats["bytes"] = 0

    def calls(self, since: dict[str, int] | None = None) -> int:
        """Calls of :meth:`hidden` since the ``stats`` snapshot ``since`` (None: since the start)."""
        return sum(self.stats[k] - (since or {}).get(k, 0) for k in ("hits", "misses", "whole"))

    def describe(self, since: dict[str, int] | None = None) -> str:
        """One line on the reuse since the ``stats`` snapshot ``since`` (None: since the start)."""
        d = {k: v - (since or {}).get(k, 0) for k, v in self.stats.items()}
        layers = f"{self.n} layer{'s' if self.n != 1 else ''}"
        line = f"shared prefix: {layers} reused for {d['hits']:,} of {self.calls(since):,} batches"
        if d["whole"]:
            line += f" ({d['whole']:,} run whole)"
        return line + f"; {self.stats['bytes'] / 2**20:,.0f} MiB stored"
