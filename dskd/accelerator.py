"""The Accelerator of a training run: device, mixed precision, accumulation, process group, trackers.

:func:`make_accelerator` builds it from the recipe whatever the node's accelerate config says (see its
docstring); :func:`autocast_dtype` is the one precision rule that both it and the loop's autocast follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dskd.config import ConfigError, RunConfig, to_dict


def autocast_dtype(precision: str, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype of training: bfloat16 when ``distill.precision`` is bf16, else the frozen weights'
    dtype when it is not float32 (float32 master weights beside them need autocast to mix); None: off."""
    if precision == "bf16":
        return torch.bfloat16
    return None if weights_dtype == torch.float32 else weights_dtype


def accelerate_precision(amp: torch.dtype | None) -> str:
    """accelerate's ``mixed_precision`` name of an autocast dtype (:func:`autocast_dtype`)."""
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]


def make_accelerator(factory, cfg: RunConfig, out: Path):
    """The Accelerator of a run, built from the recipe whatever the node's accelerate config says.

    Device: ``--model.device`` (``auto`` lets accelerate pick: each process its GPU, else the CPU; ``cpu``
    forces the CPU; an accelerator that is not there is an error naming the flag, never a silent
    fallback). Mixed precision: the recipe's (``distill.precision`` and ``model.dtype``), passed explicitly
    so ``ACCELERATE_MIXED_PRECISION`` cannot change it; float16 autocast is refused (dskd keeps no loss
    scaler). Accumulation: ``distill.grad_accum`` through a plugin, so ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``
    cannot change it (the loop accumulates itself; see :func:`dskd.distill.fit`). No torch.compile; DeepSpeed, FSDP,
    Megatron and XLA launch configs are refused. The process group's timeout is ``distill.timeout_minutes``.
    """
    from datetime import timedelta

    from accelerate.state import AcceleratorState
    from accelerate.utils import (
        DistributedType,
        GradientAccumulationPlugin,
        InitProcessGroupKwargs,
        ProjectConfiguration,
        parse_flag_from_env,
    )

    from dskd.devices import resolve_device, resolve_dtype

    mc, dc = cfg.model, cfg.distill
    device_spec = mc.device or "auto"
    want = resolve_device(device_spec, flag="--model.device")  # raises when the device is absent
    cpu = device_spec == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
    weights = resolve_dtype(mc.dtype, torch.device("cpu") if cpu else want, flag="--model.dtype")
    amp = autocast_dtype(dc.precision, weights)
    if amp == torch.float16:
        raise ConfigError(
            "--model.dtype: training under float16 autocast needs a loss scaler, which dskd does not keep; "
            "use --model.dtype bfloat16 (or float32), or --distill.precision bf16"
        )
    mixed = accelerate_precision(amp)
    for backend in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):  # what `accelerate launch` exports from such a config
        if parse_flag_from_env(f"ACCELERATE_USE_{backend}"):
            raise ConfigError(
                f"accelerate launch: the accelerate config asks for {backend} (ACCELERATE_USE_{backend}); dskd distill "
                "trains with DDP only: launch with a multi-GPU (DDP) accelerate config"
            )
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed:
        AcceleratorState._reset_state()  # an earlier run in this process used another precision
    acc = factory(
        cpu=device_spec == "cpu",
        mixed_precision=mixed,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=dc.grad_accum, adjust_scheduler=False, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        dynamo_backend="no",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=dc.timeout_minutes))],
        log_with=None if dc.report_to == "none" else dc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tracking")),
    )
    if acc.distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
        DistributedType.XLA,
    ):
        raise ConfigError(
            f"accelerate launch: the accelerate config asks for {acc.distributed_type.value}; dskd distill trains "
            "with DDP only: launch with a multi-GPU (DDP) accelerate config"
        )
    if mc.require_accelerator and acc.device.type == "cpu":
        raise ConfigError(
            "--model.require_accelerator: accelerate runs this process on the CPU (ACCELERATE_USE_CPU, "
            "--model.device cpu or the accelerate config); pass --model.require_accelerator false to allow it"
        )
    if device_spec != "auto" and acc.device.type != want.type:
        raise ConfigError(
            f"--model.device: {device_spec!r} asked for, but accelerate runs this process on {acc.device}"
        )
    if want.index is not None and acc.num_processes == 1 and acc.device.index not in (None, want.index):
        raise ConfigError(
            f"--model.device: {device_spec!r}: accelerate picked {acc.device}; "
            f"select the GPU with CUDA_VISIBLE_DEVICES={want.index} instead"
        )
    return acc


_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str) -> None:
    """``distill.report_to`` names a tracker whose package is installed (one line before any work)."""
    if report_to == "none":
        return
    import importlib.util

    pkg = _TRACKER_PACKAGES[report_to]
    if importlib.util.find_spec(pkg) is None:
        raise ConfigError(f"--distill.report_to {report_to}: the {pkg} package is not installed (pip install {pkg})")


def tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The recipe as flat scalar hyper-parameters (``loss.lam``: 1.0) for the trackers."""
    flat: dict[str, Any] = {}
    for sec, val in to_dict(cfg).items():
        for k, v in val.items() if isinstance(val, dict) else [("", val)]:
            key = f"{sec}.{k}" if k else sec
            flat[key] = v if isinstance(v, bool | int | float | str) else json.dumps(v)
    return flat


def log_distill_placement(acc, weights_dtype: torch.dtype, n_master: int, amp, cached: bool) -> None:
    """The one placement line of a training process (device, dtypes, upcast master weights, autocast, teacher)."""
    from dskd.devices import dtype_name, log_placement

    log_placement(
        "distill",
        acc.device,
        weights_dtype,
        f"process {acc.process_index + 1}/{acc.num_processes}, trainable weights float32"
        + (f" ({n_master / 1e6:.1f}M upcast)" if n_master else "")
        + f", autocast {dtype_name(amp) if amp else 'off'}, teacher {'from the cache' if cached else 'online'}",
    )


__all__ = [
    "accelerate_precision",
    "autocast_dtype",
    "check_tracker",
    "log_distill_placement",
    "make_accelerator",
    "tracker_config",
]
