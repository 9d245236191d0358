"""``dskd plan``: what a recipe will cost, per stage, before any weight is loaded.

The plan reads the teacher's *configuration* only: a local folder's ``config.json``, a hub id in the
local Hugging Face cache, or the architecture numbers shipped below for the paper's teachers
(Llama-3-8B-Instruct, Mistral-7B-Instruct v0.1 / v0.2 / v0.3) and the packaged SmolLM2. The model is
instantiated on the ``meta`` device, so parameter counts are exact for any architecture and nothing
is allocated. Training prompts are rendered from the task files and counted with the tokenizer
when it is on this machine, else estimated at 4 characters per token.

Per stage it gives: the devices assumed, parameters (total / trainable), a per-GPU memory estimate
with its parts (and host memory where a stage holds some), disk, tokens, optimiser steps, a time
estimate from FLOPs at an assumed throughput, and the command that runs the stage.

The plan is a table (``STAGES``) of per-stage estimators, each a function of the recipe and its
:class:`Shapes` (the models' shapes, the data counts, the launch); the memory and disk parts they sum
are functions of the same two arguments (``sense_store_bytes``, ``teacher_cache_position_bytes``,
``training_state_bytes``, ``ddp_bucket_bytes``, ``logits_bytes``, ``sense_bank_bytes``, ``memo_bytes``),
each saying which code it is read from; ``tests/test_plan_estimators.py`` checks them against built
artefacts and measured allocations. Memory and time remain *estimates*; ``benchmarks/gpu_check.py``
measures the real numbers on a GPU (it has not run on one yet).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd.config import ConfigError, RunConfig
from dskd.devices import DTYPES

GB = 1e9

# Architecture numbers of the paper's teachers (from their published config.json files), so a plan
# needs neither the network nor the weights.
_LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
_MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
}
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "mistralai/Mistral-7B-Instruct-v0.1": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.2": {**_MISTRAL_7B, "rope_theta": 1000000.0},
    "mistralai/Mistral-7B-Instruct-v0.3": {**_MISTRAL_7B, "vocab_size": 32768, "rope_theta": 1000000.0},
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
}

# Fixed per-GPU overhead: CUDA context, cuBLAS workspaces, allocator fragmentation (an estimate).
RUNTIME_BYTES = 1.5 * GB


@dataclass
class Arch:
    """A decoder's shape and exact parameter counts (from a meta-device instance)."""

    source: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    layer_params: list[int]
    outside_params: int  # embeddings, final norm, LM head (counted once when tied)

    @property
    def total(self) -> int:
        return self.outside_params + sum(self.layer_params)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


@dataclass
class Stage:
    """One stage of the recipe as the plan sees it."""

    name: str
    devices: int
    params_total: int
    params_trainable: int
    memory: dict[str, float]  # part -> bytes per GPU
    disk: dict[str, float]  # item -> bytes
    tokens: int
    steps: int | None
    flops: float
    command: str
    notes: list[str] = field(default_factory=list)
    host: dict[str, float] = field(default_factory=dict)  # part -> bytes of CPU memory (not in memory_total)

    @property
    def memory_total(self) -> float:
        return sum(self.memory.values())


# ----------------------------------------------------------------------------- architecture


def model_config(spec: str, trust_remote_code: bool = False, flag: str = "--model.teacher"):
    """The Hugging Face config of a model spec, without weights; returns (config, where it came from)."""
    from transformers import AutoConfig

    from dskd.models import ALIASES, resolve_spec

    if spec in ALIASES:
        folder = ALIASES[spec]()
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(str(folder)), f"config.json of {folder}"
    elif Path(spec).expanduser().exists():
        path = resolve_spec(spec)  # checks the folder holds config.json
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), f"config.json of {path}"
    if spec in KNOWN_ARCHITECTURES:
        numbers = dict(KNOWN_ARCHITECTURES[spec])
        return AutoConfig.for_model(numbers.pop("model_type"), **numbers), "architecture numbers shipped with dskd"
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code), f"hub config of {spec}"
    except (OSError, ValueError) as e:
        known = ", ".join(KNOWN_ARCHITECTURES)
        raise ConfigError(
            f"{flag}: no configuration for {spec!r}: not a local folder, not in the local Hugging Face cache, "
            f"and not one of the shipped architectures ({known})"
        ) from e


