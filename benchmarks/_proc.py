"""What the benchmark scripts read of their own process (Linux ``/proc``)."""

from __future__ import annotations

from pathlib import Path


def status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` in MB (``VmRSS``: resident now; ``VmHWM``: its peak); NaN
    where the file or the line is missing (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
