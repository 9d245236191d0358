"""KD and DSKD training: :func:`setup` -> :func:`fit` (the one loop; its body is in one place) -> :func:`export`.

``distill(cfg, out)`` trains the student of ``cfg.model`` on the data of ``cfg.data`` with the loss of
``cfg.loss`` and writes a run folder::

    config.yaml            the resolved config
    data/recipe.json       the training-set recipe (and data/dataset.safetensors without a cache)
    metrics.jsonl          one line per logged optimiser step: every loss term, sense diagnostics,
                           lr, grad norm, tokens/s (:mod:`dskd.run_metrics`)
    checkpoints/step-N/    trainable weights, optimiser, scheduler, RNG states, data position
    checkpoints/latest     name of the newest complete checkpoint (:mod:`dskd.checkpoint`)
    student/               the final student, a plain Hugging Face folder, with a README.md model card
    tracking/              the tracker's files (``distill.report_to tensorboard``)
    meta.json              fingerprints, sense-table info, counts, timing, complete: true (last)

One optimiser step is one *window* of ``grad_accum x processes`` micro-batches of the epoch's seeded
permutation. Every loss is a sum over the window's positions divided by the window's real token count
(and the sense loss by its number of sampled terms), counted from the data before any forward pass, so
the step's gradient does not depend on how the window is cut into micro-batches or processes. The
window index fully determines the data position; the sense positions of a sequence are drawn from a
generator seeded by (seed, epoch, sequence) (:func:`dskd.sense_targets.window_plans`), so resume and
re-batching see the same positions.

This module holds the loop; what it is built from lives beside it: the Accelerator (:mod:`dskd.accelerator`),
the sense table and its calibrations (:mod:`dskd.sense_targets`), the checkpoint format and the resume
checks (:mod:`dskd.checkpoint`), the metrics file (:mod:`dskd.run_metrics`), the losses (:mod:`dskd.losses`).

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
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dskd import accelerator
from dskd import data as D
from dskd.checkpoint import (
    check_resume_config,
    check_resume_window,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from dskd.config import ConfigError, LossConfig, RunConfig, dump_yaml, to_dict
from dskd.io import Artefact, is_built, sidecar, write_sidecar
from dskd.losses import (
    IGNORE_INDEX,
    SenseTable,
    SparseTeacher,
    aux_and_main,
    ce_loss,
    combine,
    grad_comparison,
    hidden_loss,
    kd_loss,
    sense_loss,
)
from dskd.models import lm_head_logits
from dskd.prefix import layer_range
from dskd.run_metrics import (
    SENSE_STATS,
    TERMS,
    append_record,
    diagnostics_summary,
    logged_values,
    sense_summary,
    step_record,
    truncate_metrics,
)
from dskd.sense_targets import (
    build_sense_table,
    open_sense_sources,
    report_sense_targets,
    resolve_margin,
    sense_dirs,
    sense_floor,
    source_info,
    teacher_state_variance,
    teacher_states,
    variance_scale,
    window_plans,
)

RUN_FORMAT = {"name": "dskd-run", "version": 1}
RUN_ARTEFACT = Artefact(RUN_FORMAT["name"], RUN_FORMAT["version"], "distillation run", "dskd distill", ConfigError)


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
    from dskd.devices import check_required_accelerator

    t_start = time.time()
    check_required_accelerator(cfg.model.require_accelerator)
    accelerator.check_tracker(cfg.distill.report_to)
    use_sense = cfg.loss.lam > 0
    if use_sense and (store is None or lexicon is None):
        lexicon_dir, senses_dir = sense_dirs(cfg.distill, lexicon_dir, senses_dir)
    if is_built(out, RUN_ARTEFACT):
        if resume:
            return None  # finished already
        raise ConfigError(f"--out: {out} already holds a finished run; pick another --out")
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise ConfigError(f"--out: {out} holds checkpoints of an unfinished run; pass --resume or pick another --out")
    if ckpt is not None:
        check_resume_config(out, cfg, ckpt)
    acc = _start(cfg, out)
    run = _models_and_data(cfg, out, acc, cache_dir)
    run.t_start = t_start
    if use_sense:
        if store is None or lexicon is None:
            store, lexicon = open_sense_sources(
                lexicon_dir, senses_dir, run.pair.tokenizer, run.pair.teacher_fingerprint
            )
        _sense_targets(run, store, lexicon, ckpt)
    _optimiser(run)
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _start(cfg: RunConfig, out: Path):
    """The run's Accelerator (:func:`dskd.accelerator.make_accelerator`), the seed, ``config.yaml`` and the trackers."""
    from accelerate import Accelerator

    acc = accelerator.make_accelerator(Accelerator, cfg, out)
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
        acc.init_trackers(cfg.name, config=accelerator.tracker_config(cfg))  # on the main process only
    return acc