def architecture(config, source: str) -> Arch:
    """Shape and exact parameter counts of ``config``, from an instance on the meta device."""
    from transformers import AutoModelForCausalLM

    from dskd.models import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _, layers = decoder_layers(model)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    heads = config.num_attention_heads
    return Arch(
        source=source,
        hidden=config.hidden_size,
        layers=len(per_layer),
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        vocab=model.get_output_embeddings().weight.shape[0],
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        layer_params=per_layer,
        outside_params=total - sum(per_layer),
    )


# ----------------------------------------------------------------------------- data


@dataclass
class DataCounts:
    sequences: int
    positions: int  # tokens of all training sequences (one epoch)
    eval_items: int
    eval_tokens: int
    exact: bool  # counted with the real tokenizer (else ~4 characters per token)
    # distinct target tokens, at most: the prompts' distinct ids plus every continuation token (the teacher
    # writes those); None without the tokenizer
    target_tokens_max: int | None = None


class _CharTokenizer:
    """Stands in for a tokenizer that is not on this machine: chat turns joined, ~4 characters per token."""

    chat_template = "plain"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [0] * max(1, math.ceil(len(text) / 4))}


def count_data(cfg: RunConfig, eval_sample: int = 100) -> DataCounts:
    """Training sequences and tokens of the recipe, and evaluation items and (estimated) tokens."""
    from dskd import data as D
    from dskd.models import ALIASES, load_tokenizer
    from dskd.prompts import letter_prompt, select_items
    from dskd.tasks import get_task

    spec = cfg.model.teacher
    try:
        if spec in ALIASES and not (ALIASES[spec]() / "config.json").is_file():
            raise FileNotFoundError(spec)  # loading the alias would export the model: estimate instead
        tok, exact = load_tokenizer(spec, cfg.model.trust_remote_code), True
    except Exception:  # noqa: BLE001 - any failure (offline hub id, missing folder) means: estimate
        tok, exact = _CharTokenizer(), False
    dc = cfg.data
    lengths = []
    n_prompts = 0
    ids: set[int] = set()  # every id of the prompts and text windows: a superset of their target ids
    for prompt in D.task_prompts(cfg.data, tok):
        p = tok(prompt, add_special_tokens=not dc.chat)["input_ids"]
        ids.update(p)
        n_prompts += 1
        lengths.append(min(len(p), dc.max_length - dc.continuation_tokens) + dc.continuation_tokens)
    for w in D.text_windows(cfg.data, tok):
        ids.update(w.tolist())
        lengths.append(len(w))
    ec = cfg.eval
    items = tokens = 0
    for name in ec.tasks:
        task = get_task(name)
        chosen = select_items(task, ec.limit)
        shots = task.train_items()[: ec.shots]
        sample = chosen[:eval_sample]
        if not sample:
            continue
        n = [len(tok(letter_prompt(task, x, shots, tok, ec.chat))["input_ids"]) for x in sample]
        items += len(chosen)
        tokens += round(sum(n) / len(n) * len(chosen))
    targets = min(len(ids) + n_prompts * dc.continuation_tokens, len(tok)) if exact else None
    return DataCounts(len(lengths), sum(lengths), items, tokens, exact, targets)


# ----------------------------------------------------------------------------- the plan


def _bytes(dtype: str, device_is_gpu: bool = True) -> int:
    if dtype == "auto":
        return 2 if device_is_gpu else 4
    return torch.finfo(DTYPES[dtype]).bits // 8


def layer_activation_bytes(a: Arch) -> int:
    """Saved activations per token of one *trained* decoder layer (bf16 autocast, float32 residual).

    Attention: norm input (fp32, 4d), its bf16 output (2d), q/k/v (2d + 4 kv), rotated q/k
    (2d + 2 kv), attention output (2d); MLP: norm input (4d), its output (2d), gate, up, act(gate)
    and their product (4 x 2I): 18d + 6 kv + 8I bytes.
    """
    return 18 * a.hidden + 6 * a.kv_dim + 8 * a.intermediate


def _cmd(args: list[str]) -> str:
    return " ".join(shlex.quote(x) for x in args)


