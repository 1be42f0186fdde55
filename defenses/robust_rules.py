"""Byzantine-robust aggregation rules, as ``federation.aggregator`` plugins.

Each rule is a pure function over the round's updates stacked into one matrix
``X`` of shape (n clients, d values) (flattened with :func:`fedsec_bench.updates.flatten`),
vectorised in torch, returning the aggregate and each client's *share* of it. The
plugins wrap them: they refuse impossible parameters at load time, stack the plain
updates, and report which clients each rule kept.

A client's share is the coefficient its own update carries in the aggregate,
normalised to sum to 1 over the round (for the coordinate-wise rules: the fraction
of the kept coordinate values that are its own). A client whose share is below the
plain mean's 1/n was *excluded or down-weighted*; with the simulator's ground truth
of who attacked (``poison.malicious`` in the client reports, recorded client-side by
the poisoning attacks, never seen by the rule) this gives the precision and recall
of excluding the truly malicious clients.

The rules are unweighted, as in their papers (a client's example count does not
change its vote), except ``geomedian`` whose RFA definition weights by examples.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from pydantic import Field, StrictFloat, StrictInt

from fedsec_bench.attacks.poisoning import MALICIOUS_KEY
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin, get_plugin
from fedsec_bench.updates import flatten, unflatten


@dataclass
class Robust:
    aggregate: torch.Tensor
    """(d,) the aggregated update."""
    share: torch.Tensor
    """(n,) each client's share of the aggregate; sums to 1."""


# --------------------------------------------------------------------------- distance-based selection


def pairwise_sq_distances(X: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances, through a Gram matrix of the centred updates.

    Centring first (distances do not change) keeps the ||a||² + ||b||² − 2ab form from
    cancelling catastrophically when the updates share a large common part. The centre is
    the update of median norm, not the mean: an attacker a million times larger than the
    honest updates drags the mean, and with it every centred honest update, far from the
    honest cluster, so their distances to each other became small differences of huge
    terms (in float32 they lost every digit, and Krum chose among the honest clients at
    random). With fewer than half of the clients attacking, the median norm is within
    the honest clients' norms. The product is made exactly symmetric (BLAS may round a·b
    and b·a differently), so that equal distances tie exactly and the rules' tie-breaks
    by client index apply.
    """
    norms = torch.linalg.vector_norm(X, dim=1)
    centre = X[torch.argsort(norms, stable=True)[(X.shape[0] - 1) // 2]]
    gram = X.new_zeros(X.shape[0], X.shape[0])
    for cols in _cache_blocks(X):
        centred = X[:, cols] - centre[cols]
        gram.addmm_(centred, centred.T)
    gram = (gram + gram.T) / 2
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0)
    return dist.fill_diagonal_(0)


def _cache_blocks(X: torch.Tensor) -> list[slice]:
    """Column slices for work over all clients at once (the Gram matrix, distances to a point).

    On one CPU thread, blocks of about 2^18 values: each block's temporaries stay in
    cache, where an (n, d) temporary costs a pass through memory and fresh pages (the
    Gram matrix runs 2–3× faster). With more threads, one block: every op on a block
    (a BLAS call above all) would wake the thread pool, and thousands of such wake-ups
    stall badly when other processes hold the cores.
    """
    n, d = X.shape
    return _column_blocks(X, max(1, (1 << 18) // max(1, n)) if torch.get_num_threads() == 1 else max(1, d))


def krum_scores(dist: torch.Tensor, f: int, min_neighbours: int = 0) -> torch.Tensor:
    """Krum's score of each update: sum of squared distances to its n − f − 2 nearest others."""
    n = dist.shape[0]
    k = max(n - f - 2, min_neighbours)
    others = dist + torch.diag(torch.full((n,), float("inf"), dtype=dist.dtype, device=dist.device))
    return others.topk(k, dim=1, largest=False).values.sum(1)


def multikrum(X: torch.Tensor, f: int, m: int) -> Robust:
    """Multi-Krum (Blanchard et al. 2017, "Machine learning with adversaries").

    score(i) = Σ_{j ∈ N(i)} ||V_i − V_j||², N(i) the n − f − 2 updates closest to V_i
    (j ≠ i); the output is the plain average of the m updates with the lowest scores
    (ties: lower client index first). m = 1 is Krum, m = n is the mean. Needs n ≥ 2f + 3.
    """
    scores = krum_scores(pairwise_sq_distances(X), f)
    chosen = torch.argsort(scores, stable=True)[:m]
    share = torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
    share[chosen] = 1.0 / m
    return Robust(X[chosen].mean(0), share)


