"""Per-token reservoir samples of teacher states whose rows live in a file, not in memory.

The reservoir keeps, per token, a uniform sample of at most ``cap`` of the d-dimensional states
offered to it (Algorithm R, vectorised over a batch, one seeded draw per state). Its bookkeeping
(``seen``, the sorted slot ``keys``, their ``rows`` and stream positions ``pos``, the generator) is
small and lives on the gathering device; the sample rows, which grow with vocab x cap x d, live in a
:class:`RowFile` on disk in the sample dtype (float32, or bfloat16 / float16 at scale). So resident
memory does not grow with the corpus, and a checkpoint is the bookkeeping alone: rows that a
checkpoint refers to are never overwritten (a replaced sample goes to a fresh row, and the old row
is reused only after the next checkpoint), so the file plus any checkpoint is always consistent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class RowFile:
    """A raw file of fixed-size rows (row i at byte ``i * d * itemsize``), read and written with
    positional system calls (``pread`` / ``pwrite``) into buffers the size of one call's rows.

    The file is never memory-mapped: a mapped file's pages count as the process's resident memory
    while mapped, and a read of scattered rows through a map brings in far more than those rows (the
    kernel maps up to 64 KB around each page fault), so resident memory grew with the file. With
    positional reads, resident memory holds one call's rows; the file's pages stay in the OS page
    cache, which is not the process's.

    Args:
        path: The file; created (empty) when missing and ``writable``.
        dim: d, values per row.
        dtype: float32, float16 or bfloat16 (stored as raw bits).
        writable: Open for writing (the file grows as rows are written).
    """

    def __init__(self, path: str | Path, dim: int, dtype: torch.dtype, writable: bool = True) -> None:
        self.path, self.dim, self.dtype, self.writable = Path(path), dim, dtype, writable
        self.row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
        self._fd = -1
        if writable and not self.path.exists():
            self.path.touch()
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @property
    def n_rows(self) -> int:
        """Rows the file has room for."""
        return max(0, os.fstat(self._fd).st_size) // self.row_bytes

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.dim)

    def flush(self) -> None:
        """Make the rows written so far durable (a checkpoint that refers to them is written next)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def reserve(self, n_rows: int) -> None:
        """Make room for ``n_rows`` rows (doubling, as a sparse file: no disk is used until written)."""
        if n_rows > self.n_rows:
            os.ftruncate(self._fd, max(n_rows, 2 * self.n_rows, 1024) * self.row_bytes)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (n, d) (any device, any float dtype: cast to the file's) into rows ``rows`` (n,).

        A row given twice gets its last value.
        """
        if rows.numel() == 0:
            return
        r = rows.cpu().numpy()
        self.reserve(int(r.max()) + 1)
        v = values.detach().to(device="cpu", dtype=self.dtype)
        order = np.argsort(r, kind="stable")
        r = r[order]
        last = np.append(r[1:] != r[:-1], True)  # of repeated rows, the last value (stable sort) wins
        if not last.all():
            r, order = r[last], order[last]
        v = v[torch.from_numpy(order)].contiguous()  # (n, d) in file order: a run of rows is one buffer
        buf = memoryview(v.view(-1).view(torch.uint8).numpy())
        rb = self.row_bytes
        for a, b in _runs(r):
            os.pwrite(self._fd, buf[a * rb : b * rb], int(r[a]) * rb)

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` ((n,) int64) as an (n, d) float32 CPU tensor."""
        return self.take_raw(rows).float()

    def take_raw(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` ((n,) int64, repeats allowed) as an (n, d) CPU tensor in the file's dtype."""
        r = rows.cpu().numpy()
        if r.size == 0:
            return torch.zeros(0, self.dim, dtype=self.dtype)
        if r.size > 1 and bool((r[1:] > r[:-1]).all()):
            uniq, inv = r, None  # increasing: read straight into the result
        else:
            uniq, inv = np.unique(r, return_inverse=True)
        if int(uniq[0]) < 0 or int(uniq[-1]) >= self.n_rows:
            raise IndexError(f"{self.path}: rows {int(uniq[0])}..{int(uniq[-1])} outside [0, {self.n_rows})")
        out = torch.empty(uniq.size, self.dim, dtype=self.dtype)
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        rb = self.row_bytes
        for a, b in _runs(uniq):
            want, pos = (b - a) * rb, int(uniq[a]) * rb
            if os.preadv(self._fd, [buf[a * rb : b * rb]], pos) != want:
                raise OSError(f"{self.path}: short read of {want} bytes at byte {pos} (a truncated file?)")
        return out if inv is None else out[torch.from_numpy(inv.reshape(-1))]


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges of ``sorted_rows`` (increasing) whose rows are consecutive: one system call each."""
    cut = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    bounds = np.concatenate([[0], cut, [sorted_rows.size]]).tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class MultiRowSource:
    """Rows drawn from several :class:`RowFile` s: row i is ``files[file_of[i]]`` row ``row_of[i]``.

    The row source k-means and the store writer read the merged samples of several processes from.
    """

    def __init__(self, files: list[RowFile], file_of: torch.Tensor, row_of: torch.Tensor) -> None:
        self.files, self.file_of, self.row_of = files, file_of.cpu(), row_of.cpu()
        self.shape = (int(row_of.numel()), files[0].dim if files else 0)
        self.dtype = files[0].dtype if files else torch.float32

    def take_raw(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.cpu()
        f, r = self.file_of[rows], self.row_of[rows]
        if len(self.files) == 1:
            return self.files[0].take_raw(r)
        out = torch.empty(rows.numel(), self.shape[1], dtype=self.dtype)
        for i, rf in enumerate(self.files):
            m = f == i
            if bool(m.any()):
                out[m] = rf.take_raw(r[m])
        return out

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return self.take_raw(rows).float()


@dataclass
class Reservoir:
    """Per-token uniform reservoir samples of d-dim states; the rows live in ``store``.

    Slot s of token t lives in row ``rows[i]`` of ``store`` where ``keys[i] == t * cap + s``; ``keys``
    is kept sorted so a lookup is a ``searchsorted``. ``pos[i]`` is the stream position the sample
    came from (merging the reservoirs of several processes orders samples by it).

    Attributes:
        cap: Samples kept per token at most.
        seen: (V,) int64, states offered per token so far.
        store: The rows: a :class:`RowFile`, or None for an in-memory pool (small uses and tests).
        n_rows: Rows of ``store`` in use or freed (the next new row is ``n_rows``).
        keys: (R,) int64 sorted slot keys; rows: (R,) int64 their rows; pos: (R,) int64 their positions.
        gen: The generator that draws the replacement slots (on the gathering device).
        copy_on_write: Replaced samples go to fresh rows, old rows are freed at :meth:`commit`
            (set while checkpointing, so a checkpoint's rows stay intact).
        free: (F,) int64 rows free for reuse; pending: rows freed since the last commit.
    """

    cap: int
    seen: torch.Tensor
    store: RowFile | None
    n_rows: int
    keys: torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    gen: torch.Generator
    copy_on_write: bool = False
    free: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    pending: list[torch.Tensor] = field(default_factory=list)
    _mem: torch.Tensor | None = None  # the in-memory pool when ``store`` is None

    @classmethod
    def empty(
        cls,
        vocab: int,
        dim: int,
        cap: int,
        seed: int,
        store: RowFile | None = None,
        device: torch.device | str = "cpu",
    ) -> Reservoir:
        """An empty reservoir; rows go to ``store`` (a RowFile) or, when None, to a float32 pool in memory."""
        device = torch.device(device)
        gen = torch.Generator(device).manual_seed(seed)
        z = torch.zeros(0, dtype=torch.int64, device=device)
        mem = torch.zeros(1024, dim) if store is None else None
        seen = torch.zeros(vocab, dtype=torch.int64, device=device)
        return cls(cap, seen, store, 0, z, z.clone(), z.clone(), gen, _mem=mem, free=z.clone())

    @property
    def device(self) -> torch.device:
        return self.seen.device

    @property
    def dim(self) -> int:
        return self.store.dim if self.store is not None else self._mem.shape[1]

    def add(self, ids: torch.Tensor, states: torch.Tensor, pos: torch.Tensor | None = None) -> None:
        """Offer states in order (Algorithm R, one uniform draw per state, vectorised).

        Args:
            ids: (n,) int64 token ids the states are filed under (on the reservoir's device).
            states: (n, d) states, in stream order.
            pos: (n,) int64 stream positions of the states (default: their index in this call).
        """
        dev = self.device
        n, cap = ids.numel(), self.cap
        u = torch.rand(n, generator=self.gen, dtype=torch.float64, device=dev)  # one draw per state, stream order
        order = torch.argsort(ids, stable=True)  # group by token, keep stream order inside a group
        sid = ids[order]
        _, inv, cnt = torch.unique_consecutive(sid, return_inverse=True, return_counts=True)
        rank = torch.arange(n, device=dev) - (torch.cumsum(cnt, 0) - cnt)[inv]
        j = self.seen[sid] + rank + 1  # 1-based occurrence number of each state for its token
        r = torch.floor(u[order] * j.to(torch.float64)).to(torch.int64)  # uniform in [0, j)
        slot = torch.where(j <= cap, j - 1, r)
        keep = slot < cap
        self.seen.index_add_(0, sid, torch.ones_like(sid))
        if not bool(keep.any()):
            return
        key, src = sid[keep] * cap + slot[keep], order[keep]
        # Several states of this batch may land in one slot: the last one (in stream order) wins.
        ukey, kinv = torch.unique(key, return_inverse=True)
        last = torch.full((ukey.numel(),), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, kinv, torch.arange(key.numel(), device=dev), reduce="amax")
        src = src[last]
        spos = (pos.to(dev) if pos is not None else torch.arange(n, device=dev))[src]
        at = torch.searchsorted(self.keys, ukey)
        if self.keys.numel():
            new = self.keys[at.clamp(max=self.keys.numel() - 1)] != ukey
        else:
            new = torch.ones_like(ukey, dtype=torch.bool)
        n_new = int(new.sum())
        old = ~new
        if self.copy_on_write and bool(old.any()):
            # A replaced sample goes to a fresh row: the old one may belong to the last checkpoint.
            self.pending.append(self.rows[at[old]])
            self.rows[at[old]] = self._alloc(int(old.sum()))
        if n_new:
            keys = torch.cat([self.keys, ukey[new]])
            rows = torch.cat([self.rows, self._alloc(n_new)])
            p = torch.cat([self.pos, spos[new]])
            o = torch.argsort(keys)
            self.keys, self.rows, self.pos = keys[o], rows[o], p[o]
            at = torch.searchsorted(self.keys, ukey)
        self.pos[at] = spos
        self._write(self.rows[at], states[src])

    def _alloc(self, n: int) -> torch.Tensor:
        """n rows to write into: freed rows first, then new ones at the end."""
        take = min(n, self.free.numel())
        got, self.free = self.free[:take], self.free[take:]
        extra = torch.arange(self.n_rows, self.n_rows + n - take, device=self.device)
        self.n_rows += n - take
        return torch.cat([got, extra])

    def _write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        if self.store is not None:
            self.store.write(rows, values)
            return
        need = int(rows.max()) + 1
        if need > self._mem.shape[0]:
            bigger = torch.zeros(max(need, 2 * self._mem.shape[0]), self._mem.shape[1])
            bigger[: self._mem.shape[0]] = self._mem
            self._mem = bigger
        self._mem[rows.cpu()] = values.detach().float().cpu()

    def commit(self) -> None:
        """Rows freed since the last checkpoint become reusable (call once a checkpoint is written)."""
        if self.pending:
            self.free = torch.cat([self.free, *self.pending])
            self.pending = []

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Sample rows ``rows`` as an (n, d) float32 CPU tensor."""
        return self.store.take(rows) if self.store is not None else self._mem[rows.cpu()]

    @property
    def pool(self) -> torch.Tensor:
        """All rows in use or freed, (n_rows, d) float32 (reads the whole file: small reservoirs only)."""
        return self.read(torch.arange(self.n_rows))

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples grouped by token, slots in order, read into memory (small reservoirs only).

        Returns:
            (tokens (R,) int64 sorted, samples (R, d) float32).
        """
        return (self.keys // self.cap).cpu(), self.read(self.rows)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bookkeeping (not the rows): what a checkpoint records. Call :meth:`commit` first."""
        assert not self.pending, "commit() before taking a checkpoint"
        out = {
            "seen": self.seen,
            "keys": self.keys,
            "rows": self.rows,
            "pos": self.pos,
            "free": self.free,
            "n_rows": torch.tensor([self.n_rows]),
            "gen": self.gen.get_state(),
        }
        return {k: v.cpu() for k, v in out.items()}

    @classmethod
    def from_state(
        cls, d: dict[str, torch.Tensor], cap: int, store: RowFile, device: torch.device | str = "cpu"
    ) -> Reservoir:
        """The reservoir a checkpoint recorded, its rows in ``store`` (the file it was gathered into)."""
        device = torch.device(device)
        gen = torch.Generator(device)
        gen.set_state(d["gen"])
        t = {k: d[k].to(device) for k in ("seen", "keys", "rows", "pos", "free")}
        res = cls(cap, t["seen"], store, int(d["n_rows"][0]), t["keys"], t["rows"], t["pos"], gen, free=t["free"])
        return res