@dataclass
class Shapes:
    """What the stage estimators read besides the recipe: the models' shapes, the data counts and the launch.

    Attributes:
        t: The teacher.
        s: Where the student's layer shapes come from (the teacher for a truncated student).
        n_layers: The student's decoder layers.
        student_total: The student's parameters.
        shared: The student is a truncation of the teacher (it shares the frozen tensors).
        m: Trained (top) layers.
        trainable: Trained parameters.
        counts: The recipe's data counts.
        gpus: Processes of the training stage (one per GPU).
        grad_accum: Accumulation per process (the config's, divided by ``gpus`` where it divides).
        accum_args: The ``--distill.grad_accum`` flag that keeps the effective batch ([] when none).
        accum_note: What that does to the effective batch (printed).
        config_args: ``--config FILE`` and the user's overrides, repeated in the commands.
        wb: Bytes per weight on a GPU (``model.dtype``; ``auto`` is bfloat16 there).
    """

    t: Arch
    s: Arch
    n_layers: int
    student_total: int
    shared: bool
    m: int
    trainable: int
    counts: DataCounts
    gpus: int
    grad_accum: int
    accum_args: list[str]
    accum_note: list[str]
    config_args: list[str]
    wb: int  # bytes per weight on a GPU (``auto`` is bfloat16 there)

    @property
    def frozen_bottom(self) -> int:
        """Bottom layers a truncated student shares, frozen, with the teacher (0 for an independent student)."""
        return self.n_layers - self.m if self.shared else 0