def _sense_targets(run: Training, store, lexicon, ckpt: Path | None) -> None:
    """The sense table of the training targets, the sense scale (``loss.sense_scale: variance``), the margin
    (``loss.margin_mode: antonym_quantile``: the resumed checkpoint's, else calibrated) and the sense floor
    (:mod:`dskd.sense_targets`), set on ``run``."""
    cfg, acc = run.cfg, run.acc
    targets = sorted({int(t) for s in run.data.seqs for t in s[1:].tolist()})
    run.table = build_sense_table(store, lexicon, targets, cfg.loss, cfg.distill.seed).to(acc.device)
    states = teacher_states(run.cache, run.teacher, acc)
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
        saved = read_state(ckpt).get("margin") if ckpt is not None else None
        resolve_margin(run.table, cfg.loss, run.data, states, saved, acc, cfg.distill.seed, run.pad_id, run.scale)
    run.floor = sense_floor(run.data, run.table, cfg.loss, cfg.distill.seed, run.pad_id, states, run.scale)
    run.table.info["sense_floor"] = run.floor
    if acc.is_main_process:
        report_sense_targets(run.table, run.data, run.floor, store)
    run.sources = {"store": source_info(store), "lexicon": source_info(lexicon), "table": run.table.info}


def _restore(run: Training, ckpt: Path) -> None:
    """Continue from ``ckpt``: its window is checked, its weights, optimiser, scheduler and RNG restored, the
    position, counts and a grad_share lambda taken over, and metric lines after it dropped."""
    check_resume_window(ckpt, run.acc.num_processes, run.cfg.distill.grad_accum, run.total)
    st = load_checkpoint(ckpt, run.model, run.opt, run.sched, run.acc)
    run.start, run.tokens_seen, run.elapsed = st["step"], st["tokens"], st["seconds"]
    if st.get("sense_lam"):
        run.lam, run.lam_info = float(st["sense_lam"]["lam"]), st["sense_lam"]
    if run.acc.is_main_process:
        truncate_metrics(run.out / "metrics.jsonl", run.start)


def _models_and_data(cfg: RunConfig, out: Path, acc, cache_dir) -> Training:
    """Teacher and student on this process's device, the training set, and the teacher cache."""
    from dskd.models import build_pair, check_rope_length, head_at_targets_ok, num_layers, tokenizer_fingerprint

    dc = cfg.distill
    pair = build_pair(cfg.model, device=acc.device)
    for m in (pair.teacher, pair.student):  # the cache and the prefix split batch sequences differently
        check_rope_length(m, cfg.data.max_length, "--data.max_length", "training sequences")
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
    amp = accelerator.autocast_dtype(dc.precision, run.weights_dtype)
    if accelerator.accelerate_precision(amp) != acc.mixed_precision:  # the Accelerator was built from the same rule
        raise ConfigError(
            f"--model.dtype: the weights came out {run.weights_dtype} on {acc.device}, but the Accelerator was "
            f"built for mixed precision {acc.mixed_precision!r}; set --model.dtype explicitly"
        )
    accelerator.log_distill_placement(acc, run.weights_dtype, n_master, amp, run.cache is not None)
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


def cosine_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ----------------------------------------------------------------------------- fit


@dataclass
class _Window:
    """One optimiser step's data: the window's micro-batches and the counts every loss is normalised by."""

    step: int
    epoch: int
    index: int  # the window's index in its epoch
    mine: list[list[int] | None]  # this process's micro-batches (None: a dummy for a short last window)
    plans: dict[int, Any]  # sense positions of the window's sequences (:func:`dskd.sense_targets.window_plans`)
    n_tok: float  # real target positions of the whole window (all processes)
    n_terms: float  # sense terms of the whole window
    diag_j: int  # the micro-batch of the gradient diagnostic: this process's first with sense terms


