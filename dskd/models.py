"""Load teachers and students, truncate a teacher into a student, freeze, fingerprint.

A *model spec* is one of: the alias ``smollm2-135m-instruct`` (the packaged default, exported once
by :mod:`dskd.assets`), a local Hugging Face folder, or a hub id (only usable when the weights are
in the local Hugging Face cache or the network is reachable).
"""

from __future__ import annotations

import contextlib
import copy
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dskd import assets
from dskd.config import ConfigError, DskdError
from dskd.io import stable_hash as _sha

ALIASES = {assets.DEFAULT_MODEL_ALIAS: assets.default_model_dir}

# Config keys that do not change what a model computes.
_VOLATILE_KEYS = {
    "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "quantization_config", "_attn_implementation", "_attn_implementation_autoset",
    "architectures", "_commit_hash", "output_hidden_states", "return_dict",
}  # fmt: skip


class ModelError(DskdError, ValueError):
    """A model or tokenizer that cannot be used as asked; the message names the spec or flag."""


def resolve_spec(spec: str) -> str:
    """Turn a model spec into what ``from_pretrained`` accepts: a local folder or a hub id.

    The packaged alias is exported on first use.
    """
    if spec in ALIASES:
        path = ALIASES[spec]()
        if not (path / "config.json").is_file():
            assets.export_smollm2()
        return str(path)
    p = Path(spec).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model {spec!r}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model {spec!r}: no such folder")
    return spec  # a hub id


