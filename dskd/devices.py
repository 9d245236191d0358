"""Where a stage runs: one rule for every stage's ``--device`` and ``--dtype``.

``auto`` means the accelerator when there is one (CUDA, then Apple MPS), else the CPU; the weights
dtype ``auto`` means bfloat16 on a CUDA device that supports it (float16 on one that does not) and
float32 elsewhere. An explicit device that is not there is an error naming the flag: no stage falls
back to the CPU behind the user's back. Every stage prints one line saying where it runs
(:func:`log_placement`).
"""

from __future__ import annotations

import os
import sys

import torch

from dskd.config import ConfigError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto", flag: str = "--device") -> torch.device:
    """The torch device a stage runs on.

    Args:
        spec: ``auto`` (the accelerator when present, else the CPU), ``cpu``, ``cuda``, ``cuda:1``,
            ``mps``, ``meta`` (shapes only, for tests and planning), or a torch.device.
        flag: The flag named in errors.

    Raises:
        ConfigError: The spec is not a device, or names an accelerator this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            # under torchrun / accelerate launch each process takes the GPU of its local rank
            local = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
            return torch.device("cuda", local % torch.cuda.device_count())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{flag}: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{flag}: {spec!r} asked for, but this torch ({torch.__version__}) sees no CUDA device; "
                "pass --device cpu to run on the CPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag}: {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not _mps_available():
        raise ConfigError(f"{flag}: {spec!r} asked for, but MPS is not available; pass --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"{flag}: {spec!r} is not available on this machine")
    return dev


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, or Apple MPS)."""
    return torch.cuda.is_available() or _mps_available()


def check_required_accelerator(required: bool, flag: str = "--model.require_accelerator") -> None:
    """Refuse, in one line before any work, a recipe that requires an accelerator on a machine where torch
    sees none (a recipe sized for GPUs must not run on the CPU silently).

    Raises:
        ConfigError: ``required`` and no accelerator is visible.
    """
    if required and not accelerator_available():
        cuda = torch.version.cuda or "none (a CPU-only build)"
        raise ConfigError(
            f"{flag}: this recipe requires a GPU, but torch {torch.__version__} (CUDA {cuda}) sees none; "
            f"fix the driver or install a CUDA build of torch, or pass {flag} false to run on the CPU"
        )


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device, flag: str = "--dtype") -> torch.dtype:
    """The weights dtype of a stage on ``device``.

    Args:
        spec: ``auto`` (bfloat16 on CUDA, float16 on a CUDA device without bfloat16, float32
            elsewhere), ``float32``, ``bfloat16``, ``float16``, or a torch.dtype.
        device: Where the weights live.
        flag: The flag named in errors.
    """
    if isinstance(spec, torch.dtype):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if spec not in DTYPES:
        raise ConfigError(f"{flag}: must be one of {', '.join(DTYPE_CHOICES)} (got {spec!r})")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def describe(device: torch.device) -> str:
    """A short human description: ``cuda:0 (NVIDIA H200, 139.8 GiB)`` or ``cpu (16 threads)``."""
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def log_placement(stage: str, device: torch.device, dtype: torch.dtype | None = None, extra: str = "") -> str:
    """Print (to stderr) and return the line saying where ``stage`` runs."""
    line = f"[dskd {stage}] on {describe(device)}"
    if dtype is not None:
        line += f", weights {dtype_name(dtype)}"
    if extra:
        line += f", {extra}"
    print(line, file=sys.stderr, flush=True)
    return line


__all__ = [
    "DTYPES",
    "DTYPE_CHOICES",
    "accelerator_available",
    "check_required_accelerator",
    "describe",
    "dtype_name",
    "log_placement",
    "resolve_device",
    "resolve_dtype",
]


def environment() -> dict[str, str]:
    """The software and hardware a result was computed on, recorded beside it.

    Floating-point results depend on more than the code: the same commit, weights and inputs gave
    log-likelihoods ~1e-3 nats apart on two 2-core CPU machines (README, "Reproducibility"). Recording the
    package versions, torch's CPU kernel level and the processor lets a later difference be attributed.
    """
    import platform
    from importlib import metadata

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "tokenizers", "accelerate", "numpy", "safetensors"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = "absent"
    env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["cpu"] = _cpu_model()
    if torch.cuda.is_available():
        env["cuda"] = str(torch.version.cuda)
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