def fit(run: Training, stop_after: int | None = None, progress: bool = True) -> bool:
    """The training loop from ``run.start``; True when it reached the last step (False: ``stop_after``).

    Each optimiser step: the window and its counts (:func:`_window`), forward and backward of this process's
    micro-batches (:func:`_accumulate`), the clipped optimiser and schedule step (:func:`_optimizer_step`),
    the metrics line (:func:`_record`, :func:`_show_and_log`) and, every ``save_every`` steps and at the
    end, a checkpoint (:func:`_save`).
    """
    from tqdm import tqdm

    dc, lc, acc = run.cfg.distill, run.cfg.loss, run.acc
    if run.lam is not None:  # grad_share: the lambda set (and checkpointed) after the warm-up
        lc = dataclasses.replace(lc, lam=run.lam)
    share_step = int(dc.warmup_frac * run.total) if lc.sense_scale == "grad_share" and run.cfg.loss.lam > 0 else None
    bar = tqdm(total=run.total, initial=run.start, desc="distill", disable=not (progress and acc.is_main_process))
    batches: list[list[int]] = []
    batches_epoch = -1
    for step in range(run.start, run.total):
        t0 = time.time()
        epoch = step // run.steps_per_epoch
        if epoch != batches_epoch:
            batches, batches_epoch = D.epoch_batches(len(run.data), dc.batch_size, dc.seed, epoch), epoch
        win = _window(run, batches, step, lc)
        logging = (step + 1) % dc.log_every == 0 or step + 1 == run.total
        set_lam = share_step is not None and run.lam is None and step >= share_step
        lc, logged, diag = _accumulate(run, win, lc, logging, set_lam)
        grad_norm, lr = _optimizer_step(run)
        if acc.num_processes > 1:
            logged = acc.reduce(logged, reduction="sum")
        dt = time.time() - t0
        run.elapsed += dt
        run.tokens_seen += int(win.n_tok)
        done = step + 1
        rec = _record(run, win, logged, lr, grad_norm, dt, diag, lc.lam if share_step is not None else None)
        _show_and_log(run, bar, rec, done)
        if (dc.save_every and done % dc.save_every == 0) or done == run.total:
            _save(run, done, win.epoch, win.index)
        if stop_after is not None and done >= stop_after and done < run.total:
            bar.close()
            return False
    bar.close()
    return True


def _window(run: Training, batches: list[list[int]], step: int, lc: LossConfig) -> _Window:
    """Step ``step``'s window of the epoch's micro-batches ``batches``, its counts from the data alone (each
    process computes them identically) and this process's share of it."""
    dc, W = run.cfg.distill, run.acc.num_processes
    epoch, index = divmod(step, run.steps_per_epoch)
    per_window = dc.grad_accum * W
    win = batches[index * per_window : (index + 1) * per_window]
    n_tok = float(run.data.num_targets(i for mb in win for i in mb))
    plans = {}
    if run.cfg.loss.lam > 0:
        plans = window_plans(run.data, [i for mb in win for i in mb], run.table, lc, dc.seed, epoch, run.pad_id)
    n_terms = float(sum(p.n_terms for p in plans.values()))
    mine = win[run.acc.process_index :: W]
    diag_j = next(
        (j for j, mb in enumerate(mine) if mb is not None and sum(plans[i].n_terms for i in mb if i in plans)), 0
    )
    if not mine:  # a short last window: this process still joins the gradient all-reduce
        mine = [None]  # type: ignore[list-item]
    return _Window(step, epoch, index, mine, plans, n_tok, n_terms, diag_j)


