"""Batched k-means over many small groups (one group per token), pure tensor code on any device.

:func:`cluster_groups` clusters every group of consecutive sample rows into at most k senses:
groups with more than k samples run seeded k-means (greedy k-means++ seeding as scikit-learn, Lloyd
iterations with scikit-learn's stopping rule) in buckets of similar size, padded into one batched
tensor; groups with <= k samples keep their samples. The samples may be a tensor or any
:class:`RowSource` (rows read from disk bucket by bucket), and the results may go to a sink instead
of memory, so a store larger than memory is clustered bucket by bucket. Everything runs on the device
given (the samples' device by default); buckets are sized to that device's memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch


class RowSource(Protocol):
    """Rows of a (N, d) matrix that live elsewhere (e.g. a file), read on demand."""

    shape: tuple[int, int]

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` ((n,) int64, CPU) as an (n, d) float32 CPU tensor."""
        ...


# Sink of clustered groups: (group indices, senses per group [(n_g, d)], counts per group [(n_g,)]).
Sink = Callable[[list[int], list[torch.Tensor], list[torch.Tensor]], None]

# Floats per padded bucket on the CPU: 8 MB of float32 stays in cache for all Lloyd iterations
# (measured fastest on the CPU; 128 MB buckets stream from memory and took 1.35x longer).
CPU_BUCKET_FLOATS = 1 << 21


def bucket_budget(device: torch.device) -> int:
    """Floats per padded bucket on ``device``: the CPU's cache-sized buckets, or on an accelerator
    1/16 of its free memory (the padded samples, their copy and the Lloyd temporaries fit many times
    over), at most 2^28 floats (1 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(CPU_BUCKET_FLOATS, min(1 << 28, free // (4 * 16))))
    return CPU_BUCKET_FLOATS


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm``; a batch of one goes through ``torch.mm``, which (unlike bmm) uses every thread."""
    return torch.mm(a[0], b[0])[None] if a.shape[0] == 1 else torch.bmm(a, b)