def _wrap_load_error(spec: str, e: Exception) -> ModelError:
    return ModelError(
        f"could not load model {spec!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
        f"Use a local folder, the alias {assets.DEFAULT_MODEL_ALIAS!r}, or a hub id that is in the local "
        "Hugging Face cache (this machine may be offline)."
    )


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Load the tokenizer of a model spec."""
    from transformers import AutoTokenizer

    path = resolve_spec(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(spec, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_weights(path: str | Path) -> None:
    """A local model folder's ``.safetensors`` files are whole (the artefact open-check of dskd.io);
    a damaged one is one line naming it and, for a dskd student, the command that rebuilds it."""
    from dskd.io import Artefact, check_files

    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: transformers reads its own cache
    run = folder.parent
    if folder.name == "student" and (run / "meta.json").is_file():  # a dskd run folder's student
        recipe = run / "config.yaml" if (run / "config.yaml").is_file() else "RECIPE.yaml"
        hint = f"rebuild it with `dskd distill --config {recipe} --out {run}-rebuilt`"
    else:
        from dskd.assets import default_model_dir

        if folder.resolve() == default_model_dir().resolve():
            hint = "export it again with `dskd assets --force`"
        else:
            hint = "save or download this model folder again (it is not one dskd builds)"

    class _Model(Artefact):
        def fail(self, where: Path | str, why: str) -> Exception:
            return self.error(f"{where}: {why}; {hint}")

    files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    check_files(folder, _Model("hf-model", 0, "model folder", hint, ModelError), files)


def load_model(
    spec: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a causal LM in eval mode.

    Args:
        spec: A model spec (alias, folder or hub id).
        dtype: ``auto`` (bfloat16 on a GPU, float32 on the CPU), a dtype name, or a torch.dtype.
        trust_remote_code: Allow model code from the hub.
        device: Where the weights go (None: the CPU). An accelerator is filled directly from the
            checkpoint files, without a full copy of the weights in host memory first.
    """
    from transformers import AutoModelForCausalLM

    from dskd.devices import resolve_device, resolve_dtype

    dev = resolve_device(device or "cpu", flag="--device")
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev, flag="--dtype")}
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    path = resolve_spec(spec)
    check_weights(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(spec, e) from e
    model.eval()
    return model


def text_config(config):
    """The config of a model's text decoder: ``config`` itself, or its ``text_config`` (multimodal models such
    as Gemma-3 4B-27B keep the decoder's layer count, window and soft-cap there)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


def rope_length_limit(config) -> tuple[str, int] | None:
    """(rope type, tokens) when the model's rope changes with the longest sequence of a batch past that many
    tokens; None when its rope is a function of the positions alone (the default, linear, llama3, yarn).

    The rope types whose frequencies follow the longest sequence of a forward (transformers'
    ``dynamic_rope_update``): ``dynamic`` (NTK) grows them past ``max_position_embeddings``, ``longrope``
    (Phi-3.5, Phi-4-mini) switches to its long factors past ``original_max_position_embeddings``. Past the
    limit, a sequence's states depend on what it is batched or packed with, so no stage can equal the
    model's own forward of that sequence alone.
    """
    c = text_config(config)
    params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return None
    per_type = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    found: list[tuple[str, int]] = []
    for p in per_type:
        kind = str(p.get("rope_type") or p.get("type") or "default")
        if "dynamic" in kind:
            limit = getattr(c, "max_position_embeddings", None)
        elif kind == "longrope":
            limit = p.get("original_max_position_embeddings") or getattr(c, "original_max_position_embeddings", None)
        else:
            continue
        found.append((kind, int(limit) if limit else 0))
    return min(found, key=lambda x: x[1]) if found else None


def check_rope_length(model_or_config, length: int, flag: str, what: str) -> None:
    """Refuse, in one line naming the model type and ``flag``, sequences of ``length`` tokens that a
    length-dependent rope (:func:`rope_length_limit`) would treat differently batched than alone."""
    config = getattr(model_or_config, "config", model_or_config)
    found = rope_length_limit(config)
    if found is None or length <= found[1]:
        return
    kind, limit = found
    model_type = getattr(text_config(config), "model_type", None) or type(config).__name__
    raise ConfigError(
        f"{model_type}: its {kind} rope changes past {limit} tokens with the longest sequence of a batch, so "
        f"{what} of up to {length} tokens would not equal the model's own forward of each; refused: {flag} "
        f"at most {limit}",
        flag=flag.lstrip("-") if flag.startswith("--") else None,
    )


def lm_head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own logits from final-norm states, in float32: its LM head, then the output scaling its
    forward applies (Cohere ``logit_scale``, Granite ``logits_scaling``, Gemma-2/3 ``final_logit_softcapping``).

    Whether this equals the model's forward for a given model is probed by :func:`head_problem`.

    Args:
        model: A causal LM.
        hidden: (..., d) last hidden states after the final norm.

    Returns:
        (..., V) logits.
    """
    logits = model.get_output_embeddings()(hidden).float()
    cfg = text_config(model.config)
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    div = getattr(cfg, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(div, (int, float)) and not isinstance(div, bool) and div:
        logits = logits / div
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def output_scaling(model: nn.Module) -> str | None:
    """The config entry by which the model's forward changes its LM head's output (``logit_scale``,
    ``logits_scaling``, ``final_logit_softcapping``), or None when its logits are the head's output."""
    cfg = text_config(model.config)
    for key in ("logit_scale", "logits_scaling", "final_logit_softcapping"):
        v = getattr(cfg, key, None)
        if (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            and v
            and not (key != "final_logit_softcapping" and v == 1)
        ):
            return key
    return None


def smallest_window(model: nn.Module) -> int | None:
    """The shortest attention window of a model's layers (None: every layer attends to the whole prefix)."""
    cfg = text_config(model.config)
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and "sliding_attention" not in types:
        return None  # a window in the config that no layer uses (Qwen2 without use_sliding_window)
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(w) if isinstance(w, int) and w > 0 else None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """For the duration the model is in eval mode (no dropout: probes are deterministic), then as it was."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


_PROBE_CAP = 2048  # longest probe sequence (a window beyond it is not seen by the probes)


def probe_inputs(model: nn.Module, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two probe rows (2, T) of arbitrary ids and their attention mask (the second right-padded by a quarter),
    on the model's device. T is 12, or 16 more than the smallest sliding window (capped at 2,048), so that
    probes see sliding-window layers slide."""
    dev = next(model.parameters()).device
    v = vocab or model.get_input_embeddings().weight.shape[0]
    w = smallest_window(model)
    T = 12 if w is None else min(w + 16, _PROBE_CAP)
    ids = (torch.arange(2 * T, device=dev) * 7919 % v).view(2, T)  # (2, T)
    mask = torch.ones_like(ids)
    mask[1, T - max(1, T // 4) :] = 0  # right padding, as batches have
    return ids, mask


_HEAD_PROBLEM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_problem(model: nn.Module) -> str | None:
    """Why :func:`lm_head_logits` of the decoder's last state (``model.get_decoder()``) is not the model's own
    logits, or None when it is (probe rows with padding, longer than the smallest window; cached per model)."""
    if model in _HEAD_PROBLEM:
        return _HEAD_PROBLEM[model]
    kind = getattr(model.config, "model_type", type(model).__name__)
    problem = None
    if model.get_output_embeddings() is None:
        problem = f"{kind}: the model has no output embeddings"
    else:
        ids, mask = probe_inputs(model)
        with mixed_precision(model), eval_mode(model):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            h = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            again = lm_head_logits(model, h)
        real = mask.bool()
        tol = 1e-3 * float(logits[real].abs().max().clamp(min=1.0))
        if again.shape != logits.shape or not torch.allclose(again[real], logits[real], atol=tol, rtol=0):
            problem = f"{kind}: the LM head applied to the decoder's last state does not give the model's logits"
    _HEAD_PROBLEM[model] = problem
    return problem


def mixed_precision(model: nn.Module):
    """Autocast to the frozen weights' dtype when the model mixes float dtypes (float32 master weights
    beside lower-precision frozen ones, :func:`keep_float32_master`), as the training loop runs it; else
    a no-op context. For probe forwards."""
    import contextlib

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    low = [d for d in dtypes if d != torch.float32]
    if len(dtypes) < 2 or not low:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=low[0])


@torch.no_grad()
def head_at_targets_ok(model: nn.Module) -> bool:
    """Whether a training step may apply the LM head at target positions only (padding has no target):
    the head is frozen, the forward takes ``logits_to_keep``, and :func:`lm_head_logits` of the last
    hidden state reproduces the model's logits (checked on a probe input: soft-capping, scaling and
    pre-norm hidden states are caught)."""
    import inspect

    head = model.get_output_embeddings()
    if head is None or any(p.requires_grad for p in head.parameters()):
        return False
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    dev = next(model.parameters()).device
    ids = (torch.arange(12, device=dev) * 7919 % head.weight.shape[0])[None]  # (1, 12) arbitrary ids
    with mixed_precision(model):
        o = model(input_ids=ids, output_hidden_states=True)
        again = lm_head_logits(model, o.hidden_states[-1])  # (1, 12, V)
    logits = o.logits.float()
    return bool(torch.allclose(again, logits, atol=1e-3 * float(logits.abs().max().clamp(min=1.0)), rtol=0))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list of a causal LM and its parameter-name prefix (e.g. ``model.layers``)."""
    for name in (
        "model.layers",
        "model.decoder.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.language_model.layers",
    ):
        mod: Any = model
        try:
            for part in name.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return name, mod
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


def truncate(teacher: nn.Module, n_layers: int, share: bool = False) -> nn.Module:
    """A new model holding the teacher's embeddings, first ``n_layers`` decoder layers, final norm
    and LM head.

    The student is created on the meta device and its parameters are then assigned from the teacher
    (``load_state_dict(assign=True)``): no random initialisation, no second full model in memory
    while truncating, and the student lives on the teacher's device.

    Args:
        teacher: A causal LM.
        n_layers: N, the number of decoder layers to keep (1 <= N <= teacher layers).
        share: Reuse the teacher's tensors instead of copying them. Only for weights that are never
            trained (the caller copies the ones it trains, see :func:`build_pair`); saves a copy
            of the kept layers when teacher and student are both in memory.
    """
    from transformers import AutoModelForCausalLM

    prefix, layers = decoder_layers(teacher)
    total = len(layers)
    if not 1 <= n_layers <= total:
        raise ModelError(f"--model.student_layers: must be in [1, {total}] for this teacher (got {n_layers})")
    config = copy.deepcopy(teacher.config)
    # the decoder's own config: the top one, or a multimodal model's text_config (the student is then the
    # same multimodal class, its vision tower kept, its text decoder truncated)
    part = text_config(config)
    part.num_hidden_layers = n_layers
    for key in ("layer_types", "sliding_window_pattern_list"):
        if isinstance(getattr(part, key, None), list):
            setattr(part, key, getattr(part, key)[:n_layers])
    dtype = next(teacher.parameters()).dtype
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")

    def kept(name: str) -> bool:
        m = pat.match(name)
        return not (m and int(m.group(1)) >= n_layers)

    state = {k: (v if share else v.detach().clone()) for k, v in teacher.state_dict().items() if kept(k)}
    missing, unexpected = student.load_state_dict(state, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelError(f"truncation failed: missing={missing[:5]} unexpected={unexpected[:5]}")
    if tied:
        student.tie_weights()
    # buffers outside the state dict (rotary frequencies) are still on meta: take the teacher's
    t_bufs = dict(teacher.named_buffers())
    for name, buf in list(student.named_buffers()):
        if buf.is_meta:
            if name not in t_bufs:
                raise ModelError(f"truncation failed: buffer {name} has no counterpart in the teacher")
            mod_name, _, attr = name.rpartition(".")
            student.get_submodule(mod_name).register_buffer(attr, t_bufs[name].clone(), persistent=False)
    still = [n for n, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]
    if still and next(teacher.parameters()).device.type != "meta":
        raise ModelError(f"truncation failed: tensors left unset: {still[:5]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student.eval()
    return student


def keep_float32_master(model: nn.Module) -> int:
    """Give the trainable parameters float32 storage (master weights) in a lower-precision model.

    In bfloat16 a weight near 1.0 moves in steps of 2**-7; an AdamW update of lr x 1e-4 is far below
    half a step and would round away. Frozen weights keep their dtype (memory); the forward then
    needs autocast to mix the two, which :func:`dskd.distill.distill` turns on.

    Returns:
        The number of parameters converted.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            n += p.numel()
    return n


def freeze_except_top(model: nn.Module, trainable_layers: int) -> list[str]:
    """Freeze every parameter except those of the top ``trainable_layers`` decoder layers.

    Returns:
        Names of the parameters left trainable.
    """
    prefix, layers = decoder_layers(model)
    if not 0 <= trainable_layers <= len(layers):
        raise ModelError(f"--model.trainable_layers: must be in [0, {len(layers)}] (got {trainable_layers})")
    for p in model.parameters():
        p.requires_grad_(False)
    first = len(layers) - trainable_layers
    for layer in list(layers)[first:]:
        for p in layer.parameters():
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary (token -> id) and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _sha({"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_tokens))})


def config_fingerprint(config) -> str:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE_KEYS}
    return _sha(d)


def fingerprint(model: nn.Module, tokenizer) -> str:
    """Identity of a model for artefact sidecars: a hash of its config and tokenizer vocabulary."""
    return _sha({"config": config_fingerprint(model.config), "tokenizer": tokenizer_fingerprint(tokenizer)})


def check_same_tokenizer(
    teacher_tok, student_tok, teacher_name: str = "teacher", student_name: str = "student"
) -> None:
    """Refuse a teacher/student pair whose tokenizers differ (token-level KD would be meaningless)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv == sv:
        return
    only_t = sorted(set(tv) - set(sv))[:5]
    only_s = sorted(set(sv) - set(tv))[:5]
    moved = sorted(k for k in set(tv) & set(sv) if tv[k] != sv[k])[:5]
    raise ModelError(
        f"tokenizer mismatch between {teacher_name} ({len(tv)} tokens) and {student_name} ({len(sv)} tokens): "
        f"only in teacher {only_t}, only in student {only_s}, different ids {moved}. "
        "Token-level KD needs the same tokenizer: pick a student from the teacher's family or truncate the "
        "teacher (--model.student unset)."
    )


def output_vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(teacher: nn.Module, student: nn.Module, tokenizer) -> int:
    """The number of logit columns KD compares. Vocabularies padded beyond the tokenizer (as in some
    Qwen checkpoints) are sliced to the tokenizer's size; a model with fewer rows than the tokenizer
    is refused."""
    v = len(tokenizer)
    for name, m in (("teacher", teacher), ("student", student)):
        rows = output_vocab_size(m)
        if rows < v:
            raise ModelError(f"{name} has {rows} output rows but the tokenizer has {v} tokens")
    return v


def shared_head_problem(teacher: nn.Module, student: nn.Module, vocab_size: int) -> str | None:
    """Why the teacher's logits can *not* be recomputed through the student's head, or None when they can.

    They can when the student's output head is frozen and holds the teacher's head weights (a
    truncated student keeps the teacher's final norm and LM head), and the teacher's logits are
    that head applied to the state its decoder returns (after the final norm): checked on a short
    probe input, so soft-capped or scaled logits and pre-norm states are caught.

    Args:
        teacher: The teacher causal LM.
        student: The student causal LM.
        vocab_size: Logit columns KD compares.
    """
    t_head, s_head = teacher.get_output_embeddings(), student.get_output_embeddings()
    if t_head is None or s_head is None:
        return "a model has no output embeddings"
    if (key := output_scaling(teacher)) is not None:
        kind = getattr(teacher.config, "model_type", type(teacher).__name__)
        return f"{kind}: the teacher's forward rescales its LM head's output ({key})"
    t_p, s_p = dict(t_head.named_parameters()), dict(s_head.named_parameters())
    if set(t_p) != set(s_p):
        return "the student's LM head has other parameters than the teacher's"
    if any(p.requires_grad for p in s_p.values()):
        return "the student's LM head is trainable"
    for name, p in s_p.items():
        q = t_p[name]
        if p.shape != q.shape or not torch.equal(p.detach(), q.detach().to(p.device)):
            return f"the student's LM head ({name}) differs from the teacher's"
    dev = next(teacher.parameters()).device
    ids = (torch.arange(16, device=dev) * 7919 % vocab_size)[None]  # (1, 16) arbitrary in-vocabulary ids
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits[..., :vocab_size].float()  # (1, 16, V)
        h = getattr(teacher.base_model(input_ids=ids), "last_hidden_state", None)  # (1, 16, d)
        if h is None:
            return "the teacher's decoder does not return its last hidden state"
        again = s_head(h.to(s_head.weight.device))[..., :vocab_size].float().to(logits.device)
    tol = 1e-3 * float(logits.abs().max().clamp(min=1.0))
    if not torch.allclose(logits, again, atol=tol, rtol=0):
        kind = getattr(teacher.config, "model_type", type(teacher).__name__)
        return f"{kind}: the teacher's logits are not its LM head applied to its last hidden state (output scaling)"
    return None


def head_probe(model: nn.Module) -> str:
    """A cheap hash of a model's output head weights (256 fixed rows), for cache keys."""
    import hashlib

    w = model.get_output_embeddings().weight.detach()
    rows = w[:: max(1, w.shape[0] // 256)].float().cpu().contiguous()  # (<= 257, d)
    return hashlib.sha256(str(list(w.shape)).encode() + rows.numpy().tobytes()).hexdigest()[:16]


@dataclass
class Pair:
    """A teacher, its student, the shared tokenizer and how they were made."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: Any
    vocab_size: int
    teacher_fingerprint: str
    student_fingerprint: str
    trainable: list[str]
    info: dict[str, Any]


def build_pair(cfg, teacher: nn.Module | None = None, tokenizer=None, device: str | torch.device | None = None) -> Pair:
    """Load the teacher and make or load the student described by a :class:`~dskd.config.ModelConfig`.

    A truncated student shares the teacher's frozen tensors (one copy of the kept layers in memory)
    and owns copies of its trainable ones, so training never moves the teacher.

    Args:
        cfg: The model config.
        teacher: An already loaded teacher (else loaded from ``cfg.teacher``).
        tokenizer: Its tokenizer (else loaded).
        device: Where both models are loaded (default: the CPU, as ``from_pretrained`` does).
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    t = teacher if teacher is not None else load_model(cfg.teacher, cfg.dtype, cfg.trust_remote_code, device)
    for p in t.parameters():
        p.requires_grad_(False)
    n_teacher = num_layers(t)
    if cfg.student:
        s_tok = load_tokenizer(cfg.student, cfg.trust_remote_code)
        check_same_tokenizer(tok, s_tok, f"teacher {cfg.teacher!r}", f"student {cfg.student!r}")
        s = load_model(cfg.student, next(t.parameters()).dtype, cfg.trust_remote_code, next(t.parameters()).device)
        source = {"kind": "independent", "spec": cfg.student}
    else:
        n = cfg.student_layers if cfg.student_layers is not None else max(1, n_teacher // 2)
        s = truncate(t, n, share=True)
        source = {"kind": "truncated", "from": cfg.teacher, "layers": n}
    m = min(cfg.trainable_layers, num_layers(s))
    trainable = freeze_except_top(s, m)
    if not cfg.student:
        for p in s.parameters():
            if p.requires_grad:  # own copies: training must never move the teacher's weights
                p.data = p.data.clone()
    v = shared_vocab_size(t, s, tok)
    info = {
        "teacher": cfg.teacher,
        "teacher_layers": n_teacher,
        "student": source,
        "student_layers": num_layers(s),
        "trainable_layers": m,
        "trainable_params": sum(p.numel() for p in s.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in s.parameters()),
        "vocab_size": v,
    }
    return Pair(t, s, tok, v, fingerprint(t, tok), fingerprint(s, tok), trainable, info)


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy completion of a raw prompt (no chat template)."""
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