def _accumulate(
    run: Training, win: _Window, lc: LossConfig, logging: bool, set_lam: bool
) -> tuple[LossConfig, torch.Tensor, dict[str, float]]:
    """Forward and backward of this process's micro-batches of ``win``, the gradients accumulated (synced
    over processes at the last one).

    On the diagnostic's micro-batch, at a logged step of a run with a sense or hidden loss (main process) or
    when ``set_lam`` (grad_share), the auxiliary and main gradients are compared on a copy of the gradients
    (``.grad``, the step and the RNG untouched); ``set_lam`` then sets lambda from the comparison.

    Returns:
        (the loss config, with a lambda set here; the summed :func:`dskd.run_metrics.logged_values`; the
        diagnostic, empty unless logged by this process)
    """
    acc, model, W = run.acc, run.model, run.acc.num_processes
    use_aux = run.cfg.loss.lam > 0 or (lc.hidden != "none" and lc.hidden_weight > 0)
    logged = torch.zeros(len(TERMS) + len(SENSE_STATS), device=acc.device)
    diag: dict[str, float] = {}
    for j, mb in enumerate(win.mine):
        last = j == len(win.mine) - 1
        sync = contextlib.nullcontext() if last or W == 1 else acc.no_sync(model)
        with sync:
            if mb is None:
                dummy = torch.tensor([[run.pad_id, run.pad_id]], device=acc.device)
                (model(input_ids=dummy).logits.float().sum() * 0.0).backward()
                continue
            loss, terms, sstats = _micro_batch(run, win, mb, lc)
            if j == win.diag_j and (set_lam or (logging and use_aux and run.diagnose and acc.is_main_process)):
                # on a copy of the gradients (torch.autograd.grad): .grad, the step and the RNG are untouched
                diag = grad_comparison(*aux_and_main(terms, lc), run.params)
                if set_lam:
                    lc, loss = _set_grad_share_lam(run, lc, terms, diag, win.step, W)
                    set_lam = False
                    if not logging or not acc.is_main_process:
                        diag = {}
            # DDP averages gradients over processes; the loss is already normalised by the global count.
            # Not acc.backward: it divides by gradient_accumulation_steps, which the counts already hold
            # (there is no loss scaler: float16 autocast is refused in dskd.accelerator.make_accelerator)
            (loss * W).backward()
            terms["loss"] = loss
            logged += logged_values(terms, sstats, acc.device)
    return lc, logged, diag


def _micro_batch(run: Training, win: _Window, mb: list[int], lc: LossConfig):
    """The teacher's outputs and :func:`micro_batch_loss` of the micro-batch of sequences ``mb``."""
    acc = run.acc
    batch = {k: v.to(acc.device) for k, v in D.collate([run.data.seqs[i] for i in mb], run.pad_id).items()}
    V = run.pair.vocab_size
    t_logits, t_h = teacher_outputs(run.teacher, run.cache, mb, batch, V, run.autocast, run.head, run.head_at_targets)
    mb_plans = [win.plans[i] for i in mb if i in win.plans]
    prefix = None
    if run.prefix:  # the frozen bottom layers' output, from the cache
        prefix = (run.prefix, run.cache.prefix(mb, batch["labels"].shape[1]).to(acc.device))
    return micro_batch_loss(
        run.model,
        batch,
        t_logits,
        t_h,
        lc,
        V,
        win.n_tok,
        win.n_terms,
        mb_plans,
        run.table,
        run.autocast,
        prefix,
        run.head_at_targets,
        run.scale,
    )


def _optimizer_step(run: Training) -> tuple[torch.Tensor, float]:
    """Clip the gradients (``distill.max_grad_norm``; 0: measure only), step the optimiser and the schedule;
    returns (the gradient norm, the step's learning rate)."""
    dc = run.cfg.distill
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, dc.max_grad_norm if dc.max_grad_norm > 0 else float("inf"))
    lr = run.sched.get_last_lr()[0]
    run.opt.step()
    run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    return grad_norm, lr


def _record(
    run: Training, win: _Window, logged, lr: float, grad_norm, dt: float, diag: dict[str, float], lam: float | None
) -> dict[str, Any]:
    """The metrics line of the step of ``win`` (:func:`dskd.run_metrics.step_record`), with the sense loss
    above its floor, the gradient diagnostic when measured and lambda (``lam``, grad_share runs)."""
    use_sense = run.cfg.loss.lam > 0
    rec = step_record(logged, use_sense, win.step + 1, win.epoch, lr, grad_norm, win.n_tok, dt, run.elapsed)
    if use_sense and run.floor.get("floor") is not None:
        rec["sense_above_floor"] = rec["sense"] - run.floor["floor"]
    if diag:
        rec.update({k: diag[k] for k in ("aux_grad_ratio", "aux_grad_cos")})
    if lam is not None:
        rec["lam"] = lam
    return rec


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


