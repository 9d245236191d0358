"""Typed configuration for every stage, with validation that names the offending flag.

Each stage owns one dataclass. Field names follow the paper's symbols where it has one
(``k``, ``kappa``, ``lam``, ``T``, ``alpha``, ``margin``). Every dataclass validates itself on
creation (``__post_init__``) and raises :class:`ConfigError` with the dotted flag name, so a bad
value is reported before any long work starts, whether it came from YAML or from the command line.
Before that, a value read from YAML is checked against its field's type annotation (:func:`check_value`:
bool, int, float, str, Path, Literal choices, Optional/unions, lists, tuples, dicts), as the flag parser
checks a flag, so a new field is typed with no new code.

The top-level :class:`RunConfig` groups the stage configs; YAML files in ``configs/`` are instances
of it, and dotted CLI overrides (``--distill.lr 3e-4``) address its fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The errors live in dskd.errors, below dskd.io (which raises them); re-exported here, their usual spelling.
from dskd.errors import ConfigError as ConfigError
from dskd.errors import DskdError as DskdError

DEFAULT_TEACHER = "smollm2-135m-instruct"  # the packaged default (dskd assets exports it); one spelling


def _check(cond: bool, flag: str, msg: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"--{flag}: {msg} (got {value!r})", flag=flag)


# ---- types: a recipe value is checked against its field's annotation, as the flag parser checks a flag ----
_UNION_TYPES = (typing.Union, types.UnionType)


def describe_type(hint: Any) -> str:
    """Words for what a field of type ``hint`` takes (``a float``, ``an integer or null``, ``one of a, b``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "null"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a float"
    if hint is str:
        return "a string"
    if hint is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in _UNION_TYPES:
        return " or ".join(describe_type(a) for a in args)
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        inner = describe_type(args[0]) if args and args[0] is not Ellipsis else "values"
        return f"a list of {_plural(inner)}"
    if origin is dict or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "a mapping of options"
    return getattr(hint, "__name__", str(hint))


def _plural(words: str) -> str:
    for one, many in (("an integer", "integers"), ("a float", "floats"), ("a string", "strings"), ("a path", "paths")):
        words = words.replace(one, many)
    return words


class _Wrong(Exception):
    """A value that does not fit its type (internal: :func:`check_value` turns it into a ConfigError)."""


def _fit(value: Any, hint: Any) -> Any:
    """``value`` as a value of ``hint`` (an int where a float goes becomes a float, a float in a string
    a float, as on the command line); raises :class:`_Wrong` when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Wrong
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _fit(value, arm)
            except _Wrong:
                continue
        raise _Wrong
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Wrong
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Wrong
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Wrong
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string; the flag parser takes it
            try:
                return float(value)
            except ValueError:
                raise _Wrong from None
        raise _Wrong
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Wrong
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Wrong
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Wrong
        if not args:
            return list(value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Wrong
            return tuple(_fit(v, a) for v, a in zip(value, args, strict=True))
        items = [_fit(v, args[0]) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Wrong
        if not args:
            return dict(value)
        return {_fit(k, args[0]): _fit(v, args[1]) for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Wrong
    return value  # a typing construct this checker does not know: left to the dataclass


def check_value(value: Any, hint: Any, flag: str) -> Any:
    """``value`` checked against the type ``hint`` of the field ``flag`` (dotted, without dashes), as the
    flag parser checks a flag: a mismatch is one line, ``--distill.lr: expected a float, got 'abc'``.

    Returns:
        The value, with an int given for a float made a float (and a float written as a string parsed).
    """
    try:
        return _fit(value, hint)
    except _Wrong:
        raise ConfigError(f"--{flag}: expected {describe_type(hint)}, got {value!r}", flag=flag) from None


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of each field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    _check(value in choices, flag, f"must be one of {', '.join(choices)}", value)


@dataclass
class ModelConfig:
    """Teacher and student.

    Args:
        teacher: Teacher model: a hub id, a local folder, or the alias ``smollm2-135m-instruct``.
        student: An independent student (same tokenizer as the teacher). When unset, the student is
            the teacher truncated to its first ``student_layers`` decoder layers.
        student_layers: N, the number of teacher decoder layers the truncated student keeps
            (default: half of the teacher's layers).
        trainable_layers: M, the number of top student decoder layers that are trained; all other
            parameters are frozen.
        dtype: Weights dtype: ``auto`` (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or
            float16. Trainable layers keep float32 master weights whatever this is.
        device: Where the teacher and student run (``cache build``, ``distill``): ``auto`` (the
            accelerator when there is one), ``cpu``, ``cuda``; under ``accelerate launch`` each
            process takes its own GPU.
        trust_remote_code: Allow model code from the hub (off unless you ask).
        require_accelerator: Refuse to start (one line, before any work) when torch sees no accelerator
            (CUDA or MPS), or when ``accelerate`` would train on the CPU: a recipe sized for GPUs never
            runs on the CPU behind the user's back (a broken driver, a CPU-only torch).
    """

    teacher: str = DEFAULT_TEACHER
    student: str | None = None
    student_layers: int | None = None
    trainable_layers: int = 2
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    require_accelerator: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.teacher), "model.teacher", "must be a model spec", self.teacher)
        if self.student_layers is not None:
            _check(self.student_layers >= 1, "model.student_layers", "must be >= 1", self.student_layers)
        _check(self.trainable_layers >= 0, "model.trainable_layers", "must be >= 0", self.trainable_layers)
        if self.student_layers is not None:
            _check(
                self.trainable_layers <= self.student_layers,
                "model.trainable_layers",
                f"must be <= model.student_layers ({self.student_layers})",
                self.trainable_layers,
            )
        _choice(self.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
        _check(bool(self.device), "model.device", "must be auto, cpu or a torch device", self.device)


@dataclass
class LexiconConfig:
    """Lexical relations.

    Args:
        sources: Lexical sources: ``wordnet``, ``mythes``, ``kaikki:FILE``, ``pairs:FILE:syn|ant``.
        normalize_negation: Replace words with an odd number of negating affixes by their base and
            flip the relation (syn(sad, unhappy) -> ant(sad, happy)).
        max_tail_tokens: Synonyms/antonyms longer than this many tokens are dropped.
        min_head_chars: Head words shorter than this are dropped.
        max_malformed_share: Fail when more than this share of a file's lines is malformed.
        near_synonyms: Also count WordNet's adjective similar-to / also-see links (mythes'
            "(similar term)" and adjective "(related term)") as synonyms, not only shared synsets.
    """

    sources: list[str] = field(default_factory=lambda: ["wordnet", "mythes"])
    normalize_negation: bool = True
    max_tail_tokens: int = 3
    min_head_chars: int = 3
    max_malformed_share: float = 0.01
    near_synonyms: bool = True

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "lexicon.sources", "needs at least one source", self.sources)
        _check(1 <= self.max_tail_tokens <= 8, "lexicon.max_tail_tokens", "must be in [1, 8]", self.max_tail_tokens)
        _check(self.min_head_chars >= 1, "lexicon.min_head_chars", "must be >= 1", self.min_head_chars)
        _check(
            0.0 <= self.max_malformed_share <= 1.0,
            "lexicon.max_malformed_share",
            "must be in [0, 1]",
            self.max_malformed_share,
        )


@dataclass
class SenseConfig:
    """Sense dictionary.

    Args:
        corpus: Corpora: text files, folders or globs of .txt/.jsonl files, or ``default``; in ``dskd run``
            also ``prompts``: the recipe's training prompts as the students see them (``<out>/prompts.jsonl``).
        k: Senses (k-means centroids) per token.
        max_samples: Per-token reservoir sample cap.
        key: File each state under the teacher's ``predicted`` next token or the ``actual`` one.
        max_tokens: Stop gathering after this many corpus tokens.
        seq_len: Sequence length of gathering batches.
        batch_size: Sequences per gathering batch.
        seed: Seed for the reservoir and k-means.
        kmeans_iters: Lloyd iterations of k-means (it stops earlier when no assignment changes).
        kmeans_init: k-means++ seedings per token; the lowest-inertia run is kept.
        store_dtype: Dtype of the stored sense matrix: float16 or bfloat16.
        checkpoint_every: Gathering batches between progress checkpoints (0: none, no resume).
        keep_samples: Also keep the gathered samples in the store folder (samples.safetensors).
        device: Where the teacher, the reservoir and k-means run: auto (the accelerator when there is
            one), cpu, cuda or cuda:N (under several processes, ``cuda`` is each process's own GPU).
        dtype: Weights dtype of the teacher: auto (bfloat16 on an accelerator, float32 on the CPU),
            float32, bfloat16 or float16 (states are gathered in float32).
        sample_dtype: Dtype of the gathered sample rows on disk: auto (float32 on the CPU, the store
            dtype on an accelerator), float32, bfloat16 or float16.
        block_chars: Cut the corpus into blocks of about this many bytes of a file (this / 4000
            documents of a dataset), taken round-robin over corpora and processes, each read only by
            its process: the store is then the same for any number of processes (when no token
            reaches max_samples). 0: one stream (one process only). Unset: 0 for one process,
            65536 for several.
    """

    corpus: list[str] = field(default_factory=lambda: ["default"])
    k: int = 5
    max_samples: int = 2000
    key: str = "predicted"
    max_tokens: int = 200_000
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    kmeans_iters: int = 25
    kmeans_init: int = 1
    store_dtype: str = "float16"
    checkpoint_every: int = 20
    keep_samples: bool = False
    device: str = "auto"
    dtype: str = "auto"
    sample_dtype: str = "auto"
    block_chars: int | None = None

    def __post_init__(self) -> None:
        _check(len(self.corpus) > 0, "senses.corpus", "needs at least one corpus", self.corpus)
        _check(self.k >= 1, "senses.k", "must be >= 1", self.k)
        _check(self.max_samples >= self.k, "senses.max_samples", f"must be >= senses.k ({self.k})", self.max_samples)
        _choice(self.key, ("predicted", "actual"), "senses.key")
        _check(self.max_tokens >= 1, "senses.max_tokens", "must be >= 1", self.max_tokens)
        _check(self.seq_len >= 2, "senses.seq_len", "must be >= 2", self.seq_len)
        _check(self.batch_size >= 1, "senses.batch_size", "must be >= 1", self.batch_size)
        _check(self.kmeans_iters >= 1, "senses.kmeans_iters", "must be >= 1", self.kmeans_iters)
        _check(self.kmeans_init >= 1, "senses.kmeans_init", "must be >= 1", self.kmeans_init)
        _choice(self.store_dtype, ("float16", "bfloat16"), "senses.store_dtype")
        _check(self.checkpoint_every >= 0, "senses.checkpoint_every", "must be >= 0", self.checkpoint_every)
        _choice(self.dtype, ("auto", "float32", "bfloat16", "float16"), "senses.dtype")
        _choice(self.sample_dtype, ("auto", "float32", "bfloat16", "float16"), "senses.sample_dtype")
        _check(
            self.block_chars is None or self.block_chars >= 0, "senses.block_chars", "must be >= 0", self.block_chars
        )


@dataclass
class LossConfig:
    """Loss terms: L = ce_weight * CE + alpha * T^2 * D(teacher || student) + lam * L_sense + hidden_weight * L_hidden.

    Args:
        divergence: KD divergence: forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tv.
        T: Softmax temperature of the KD term.
        alpha: Weight of the KD term.
        ce_weight: Weight of the next-token cross-entropy term.
        beta: Interpolation of the generalised JSD (0 -> forward KL limit, 1 -> reverse KL limit).
        skew: Skew of the skew KL divergences.
        lam: lambda, weight of the sense loss; 0 gives the KD baseline.
        kappa: Candidates of each set kept, nearest (L2) to the teacher state.
        margin: The antonym hinge margin m in MSE units with margin_mode ``absolute`` (the paper: 1.0);
            a multiplier with ``state_median``; unused with ``antonym_quantile``.
        margin_mode: How m is set. ``antonym_quantile`` (default): m is the ``margin_quantile``
            quantile of MSE(antonym sense, teacher state) over the antonym terms the loss will use
            (the kappa antonym senses nearest the teacher's state at the sampled related positions)
            of the first ``margin_calibration_seqs`` training sequences, so at the teacher's own
            states that share of antonym terms is inside the margin. ``absolute``: m = margin.
            ``state_median``: m = margin x the store's ``distance.median_mse``, the median MSE
            between the teacher's last states at two random positions of the sense corpus (not a
            distance between senses; ``relative`` is the old name).
        margin_quantile: The quantile of ``antonym_quantile`` (in (0, 1)).
        margin_calibration_seqs: Training sequences (in the first epoch's order) whose antonym
            terms calibrate ``antonym_quantile``; more are read while fewer than 100 terms are found.
        positive_margin: beta_p: synonyms within this MSE are not pulled further.
        positive_margin_mode: ``absolute`` (default, the paper's): beta_p = positive_margin.
            ``teacher``: beta_p = MSE(p, h^t_i) + positive_margin per kept positive p, so the pull stops
            once the student's state is as close to the sense as the teacher's own state is (the loss at
            the teacher's states, the floor, has no positive part).
        max_synonyms: Cap on sampled synonyms per position.
        max_antonyms: Cap on sampled antonyms per position.
        min_positions: Lower bound of the number of related positions sampled per sequence.
        position_frac: Share of related positions sampled per sequence.
        self_sense: Add the self-sense pull at as many positions sampled from all positions.
        use_synonyms: Include synonyms' senses in the positive set.
        use_antonyms: Include antonyms' senses in the negative set.
        reference_antonyms: Reproduce the reference code: append y's own senses to the antonyms.
        hidden: Direct hidden-state loss between student and teacher last states: none, mse, cosine.
        hidden_weight: Weight of the direct hidden-state loss.
        sense_scale: How the sense loss is scaled. ``none`` (default, the paper's): plain MSE weighted by
            lam. ``variance``: every MSE of the sense loss (and its margins) divides each dimension's
            squared difference by the per-dimension variance of the teacher's last hidden states (measured
            at the target positions of the first ``margin_calibration_seqs`` training sequences), so a few
            high-variance dimensions no longer set the loss (an ``absolute`` margin is in these units; the
            ``antonym_quantile`` one is calibrated in them). ``grad_share``: lam is set once, at the first
            step after the learning-rate warm-up, so that the lam-weighted sense gradient's norm is
            ``sense_share`` times the KD + CE gradient's (measured on that step's first micro-batch;
            loss.lam weighs the warm-up steps), then frozen (recorded in meta.json). The share holds at that
            step only: on the 24-layer demo recipe a 0.3 share set lam = 7.9 at step 8, the ratio then rose
            to ~1.3 on average as KD's gradient shrank, and accuracy fell to the untrained truncation's
            (results/smollm2-135m_to_24l/sense_study.md); watch ``aux_grad_ratio`` in metrics.jsonl.
        sense_share: The share of ``grad_share``: ||lam * grad sense|| / ||grad (KD + CE)|| at the step
            lam is set (in (0, 10]).
    """

    divergence: str = "forward_kl"
    T: float = 2.0
    alpha: float = 0.7
    ce_weight: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    lam: float = 1.0
    kappa: int = 5
    margin: float = 1.0
    margin_mode: str = "antonym_quantile"
    margin_quantile: float = 0.25
    margin_calibration_seqs: int = 32
    positive_margin: float = 0.0
    positive_margin_mode: Literal["absolute", "teacher"] = "absolute"
    max_synonyms: int = 25
    max_antonyms: int = 25
    min_positions: int = 25
    position_frac: float = 0.4
    self_sense: bool = True
    use_synonyms: bool = True
    use_antonyms: bool = True
    reference_antonyms: bool = False
    hidden: str = "none"
    hidden_weight: float = 0.0
    sense_scale: Literal["none", "variance", "grad_share"] = "none"
    sense_share: float = 0.3

    def __post_init__(self) -> None:
        _choice(
            self.divergence,
            ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"),
            "loss.divergence",
        )
        _check(self.T > 0, "loss.T", "must be > 0", self.T)
        _check(self.alpha >= 0, "loss.alpha", "must be >= 0", self.alpha)
        _check(self.ce_weight >= 0, "loss.ce_weight", "must be >= 0", self.ce_weight)
        _check(0.0 <= self.beta <= 1.0, "loss.beta", "must be in [0, 1]", self.beta)
        _check(0.0 <= self.skew <= 1.0, "loss.skew", "must be in [0, 1]", self.skew)
        _check(self.lam >= 0, "loss.lam", "must be >= 0", self.lam)
        _check(self.kappa >= 1, "loss.kappa", "must be >= 1", self.kappa)
        _check(self.margin >= 0, "loss.margin", "must be >= 0", self.margin)
        if self.margin_mode == "relative":  # the old name of state_median
            self.margin_mode = "state_median"
        _choice(self.margin_mode, ("antonym_quantile", "absolute", "state_median"), "loss.margin_mode")
        _check(0.0 < self.margin_quantile < 1.0, "loss.margin_quantile", "must be in (0, 1)", self.margin_quantile)
        _check(
            self.margin_calibration_seqs >= 1,
            "loss.margin_calibration_seqs",
            "must be >= 1",
            self.margin_calibration_seqs,
        )
        _check(self.positive_margin >= 0, "loss.positive_margin", "must be >= 0", self.positive_margin)
        _check(self.max_synonyms >= 0, "loss.max_synonyms", "must be >= 0", self.max_synonyms)
        _check(self.max_antonyms >= 0, "loss.max_antonyms", "must be >= 0", self.max_antonyms)
        _check(self.min_positions >= 0, "loss.min_positions", "must be >= 0", self.min_positions)
        _check(0.0 <= self.position_frac <= 1.0, "loss.position_frac", "must be in [0, 1]", self.position_frac)
        _choice(self.hidden, ("none", "mse", "cosine"), "loss.hidden")
        _check(self.hidden_weight >= 0, "loss.hidden_weight", "must be >= 0", self.hidden_weight)
        _choice(self.positive_margin_mode, ("absolute", "teacher"), "loss.positive_margin_mode")
        _choice(self.sense_scale, ("none", "variance", "grad_share"), "loss.sense_scale")
        _check(0.0 < self.sense_share <= 10.0, "loss.sense_share", "must be in (0, 10]", self.sense_share)
        _check(
            not (self.sense_scale == "variance" and self.margin_mode == "state_median"),
            "loss.margin_mode",
            "state_median is in unscaled MSE units; with loss.sense_scale variance use antonym_quantile or absolute",
            self.margin_mode,
        )
        if self.sense_scale == "grad_share":
            _check(
                self.lam > 0,
                "loss.lam",
                "must be > 0 with loss.sense_scale grad_share (it weighs the warm-up)",
                self.lam,
            )
            _check(
                self.hidden == "none" or self.hidden_weight == 0,
                "loss.sense_scale",
                "grad_share measures the sense gradient alone: set loss.hidden none",
                self.sense_scale,
            )


@dataclass
class DataConfig:
    """Distillation data.

    Args:
        tasks: Tasks whose training items (see ``dskd eval --list_tasks`` and the split protocol) make prompts.
        shots: Few-shot exemplars per prompt.
        sample_frac: Share of each task's training items used.
        max_items: Cap on prompts per task (0: no cap).
        chat: Wrap prompts in the tokenizer's chat template.
        style: ``letter``: lettered-choice prompts ending where the answer letter goes (the paper's
            prompts); ``cloze``: the question as log-likelihood scoring asks it (``Question: ...
            Answer:``, exemplars solved with their answer text), so the teacher's continuation is a
            free-text answer. Gold labels appear only in the exemplars, in both styles.
        continuation_tokens: Tokens of greedy teacher continuation appended to each prompt.
        text_files: Plain text files used as extra training sequences.
        datasets: Training data of your own, each cut into windows of ``max_length`` tokens (every token a
            target, like ``text_files``): a ``.jsonl`` file, a ``save_to_disk`` folder or a hub id
            (``id[:config][@split]``, split ``train`` by default) whose rows hold ``messages`` (a chat:
            rendered with the model's own chat template), ``prompt`` and ``completion`` (through the chat
            template as a user and an assistant turn when ``chat``, else joined) or ``text``.
        max_length: Prompts are truncated from the left to this many tokens.
        seed: Seed for sampling items and exemplars.
    """

    tasks: list[str] = field(default_factory=lambda: ["arc_challenge", "arc_easy", "mmlu", "csqa", "piqa"])
    shots: int = 5
    sample_frac: float = 1.0
    max_items: int = 0
    chat: bool = True
    style: str = "letter"
    continuation_tokens: int = 1
    text_files: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    max_length: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.shots >= 0, "data.shots", "must be >= 0", self.shots)
        _check(0.0 < self.sample_frac <= 1.0, "data.sample_frac", "must be in (0, 1]", self.sample_frac)
        _check(self.max_items >= 0, "data.max_items", "must be >= 0", self.max_items)
        _check(self.style in ("letter", "cloze"), "data.style", "must be letter or cloze", self.style)
        _check(self.continuation_tokens >= 0, "data.continuation_tokens", "must be >= 0", self.continuation_tokens)
        _check(self.max_length >= 8, "data.max_length", "must be >= 8", self.max_length)
        _check(
            bool(self.tasks) or bool(self.text_files) or bool(self.datasets),
            "data.tasks",
            "needs tasks, data.text_files or data.datasets",
            self.tasks,
        )


@dataclass
class TrainConfig:
    """Optimisation.

    Args:
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_frac: Share of optimiser steps spent in linear warm-up before the cosine decay.
        epochs: Passes over the training data.
        max_steps: Stop after this many optimiser steps (0: no cap).
        batch_size: Sequences per micro-batch per process.
        grad_accum: Micro-batches per optimiser step.
        max_grad_norm: Gradient clipping norm (0: off).
        precision: fp32 or bf16 autocast.
        grad_checkpointing: Recompute activations in the backward pass to save memory.
        teacher_cache: Use (and build if missing) the teacher cache instead of running the teacher online.
        cache_kd: What the cache keeps for KD. ``auto``: when the student shares the teacher's frozen
            LM head (every truncated student; checked on the weights and on a probe forward), no logits:
            the teacher's full-vocabulary logits are recomputed from the cached last hidden state
            through that head, so cached KD is exact; otherwise logits as ``cache_topk`` says.
            ``head``: require the shared head (error otherwise). ``logits``: always store logits.
        cache_topk: Teacher logits kept per position when the cache stores logits (0: the full
            vocabulary). With fewer than the vocabulary, KD compares the top-k tokens plus one bucket
            for the remaining mass (the tail is kept, not renormalised; the run prints its mean).
        cache_hidden_dtype: Dtype of the cached teacher hidden states: float16 or float32.
        cache_prefix: ``auto``: when the student's bottom layers are the teacher's, frozen and equal bit
            for bit (a truncated student trained in its top layers), the cache also keeps the teacher's
            state entering the first trained layer, and training runs only the layers from there (the
            same result, less compute: the frozen layers are computed once, in the cache pass). Costs
            d values per position of cache space in the model's dtype. ``off``: the whole student runs.
        cache_dir: Teacher cache folder (default: ``<out>/../teacher_cache/<key>``, shared by the runs
            of one folder, e.g. KD and DSKD).
        lexicon_dir: Lexicon folder (``dskd lexicon build``); needed when loss.lam > 0.
        senses_dir: Sense store folder (``dskd senses build``); needed when loss.lam > 0.
        keep_checkpoints: Checkpoints kept in ``<out>/checkpoints`` (the newest ones).
        seed: Seed of initialisation-free randomness (data order, position sampling).
        log_every: Optimiser steps between metric lines.
        save_every: Optimiser steps between checkpoints (0: only at the end).
        timeout_minutes: Timeout of the process group under several processes (accelerate's
            ``InitProcessGroupKwargs``): how long a process waits at a collective (e.g. while process 0
            builds the teacher cache) before the launch fails.
        report_to: Experiment tracker fed through accelerate's trackers with every metrics line
            (``none``, ``tensorboard``: event files in ``<out>/tracking``, ``wandb``, ``mlflow``).
    """

    lr: float = 1.5e-4
    weight_decay: float = 1e-3
    warmup_frac: float = 0.1
    epochs: int = 2
    max_steps: int = 0
    batch_size: int = 1
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    teacher_cache: bool = True
    cache_kd: str = "auto"
    cache_topk: int = 64
    cache_hidden_dtype: str = "float16"
    cache_prefix: str = "auto"
    cache_dir: str | None = None
    lexicon_dir: str | None = None
    senses_dir: str | None = None
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 5
    save_every: int = 50
    timeout_minutes: int = 180
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = "none"

    def __post_init__(self) -> None:
        _check(self.lr > 0, "distill.lr", "must be > 0", self.lr)
        _check(self.weight_decay >= 0, "distill.weight_decay", "must be >= 0", self.weight_decay)
        _check(0.0 <= self.warmup_frac < 1.0, "distill.warmup_frac", "must be in [0, 1)", self.warmup_frac)
        _check(self.epochs >= 1, "distill.epochs", "must be >= 1", self.epochs)
        _check(self.max_steps >= 0, "distill.max_steps", "must be >= 0", self.max_steps)
        _check(self.batch_size >= 1, "distill.batch_size", "must be >= 1", self.batch_size)
        _check(self.grad_accum >= 1, "distill.grad_accum", "must be >= 1", self.grad_accum)
        _check(self.max_grad_norm >= 0, "distill.max_grad_norm", "must be >= 0", self.max_grad_norm)
        _choice(self.precision, ("fp32", "bf16"), "distill.precision")
        _choice(self.cache_kd, ("auto", "head", "logits"), "distill.cache_kd")
        _check(self.cache_topk >= 0, "distill.cache_topk", "must be >= 0", self.cache_topk)
        _choice(self.cache_hidden_dtype, ("float16", "float32"), "distill.cache_hidden_dtype")
        _choice(self.cache_prefix, ("auto", "off"), "distill.cache_prefix")
        _check(self.keep_checkpoints >= 1, "distill.keep_checkpoints", "must be >= 1", self.keep_checkpoints)
        _check(self.log_every >= 1, "distill.log_every", "must be >= 1", self.log_every)
        _check(self.save_every >= 0, "distill.save_every", "must be >= 0", self.save_every)
        _check(self.timeout_minutes >= 1, "distill.timeout_minutes", "must be >= 1", self.timeout_minutes)
        _choice(self.report_to, ("none", "tensorboard", "wandb", "mlflow"), "distill.report_to")


@dataclass
class EvalConfig:
    """Evaluation.

    Args:
        tasks: Tasks to evaluate (``dskd eval --list_tasks``).
        shots: Few-shot exemplars per question.
        chat: Wrap prompts in the tokenizer's chat template.
        scoring: ``loglik`` (per-choice log-likelihood, acc and acc_norm), ``letter`` (log-likelihood
            of the answer letters) or ``generate`` (greedy generation: the parsed answer letter, or
            exact match and token F1 for extractive QA; see ``docs/evaluation.md``).
        limit: Evaluate at most this many items per task (0: all). Per subject for MMLU, except under
            a preset, where it caps every task and MMLU spreads it evenly over its subjects.
        batch_size: Questions per forward pass (each packed with all its choices).
        bootstrap: Bootstrap resamples for standard errors (0: none).
        seed: Seed for exemplars and the bootstrap.
        dtype: Weights dtype: ``auto`` (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16
            or float16.
        device: ``auto`` (the accelerator when there is one), ``cpu``, ``cuda``, ``cuda:1`` ...
        data: ``TASK=DATASET`` entries reading a task from a Hugging Face dataset id (``id[:config]``)
            or a ``save_to_disk`` folder instead of the packaged files.
        preset: A named protocol that fixes tasks, shots, chat and scoring per task (``paper``: the
            paper's evaluation); empty: use ``tasks``/``shots``/``chat``/``scoring``.
        max_new_tokens: Generation budget of ``generate`` scoring (default: 8 tokens for multiple
            choice, 50 for extractive QA).
        stop: Stop sequences of ``generate`` scoring (default: a newline); the end-of-sequence token
            always stops.
        paper_limit: ``dskd run`` also evaluates every model with the paper preset on at most this
            many items per task (0: the full preset; -1: skip it).
    """

    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge"])
    shots: int = 0
    chat: bool = False
    scoring: str = "loglik"
    limit: int = 0
    batch_size: int = 8
    bootstrap: int = 1000
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    data: list[str] = field(default_factory=list)
    preset: str = ""
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    paper_limit: int = 20

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "eval.tasks", "needs at least one task", self.tasks)
        _check(self.shots >= 0, "eval.shots", "must be >= 0", self.shots)
        _choice(self.scoring, ("loglik", "letter", "generate"), "eval.scoring")
        _check(self.preset in ("", "paper"), "eval.preset", "unknown preset; known: paper (empty: none)", self.preset)
        if self.max_new_tokens is not None:
            _check(
                self.max_new_tokens >= 1,
                "eval.max_new_tokens",
                "the generation budget must be >= 1",
                self.max_new_tokens,
            )
        if self.stop is not None:
            _check(all(self.stop), "eval.stop", "stop sequences must be non-empty strings", self.stop)
        _check(self.paper_limit >= -1, "eval.paper_limit", "must be >= 0 (0: all items) or -1 (skip)", self.paper_limit)
        _check(self.limit >= 0, "eval.limit", "must be >= 0", self.limit)
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)
        _check(self.bootstrap >= 0, "eval.bootstrap", "must be >= 0", self.bootstrap)
        _choice(self.dtype, ("auto", "float32", "bfloat16", "float16"), "eval.dtype")
        _check(bool(self.device), "eval.device", "must be auto, cpu or a torch device", self.device)
        for entry in self.data:
            _check("=" in entry, "eval.data", "entries must be TASK=DATASET", entry)


@dataclass
class FidelityConfig:
    """Held-out fidelity of students to the teacher (``dskd fidelity``, the main job's ``fidelity`` stage).

    Args:
        text_tasks: Tasks whose evaluation questions, as raw text, form the held-out text.
        prompt_tasks: Tasks whose evaluation items, as prompts built like the training prompts
            (``data.style``, ``data.chat``), form the held-out prompts (empty: the run's ``eval.tasks``).
        text_limit: Questions per text task (0: all).
        prompt_limit: Prompts per prompt task (0: all).
        shots: Exemplars per held-out prompt, from training items (None: ``data.shots``).
        max_length: Sequences are cut from the left to this many tokens.
        batch_tokens: Tokens per forward batch (padding included).
        bootstrap: Bootstrap resamples over documents / items for errors and paired intervals.
        seed: Seed of exemplars and the bootstrap.
        probe: Run the sense probe (needs a sense store and a lexicon).
    """

    text_tasks: list[str] = field(default_factory=lambda: ["arc_easy"])
    prompt_tasks: list[str] = field(default_factory=list)
    text_limit: int = 150
    prompt_limit: int = 15
    shots: int | None = None
    max_length: int = 512
    batch_tokens: int = 2048
    bootstrap: int = 1000
    seed: int = 0
    probe: bool = True

    def __post_init__(self) -> None:
        _check(self.text_limit >= 0, "fidelity.text_limit", "must be >= 0", self.text_limit)
        _check(self.prompt_limit >= 0, "fidelity.prompt_limit", "must be >= 0", self.prompt_limit)
        if self.shots is not None:
            _check(self.shots >= 0, "fidelity.shots", "must be >= 0", self.shots)
        _check(self.max_length >= 8, "fidelity.max_length", "must be >= 8", self.max_length)
        _check(self.batch_tokens >= 8, "fidelity.batch_tokens", "must be >= 8", self.batch_tokens)
        _check(self.bootstrap >= 0, "fidelity.bootstrap", "must be >= 0", self.bootstrap)


@dataclass
class RunConfig:
    """A whole recipe: what ``dskd run`` and ``dskd distill`` read from YAML.

    Args:
        name: Name of the recipe; the default output folder is ``runs/<name>``.
        out: Output folder (default ``runs/<name>``).
        model: Teacher and student.
        lexicon: Lexical relations.
        senses: Sense dictionary.
        data: Distillation data.
        loss: Loss terms.
        distill: Optimisation.
        eval: Evaluation.
        fidelity: Held-out fidelity to the teacher and the sense probe.
    """

    name: str = "run"
    out: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    lexicon: LexiconConfig = field(default_factory=LexiconConfig)
    senses: SenseConfig = field(default_factory=SenseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "must be non-empty", self.name)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.name


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"--{prefix or 'config'}: expected a mapping of options, got {data!r}", flag=prefix or None)
    names = field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        flag = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"--{flag}: unknown option; valid: {', '.join(sorted(names))}", flag=flag)
        sub = names[key]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            kwargs[key] = value if isinstance(value, sub) else _build(sub, {} if value is None else value, flag)
        else:
            kwargs[key] = check_value(value, sub, flag)
    return cls(**kwargs)


def from_dict(data: dict[str, Any], cls: type = RunConfig, prefix: str = "") -> Any:
    """Build and validate a config dataclass from a nested dict (unknown keys are refused); ``prefix``
    is the dotted flag of the section when ``cls`` is one (``senses``)."""
    return _build(cls, data, prefix)


def load_yaml_dict(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe, not yet validated; a missing, empty, unparsable or non-mapping file
    is one line naming ``--config`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--config: {'a folder, not a recipe file' if path.is_dir() else 'file not found'}: {path}", flag="config"
        )
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config: {path} is not a text (YAML) file ({e.reason} at byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {' '.join(str(e).split())}") from e
    if data is None:
        raise ConfigError(f"--config: {path} is empty (a recipe is a mapping of sections, see configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_yaml(path: str | Path, cls: type = RunConfig) -> Any:
    """Load and validate a YAML recipe; errors name the file."""
    path = Path(path)
    data = load_yaml_dict(path)
    try:
        return from_dict(data, cls)
    except ConfigError as e:
        raise ConfigError(f"{e} [in {path}]") from e


# Fields added to a section after recipes and run folders were saved, with the value that behaves as dskd did
# before the field existed: a saved config without the field is compared as if it held that value.
ADDED_FIELDS: dict[str, Any] = {
    "model.require_accelerator": False,
    "data.datasets": [],
    "distill.timeout_minutes": 180,
    "distill.report_to": "none",
}


def config_diff(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ("out",)) -> list[str]:
    """The dotted fields (``loss.lam``; a whole top-level key when it is not a section) whose values
    differ between two config dicts (``to_dict`` / a saved ``config.yaml``), ``ignore`` left out. A field
    of :data:`ADDED_FIELDS` missing on one side counts as its recorded value."""
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        if key in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            a, b = a or {}, b or {}
            added = {f.split(".", 1)[1]: v for f, v in ADDED_FIELDS.items() if f.startswith(f"{key}.")}
            diffs += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k, added.get(k)) != b.get(k, added.get(k))]
        elif a != b:
            diffs.append(key)
    return diffs


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write a config as YAML (atomically)."""
    from dskd.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
