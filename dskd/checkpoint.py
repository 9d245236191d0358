"""The checkpoints of a training run (``<run>/checkpoints``): format, atomic writes, restore, resume checks.

Layout::

    checkpoints/step-N/trainable.safetensors    the trainable weights (float32 master weights)
    checkpoints/step-N/optimizer.safetensors    the optimiser's tensors (AdamW moments), keyed "<param>.<name>"
    checkpoints/step-N/optimizer.json           its param groups and scalar state
    checkpoints/step-N/scheduler.json           the LR scheduler's state dict
    checkpoints/step-N/rng-<process>.safetensors  each process's torch CPU (and CUDA) RNG state
    checkpoints/step-N/state.json               step, data position, tokens, seconds, the window
                                                (processes x grad_accum), total steps, a calibrated margin
                                                and a grad_share lambda
    checkpoints/latest                          the name of the newest complete checkpoint

A checkpoint is built in ``.tmp-step-N`` and renamed, then ``latest`` is replaced (temp name + rename): a
kill leaves the old or the new pointer, never a half-written checkpoint.

Why not accelerate's ``Accelerator.save_state`` / ``load_state`` (checked against accelerate 1.16, where the
optimiser and scheduler do go through ``prepare``):

- it writes the optimiser, the scheduler and the RNG states with ``torch.save`` (``optimizer.bin``,
  ``scheduler.bin``, ``random_states_<i>.pkl``): pickle, which dskd keeps out of every file it reads back
  (a restricted ``weights_only`` unpickler is still an unpickler reading a run folder that may have been
  copied from elsewhere); safetensors + JSON need none;
- ``load_state`` swallows any error reading the RNG file (``"Could not load random states"`` at info
  level) and goes on: a resume that is not exact instead of a refusal (here only the file of a process the
  checkpointed launch did not have is skipped, 1 -> 2 processes; a missing or broken one stops the resume);
- it saves the whole student (frozen layers too), not only the trainable weights, and checks nothing
  about which parameters are trainable (here a changed ``model.trainable_layers`` is refused in one line);
- it writes into its folder in place (no temp name + rename) and keeps no ``latest`` pointer, so the
  atomicity and the rotation above would stay dskd's anyway.

What it would add (python ``random`` and numpy RNG states) the loop does not use: the data order and the
sense positions come from seeded generators (:func:`dskd.data.epoch_batches`,
:func:`dskd.sense_targets.window_plans`). Exact resume is tested: an interrupted run resumed equals the
uninterrupted one bit for bit (``tests/test_distill.py``; with a grad_share lambda in
``tests/test_sense_diagnostics.py``); 2 processes continue 1 process's checkpoint with the same window, and
another window is refused (``tests/test_distill_recipe.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dskd.config import ConfigError, RunConfig, config_diff, to_dict

# fields that change neither the data order nor the maths: a resumed or re-run run may change them
RUNTIME_FIELDS = ("distill.timeout_minutes", "distill.report_to")


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (``checkpoints/latest`` names it)."""
    p = _ckpt_dir(out) / "latest"
    if not p.is_file():
        return None
    d = _ckpt_dir(out) / p.read_text().strip()
    return d if (d / "state.json").is_file() else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``."""
    return json.loads((ckpt / "state.json").read_text())


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
    """Write ``checkpoints/step-N`` atomically: built in a temporary folder, renamed, then ``latest``.

    Args:
        out: The run folder.
        step: The optimiser steps done.
        model: The student as accelerate prepared it (its trainable weights are saved).
        opt: The optimiser.
        sched: The LR scheduler.
        acc: The Accelerator (every process writes its RNG state; the main process the rest).
        extra: More of ``state.json`` (data position, counts, the window, margin, lambda).
        keep: How many checkpoints to keep (the oldest are removed).

    Returns:
        The checkpoint folder.
    """
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
    """Restore trainable weights, optimiser, scheduler and this process's RNG; returns state.json.

    A process the checkpointed launch did not have (resuming 1 process's checkpoint under 2) has no RNG file
    and keeps its seeded RNG (the data order and sense positions come from their own seeded generators); a
    missing RNG file of a process it had is refused."""
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
    state = read_state(path)
    rng_file = path / f"rng-{acc.process_index}.safetensors"
    if not rng_file.is_file() and acc.process_index < state.get("processes", 0):
        raise ConfigError(f"--resume: checkpoint {path} lacks {rng_file.name}; resume from another checkpoint")
    if rng_file.is_file():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def config_changes(out: Path, cfg: RunConfig) -> list[str]:
    """The fields (:func:`dskd.config.config_diff`) in which ``cfg`` differs from the config the run in
    ``out`` started with (its ``config.yaml``), :data:`RUNTIME_FIELDS` left out; empty when there is none."""
    import yaml

    saved = Path(out) / "config.yaml"
    if not saved.is_file():
        return []
    return [d for d in config_diff(yaml.safe_load(saved.read_text()) or {}, to_dict(cfg)) if d not in RUNTIME_FIELDS]


def check_resume_config(out: Path, cfg: RunConfig, ckpt: Path | None = None) -> None:
    """A resume keeps the config the run started with (:func:`config_changes`), or is refused in one line.

    ``distill.grad_accum`` may change when the checkpoint records its window: :func:`check_resume_window`
    checks it once the process count is known."""
    diffs = config_changes(out, cfg)
    if ckpt is not None and "processes" in read_state(ckpt):
        diffs = [d for d in diffs if d != "distill.grad_accum"]
    if diffs:
        raise ConfigError(
            f"--resume: the config differs from the one the run in {out} started with ({', '.join(diffs)}); "
            "resume with the same config or pick another --out"
        )


def check_resume_window(ckpt: Path, processes: int, grad_accum: int, total: int) -> None:
    """A resumed run continues the same data order and schedule, or is refused: the optimiser step's window
    (``processes x grad_accum`` micro-batches of ``batch_size``) and the number of steps must be the ones
    the checkpoint was trained with. 2 processes with accumulation 2 continue 1 process with accumulation 4.

    Args:
        ckpt: The checkpoint to resume.
        processes: This launch's process count.
        grad_accum: This launch's ``distill.grad_accum``.
        total: This launch's number of optimiser steps.
    """
    st = read_state(ckpt)
    W, G = processes, grad_accum
    if "processes" in st and st["processes"] * st["grad_accum"] != W * G:
        window = st["processes"] * st["grad_accum"]
        hint = f"--distill.grad_accum {window // W}" if window % W == 0 else f"a process count that divides {window}"
        raise ConfigError(
            f"--resume: {ckpt} was trained with {st['processes']} process(es) x grad_accum {st['grad_accum']} = "
            f"{window} micro-batches per step, this launch has {W} x {G} = {W * G}: use {hint} to continue the "
            "same data order and schedule"
        )
    if st.get("total_steps", total) != total:
        raise ConfigError(
            f"--resume: {ckpt} belongs to a schedule of {st['total_steps']} steps, this launch makes "
            f"{total} (another process count or batch): resume with the launch it started with"
        )


__all__ = [
    "RUNTIME_FIELDS",
    "check_resume_config",
    "check_resume_window",
    "config_changes",
    "latest_checkpoint",
    "load_checkpoint",
    "read_state",
    "save_checkpoint",
]