def _show_and_log(run: Training, bar, rec: dict[str, Any], done: int) -> None:
    """Progress bar postfix, and the metrics line every ``log_every`` steps and at the end."""
    use_sense = run.cfg.loss.lam > 0
    bar.update(1)
    shown = ("loss", "ce", "kd", "sense", "hinge_active_share") if use_sense else ("loss", "ce", "kd")
    bar.set_postfix({k: f"{rec[k]:.3g}" for k in shown} | {"tok/s": f"{rec['tokens_per_s']:.0f}"})
    if run.acc.is_main_process and (done % run.cfg.distill.log_every == 0 or done == run.total):
        clean = append_record(run.out / "metrics.jsonl", rec)
        if run.cfg.distill.report_to != "none":
            run.acc.log({k: v for k, v in clean.items() if isinstance(v, int | float) and v is not None}, step=done)


def _save(run: Training, done: int, epoch: int, window: int) -> None:
    """A checkpoint after ``done`` steps (:func:`dskd.checkpoint.save_checkpoint`), with what a resume needs
    beside the weights: the data position, counts, the window, the margin and a grad_share lambda."""
    state = {
        "epoch": epoch,
        "window": window,
        "tokens": run.tokens_seen,
        "seconds": run.elapsed,
        "total_steps": run.total,
        # the optimiser step's window: a resume must keep processes x grad_accum (check_resume_window)
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


# ----------------------------------------------------------------------------- one micro-batch


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


def _to(sp, device):
    return SparseTeacher(ids=sp.ids.to(device), logp=sp.logp.to(device), rest_logp=sp.rest_logp.to(device))


# ----------------------------------------------------------------------------- export


def export(run: Training) -> Path:
    """The student as a plain Hugging Face folder (loadable without dskd), its model card, then the run's
    sidecar (``meta.json``, which marks the run complete)."""
    acc, out = run.acc, run.out
    acc.wait_for_everyone()
    if acc.is_main_process:
        _save_student(run)
        meta = _run_meta(run)
        from dskd.card import render
        from dskd.io import write_text_atomic

        # the model card (README.md, Hub front matter) before the sidecar that marks the run complete
        write_text_atomic(out / "student" / "README.md", render(meta, out / "metrics.jsonl"))
        write_sidecar(out, meta)
    acc.wait_for_everyone()
    return out


def _save_student(run: Training) -> None:
    """``<out>/student``: the trained student in its weights' dtype and the tokenizer (temp name + rename)."""
    out = run.out
    final = run.acc.unwrap_model(run.model)
    if run.cfg.distill.grad_checkpointing:
        final.gradient_checkpointing_disable()
    final.config.use_cache = True
    final.to(run.weights_dtype)  # the master weights go back to the model's dtype for export
    final.eval()
    tmp = out / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    final.save_pretrained(tmp)
    run.pair.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out / "student", ignore_errors=True)
    os.replace(tmp, out / "student")


def _run_meta(run: Training) -> dict[str, Any]:
    """The run's sidecar: fingerprints, config, data, teacher cache, senses, summaries of the logged steps, counts."""
    cfg, pair, data, cache, table, acc = run.cfg, run.pair, run.data, run.cache, run.table, run.acc
    metrics = run.out / "metrics.jsonl"
    return sidecar(
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
        sense_summary=sense_summary(metrics, table.margin) if table is not None else None,
        diagnostics=diagnostics_summary(metrics, run.floor),
        sense_scale={"mode": cfg.loss.sense_scale, **run.lam_info} if table is not None else None,
        processes=acc.num_processes,
        steps=run.total,
        tokens=run.tokens_seen,
        train_seconds=round(run.elapsed, 2),
        wall_seconds=round(time.time() - run.t_start, 2),
        loss=asdict(cfg.loss),
    )


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


__all__ = [
    "IGNORE_INDEX",
    "Training",
    "distill",
    "distill_command",
    "export",
    "fit",
    "micro_batch_loss",
    "setup",
    "teacher_outputs",
]