def shapes(cfg: RunConfig, config_args: list[str], gpus: int = 1, counts: DataCounts | None = None) -> Shapes:
    """Resolve the recipe's models (configurations only, on the meta device), data counts and launch."""
    mc, dc = cfg.model, cfg.distill
    t_conf, t_src = model_config(mc.teacher, mc.trust_remote_code)
    t = architecture(t_conf, t_src)
    if mc.student:
        s = architecture(*model_config(mc.student, mc.trust_remote_code, flag="--model.student"))
        n_layers, student_total, shared, layer_params = s.layers, s.total, False, s.layer_params
    else:
        n_layers = mc.student_layers if mc.student_layers is not None else max(1, t.layers // 2)
        if not 1 <= n_layers <= t.layers:
            raise ConfigError(f"--model.student_layers: must be in [1, {t.layers}] for this teacher (got {n_layers})")
        student_total, shared = t.outside_params + sum(t.layer_params[:n_layers]), True
        layer_params, s = t.layer_params, t
    m = min(mc.trainable_layers, n_layers)
    G, accum_args, note = dc.grad_accum, [], []
    if gpus > 1:
        if G % gpus == 0:
            G = G // gpus
            accum_args = ["--distill.grad_accum", str(G)]
            note.append(f"grad_accum {dc.grad_accum} -> {G} per process keeps the effective batch")
        else:
            note.append(
                f"effective batch becomes {dc.batch_size * G * gpus} (grad_accum {G} x {gpus} processes); "
                f"the config's is {dc.batch_size * dc.grad_accum}"
            )
    sh = Shapes(
        t=t,
        s=s,
        n_layers=n_layers,
        student_total=student_total,
        shared=shared,
        m=m,
        trainable=sum(layer_params[n_layers - m : n_layers]),
        counts=counts or count_data(cfg),
        gpus=gpus,
        grad_accum=G,
        accum_args=accum_args,
        accum_note=note,
        config_args=list(config_args),
        wb=_bytes(mc.dtype),
    )
    return sh


_BASE = ["python", "-m", "dskd"]

# ----------------------------------------------------------------------------- memory / disk parts
# Each is a function of (recipe, shapes); tests/test_plan.py checks each against a built artefact or
# a measured run where one exists.


def store_file_bytes(rows: int, entries: int, spans: int, dim: int, dtype_bytes: int = 2) -> int:
    """Tensor bytes of ``senses.safetensors`` (``dskd.senses.build._write_store``): ``senses`` (rows, d) in the
    store dtype, ``counts`` (rows,) int64, ``offsets`` (entries + 1,) int64, ``spans`` (spans, MAX_SPAN) int64."""
    from dskd.senses.store import MAX_SPAN

    return rows * dim * dtype_bytes + rows * 8 + (entries + 1) * 8 + spans * MAX_SPAN * 8


def sense_store_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """The sense store's senses, at most k per gathered token (``senses.k``; a token seen fewer times keeps
    its raw states), every vocabulary entry or corpus token at most once: an upper bound without the
    composed multi-token spans (the lexicon decides those; each adds <= k rows)."""
    sc = cfg.senses
    rows = min(sh.t.vocab, sc.max_tokens) * sc.k
    return rows * sh.t.hidden * _bytes(sc.store_dtype)


def reservoir_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """Rows the reservoir holds on disk while gathering: <= max_samples per token and <= the tokens read."""
    sc = cfg.senses
    return min(sh.t.vocab * sc.max_samples, sc.max_tokens) * sh.t.hidden * _bytes(sc.store_dtype)


def teacher_cache_position_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """Bytes per position of the teacher cache (``dskd.data.write_cache``): the final states, the KD input
    unless a truncated student recomputes it through the shared head (``distill.cache_kd``), and the state
    entering the first trained layer when the frozen bottom layers are skipped (``distill.cache_prefix``)."""
    dc, d, V = cfg.distill, sh.t.hidden, sh.t.vocab
    per_pos = d * (2 if dc.cache_hidden_dtype == "float16" else 4)
    if not (sh.shared and dc.cache_kd != "logits"):
        per_pos += V * 4 if dc.cache_topk == 0 or dc.cache_topk >= V else dc.cache_topk * 8 + 4
    if _cache_prefix(cfg, sh):
        per_pos += d * sh.wb
    return per_pos


def _cache_prefix(cfg: RunConfig, sh: Shapes) -> int:
    dc = cfg.distill
    return sh.frozen_bottom if dc.cache_prefix == "auto" and dc.teacher_cache else 0


def training_state_bytes(cfg: RunConfig, sh: Shapes) -> dict[str, float]:
    """The trained tensors per process: float32 master weights (``models.keep_float32_master``), their
    float32 gradients and AdamW's two float32 moments (``distill._optimiser``)."""
    n = sh.trainable
    return {
        "student trained weights (float32)": n * 4,
        "gradients (float32)": n * 4,
        "AdamW states (float32)": n * 8,
    }


def ddp_bucket_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """DDP's gradient buckets: ``distill._optimiser`` wraps the student with ``acc.prepare_model`` and no
    ``DistributedDataParallelKwargs``, so torch's Reducer runs with ``gradient_as_bucket_view=False`` and
    keeps a flat float32 copy of every trained gradient in its buckets (one more gradient-sized buffer).
    None with one process (no DDP wrapper)."""
    return sh.trainable * 4.0 if sh.gpus > 1 else 0.0


# Bytes per (target position x vocabulary entry) live at the peak of a KD + CE step over the full vocabulary,
# read off the code of the teacher-online step with the LM head applied at target positions only
# (distill.fit -> teacher_outputs -> micro_batch_loss with head_at_targets -> losses.ce_loss, kd_loss):
#   fit's t_logits (the teacher's (B, T, V), bf16) 2, its target rows (distill._at_targets) 2,
#   the student's logits (models.lm_head_logits: float32) 4, ce_loss's log_softmax output (kept for backward) 4,
#   kd_loss: the masked student copy s 4, log_q 4, the teacher's masked float32 copy t 4, log_p 4,
#   divergence -> _xlogy_diff: p = exp(log_p) (kept by the product) 4, the (p > 0) mask 1,
#   p * (log_p - log_q) 4, zeros_like 4 and torch.where's output 4: 45.
# Measured on the CPU by tests/test_plan.py (a dispatch-mode counter of live tensors over one real
# micro_batch_loss + backward): 45.1. Without head_at_targets the (B, T, V) logits stay bfloat16 and ce_loss's
# float32 copy is freed before kd_loss: 41. A sparse top-k cache keeps only the student's (N, V) tensors
# (logits, ce's log_softmax, s, log_q, the scatter copy of q_rest): 20.
LOGIT_BYTES_FULL = 45
LOGIT_BYTES_TOPK = 20


def logits_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """The KD/CE logits working set of one micro-batch (see ``LOGIT_BYTES_FULL``)."""
    dc, V = cfg.distill, sh.t.vocab
    bt = dc.batch_size * cfg.data.max_length  # every position a target: the upper bound
    sparse = dc.teacher_cache and not sh.shared and 0 < dc.cache_topk < V
    sparse = sparse or (dc.teacher_cache and sh.shared and dc.cache_kd == "logits" and 0 < dc.cache_topk < V)
    return bt * V * (LOGIT_BYTES_TOPK if sparse else LOGIT_BYTES_FULL)


def sense_bank_bytes(cfg: RunConfig, sh: Shapes) -> float:
    """The sense candidates resident on the GPU: ``distill.build_sense_table`` copies, as float16, only the
    store entries of the training targets, of at most ``loss.max_synonyms`` synonyms and
    ``loss.max_antonyms`` antonyms of each, each entry <= k rows: <= min(store, targets x (1 + caps) x k) rows.
    The store file itself stays on disk (memory-mapped)."""
    sc, lc = cfg.senses, cfg.loss
    store_rows = min(sh.t.vocab, sc.max_tokens) * sc.k
    targets = sh.counts.target_tokens_max if sh.counts.target_tokens_max is not None else sh.t.vocab
    rows = min(store_rows, targets * (1 + lc.max_synonyms + lc.max_antonyms) * sc.k)
    return rows * sh.t.hidden * 2


def memo_cap_bytes() -> int:
    """The evaluation's shared-prefix memo cap (``prefix.PrefixMemo``'s ``max_bytes`` default, host memory)."""
    import inspect

    from dskd.prefix import PrefixMemo

    return int(inspect.signature(PrefixMemo.__init__).parameters["max_bytes"].default)


def memo_bytes(cfg: RunConfig, sh: Shapes) -> tuple[float, float]:
    """(host bytes the memo holds, share of the evaluation batches whose shared states it serves): the states
    entering the first trained layer, one (tokens x d) tensor in the evaluation dtype per batch, kept in CPU
    memory until ``memo_cap_bytes`` (``pipeline.shared_prefix_memo``; none for an independent student)."""
    if not sh.frozen_bottom:
        return 0.0, 0.0
    need = sh.counts.eval_tokens * sh.t.hidden * _bytes(cfg.eval.dtype)
    cap = memo_cap_bytes()
    return float(min(need, cap)), (min(1.0, cap / need) if need else 1.0)


# ----------------------------------------------------------------------------- the stages


def senses_stage(cfg: RunConfig, sh: Shapes) -> list[Stage]:
    """Lexicon + sense store: one process, a no-grad teacher forward over the sense corpus."""
    sc, t = cfg.senses, sh.t
    d, V = t.hidden, t.vocab
    gather_tok = sc.batch_size * sc.seq_len
    return [
        Stage(
            name="senses",
            devices=1,
            params_total=t.total,
            params_trainable=0,
            memory={
                "teacher weights": t.total * sh.wb,
                # no-grad forward: logits (bf16) + final states + one layer's working set
                f"activations ({sc.batch_size} x {sc.seq_len} tokens)": gather_tok
                * (2 * V + 2 * 2 * d + 2 * (4 * d + 3 * t.intermediate)),
                "runtime": RUNTIME_BYTES,
            },
            disk={
                "sense store (<= every token x k)": sense_store_bytes(cfg, sh),
                "reservoir while gathering": reservoir_bytes(cfg, sh),
            },
            tokens=sc.max_tokens,
            steps=None,
            flops=2.0 * t.total * sc.max_tokens,
            command=_cmd([*_BASE, "run", *sh.config_args, "--until", "cache"]),
            notes=[
                "the lexicon is built on the CPU first (WordNet + mythes: ~1 min)",
                f"composed multi-token senses add k = {sc.k} rows per synonym/antonym span to the store",
            ],
        )
    ]


def cache_stage(cfg: RunConfig, sh: Shapes) -> list[Stage]:
    """The teacher cache (only when the run trains from it)."""
    if not cfg.distill.teacher_cache:
        return []
    t, positions = sh.t, sh.counts.positions
    cb, T = 4, cfg.data.max_length
    return [
        Stage(
            name="cache",
            devices=1,
            params_total=t.total,
            params_trainable=0,
            memory={
                "teacher weights": t.total * sh.wb,
                f"activations ({cb} x {T} tokens)": cb * T * (2 * t.vocab + 2 * (t.layers + 1) * t.hidden)
                + T * t.vocab * 4,
                "runtime": RUNTIME_BYTES,
            },
            disk={"teacher cache": positions * teacher_cache_position_bytes(cfg, sh)},
            tokens=positions,
            steps=None,
            flops=2.0 * t.total * positions,
            command=_cmd([*_BASE, "cache", "build", *sh.config_args]),
        )
    ]


def _distill_stage(cfg: RunConfig, sh: Shapes, arm: str) -> Stage:
    dc, t, s = cfg.distill, sh.t, sh.s
    lam = cfg.loss.lam if arm == "dskd" else 0.0
    online = not dc.teacher_cache
    T = cfg.data.max_length
    bt = dc.batch_size * T
    micro = math.ceil(sh.counts.sequences / dc.batch_size)
    steps = math.ceil(micro / (sh.grad_accum * sh.gpus)) * dc.epochs
    if dc.max_steps:
        steps = min(steps, dc.max_steps)
    frozen = sh.student_total - sh.trainable
    mem: dict[str, float] = {}
    if online:
        mem["teacher weights"] = t.total * sh.wb
    # a truncated student shares its frozen tensors with an online teacher (dskd.models.build_pair)
    mem["student frozen weights"] = 0.0 if (online and sh.shared) else frozen * sh.wb
    mem.update(training_state_bytes(cfg, sh))
    if sh.gpus > 1:
        mem["DDP gradient buckets (float32)"] = ddp_bucket_bytes(cfg, sh)
    d, m = t.hidden, sh.m
    per_layer = layer_activation_bytes(s)
    act = (m * bt * per_layer) if not dc.grad_checkpointing else (m * bt * 4 * d + bt * per_layer)
    hidden_states = bt * 2 * d * ((t.layers + 1 if online else 0) + sh.n_layers + 1)
    mem[f"activations ({dc.batch_size} x {T} tokens, {m} trained layers)"] = act + hidden_states
    mem[f"logits working set ({dc.batch_size} x {T} x {t.vocab})"] = logits_bytes(cfg, sh)
    if lam > 0:
        bank = sense_bank_bytes(cfg, sh)
        bound = "<= whole store" if bank >= sense_store_bytes(cfg, sh) else "<= targets and their relations x k"
        mem[f"sense candidates ({bound}, float16)"] = bank
    mem["runtime"] = RUNTIME_BYTES
    positions = sh.counts.positions
    tok_train = positions * dc.epochs
    prefix = _cache_prefix(cfg, sh)
    # from the cache's prefix states, the student's frozen bottom layers are not run
    fwd = 2.0 * (sh.student_total - sum(t.layer_params[:prefix]) + (t.total if online else 0))
    bwd = 4.0 * sh.trainable + 2.0 * t.vocab * d  # trained layers (weights + inputs) and the LM head's input gradient
    ckpt = dc.keep_checkpoints * sh.trainable * (4 + 8) + sh.student_total * sh.wb
    eff = dc.batch_size * sh.grad_accum * sh.gpus
    note = [f"{sh.counts.sequences} sequences, effective batch {eff} ({dc.batch_size} x {sh.grad_accum} x {sh.gpus})"]
    note += sh.accum_note
    if online:
        cache = positions * teacher_cache_position_bytes(cfg, sh)
        note.append(
            f"with --distill.teacher_cache true a {_gb(cache)} teacher cache on disk replaces the "
            f"teacher in memory (built once for KD and DSKD)"
        )
    if prefix:
        note.append(
            f"assumes the split below the {prefix} frozen layers is exact (probed on the model when the cache is "
            "built; docs/architectures.md): a refused split (GPT-2, Granite) stores no prefix and runs them at every step"
        )
    note.append(
        "the time is compute at the assumed utilisation; batch-1 steps of short sequences reach less "
        "(gpu_check.py measures the step time)"
    )
    extra = [] if arm == "dskd" else ["--loss.lam", "0"]
    if sh.gpus == 1:
        launch = [*_BASE, "distill", *sh.config_args, *extra]
    else:
        launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(sh.gpus), "-m", "dskd", "distill"]
        launch += [*sh.config_args, *sh.accum_args, *extra]
    launch += ["--out", str(cfg.out_dir / "students" / arm)]
    return Stage(
        name=f"distill:{arm}",
        devices=sh.gpus,
        params_total=sh.student_total + (t.total if online else 0) - (frozen if online and sh.shared else 0),
        params_trainable=sh.trainable,
        memory=mem,
        disk={"checkpoints + exported student": ckpt, **({} if online else {"teacher cache (read)": 0.0})},
        tokens=tok_train,
        steps=steps,
        flops=(fwd + bwd) * tok_train,
        command=_cmd(launch),
        notes=note,
    )