def krum(X: torch.Tensor, f: int) -> Robust:
    """Krum (Blanchard et al. 2017): the single update with the lowest Krum score."""
    return multikrum(X, f, 1)


# --------------------------------------------------------------------------- coordinate-wise order statistics


def trimmed_mean(X: torch.Tensor, b: int, compiled: bool = False) -> Robust:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the b largest
    and b smallest values and average the remaining n − 2b. Needs n − 2b ≥ 1.

    Computed from the two cut values alone: with lo and hi the (b+1)-th smallest and the
    (b+1)-th largest value of a coordinate, clamping every value to [lo, hi] turns the b
    dropped at each end into copies of lo and hi and leaves the kept ones as they are, so

        Σ kept = Σ_i clamp(x_i, lo, hi) − b·lo − b·hi,

    with no cancellation against the dropped values (a huge poisoned value becomes hi).
    Where lo or hi is infinite the mean is lo + hi. When one or two values are kept
    (the median), the mean is taken of lo and hi directly, so it is exact.

    A NaN counts as +∞ (so it is trimmed as a largest value). A client's share counts the
    coordinates where its value lies in [lo, hi]: exactly its kept values, unless ties
    straddle a cut, where the tied clients all count.

    ``compiled`` (CPU only): run the same computation as two kernels fused by
    ``torch.compile``, each value loaded once instead of once per compare-exchange,
    after a one-off compile per (n, b, dtype) (see :func:`_fused_trimming`).
    """
    aggregate = X.new_empty(X.shape[1])
    counts = X.new_zeros(X.shape[0], dtype=torch.float64)
    trim = _Trimming(X, b, compiled)
    for cols in trim.blocks:
        block = X[:, cols]
        mean, inside = trim(block)
        if mean.sum().isnan() and block.isnan().any():  # NaNs count as +∞: do the block again
            mean, inside = trim(_nan_as_infinity(block))
        aggregate[cols] = mean
        counts += inside
    return Robust(aggregate, _fractions(counts, X.dtype))


def median(X: torch.Tensor, compiled: bool = False) -> Robust:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even.

    It is the trimmed mean with b = ⌊(n − 1) / 2⌋: one value (n odd) or two (n even) kept.
    """
    return trimmed_mean(X, (X.shape[0] - 1) // 2, compiled)


class _Trimming:
    """The trimmed mean of column blocks of X and each client's count of kept values.

    Per block: the cut values lo and hi (the (b+1)-th smallest and largest of each
    column; NaN as +∞ by torch.sort off the CPU, and on the CPU a NaN in a column makes
    that column's result NaN, which the caller handles), then the mean from the clamped
    values' column sums, and per client the count of its values in [lo, hi].

    The buffers are allocated once per call (fresh multi-megabyte buffers per block would
    each cost page faults) and X is never written. Compiled, each block is copied into one
    contiguous buffer ``_FUSED_BLOCK`` wide, the last one padded with zeros, and run by the
    two fused kernels of :func:`_fused_trimming`: every call then has the same shape and
    strides, so one compile serves every update size, and the second kernel reads the block
    from cache. A padding column is all zeros, which every client keeps, so its count comes
    off the clients' counts.
    """

    def __init__(self, X: torch.Tensor, b: int, compiled: bool):
        n, d = X.shape
        self.b = b
        self.fused = _fused_trimming(n, b) if compiled and X.device.type == "cpu" else None
        if self.fused:
            self.blocks = _column_blocks(X, _FUSED_BLOCK)
            self.padded = X.new_empty(n, _FUSED_BLOCK)
            return
        self.blocks = _column_blocks(X)
        width = min(d, self.blocks[0].stop)
        self.kept = X.new_empty(n, width)
        self.inside = torch.empty(n, width, dtype=torch.float32, device=X.device)
        self.ones = X.new_ones(n)
        if X.device.type == "cpu":
            self.network, self.cut_rows = _selection_network(n, b)
            self.spare = [X.new_empty(width) for _ in range(n + 1)]

    def cut_values(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, b = block.shape[0], self.b
        if block.device.type != "cpu":
            s = _nan_as_infinity(block).sort(dim=0).values
            return s[b], s[n - 1 - b]
        rows = _compare_exchange(list(block), self.network, [row[: block.shape[1]] for row in self.spare])
        return rows[self.cut_rows[0]], rows[self.cut_rows[1]]

    def __call__(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = block.shape[1]
        if self.fused:
            self.padded[:, :width] = block
            self.padded[:, width:] = 0
            mean, counts = self.fused(self.padded)
            return mean[:width], counts - (_FUSED_BLOCK - width)
        lo, hi = self.cut_values(block)
        kept = torch.clamp(block, lo, hi, out=self.kept[:, :width])
        mean = _mean_from_cuts(lambda: self.column_sums(kept), lo, hi, len(block), self.b)
        return mean, _count_equal(kept, block, out=self.inside[:, :width])

    def column_sums(self, kept: torch.Tensor) -> torch.Tensor:
        """Σ over the clients, in float32 at least; for float32 and float64 as a matrix–vector
        product (BLAS), about twice as fast as torch's reduction across rows."""
        if kept.dtype in (torch.float32, torch.float64):
            return torch.mv(kept.T, self.ones)
        return kept.sum(0, dtype=torch.float32)


def _mean_from_cuts(column_total, lo: torch.Tensor, hi: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """The trimmed mean from the cut values and ``column_total()``, the column sums of the
    clamped values (in float32 at least): (Σ clamp − b·(lo + hi)) / (n − 2b), or lo + hi
    where a cut is infinite; the exact mean of lo and hi when n − 2b ≤ 2 (no sum needed)."""
    if n - 2 * b <= 2:
        return _mean([lo, hi][: n - 2 * b])
    total = column_total()
    cuts = lo.to(total.dtype) + hi.to(total.dtype)  # in the sum's precision, not half precision
    mean = ((total - b * cuts) / (n - 2 * b)).to(lo.dtype)
    return torch.where(lo.isinf() | hi.isinf(), lo + hi, mean)


@functools.cache
def _fused_trimming(n: int, b: int):
    """The trimming of :class:`_Trimming` for n clients as two ``torch.compile`` kernels
    (inductor, which needs a C++ compiler), for a contiguous (n, ``_FUSED_BLOCK``) block.

    Eager, each compare-exchange of the selection network is one pass over a block, so a
    value is loaded and stored once per comparator. Fused, the network runs in registers,
    one SIMD vector of coordinates at a time. The clamped sums and counts are a second
    kernel: fused into the first, the n inputs kept live across the network spill.

    Compiling takes up to about 20 s per (n, b, dtype) (about 1 s once inductor has the
    kernels in its disk cache), so it pays for large updates or many rounds, not for small
    runs. Past torch._dynamo's recompile limit (8 (n, b, dtype) per process) it runs
    uncompiled.
    """
    network, (low_row, high_row) = _selection_network(n, b)

    def cut_values(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_compare_exchange`'s network, written functionally: the compiler, not
        spare buffers, decides where values live."""
        rows = list(block.unbind(0))
        for i, j, low, high in network:
            a, c = rows[i], rows[j]
            if low:
                rows[i] = torch.minimum(a, c)
            if high:
                rows[j] = torch.maximum(a, c)
        return rows[low_row], rows[high_row]

    def mean_and_counts(block, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
        def column_total() -> torch.Tensor:  # row by row: a reduction across rows vectorises badly
            total = torch.zeros_like(lo, dtype=torch.promote_types(lo.dtype, torch.float32))
            for x in block.unbind(0):
                total = total + torch.clamp(x, lo, hi)
            return total

        return _mean_from_cuts(column_total, lo, hi, n, b), ((block >= lo) & (block <= hi)).sum(1)

    # Static shapes (some 40% faster than kernels for any width). Not fullgraph: past the
    # recompile limit, dynamo then runs the function uncompiled, with a warning, instead of failing.
    cut_values = torch.compile(cut_values, dynamic=False)
    mean_and_counts = torch.compile(mean_and_counts, dynamic=False)
    return lambda block: mean_and_counts(block, *cut_values(block))


# Order statistics on the CPU. torch.sort along the client axis runs one small scalar sort
# per coordinate, several times slower than numpy's, so the cut values are found by a
# selection network instead (and Bulyan's values sorted by a sorting network): a fixed
# sequence of compare-exchanges, each an elementwise min and/or max of two clients'
# values over a block of coordinates. The work goes block by block, each op on one
# client's values of a block, short enough to stay in cache and
# under torch's parallel grain (32768 values): it runs in the calling thread, where
# thousands of short multithreaded ops would each wait for the thread pool (badly so
# when other processes hold the cores). On an accelerator torch.sort is fast and each op
# a kernel launch, so there it sorts, in one block.

_BLOCK = (1 << 15) - 1
_FUSED_BLOCK = 1 << 15
"""The compiled kernels' block width: a power of two, so their SIMD loops have no scalar
tail (torch's parallel grain, which bounds ``_BLOCK``, does not concern them)."""


def _column_blocks(X: torch.Tensor, width: int = _BLOCK) -> list[slice]:
    """Slices of X's columns: blocks of ``width`` on the CPU, one slice on other devices."""
    d = X.shape[1]
    width = width if X.device.type == "cpu" else max(1, d)
    return [slice(c, c + width) for c in range(0, max(1, d), width)]


def _compare_exchange(rows: list[torch.Tensor], network, spare: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run a pruned network over the rows: (i, j, low, high) puts min(row i, row j) on row i
    when ``low`` and the max on row j when ``high``. Results go to the spare buffers (a
    row's own buffer once it has one, never the caller's rows)."""
    owned = [False] * len(rows)
    for i, j, low, high in network:
        a, c = rows[i], rows[j]
        if low and high:
            new_low = torch.minimum(a, c, out=spare.pop())
            rows[j] = torch.maximum(a, c, out=c if owned[j] else spare.pop())
            if owned[i]:
                spare.append(a)
            rows[i] = new_low
        elif low:
            rows[i] = torch.minimum(a, c, out=a if owned[i] else spare.pop())
        else:
            rows[j] = torch.maximum(a, c, out=c if owned[j] else spare.pop())
        owned[i] |= low
        owned[j] |= high
    return rows


def _batcher(lines: list[int]) -> list[tuple[int, int]]:
    """Batcher's odd–even merge sort of the given lines (ascending), on the next power of
    two, keeping the comparators within the real lines (the missing ones stand for +∞,
    which never move)."""
    n = len(lines)
    size = 1 << max(0, n - 1).bit_length()
    network = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        network.append((lines[i + j], lines[i + j + k]))
            k //= 2
        p *= 2
    return network


def _merge(a: list[int], b: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Batcher's odd–even merge of two sorted line lists; returns the comparators and the
    merged lines in ascending order. Each list is padded to the next power of two, a with
    −∞ below and b with +∞ above, so that a comparator touching padding never moves anything."""
    size = 1 << (max(len(a), len(b), 1) - 1).bit_length()
    lines = [None] * (size - len(a)) + a + b + [None] * (size - len(b))
    network = []

    def merge(first: int, length: int, stride: int) -> None:
        if 2 * stride < length:
            merge(first, length, 2 * stride)
            merge(first + stride, length, 2 * stride)
            network.extend((i, i + stride) for i in range(first + stride, first + length - stride, 2 * stride))
        else:
            network.append((first, first + stride))

    merge(0, 2 * size, 1)
    real = [(lines[i], lines[j]) for i, j in network if lines[i] is not None and lines[j] is not None]
    return real, [line for line in lines if line is not None]


def _extremes(lines: list[int], t: int) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Comparators that sort the t smallest and the t largest values of the lines, and the
    lines holding them (ascending): each half by recursion, then the halves' smallest
    merged and their largest merged; a part too small to split in two of ≥ 2t is sorted."""
    if len(lines) < 4 * t:
        return _batcher(lines), lines[:t], lines[-t:]
    half = len(lines) // 2
    low_net, low_bottom, low_top = _extremes(lines[:half], t)
    high_net, high_bottom, high_top = _extremes(lines[half:], t)
    bottom_net, bottom = _merge(low_bottom, high_bottom)
    top_net, top = _merge(low_top, high_top)
    return low_net + high_net + bottom_net + top_net, bottom[:t], top[-t:]


@functools.cache
def _selection_network(n: int, b: int) -> tuple[tuple[tuple[int, int, bool, bool], ...], tuple[int, int]]:
    """Compare-exchanges that bring the (b+1)-th smallest and the (b+1)-th largest of n
    values onto two rows, and those rows.

    Sorting only each end (:func:`_extremes`) and then keeping only the comparators whose
    outputs are still needed (for each, whether its min and/or its max is) costs about
    half a pruned full sort: 146 against 206 elementwise ops for n = 20, b = 4, and 436
    against 806 for n = 50.
    """
    network, bottom, top = _extremes(list(range(n)), b + 1)
    outputs = (bottom[b], top[-1 - b])
    live, pruned = set(outputs), []
    for i, j in reversed(network):
        if i in live or j in live:
            pruned.append((i, j, i in live, j in live))
            live.update((i, j))
    return tuple(reversed(pruned)), outputs


@functools.cache
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Compare-exchanges (i, j), i < j, that sort n rows (Batcher's odd–even merge sort)."""
    return tuple(_batcher(list(range(n))))


def _sort_columns(block: torch.Tensor, network: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
    """The values of each column of the block in ascending order (NaN as +∞): row k holds
    the k-th smallest. By ``network`` on the CPU, by torch.sort elsewhere. Sorts in place."""
    block = _nan_as_infinity(block, inplace=True)
    if block.device.type != "cpu":
        return list(block.sort(dim=0).values)
    rows = list(block)
    spare = torch.empty_like(rows[0])
    for i, j in network:
        torch.minimum(rows[i], rows[j], out=spare)
        torch.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return rows


def _nan_as_infinity(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x with NaN replaced by +∞ and the infinities kept (``nan_to_num`` alone would also
    turn ±∞ into the largest finite values)."""
    return (x.nan_to_num_ if inplace else x.nan_to_num)(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _mean(rows: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise mean of the rows, summed in float32 at least (as torch.mean does for
    half-precision updates)."""
    total = rows[0].to(torch.promote_types(rows[0].dtype, torch.float32), copy=True)
    for row in rows[1:]:
        total += row
    return (total / len(rows)).to(rows[0].dtype)


def _count_equal(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(n,) per row, at how many columns a equals b. The test is written as 0/1 into the
    float32 ``out`` (a bool result is several times slower to produce in torch), summed
    exactly while a block is under 2^24 columns."""
    return torch.eq(a, b, out=out).sum(1)


def _fractions(counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Counts (accumulated in float64: exact past 2^24) as fractions of their total."""
    return (counts / counts.sum()).to(dtype)


# --------------------------------------------------------------------------- Bulyan


def bulyan(X: torch.Tensor, f: int) -> Robust:
    """Bulyan (El Mhamdi et al. 2018, "The hidden vulnerability of distributed learning in Byzantium").

    1. Selection: θ = n − 2f times, run Krum on the updates not yet selected and move
       its choice to the selection set S (so S holds θ updates).
    2. Aggregation: β = θ − 2f; for each coordinate, average the β values of S closest
       to the coordinate's median over S.

    Needs n ≥ 4f + 3 (so β ≥ 3). Krum over r remaining updates scores with the
    r − f − 2 nearest others; in the last selections r falls to 2f + 1 where that
    count is below one, and the score then uses the single nearest other. As for the
    trimmed mean, a NaN counts as +∞, and a client's share counts the coordinates where
    its value lies between the lowest and the highest of the β values kept.
    """
    n = X.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    dist = pairwise_sq_distances(X)
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        idx = torch.tensor(remaining, device=X.device)
        scores = krum_scores(dist[idx][:, idx], f, min_neighbours=1 if len(remaining) > 1 else 0)
        chosen.append(remaining.pop(int(torch.argmin(scores))))
    network = _sorting_network(theta)
    aggregate = X.new_empty(X.shape[1])
    counts = X.new_zeros(theta, dtype=torch.float64)
    rows = torch.tensor(chosen, device=X.device)
    for cols in _column_blocks(X):
        block = X[:, cols].index_select(0, rows)
        aggregate[cols], low, high = _closest_to_median(_sort_columns(block.clone(), network), beta)
        counts += _count_equal(torch.clamp(block, low, high), block, out=torch.empty_like(block, dtype=torch.float32))
    share = torch.zeros(n, dtype=X.dtype, device=X.device)
    share[chosen] = _fractions(counts, X.dtype)
    return Robust(aggregate, share)


def _closest_to_median(s: list[torch.Tensor], beta: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per coordinate of the sorted rows s (θ of them): the mean of the β values closest to
    the median, and the lowest and the highest of those β.

    The β closest values of a sorted column are a window s[w : w + β]; s[k] (k < θ − β)
    lies below it exactly when it is farther from the median than s[k + β] (a tie keeps
    the lower value), which holds for k < w and fails after, since s is sorted. The
    window holds one row of each residue class mod β: s[k + β] takes the place of s[k]
    in its class whenever s[k] lies below.
    """
    theta = len(s)
    middle = (theta - 1) // 2
    centre = _mean(s[middle : theta - middle])
    kept = s[:beta]
    for k in range(theta - beta):
        below = (centre - s[k]) > (s[k + beta] - centre)
        kept[k % beta] = torch.where(below, s[k + beta], kept[k % beta])
    return _mean(kept), functools.reduce(torch.minimum, kept), functools.reduce(torch.maximum, kept)


# --------------------------------------------------------------------------- clipping and the geometric median


def norm_bound(X: torch.Tensor, max_norm: float) -> Robust:
    """Norm thresholding (Sun et al. 2019, "Can you really backdoor federated learning?").

    Each update is scaled by min(1, M / ||Δw_k||) and the scaled updates are averaged.
    (The paper's "weak DP" Gaussian noise is added by the plugin.)
    """
    scale = (max_norm / X.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return Robust(scale @ X / X.shape[0], scale / scale.sum())


def centered_clip(X: torch.Tensor, start: torch.Tensor, tau: float, iterations: int) -> Robust:
    """Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from history for Byzantine robust optimization").

    v_0 = ``start`` (the previous round's aggregate: the "history");
    v_{l+1} = v_l + (1/n) Σ_i (x_i − v_l) · min(1, τ / ||x_i − v_l||), for L iterations.
    A client's share is its clipping factor min(1, τ / ||x_i − v||) in the last iteration.
    """
    v = start
    for _ in range(iterations):
        factor = (tau / _distances(X, v).clamp_min(1e-12)).clamp(max=1.0)
        # Σ_i f_i (x_i − v) = f @ X − (Σ_i f_i) v: one product over X instead of forming X − v
        # again; where the two terms cancel (updates close to v) this costs about an ulp of v.
        v = v + (factor @ X - factor.sum() * v) / X.shape[0]
    return Robust(v, factor / factor.sum())


def geomedian(X: torch.Tensor, alpha: torch.Tensor, nu: float, max_iter: int, ftol: float) -> Robust:
    """Geometric median by the smoothed Weiszfeld algorithm (RFA; Pillutla, Kakade & Harchaoui 2022).

    Minimises g(v) = Σ_i α_i ||v − w_i|| (α the clients' example counts, normalised),
    from v_0 = Σ α_i w_i, by v ← Σ β_i w_i / Σ β_i with β_i = α_i / max(ν, ||v − w_i||);
    stops after ``max_iter`` updates or when g improves by less than ``ftol`` · g.
    A client's share is β_i / Σ β in the last update.
    """
    alpha = alpha / alpha.sum()
    v, distance = _combination_and_distances(X, alpha)
    objective = alpha @ distance
    share = alpha
    for _ in range(max_iter):
        beta = alpha / distance.clamp_min(nu)
        share = beta / beta.sum()
        v, distance = _combination_and_distances(X, share)
        previous, objective = objective, alpha @ distance
        if abs(previous - objective) < ftol * objective:
            break
    return Robust(v, share)


def _combination_and_distances(X: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v = weights @ X and (n,) ||x_i − v||, in one pass over X: each column block's part of
    v is made and the distances to it taken while the block is in cache (half the memory
    traffic of a product and then a distance pass)."""
    v = X.new_empty(X.shape[1])
    blocks = []
    for cols in _cache_blocks(X):
        block = X[:, cols]
        blocks.append(torch.linalg.vector_norm(block - torch.mv(block.T, weights, out=v[cols]), dim=1))
    return v, torch.linalg.vector_norm(torch.stack(blocks), dim=0)


def _distances(X: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n,) ||x_i − v||, as the norm of the clients' norms over column blocks."""
    blocks = [torch.linalg.vector_norm(X[:, cols] - v[cols], dim=1) for cols in _cache_blocks(X)]
    return torch.linalg.vector_norm(torch.stack(blocks), dim=0)


# --------------------------------------------------------------------------- plugins


class FOptions(Options):
    f: int = Field(1, ge=0, description="Number of Byzantine clients per round the rule tolerates.")


class RobustAggregator(Plugin):
    """Stacks the plain updates, applies :meth:`rule`, and reports each client's share.

    Figures (per round): ``robust.selected`` (clients kept at ≥ the mean's 1/n share),
    ``robust.malicious_share`` (share of the aggregate from clients that truly
    attacked; lower is better), ``robust.exclusion_precision`` and
    ``robust.exclusion_recall`` (of excluding or down-weighting exactly the truly
    malicious clients; higher is better, absent when undefined). The per-client table
    ``robust_selection.csv`` goes to the artifacts.
    """

    kind = "aggregator"

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.shares: dict[int, float] = {}
        self.rows: list[dict] = []

    def rule(self, X: torch.Tensor, messages: list[Message]) -> Robust:
        raise NotImplementedError

    @classmethod
    def condition(cls, options: Options, n: int) -> str | None:
        """Why this rule cannot run on n updates, or None."""

    @classmethod
    def check(cls, options: Options, scenario) -> None:
        problem = cls.condition(options, scenario.federation.clients_per_round)
        if problem:
            raise ValueError(f"{problem} (n = federation.clients_per_round)")
        for i, spec in enumerate(scenario.defenses):
            try:
                defense = get_plugin(spec.name, "defense")
            except ValueError:
                continue  # reported by the defense's own check
            if "aggregation" in defense.hooks():
                raise ValueError(
                    f"defenses[{i}] ({spec.name}) aggregates the round itself (encrypted or masked updates), "
                    f"so {cls.name} would never see a plain update; drop one of them"
                )

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        for m in messages:
            if not isinstance(m.payload, dict):
                raise TypeError(
                    f"{self.name} needs each client's plain update, but client {m.client_id} sent a "
                    f"{type(m.payload).__name__}: robust rules cannot run on encrypted or masked updates"
                )
        if not messages:
            self.shares = {}
            return {k: torch.zeros_like(t) for k, t in round.global_state.items()}
        problem = self.condition(self.options, len(messages))
        if problem:
            raise ValueError(f"round {round.round}: {problem}")
        X = torch.stack([flatten(m.payload) for m in messages])
        result = self.rule(X, messages)
        self.shares = {m.client_id: float(s) for m, s in zip(messages, result.share)}
        return unflatten(result.aggregate, like=round.global_state)

    def round_end(self, round: RoundContext, metrics: dict[str, float]) -> dict[str, float]:
        if not self.shares:
            return {}
        figures, rows = selection_figures(self.shares, malicious_clients(round) & self.shares.keys())
        self.rows.extend({"round": round.round, **row} for row in rows)
        return figures

    def training_end(self, runtime) -> None:
        if self.rows:
            runtime.write_table("robust_selection.csv", self.rows)


def malicious_clients(round: RoundContext) -> set[int]:
    """Ground truth from the simulator-side reports: who attacked this round (delivered or not)."""
    return {r.client_id for r in round.reports if r.metrics.get(MALICIOUS_KEY, 0.0) > 0}


def selection_figures(shares: dict[int, float], malicious: set[int]) -> tuple[dict[str, float], list[dict]]:
    """Figures and per-client rows from the clients' shares and the truly malicious set."""
    n = len(shares)
    excluded = {cid for cid, s in shares.items() if s < (1 - 1e-6) / n}
    caught = len(excluded & malicious)
    figures = {
        "robust.selected": float(n - len(excluded)),
        "robust.malicious_share": float(sum(shares[c] for c in malicious if c in shares)),
    }
    if excluded:
        figures["robust.exclusion_precision"] = caught / len(excluded)
    if malicious:
        figures["robust.exclusion_recall"] = caught / len(malicious)
    rows = [
        {"client_id": cid, "share": s, "excluded": cid in excluded, "malicious": cid in malicious}
        for cid, s in shares.items()
    ]
    return figures, rows


class Krum(RobustAggregator):
    name = "krum"
    summary = "the one update closest to its n − f − 2 nearest others (Blanchard et al. 2017)"
    OptionsModel = FOptions

    @classmethod
    def condition(cls, options, n):
        if n < 2 * options.f + 3:
            return f"{cls.name} needs n ≥ 2f+3: got n={n}, f={options.f}"

    def rule(self, X, messages):
        return krum(X, self.options.f)


class MultiKrumOptions(FOptions):
    m: int | None = Field(None, ge=1, description="How many lowest-score updates to average; default n − f.")


class MultiKrum(Krum):
    name = "multikrum"
    summary = "average of the m updates with the lowest Krum scores (Blanchard et al. 2017)"
    OptionsModel = MultiKrumOptions

    @classmethod
    def condition(cls, options, n):
        if options.m is not None and options.m > n:
            return f"multikrum needs m ≤ n: got n={n}, m={options.m}"
        return super().condition(options, n)

    def rule(self, X, messages):
        m = self.options.m if self.options.m is not None else X.shape[0] - self.options.f
        return multikrum(X, self.options.f, m)


class OrderStatisticsOptions(Options):
    compile: bool = Field(
        False,
        description="CPU only: compute the order statistics with two kernels fused by torch.compile "
        "(needs a C++ compiler): about 2–2.5× faster per round after a one-off compile of up to about "
        "20 s, so worth it for large updates or many rounds.",
    )


class OrderStatistics(RobustAggregator):
    """The coordinate-wise rules built on the two cut values: median and trimmed mean."""

    OptionsModel = OrderStatisticsOptions

    @classmethod
    def check(cls, options, scenario):
        super().check(options, scenario)
        if options.compile:
            missing = cpp_compiler_problem()
            if missing:
                raise ValueError(f"compile: true needs a C++ compiler for torch.compile: {missing}; "
                                 "install one (g++) or set compile: false")


def cpp_compiler_problem() -> str | None:
    """Why torch.compile's inductor cannot build CPU kernels here (no C++ compiler), or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without this helper: its first compile will say what is missing
        return None
    try:
        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - any failure to find or run one means no compiler
        return f"none found ({type(exc).__name__}; torch looks for $CXX, else g++)"
    return None


class Median(OrderStatistics):
    name = "median"
    summary = "coordinate-wise median (Yin et al. 2018)"

    def rule(self, X, messages):
        return median(X, self.options.compile)


class TrimmedMeanOptions(OrderStatisticsOptions):
    trim: StrictInt | StrictFloat = Field(
        0.1, ge=0, description="Trimmed from each end per coordinate: a fraction β < 0.5 (float) or a count b (int)."
    )


class TrimmedMean(OrderStatistics):
    name = "trimmed_mean"
    summary = "coordinate-wise mean after dropping the b largest and b smallest values (Yin et al. 2018)"
    OptionsModel = TrimmedMeanOptions

    @staticmethod
    def count(trim: int | float, n: int) -> int:
        """b = trim for a count; ⌊β·n⌋ for a fraction β (Yin et al.)."""
        return trim if isinstance(trim, int) else int(trim * n)

    @classmethod
    def condition(cls, options, n):
        trim = options.trim
        if isinstance(trim, float) and trim >= 0.5:
            return f"trimmed_mean needs a fraction trim < 0.5: got trim={trim}"
        b = cls.count(trim, n)
        if n - 2 * b < 1:
            return f"trimmed_mean needs n − 2b ≥ 1: got n={n}, b={b}"

    def rule(self, X, messages):
        return trimmed_mean(X, self.count(self.options.trim, X.shape[0]), self.options.compile)


class Bulyan(RobustAggregator):
    name = "bulyan"
    summary = "repeated Krum selection, then a coordinate-wise average around the median (El Mhamdi et al. 2018)"
    OptionsModel = FOptions

    @classmethod
    def condition(cls, options, n):
        if n < 4 * options.f + 3:
            return f"bulyan needs n ≥ 4f+3: got n={n}, f={options.f}"

    def rule(self, X, messages):
        return bulyan(X, self.options.f)


class NormBoundOptions(Options):
    max_norm: float = Field(1.0, gt=0, description="M: each update is scaled down to L2 norm ≤ M.")
    noise_std: float = Field(0.0, ge=0, description="σ of the Gaussian noise added to the aggregate (Sun et al.'s weak DP).")


class NormBound(RobustAggregator):
    name = "norm_bound"
    summary = "server-side norm thresholding, optionally with weak-DP noise (Sun et al. 2019)"
    OptionsModel = NormBoundOptions

    def rule(self, X, messages):
        return norm_bound(X, self.options.max_norm)

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Sun et al.'s weak DP: N(0, σ²) noise on every coordinate of the aggregate."""
        if self.options.noise_std == 0:
            return aggregate
        generator = torch.Generator().manual_seed(self.runtime.seed_for(round.round, 0x4E42))
        return {
            name: t + self.options.noise_std * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
            for name, t in aggregate.items()
        }


class CenteredClipOptions(Options):
    tau: float = Field(1.0, gt=0, description="τ: clipping radius around the current centre.")
    iterations: int = Field(1, ge=1, description="L: clipping iterations per round (the paper uses 1).")


class CenteredClip(RobustAggregator):
    name = "centered_clip"
    summary = "iterative clipping around the previous aggregate (Karimireddy et al. 2021)"
    OptionsModel = CenteredClipOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.previous: torch.Tensor | None = None

    def rule(self, X, messages):
        start = self.previous if self.previous is not None else torch.zeros_like(X[0])
        result = centered_clip(X, start, self.options.tau, self.options.iterations)
        self.previous = result.aggregate
        return result


class GeoMedianOptions(Options):
    nu: float = Field(1e-6, gt=0, description="ν: smoothing, the least distance a weight divides by.")
    max_iter: int = Field(4, ge=1, description="Most Weiszfeld updates per round.")
    ftol: float = Field(1e-6, ge=0, description="Stop when the objective improves by less than ftol · objective.")


class GeoMedian(RobustAggregator):
    name = "geomedian"
    summary = "example-weighted geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022)"
    OptionsModel = GeoMedianOptions

    def rule(self, X, messages):
        alpha = torch.tensor([float(m.num_examples) for m in messages], dtype=X.dtype, device=X.device)
        o = self.options
        return geomedian(X, alpha, o.nu, o.max_iter, o.ftol)