def _scores(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """|c|^2 - 2 x.c, batched: x (B, n, d), c (B, m, d) -> (B, n, m); its argmin is the nearest centre."""
    c2 = torch.linalg.vecdot(c, c)[:, None, :]  # (B, 1, m)
    if x.shape[0] == 1:
        return torch.addmm(c2[0], x[0], c[0].T, alpha=-2)[None]
    return torch.baddbmm(c2, x, c.transpose(1, 2), alpha=-2)


def _sq_dist(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances, batched: x (B, n, d), x2 (B, n), c (B, m, d) -> (B, n, m), >= 0."""
    return _scores(x, c).add_(x2[:, :, None]).clamp_min_(0)


def _greedy_seeds(
    dist_rows: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step), batched.

    Args:
        dist_rows: Maps sample indices (B, L) to their squared distances to every sample, (B, L, n).
        mask: (B, n) real samples.
    Returns:
        (B, k) indices of the seed samples.
    """
    b, n = mask.shape
    idx = torch.arange(b, device=mask.device)
    padded = not bool(mask.all())
    first = (
        (torch.rand(b, generator=gen, dtype=torch.float64, device=mask.device) * mask.sum(1)).long().clamp(max=n - 1)
    )
    seeds = [first]
    pot = dist_rows(first[:, None])[:, 0]  # (B, n)
    if padded:
        pot = pot * mask
    n_cand = 2 + int(math.log(k))
    for _ in range(1, k):
        w = pot.double()
        empty = w.sum(1) <= 0
        if bool(empty.any()):  # all points coincide with a centre: pick uniformly
            w[empty] = mask[empty].double()
        cand = torch.multinomial(w, n_cand, replacement=True, generator=gen)  # (B, L)
        new_pot = torch.minimum(pot[:, None, :], dist_rows(cand))  # (B, L, n)
        if padded:
            new_pot = new_pot * mask[:, None, :]
        best = new_pot.sum(2).argmin(1)  # (B,)
        pot = new_pot[idx, best]
        seeds.append(cand[idx, best])
    return torch.stack(seeds, 1)


def _kmeanspp(x: torch.Tensor, x2: torch.Tensor, mask: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (:func:`_greedy_seeds`) with distances computed from the samples.

    Args:
        x: (B, n, d) padded samples; x2: (B, n) their squared norms; mask: (B, n) real samples.
    Returns:
        (B, k, d) initial centroids.
    """
    idx = torch.arange(x.shape[0], device=x.device)[:, None]
    seeds = _greedy_seeds(lambda cand: _sq_dist(x, x2, x[idx, cand]).transpose(1, 2), mask, k, gen)
    return x[idx, seeds]


def kmeans_padded(
    x: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    n_init: int = 1,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a batch of padded groups; each group has more than k real samples.

    Seeding is scikit-learn's greedy k-means++. Each group stops on its own, with scikit-learn's rule:
    when no assignment changes, or when the squared centre shift of an iteration is at most ``tol`` x
    the mean per-feature variance of the group. Stopped groups are frozen, so a group's result does
    not depend on the others in the batch. Three paths compute this, chosen by shape: groups of at
    most ``GRAM_MAX_SAMPLES`` samples through their Gram matrix (:func:`_kmeans_gram`), one unpadded
    group with few tensor operations per iteration (:func:`_lloyd_one`), otherwise a padded batch
    that drops its stopped groups once a quarter has stopped (:func:`_lloyd_batch`).

    Args:
        x: (B, n, d) float32 samples; rows where ``mask`` is False are ignored (any finite values).
        mask: (B, n) bool, real samples.
        k: Centroids per group.
        iters: Maximum Lloyd iterations.
        gen: Generator for the seeding.
        n_init: Seedings per group; the run with the lowest inertia is kept.
        tol: Relative tolerance on the centre shift (scikit-learn's ``tol``).
    Returns:
        (centroids (B, k, d), counts (B, k) int64, inertia (B,) float64).
    """
    b, _, d = x.shape
    x2 = torch.linalg.vector_norm(x, dim=-1).square_()  # (B, n) squared norms, without a (B, n, d) temporary
    maskf = mask.to(x.dtype)
    padded = not bool(mask.all())
    n_real = maskf.sum(1).clamp_min(1)
    if padded:  # padding rows may hold anything finite: mask them out of the statistics
        x2_sum, x_sum = (x2 * maskf).sum(1), _bmm(maskf[:, None, :], x)[:, 0]
    else:
        x2_sum, x_sum = x2.sum(1), x.sum(1)
    mean = x_sum / n_real[:, None]
    # Mean per-feature variance = (E||x||^2 - ||E x||^2) / d, as scikit-learn scales its tol.
    tol_g = tol * ((x2_sum / n_real - (mean * mean).sum(1)) / d).clamp_min(0)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    gram = torch.bmm(x, x.transpose(1, 2)).double() if x.shape[1] <= GRAM_MAX_SAMPLES else None
    for _ in range(n_init):
        if gram is not None:
            c, counts, inertia = _kmeans_gram(x, gram, mask, k, iters, gen, tol_g)
        elif b == 1 and not padded:
            c = _kmeanspp(x, x2, mask, k, gen)
            c, counts, inertia = (t[None] for t in _lloyd_one(x[0], x2[0], c[0], iters, float(tol_g[0])))
        else:
            c = _lloyd_batch(x, x2, mask, padded, _kmeanspp(x, x2, mask, k, gen), tol_g, iters)
            dist, a = _sq_dist(x, x2, c).min(2)
            inertia = (dist * maskf).double().sum(1)
            flat = (a + torch.arange(b, device=x.device)[:, None] * k).view(-1)
            counts = torch.bincount(flat, weights=maskf.view(-1), minlength=b * k).view(b, k).long()
        if best is None:
            best = (c, counts, inertia)
        else:
            better = inertia < best[2]
            best = (
                torch.where(better[:, None, None], c, best[0]),
                torch.where(better[:, None], counts, best[1]),
                torch.where(better, inertia, best[2]),
            )
    assert best is not None and best[0].shape[0] == b
    return best


# Groups of at most this many samples run k-means through their Gram matrix (see _kmeans_gram).
GRAM_MAX_SAMPLES = 64


def _kmeans_gram(
    x: torch.Tensor,
    gram: torch.Tensor,
    mask: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    tol_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeding and Lloyd's iterations of :func:`kmeans_padded` for groups of few samples.

    A centre is a mean of samples, so it is kept as weights over its group's samples (``w``, 1/count
    on its members): its dot products with the samples are ``gram @ w`` and its squared norm
    ``w . gram @ w``. Every distance of the seeding and of the iterations then comes from the
    (n, n) Gram matrix, in float64, instead of a pass over the d-dimensional samples, which only
    form the final centres. Same greedy k-means++ seeding, assignments and stopping rule as the
    direct path (up to rounding).

    Args:
        x: (B, n, d) samples; gram: (B, n, n) float64 ``x @ x^T``; mask: (B, n) real samples.
        tol_g: (B,) absolute tolerance on the squared centre shift.
    Returns:
        (centroids (B, k, d), counts (B, k) int64, inertia (B,) float64).
    """
    b, n, _ = x.shape
    idx = torch.arange(b, device=x.device)
    maskd = mask.double()
    g = gram.diagonal(dim1=1, dim2=2)  # (B, n) squared norms
    dist = (g[:, :, None] + g[:, None, :] - 2 * gram).clamp_min_(0)  # (B, n, n) between samples
    seeds = _greedy_seeds(lambda cand: dist[idx[:, None], cand], mask, k, gen)  # on the precomputed distances
    w = torch.nn.functional.one_hot(seeds, n).double()  # (B, k, n) centre weights
    slots = torch.arange(k, device=x.device)[None, :, None]
    live = torch.ones(b, dtype=torch.bool, device=x.device)
    prev = None

    def scores(w: torch.Tensor) -> torch.Tensor:  # |c_j|^2 - 2 x_i . c_j, (B, n, k)
        gw = torch.bmm(gram, w.transpose(1, 2))  # (B, n, k) = x_i . c_j
        return torch.linalg.vecdot(w.transpose(1, 2), gw, dim=1)[:, None, :] - 2 * gw

    for _ in range(iters):
        a = scores(w).argmin(2)  # (B, n)
        onehot = (a[:, None, :] == slots) & mask[:, None, :]  # (B, k, n)
        cnt = onehot.sum(2)  # (B, k)
        new = onehot.double() / cnt.clamp_min(1)[:, :, None]
        new = torch.where((cnt == 0)[:, :, None], w, new)  # an empty cluster keeps its centre
        same = torch.zeros_like(live) if prev is None else ((a == prev) | ~mask).all(1)
        dw = new - w
        shift = torch.linalg.vecdot(dw, torch.bmm(dw, gram)).sum(1)  # (B,) = sum_j |c_j' - c_j|^2
        stop = live & (same | shift.le(tol_g.double()))
        w = torch.where((live & ~same)[:, None, None], new, w)
        live = live & ~stop
        if not bool(live.any()):
            break
        prev = a
    smin, a = scores(w).min(2)
    inertia = ((smin + g).clamp_min_(0) * maskd).sum(1)
    flat = (a + idx[:, None] * k).view(-1)
    counts = torch.bincount(flat, weights=maskd.view(-1), minlength=b * k).view(b, k).long()
    return torch.bmm(w.to(x.dtype), x), counts, inertia


def _lloyd_batch(
    x: torch.Tensor,
    x2: torch.Tensor,
    mask: torch.Tensor,
    padded: bool,
    c: torch.Tensor,
    tol_g: torch.Tensor,
    iters: int,
) -> torch.Tensor:
    """Lloyd's iterations of :func:`kmeans_padded` on a batch; updates and returns ``c`` (B, k, d)."""
    b, _, d = x.shape
    k = c.shape[1]
    slots = torch.arange(k, device=x.device)[None, :, None]  # (1, k, 1)
    # The working batch: groups not yet dropped, with their own copy of the centres (``cw``),
    # written back into ``c`` when groups leave it.
    idx = torch.arange(b, device=x.device)
    xa, ma, ta, cw = x, mask, tol_g, c
    live = torch.ones(b, dtype=torch.bool, device=x.device)  # of the working batch: not stopped yet
    prev = sums = cnt = None
    for _ in range(iters):
        a = _scores(xa, cw).argmin(2)  # (B', n): argmin_j |x - c_j|^2 = argmin_j |c_j|^2 - 2 x.c_j
        if prev is None:  # cluster sums from scratch: one one-hot matmul
            onehot = a[:, None, :] == slots
            if padded:
                onehot &= ma[:, None, :]
            onehot = onehot.to(x.dtype)  # (B', k, n)
            cnt, sums = onehot.sum(2), _bmm(onehot, xa)  # (B', k), (B', k, d)
            same = torch.zeros_like(live)
        else:  # then only the samples that changed cluster move their contribution
            moved = a != prev
            if padded:
                moved &= ma
            same = ~moved.any(1)
            bi, ni = moved.nonzero(as_tuple=True)
            if bi.numel():
                xs, dst, src = xa[bi, ni], bi * k + a[bi, ni], bi * k + prev[bi, ni]
                sums.view(-1, d).index_add_(0, dst, xs).index_add_(0, src, xs, alpha=-1)
                one = torch.ones_like(dst, dtype=x.dtype)
                cnt.view(-1).index_add_(0, dst, one).index_add_(0, src, one, alpha=-1)
        new = sums / cnt.clamp_min(1)[:, :, None]
        empty = cnt == 0
        if bool(empty.any()):  # an empty cluster keeps its centre
            new = torch.where(empty[:, :, None], cw, new)
        diff = new - cw
        shift = torch.linalg.vecdot(diff, diff).sum(1)  # (B',) squared centre shift
        # A group whose labels did not change keeps its centres (they are already the means).
        stop = live & (same | shift.le(ta))
        upd = live & ~same
        cw = new if bool(upd.all()) else torch.where(upd[:, None, None], new, cw)
        live = live & ~stop
        if not bool(live.any()):
            break
        prev = a
        if int(live.sum()) * 4 <= 3 * live.numel():
            out, keep = (~live).nonzero().squeeze(1), live.nonzero().squeeze(1)
            c[idx[out]] = cw[out]
            idx, xa, ma, ta, cw, prev, sums, cnt = (
                t.index_select(0, keep) for t in (idx, xa, ma, ta, cw, prev, sums, cnt)
            )
            live = live[keep]
    if cw is not c:
        c[idx] = cw
    return c


def _lloyd_one(
    x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor, iters: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same iterations and stopping rule as :func:`_lloyd_batch` for one unpadded group.

    Large groups run one at a time, and there each tensor operation's fixed cost is as large as the
    matmul, so this path uses fewer of them; when the labels stop changing, the last distances
    already belong to the final centres and the closing assignment pass is skipped.

    Args:
        x: (n, d) samples; x2: (n,) their squared norms; c: (k, d) initial centres.
        tol: Absolute tolerance on the squared centre shift.
    Returns:
        (centres (k, d), counts (k,) int64, inertia () float64).
    """
    k, d = c.shape
    prev = sums = cnt = smin = None
    final = False  # whether ``smin`` / ``a`` belong to the final centres
    for _ in range(iters):
        smin, a = torch.addmm(torch.linalg.vecdot(c, c), x, c.T, alpha=-2).min(1)
        if prev is None:
            sums = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, a, x)
        else:
            ni = (a != prev).nonzero().squeeze(1)
            if ni.numel() == 0:  # labels unchanged: the centres are already their means
                final = True
                break
            xs = x[ni]
            sums.index_add_(0, a[ni], xs).index_add_(0, prev[ni], xs, alpha=-1)
        cnt = torch.bincount(a, minlength=k)
        new = sums / cnt.clamp_min(1).to(x.dtype)[:, None]
        if bool((cnt == 0).any()):  # an empty cluster keeps its centre
            new = torch.where((cnt == 0)[:, None], c, new)
        diff = new - c
        c, prev = new, a
        if float(torch.linalg.vecdot(diff, diff).sum()) <= tol:
            break
    if final:
        dist = (smin + x2).clamp_min_(0)
    else:
        dist, a = _sq_dist(x[None], x2[None], c[None]).min(2)
        dist, cnt = dist[0], torch.bincount(a[0], minlength=k)
    return c, cnt, dist.double().sum()


def cluster_groups(
    samples: torch.Tensor | RowSource,
    sizes: torch.Tensor,
    k: int,
    iters: int,
    seed: int,
    n_init: int = 1,
    budget: int | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    sink: Sink | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Cluster every group of consecutive samples into at most k senses, batched across groups.

    Groups with more than k samples run k-means in buckets of similar size (padded to the largest
    group of the bucket, at most ``budget`` floats per bucket); groups with <= k samples keep their
    samples (count 1 each). Empty clusters are dropped; senses are ordered by count, largest first.

    Args:
        samples: (N, d) float32 tensor or a :class:`RowSource`; group g owns the next ``sizes[g]`` rows.
        sizes: (G,) int64 group sizes.
        k: Senses per group.
        iters: Lloyd iterations.
        seed: Seed of the k-means++ seeding (the result is a function of the inputs, the seed and the device).
        n_init: Seedings per group.
        budget: Floats per padded bucket (default :func:`bucket_budget` of the device).
        progress: Show a tqdm bar.
        device: Where k-means runs (default: the samples' device; the CPU for a RowSource).
        sink: When given, each group's result is passed to it (small groups first, then bucket by
            bucket) instead of being kept, and the returned lists are empty.
    Returns:
        (senses per group [(n_g, d)], counts per group [(n_g,) int64], inertia (G,) float64), the lists
        empty with a sink. The tensors may be views (of ``samples`` for small groups); copy before
        writing into them.
    """
    is_tensor = isinstance(samples, torch.Tensor)
    dev = torch.device(device) if device is not None else (samples.device if is_tensor else torch.device("cpu"))
    if budget is None:
        budget = bucket_budget(dev)
    g_count, d = sizes.numel(), samples.shape[1]
    sizes = sizes.cpu()
    starts = torch.cumsum(sizes, 0) - sizes
    keep = sink is None
    empty = torch.zeros(0, d, dtype=torch.float32, device=dev)
    senses: list[torch.Tensor] = [empty] * g_count if keep else []
    counts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.int64)] * g_count if keep else []
    inertia = torch.zeros(g_count, dtype=torch.float64)

    def put(groups: list[int], s: list[torch.Tensor], c: list[torch.Tensor]) -> None:
        if sink is not None:
            sink(groups, s, c)
            return
        for g, x, n in zip(groups, s, c, strict=True):
            senses[g], counts[g] = x, n

    ones = torch.ones(k, dtype=torch.int64)
    small = (sizes <= k).nonzero().flatten()
    for groups, got in _small_groups(samples, small, sizes, starts, max(1, budget // (k * d))):
        put(groups, got, [ones[: len(x)] for x in got])
    buckets = _buckets(sizes, k, d, budget)
    reader = _BucketReader(samples, sizes, starts, dev, budget)
    gen = torch.Generator(dev).manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(len(b) for b in buckets)
        bar = tqdm(total=total, unit="tok", desc=f"cluster ({dev.type})", dynamic_ncols=True)
    for bucket in buckets:
        x, mask = reader.read(bucket)
        out_s, out_c, inert = _cluster_bucket(x, mask, k, iters, gen, n_init)
        inertia[torch.tensor(bucket)] = inert
        put(bucket, out_s, out_c)
        if bar is not None:
            bar.update(len(bucket))
    if bar is not None:
        bar.close()
    return senses, counts, inertia


def _small_groups(
    samples: torch.Tensor | RowSource, small: torch.Tensor, sizes: torch.Tensor, starts: torch.Tensor, step: int
) -> Iterator[tuple[list[int], list[torch.Tensor]]]:
    """The samples of the groups that keep them as their senses (at most k samples), in group order.

    Args:
        samples: The samples (see :func:`cluster_groups`).
        small: (S,) indices of those groups; sizes: (G,) and starts: (G,) every group's size and first row.
        step: Groups per read from a :class:`RowSource` (about ``budget`` floats at a time).
    Yields:
        (groups, their samples [(n_g, d)]): from a tensor, once, as views; from a row source, ``step``
        groups at a time.
    """
    if isinstance(samples, torch.Tensor):
        yield (
            small.tolist(),
            [samples[s : s + n] for s, n in zip(starts[small].tolist(), sizes[small].tolist(), strict=True)],
        )
        return
    for a in range(0, small.numel(), step):
        part = small[a : a + step]
        lens = sizes[part]
        first = starts[part] - (torch.cumsum(lens, 0) - lens)
        rows = torch.repeat_interleave(first, lens) + torch.arange(int(lens.sum()))
        yield part.tolist(), list(samples.take(rows).split(lens.tolist()))


def _buckets(sizes: torch.Tensor, k: int, d: int, budget: int) -> list[list[int]]:
    """The groups of more than k samples, largest first, cut into buckets clustered as one padded batch.

    A bucket ends before a group of under 0.6 x its first (largest) group's size, or before the group
    that would make its padded size (groups x largest size x d) exceed ``budget`` floats.

    Returns:
        Per bucket, its group indices.
    """
    big = (sizes > k).nonzero().flatten()
    big = big[torch.argsort(sizes[big], descending=True, stable=True)]
    size_of = sizes.tolist()
    buckets: list[list[int]] = []
    cur: list[int] = []
    for g in big.tolist():
        n = size_of[g]
        if cur and (n < 0.6 * size_of[cur[0]] or (len(cur) + 1) * size_of[cur[0]] * d > budget):
            buckets.append(cur)
            cur = []
        cur.append(g)
    if cur:
        buckets.append(cur)
    return buckets


class _BucketReader:
    """Reads a bucket's groups as one padded (B, n_max, d) tensor on the clustering device.

    Padding rows repeat other samples; :func:`kmeans_padded` ignores them (any finite values), and
    zeroing them would cost a pass. From a tensor on the clustering device, one buffer of ``budget``
    floats serves every bucket (a fresh 8 MB tensor per bucket costs its page faults).
    """

    def __init__(
        self,
        samples: torch.Tensor | RowSource,
        sizes: torch.Tensor,
        starts: torch.Tensor,
        device: torch.device,
        budget: int,
    ) -> None:
        self.samples, self.sizes, self.starts, self.device, self.budget = samples, sizes, starts, device, budget
        self.size_of, self.start_of = sizes.tolist(), starts.tolist()
        self._buf: torch.Tensor | None = None

    def read(self, bucket: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples of the groups ``bucket`` (the first one the largest).

        Returns:
            (x (B, n_max, d) float32 on the device, mask (B, n_max) bool of the real samples).
        """
        samples, dev = self.samples, self.device
        b, n_max, d = len(bucket), self.size_of[bucket[0]], samples.shape[1]
        idx = torch.tensor(bucket)
        lens = self.sizes[idx]
        mask = (torch.arange(n_max)[None, :] < lens[:, None]).to(dev)  # (B, n_max)
        rows = (self.starts[idx][:, None] + torch.arange(n_max)[None, :]).clamp_(max=samples.shape[0] - 1)
        if not isinstance(samples, torch.Tensor):
            x = samples.take(rows.flatten()).to(dev, non_blocking=True).view(b, n_max, d)
        elif b == 1:  # no padding: a view of the samples
            x = samples[self.start_of[bucket[0]] :][:n_max][None].to(dev)
        elif samples.device != dev:
            x = samples.index_select(0, rows.flatten().to(samples.device)).to(dev).view(b, n_max, d)
        else:
            if self._buf is None:
                self._buf = samples.new_empty(self.budget)
            x = self._buf[: b * n_max * d].view(b * n_max, d)
            torch.index_select(samples, 0, rows.flatten().to(dev), out=x)
            x = x.view(b, n_max, d)  # (B, n_max, d)
        return x, mask


def _cluster_bucket(
    x: torch.Tensor, mask: torch.Tensor, k: int, iters: int, gen: torch.Generator, n_init: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """k-means on one padded bucket (:func:`kmeans_padded`), senses ordered by count, empty ones dropped.

    Args:
        x: (B, n, d) padded samples; mask: (B, n) real samples.
        k: Senses per group; iters: Lloyd iterations; gen: the seeding's generator; n_init: seedings per group.
    Returns:
        (senses per group [(n_g, d)] on the device, counts per group [(n_g,)] int64 on the CPU,
        inertia (B,) float64 on the CPU).
    """
    c, cnt, inert = kmeans_padded(x, mask, k, iters, gen, n_init)
    order = torch.argsort(-cnt, dim=1, stable=True)  # largest first; empty clusters last
    c = c[torch.arange(x.shape[0], device=x.device)[:, None], order]
    cnt = torch.gather(cnt, 1, order).cpu()
    n_keep = (cnt > 0).sum(1).tolist()
    out_s = [ci[:nk] for ci, nk in zip(c.unbind(0), n_keep, strict=True)]
    out_c = [cnti[:nk] for cnti, nk in zip(cnt.unbind(0), n_keep, strict=True)]
    return out_s, out_c, inert.cpu()