def distill_stages(cfg: RunConfig, sh: Shapes) -> list[Stage]:
    """The DSKD and KD students (DDP over ``gpus``)."""
    return [_distill_stage(cfg, sh, "dskd"), _distill_stage(cfg, sh, "kd")]


def eval_stage(cfg: RunConfig, sh: Shapes) -> list[Stage]:
    """Evaluation of the teacher, the untrained student, KD and DSKD (one process each)."""
    ec, t, c = cfg.eval, sh.t, sh.counts
    d = t.hidden
    eval_T = min(cfg.data.max_length, max(1, c.eval_tokens // max(c.eval_items, 1)) * 2)
    shared_eval = sh.frozen_bottom  # dskd.prefix.PrefixMemo in the main job's evaluation
    memo, served = memo_bytes(cfg, sh)
    # the students share the teacher's frozen bottom layers: computed once, with the teacher, for the batches
    # whose states the memo holds (the rest are recomputed past its cap)
    skipped = served * sum(t.layer_params[:shared_eval])
    note = f"{c.eval_items} items x 4 models (teacher, untrained, KD, DSKD)"
    if shared_eval:
        note += f"; the students run only their layers above the {shared_eval} they share"
        if served < 1:
            note += f" for {served:.0%} of the batches (the memo's {memo_cap_bytes() / 2**30:g} GiB cap)"
    return [
        Stage(
            name="eval",
            devices=1,
            params_total=t.total,
            params_trainable=0,
            memory={
                "model weights (the teacher, the largest)": t.total * _bytes(ec.dtype),
                f"activations ({ec.batch_size} x ~{eval_T} tokens)": ec.batch_size
                * eval_T
                * (2 * (4 * d + 3 * t.intermediate) + 2 * eval_T),
                "runtime": RUNTIME_BYTES,
            },
            host={"shared-prefix memo": memo} if memo else {},
            disk={},
            tokens=c.eval_tokens * 4,
            steps=None,
            flops=2.0 * c.eval_tokens * (t.total + 3 * (sh.student_total - skipped)),
            command=_cmd([*_BASE, "run", *sh.config_args, *sh.accum_args]),
            notes=[note],
        )
    ]


# The plan: each stage's estimator, in the order the recipe runs them.
STAGES: list[Callable[[RunConfig, Shapes], list[Stage]]] = [senses_stage, cache_stage, distill_stages, eval_stage]


def make_plan(
    cfg: RunConfig,
    config_args: list[str],
    gpus: int = 1,
    peak_tflops: float = 989.0,
    mfu: float = 0.35,
    counts: DataCounts | None = None,
) -> dict[str, Any]:
    """Resolve a recipe into per-stage numbers: ``STAGES``' estimators over the recipe's :class:`Shapes`.

    Args:
        cfg: The recipe.
        config_args: ``--config FILE`` and the overrides the user gave, repeated in the commands.
        gpus: GPUs the training stage runs on (DDP through accelerate, one process per GPU).
        peak_tflops: Dense bf16 peak of one GPU (989: H100/H200 SXM), for the time estimates.
        mfu: Share of that peak the stages reach, for the time estimates.
        counts: Data counts (computed from the task files when None).
    """
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1 (got {gpus})")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1] (got {mfu})")
    sh = shapes(cfg, config_args, gpus, counts)
    stages = [st for estimate in STAGES for st in estimate(cfg, sh)]
    peak = peak_tflops * 1e12 * mfu
    return {
        "name": cfg.name,
        "teacher": {
            "spec": cfg.model.teacher,
            **{k: v for k, v in dataclasses.asdict(sh.t).items() if k != "layer_params"},
        },
        "teacher_params": sh.t.total,
        "student": {
            "layers": sh.n_layers,
            "params": sh.student_total,
            "trainable": sh.trainable,
            "trainable_layers": sh.m,
        },
        "gpus": gpus,
        "assumed": {"peak_tflops": peak_tflops, "mfu": mfu},
        "data": dataclasses.asdict(sh.counts),
        "stages": [
            {
                **dataclasses.asdict(st),
                "flops": float(st.flops),
                "memory_total": st.memory_total,
                "hours": st.flops / (peak * st.devices) / 3600,
            }
            for st in stages
        ],
    }


# ----------------------------------------------------------------------------- printing


def _gb(x: float) -> str:
    return f"{x / GB:.2f} GB" if x < 10 * GB else f"{x / GB:.1f} GB"


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def render(plan: dict[str, Any], gpu_memory_gb: float = 80.0) -> str:
    t, s = plan["teacher"], plan["student"]
    a = plan["assumed"]
    lines = [
        f"dskd plan: {plan['name']} (no weights read; teacher shape from {t['source']})",
        f"teacher {t['spec']}: d {t['hidden']}, {t['layers']} layers, {t['heads']} heads / {t['kv_heads']} kv, "
        f"intermediate {t['intermediate']}, vocab {t['vocab']:,}, {'tied' if t['tied'] else 'untied'} head; "
        f"{_count(plan['teacher_params'])} parameters",
        f"student: first {s['layers']} layers, {_count(s['params'])} parameters, {_count(s['trainable'])} trained "
        f"(top {s['trainable_layers']})",
        f"data: {plan['data']['sequences']:,} training sequences, {plan['data']['positions']:,} tokens per epoch; "
        f"{plan['data']['eval_items']:,} evaluation items"
        + ("" if plan["data"]["exact"] else " (tokens estimated at 4 characters each: tokenizer not on this machine)"),
        f"assumed: {plan['gpus']} GPU(s) for training, {gpu_memory_gb:g} GB each; times at {a['peak_tflops']:g} "
        f"TFLOP/s x {a['mfu']:.0%} utilisation (estimates; benchmarks/gpu_check.py measures)",
    ]
    for st in plan["stages"]:
        fits = "" if st["memory_total"] <= gpu_memory_gb * GB else f"  !! over {gpu_memory_gb:g} GB"
        lines += [
            "",
            f"[{st['name']}] {st['devices']} GPU(s); parameters {_count(st['params_total'])} in memory, "
            f"{_count(st['params_trainable'])} trained",
            f"  memory per GPU ~{_gb(st['memory_total'])}{fits}: "
            + ", ".join(f"{k} {_gb(v)}" for k, v in st["memory"].items()),
        ]
        if st.get("host"):
            lines.append("  host memory: " + ", ".join(f"{k} {_gb(v)}" for k, v in st["host"].items()))
        if st["disk"]:
            lines.append("  disk: " + ", ".join(f"{k} {_gb(v)}" for k, v in st["disk"].items()))
        steps = f", optimiser steps {st['steps']:,}" if st["steps"] is not None else ""
        hours = st["hours"]
        when = f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.1f} h"
        lines.append(f"  tokens {st['tokens']:,}{steps}; compute {st['flops']:.2e} FLOP, ~{when}")
        lines += [f"  note: {n}" for n in st["notes"]]
        lines.append(f"  run: {st['command']}")
    return "\n".join(lines)


