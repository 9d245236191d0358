"""``dskd plan``: what a recipe will cost, per stage, before any weight is loaded.

The plan reads the teacher's *configuration* only: a local folder's ``config.json``, a hub id in the
local Hugging Face cache, or the architecture numbers shipped below for the paper's teachers
(Llama-3-8B-Instruct, Mistral-7B-Instruct v0.1 / v0.2 / v0.3) and the packaged SmolLM2. The model is
instantiated on the ``meta`` device, so parameter counts are exact for any architecture and nothing
is allocated. Training prompts are rendered from the task files and counted with the tokenizer
when it is on this machine, else estimated at 4 characters per token.

Per stage it gives: the devices assumed, parameters (total / trainable), a per-GPU memory estimate
with its parts, disk, tokens, optimiser steps, a time estimate from FLOPs at an assumed throughput,
and the command that runs the stage. Memory and time are *estimates* (formulas below, with their
assumptions); ``benchmarks/gpu_check.py`` measures the real numbers on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
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
# Working copies of (positions x vocabulary) tensors in the KD/CE step: student and teacher logits
# in bf16 (2 + 2 bytes) and four float32 tensors (student log-probs, teacher probs at T, the
# gradient of the logits, one temporary): 20 bytes per position and vocabulary entry.
LOGIT_BYTES_PER_ENTRY = 20


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
    for prompt in D.task_prompts(cfg.data, tok):
        n = len(tok(prompt, add_special_tokens=not dc.chat)["input_ids"])
        lengths.append(min(n, dc.max_length - dc.continuation_tokens) + dc.continuation_tokens)
    lengths += [len(w) for w in D.text_windows(cfg.data, tok)]
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
    return DataCounts(len(lengths), sum(lengths), items, tokens, exact)


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


def make_plan(
    cfg: RunConfig,
    config_args: list[str],
    gpus: int = 1,
    peak_tflops: float = 989.0,
    mfu: float = 0.35,
    counts: DataCounts | None = None,
) -> dict[str, Any]:
    """Resolve a recipe into per-stage numbers (see the module docstring).

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
    mc, sc, dc, lc = cfg.model, cfg.senses, cfg.distill, cfg.loss
    t_conf, t_src = model_config(mc.teacher, mc.trust_remote_code)
    t = architecture(t_conf, t_src)
    if mc.student:
        s_conf, s_src = model_config(mc.student, mc.trust_remote_code, flag="--model.student")
        s = architecture(s_conf, s_src)
        n_layers, student_total, shared = s.layers, s.total, False
        layer_params = s.layer_params
    else:
        n_layers = mc.student_layers if mc.student_layers is not None else max(1, t.layers // 2)
        if not 1 <= n_layers <= t.layers:
            raise ConfigError(f"--model.student_layers: must be in [1, {t.layers}] for this teacher (got {n_layers})")
        student_total, shared = t.outside_params + sum(t.layer_params[:n_layers]), True
        layer_params, s = t.layer_params, t
    m = min(mc.trainable_layers, n_layers)
    trainable = sum(layer_params[n_layers - m : n_layers])
    wb = _bytes(mc.dtype)  # weights on a GPU: auto is bfloat16 there
    counts = counts or count_data(cfg)
    d, V = t.hidden, t.vocab
    peak = peak_tflops * 1e12 * mfu
    base = ["python", "-m", "dskd"]
    stages: list[Stage] = []

    # --- lexicon + senses (one process)
    store_b = 2  # float16 / bfloat16
    stored_tokens = min(V, sc.max_tokens)
    reservoir_rows = min(V * sc.max_samples, sc.max_tokens)
    gather_tok = sc.batch_size * sc.seq_len
    stages.append(
        Stage(
            name="senses",
            devices=1,
            params_total=t.total,
            params_trainable=0,
            memory={
                "teacher weights": t.total * wb,
                # no-grad forward: logits (bf16) + final states + one layer's working set
                f"activations ({sc.batch_size} x {sc.seq_len} tokens)": gather_tok
                * (2 * V + 2 * 2 * d + 2 * (4 * d + 3 * t.intermediate)),
                "runtime": RUNTIME_BYTES,
            },
            disk={
                "sense store (<= every token x k)": stored_tokens * sc.k * d * store_b,
                "reservoir while gathering": reservoir_rows * d * store_b,
            },
            tokens=sc.max_tokens,
            steps=None,
            flops=2.0 * t.total * sc.max_tokens,
            command=_cmd([*base, "run", *config_args, "--until", "cache"]),
            notes=[
                "the lexicon is built on the CPU first (WordNet + mythes: ~1 min)",
                f"composed multi-token senses add k = {sc.k} rows per synonym/antonym span to the store",
            ],
        )
    )

    # --- teacher cache (only when the run trains from it)
    positions = counts.positions
    per_pos = d * (2 if dc.cache_hidden_dtype == "float16" else 4)
    # a truncated student shares the teacher's head (KD recomputes the logits: none are stored) and its
    # frozen bottom layers (the state entering the first trained one is stored: distill.cache_prefix)
    frozen_bottom = n_layers - m if shared else 0
    if not (shared and dc.cache_kd != "logits"):
        per_pos += V * 4 if dc.cache_topk == 0 or dc.cache_topk >= V else dc.cache_topk * 8 + 4
    prefix = frozen_bottom if dc.cache_prefix == "auto" and dc.teacher_cache else 0
    if prefix:
        per_pos += d * wb
    if dc.teacher_cache:
        cb, T = 4, cfg.data.max_length
        stages.append(
            Stage(
                name="cache",
                devices=1,
                params_total=t.total,
                params_trainable=0,
                memory={
                    "teacher weights": t.total * wb,
                    f"activations ({cb} x {T} tokens)": cb * T * (2 * V + 2 * (t.layers + 1) * d) + T * V * 4,
                    "runtime": RUNTIME_BYTES,
                },
                disk={"teacher cache": positions * per_pos},
                tokens=positions,
                steps=None,
                flops=2.0 * t.total * positions,
                command=_cmd([*base, "cache", "build", *config_args]),
            )
        )

    # --- distillation (DDP over gpus)
    G = dc.grad_accum
    accum_args: list[str] = []
    note = []
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
    eff = dc.batch_size * G * gpus
    micro = math.ceil(counts.sequences / dc.batch_size)
    steps = math.ceil(micro / (G * gpus)) * dc.epochs
    if dc.max_steps:
        steps = min(steps, dc.max_steps)
    T = cfg.data.max_length
    bt = dc.batch_size * T
    online = not dc.teacher_cache
    mem: dict[str, float] = {}
    if online:
        mem["teacher weights"] = t.total * wb
    frozen = student_total - trainable
    # a truncated student shares its frozen tensors with an online teacher (dskd.models.build_pair)
    mem["student frozen weights"] = 0.0 if (online and shared) else frozen * wb
    mem["student trained weights (float32)"] = trainable * 4
    mem["gradients (float32)"] = trainable * 4
    mem["AdamW states (float32)"] = trainable * 8
    per_layer = layer_activation_bytes(s)
    act = (m * bt * per_layer) if not dc.grad_checkpointing else (m * bt * 4 * d + bt * per_layer)
    hidden_states = bt * 2 * d * ((t.layers + 1 if online else 0) + n_layers + 1)
    mem[f"activations ({dc.batch_size} x {T} tokens, {m} trained layers)"] = act + hidden_states
    mem[f"logits ({dc.batch_size} x {T} x {V})"] = bt * V * LOGIT_BYTES_PER_ENTRY
    if lc.lam > 0:
        mem["sense bank (<= whole store, float16)"] = stored_tokens * sc.k * d * 2
    mem["runtime"] = RUNTIME_BYTES
    tok_train = positions * dc.epochs
    # from the cache's prefix states, the student's frozen bottom layers are not run
    fwd = 2.0 * (student_total - sum(t.layer_params[:prefix]) + (t.total if online else 0))
    bwd = 4.0 * trainable + 2.0 * V * d  # trained layers (weights + inputs) and the LM head's input gradient
    ckpt = dc.keep_checkpoints * trainable * (4 + 8) + student_total * wb
    steps_note = f"{counts.sequences} sequences, effective batch {eff} ({dc.batch_size} x {G} x {gpus})"
    if online:
        note.append(
            f"with --distill.teacher_cache true a {_gb(positions * per_pos)} teacher cache on disk replaces the "
            f"teacher in memory (built once for KD and DSKD)"
        )
    for arm, lam in (("dskd", None), ("kd", "0")):
        extra = ["--loss.lam", lam] if lam else []
        if gpus == 1:
            launch = [*base, "distill", *config_args, *extra]
        else:
            launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(gpus), "-m", "dskd", "distill"]
            launch += [*config_args, *accum_args, *extra]
        launch += ["--out", str(cfg.out_dir / "students" / arm)]
        stages.append(
            Stage(
                name=f"distill:{arm}",
                devices=gpus,
                params_total=student_total + (t.total if online else 0) - (frozen if online and shared else 0),
                params_trainable=trainable,
                memory=dict(mem) if arm == "dskd" else {k: v for k, v in mem.items() if not k.startswith("sense")},
                disk={"checkpoints + exported student": ckpt, **({} if online else {"teacher cache (read)": 0.0})},
                tokens=tok_train,
                steps=steps,
                flops=(fwd + bwd) * tok_train,
                command=_cmd(launch),
                notes=[steps_note, *note],
            )
        )

    # --- evaluation: teacher, untrained student, KD, DSKD (one process each)
    ec = cfg.eval
    eb = _bytes(ec.dtype)
    eval_T = min(T, max(1, counts.eval_tokens // max(counts.eval_items, 1)) * 2)
    shared_eval = frozen_bottom  # dskd.prefix.PrefixMemo in the main job's evaluation
    stages.append(
        Stage(
            name="eval",
            devices=1,
            params_total=t.total,
            params_trainable=0,
            memory={
                "model weights (the teacher, the largest)": t.total * eb,
                f"activations ({ec.batch_size} x ~{eval_T} tokens)": ec.batch_size
                * eval_T
                * (2 * (4 * d + 3 * t.intermediate) + 2 * eval_T),
                "runtime": RUNTIME_BYTES,
            },
            disk={},
            tokens=counts.eval_tokens * 4,
            steps=None,
            # the students share the teacher's frozen bottom layers: computed once, with the teacher
            flops=2.0 * counts.eval_tokens * (t.total + 3 * (student_total - sum(t.layer_params[:shared_eval]))),
            command=_cmd([*base, "run", *config_args, *accum_args]),
            notes=[
                f"{counts.eval_items} items x 4 models (teacher, untrained, KD, DSKD)"
                + (f"; the students run only their layers above the {shared_eval} they share" if shared_eval else "")
            ],
        )
    )
    for st in stages:
        st.flops = float(st.flops)
        if st.name.startswith("distill"):
            st.notes.append(
                "the time is compute at the assumed utilisation; batch-1 steps of short sequences reach less "
                "(gpu_check.py measures the step time)"
            )
    return {
        "name": cfg.name,
        "teacher": {"spec": mc.teacher, **{k: v for k, v in dataclasses.asdict(t).items() if k != "layer_params"}},
        "teacher_params": t.total,
        "student": {"layers": n_layers, "params": student_total, "trainable": trainable, "trainable_layers": m},
        "gpus": gpus,
        "assumed": {"peak_tflops": peak_tflops, "mfu": mfu},
        "data": dataclasses.asdict(counts),
        "stages": [
            {
                **dataclasses.asdict(st),
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
