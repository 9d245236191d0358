"""The one lazy reader of safetensors files: whole tensors, row ranges and rows by index, read on
demand through safetensors' own API (``safe_open`` / ``get_slice``, bfloat16 included), so a large
tensor (a sense matrix, kept samples, a teacher cache shard) is never loaded whole.

The file is memory-mapped by safetensors while a :class:`TensorFile` is open; pages it has read stay
mapped (and count as resident memory) until it is closed. A reader that must keep resident memory
bounded while reading a large file piece by piece (the sense build's row sources) opens it per read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


class TensorFile:
    """A safetensors file opened lazily.

    Args:
        path: The ``.safetensors`` file.
    """

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._f = safe_open(str(self.path), framework="pt")

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the file (the reader cannot be used afterwards)."""
        self._f = None  # safetensors unmaps the file when its handle goes

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._f.keys()  # noqa: SIM118 (safe_open has no __contains__)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._f.get_slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (small tensors)."""
        return self._f.get_tensor(name)

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows ``a:b`` of tensor ``name`` (a copy; only those rows are read)."""
        return self._f.get_slice(name)[a:b]

    def take(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` ((n,) int64, any order, repeats allowed) of tensor ``name``, one read per run
        of consecutive rows.

        Returns:
            (n, *row_shape) in the file's dtype.
        """
        r = rows.cpu().numpy()
        sl = self._f.get_slice(name)
        if r.size == 0:
            return torch.zeros(0, *sl.get_shape()[1:], dtype=_DTYPES[sl.get_dtype()])
        uniq, inv = np.unique(r, return_inverse=True)
        cut = np.flatnonzero(np.diff(uniq) != 1) + 1
        bounds = np.concatenate([[0], cut, [uniq.size]]).tolist()
        parts = [sl[int(uniq[a]) : int(uniq[b - 1]) + 1] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out[torch.from_numpy(inv.reshape(-1))]


class TensorRows:
    """Tensor ``name`` of a safetensors file as a row source (``take`` / ``take_raw``, ``shape``,
    ``dtype``), opened per read so the file's pages are unmapped after each read."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path, self.name = Path(path), name
        with TensorFile(path) as f:
            self.shape, self.dtype = f.shape(name), f.dtype(name)

    def take_raw(self, rows: torch.Tensor) -> torch.Tensor:
        with TensorFile(self.path) as f:
            return f.take(self.name, rows)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.take_raw(rows).float()


__all__ = ["TensorFile", "TensorRows"]