def plan_command(
    cfg: RunConfig,
    gpus: int = 1,
    gpu_memory: float = 80.0,
    peak_tflops: float = 989.0,
    mfu: float = 0.35,
    as_json: bool = False,
    recipe_argv: list[str] | None = None,
) -> dict[str, Any]:
    """Resolve a recipe without loading weights and print, per stage: devices, parameters, a per-GPU
    memory estimate with its parts, disk, tokens, optimiser steps, a time estimate and the command.

    Example: dskd plan --config configs/llama3-8b-instruct_to_16l.yaml --gpus 3

    Args:
        cfg: The recipe.
        gpus: GPUs the training stage uses (one process each).
        gpu_memory: GB per GPU; stages over it are flagged.
        peak_tflops: Dense bf16 TFLOP/s of one GPU (H100/H200).
        mfu: Share of the peak assumed for the time estimates.
        as_json: Print the plan as JSON.
        recipe_argv: The flags that set the recipe (``--config`` and dotted flags), repeated in the
            printed commands.
    """
    plan = make_plan(cfg, list(recipe_argv or []), gpus, peak_tflops, mfu)
    if as_json:
        print(json.dumps(plan, indent=1))
    else:
        print(render(plan, gpu_memory))
    sys.stdout.flush()
    return plan


__all__ = ["KNOWN_ARCHITECTURES", "architecture", "count_data", "make_plan", "model_config", "render"]
