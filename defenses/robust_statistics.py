"""The robust aggregation rules as pure functions of the round's stacked updates.

Each takes ``X`` of shape (n clients, d values) (flattened with
:func:`fedsec_bench.updates.flatten`), is written with plain torch ops as its paper defines
it, and returns the aggregate and each client's *share* of it (:class:`Robust`). The
plugins in :mod:`.robust_rules` wrap them.

A client's share is the coefficient its own update carries in the aggregate, normalised
to sum to 1 over the round (for the coordinate-wise rules: the fraction of the kept
coordinate values that are its own).

Aggregation is a small part of a round (local training dominates it; see
``benchmarks/robust_aggregation_share.py``), so the rules favour the plain form of
their definitions over speed.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Robust:
    aggregate: torch.Tensor
    """(d,) the aggregated update."""
    share: torch.Tensor
    """(n,) each client's share of the aggregate; sums to 1 (all 0 when a filter kept no one: ``dnc``, ``signguard``)."""


CHUNK_VALUES = 1 << 22
"""Values (over all clients) per column chunk: bounds the temporaries of a sort or a
difference to a few tens of MB whatever the model size."""


def column_chunks(*tensors: torch.Tensor) -> zip:
    """Matching column chunks of (n, d) matrices and (d,) vectors (views, not copies)."""
    width = max(1, CHUNK_VALUES // tensors[0].shape[0])
    return zip(*(t.split(width, dim=-1) for t in tensors))


def _mean(rows: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0, summed in float32 at least (half-precision updates are rounded once)."""
    return rows.mean(0, dtype=torch.promote_types(rows.dtype, torch.float32)).to(rows.dtype)


def _nan_as_infinity(x: torch.Tensor) -> torch.Tensor:
    """x with NaN as +∞, the order statistics' convention (``nan_to_num`` alone would also
    turn ±∞ into the largest finite values)."""
    return x.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _inside(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(n,) per client, at how many columns its value lies in [low, high] (summed by the
    callers in float64, exact past 2^24)."""
    return ((x >= low) & (x <= high)).sum(1)


def distances_to(X: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(n,) ||x_i − v||, as the norm of the per-chunk norms."""
    return torch.stack([(x - c).norm(dim=1) for x, c in column_chunks(X, v)]).norm(dim=0)


# --------------------------------------------------------------------------- distance-based selection


def cosine_similarities(X: torch.Tensor) -> torch.Tensor:
    """(n, n) cos(x_i, x_j) in float64, from the Gram matrix of the unit rows (summed over column
    chunks); a zero row has cosine 0 with every row (scikit-learn's convention)."""
    unit = X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gram = sum(u.double() @ u.double().T for (u,) in column_chunks(unit))
    return (gram + gram.T) / 2


def pairwise_sq_distances(X: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances ||a||² + ||b||² − 2ab, from the Gram matrix of the
    updates centred at the update of median norm.

    Centring (distances do not change) keeps the formula from cancelling catastrophically
    when the updates share a large common part. The centre is the update of median norm,
    not the mean: an attacker a million times larger would drag the mean, and with it every
    centred honest update, so far that the honest distances became small differences of
    huge terms (in float32 Krum then chose among the honest clients at random). With fewer
    than half of the clients attacking, the median norm is an honest one. The Gram matrix
    is made exactly symmetric (BLAS may round a·b and b·a differently) so that equal
    distances tie exactly and the tie-breaks by client index apply.
    """
    centre = X[torch.argsort(X.norm(dim=1), stable=True)[(X.shape[0] - 1) // 2]]
    gram = sum(y @ y.T for y in (x - c for x, c in column_chunks(X, centre)))
    gram = (gram + gram.T) / 2
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0).fill_diagonal_(0)


def krum_scores(dist: torch.Tensor, f: int, min_neighbours: int = 0) -> torch.Tensor:
    """Krum's score of each update: sum of squared distances to its n − f − 2 nearest others."""
    n = dist.shape[0]
    others = dist + torch.diag(dist.new_full((n,), math.inf))
    return others.topk(max(n - f - 2, min_neighbours), dim=1, largest=False).values.sum(1)


def multikrum(X: torch.Tensor, f: int, m: int) -> Robust:
    """Multi-Krum (Blanchard et al. 2017, "Machine learning with adversaries").

    score(i) = Σ_{j ∈ N(i)} ||V_i − V_j||², N(i) the n − f − 2 updates closest to V_i
    (j ≠ i); the output is the plain average of the m updates with the lowest scores
    (ties: lower client index first). m = 1 is Krum, m = n is the mean. Needs n ≥ 2f + 3.
    """
    chosen = torch.argsort(krum_scores(pairwise_sq_distances(X), f), stable=True)[:m]
    share = X.new_zeros(X.shape[0])
    share[chosen] = 1.0 / m
    return Robust(X[chosen].mean(0), share)


def krum(X: torch.Tensor, f: int) -> Robust:
    """Krum (Blanchard et al. 2017): the single update with the lowest Krum score."""
    return multikrum(X, f, 1)


# --------------------------------------------------------------------------- coordinate-wise order statistics


def trimmed_mean(X: torch.Tensor, b: int) -> Robust:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the b largest
    and b smallest values and average the remaining n − 2b. Needs n − 2b ≥ 1.

    The mean is taken over the kept values alone, so a huge dropped value costs the kept
    ones no precision. A NaN counts as +∞ (trimmed as a largest value). A client's share
    counts the coordinates where its value lies between the lowest and the highest kept
    value: exactly its kept values, unless ties straddle a cut, where the tied clients all count.
    """
    n = X.shape[0]
    aggregate = X.new_empty(X.shape[1])
    counts = X.new_zeros(n, dtype=torch.float64)
    for x, out in column_chunks(X, aggregate):
        x = _nan_as_infinity(x)
        kept = x.sort(dim=0).values[b : n - b]
        out.copy_(_mean(kept))
        counts += _inside(x, kept[0], kept[-1])
    return Robust(aggregate, (counts / counts.sum()).to(X.dtype))


def median(X: torch.Tensor) -> Robust:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even.

    It is the trimmed mean with b = ⌊(n − 1) / 2⌋: one value (n odd) or two (n even) kept.
    """
    return trimmed_mean(X, (X.shape[0] - 1) // 2)


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

    The β values closest to the median of a sorted column s are a window s[w : w + β]:
    s[k] lies below the window exactly when it is farther from the median than s[k + β]
    (a tie keeps the lower value), which holds for k < w and fails after, so w counts those k.
    """
    n = X.shape[0]
    theta, beta = n - 2 * f, n - 4 * f
    dist = pairwise_sq_distances(X)
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        idx = torch.tensor(remaining, device=X.device)
        scores = krum_scores(dist[idx][:, idx], f, min_neighbours=1 if len(remaining) > 1 else 0)
        chosen.append(remaining.pop(int(torch.argmin(scores))))
    S = X[chosen]
    middle = (theta - 1) // 2
    aggregate = X.new_empty(X.shape[1])
    counts = X.new_zeros(theta, dtype=torch.float64)
    for x, out in column_chunks(S, aggregate):
        x = _nan_as_infinity(x)
        s = x.sort(dim=0).values
        centre = _mean(s[middle : theta - middle])
        w = ((centre - s[: theta - beta]) > (s[beta:] - centre)).sum(0)
        kept = s.gather(0, w + torch.arange(beta, device=X.device)[:, None])
        out.copy_(_mean(kept))
        counts += _inside(x, kept[0], kept[-1])
    share = X.new_zeros(n)
    share[chosen] = (counts / counts.sum()).to(X.dtype)
    return Robust(aggregate, share)


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
        factor = (tau / distances_to(X, v).clamp_min(1e-12)).clamp(max=1.0)
        # Σ_i f_i (x_i − v) = f @ X − (Σ_i f_i) v, without an (n, d) X − v
        v = v + (factor @ X - factor.sum() * v) / X.shape[0]
    return Robust(v, factor / factor.sum())


def geomedian(X: torch.Tensor, alpha: torch.Tensor, nu: float, max_iter: int, ftol: float) -> Robust:
    """Geometric median by the smoothed Weiszfeld algorithm (RFA; Pillutla, Kakade & Harchaoui 2022).

    Minimises g(v) = Σ_i α_i ||v − w_i|| (α the clients' example counts, normalised),
    from v_0 = Σ α_i w_i, by v ← Σ β_i w_i / Σ β_i with β_i = α_i / max(ν, ||v − w_i||);
    stops after ``max_iter`` updates or when g improves by less than ``ftol`` · g.
    A client's share is β_i / Σ β in the last update.
    """
    share = alpha = alpha / alpha.sum()
    v = alpha @ X
    distance = distances_to(X, v)
    objective = alpha @ distance
    for _ in range(max_iter):
        beta = alpha / distance.clamp_min(nu)
        share = beta / beta.sum()
        v = share @ X
        distance = distances_to(X, v)
        previous, objective = objective, alpha @ distance
        if abs(previous - objective) < ftol * objective:
            break
    return Robust(v, share)


# --------------------------------------------------------------------------- pre-aggregators


@dataclass
class Mixed:
    """What a pre-aggregator hands the rule: ``rows = weights @ X``."""

    rows: torch.Tensor
    """(m, d) the vectors the rule receives."""
    weights: torch.Tensor
    """(m, n) each row's coefficients over the original updates; every row sums to 1."""


def mix(X: torch.Tensor, weights: torch.Tensor) -> Mixed:
    return Mixed(weights @ X, weights)


def bucketing(X: torch.Tensor, s: int, generator: torch.Generator) -> Mixed:
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-robust learning on
    heterogeneous datasets via bucketing", Algorithm 1).

    A random permutation π of the n updates is cut into ⌈n/s⌉ buckets of s consecutive
    entries (the last one shorter when s does not divide n); each bucket is replaced by the
    mean of its members. Averaging s updates shrinks the honest ones' spread (their
    heterogeneity) by about √s, while at most f of the buckets hold an attacker.
    """
    n = X.shape[0]
    order = torch.randperm(n, generator=generator).to(X.device)
    weights = X.new_zeros(math.ceil(n / s), n)
    for b, members in enumerate(order.split(s)):
        weights[b, members] = 1.0 / len(members)
    return mix(X, weights)


def nnm(X: torch.Tensor, f: int) -> Mixed:
    """Nearest neighbour mixing (Allouah et al., AISTATS 2023, "Fixing by mixing", Algorithm 1).

    Each x_i is replaced by the mean of its n − f nearest neighbours in Euclidean distance,
    itself included (ties: lower index first). Needs f < n. Mixing pulls every honest vector
    towards the honest mean and bounds how far a Byzantine one can stay from it, which makes
    any rule that is robust for homogeneous data robust under heterogeneity.
    """
    n = X.shape[0]
    dist = pairwise_sq_distances(X).fill_diagonal_(-1.0)  # itself first, even beside an exact duplicate
    neighbours = torch.argsort(dist, dim=1, stable=True)[:, : n - f]
    weights = X.new_zeros(n, n).scatter_(1, neighbours, 1.0 / (n - f))
    return mix(X, weights)


# --------------------------------------------------------------------------- sign- and spectrum-based filters


def robust_lr(X: torch.Tensor, alpha: torch.Tensor, threshold: int) -> Robust:
    """Robust learning rate (Ozdayi, Kantarcioglu & Gel, AAAI 2021, eq. 2-3).

    Per coordinate j the server's learning rate is +η where |Σ_i sign(Δ_i,j)| ≥ θ and −η
    where fewer than θ more clients agree on the sign than disagree: a backdoor's
    coordinates, pushed by a few clients only, are moved against them. The aggregate is
    lr ⊙ (the example-weighted mean, FedAvg's as in the paper); η is ``federation.server_lr``,
    applied by the round loop. Every client is kept: each share is 1/n (the sign vote is
    unweighted, and a share below 1/n would read as an exclusion).
    """
    votes = torch.zeros_like(X[0])
    for x, out in column_chunks(X, votes):
        out.copy_(x.sign().sum(0))
    sign = torch.where(votes.abs() >= threshold, 1.0, -1.0).to(X.dtype)
    mean = (alpha / alpha.sum()).to(X.dtype) @ X
    n = X.shape[0]
    return Robust(sign * mean, X.new_full((n,), 1.0 / n))


def kept_mean(X: torch.Tensor, kept: torch.Tensor, scale: torch.Tensor | None = None) -> Robust:
    """Mean of the kept rows (each scaled by ``scale`` when given), and their shares: each kept
    row's coefficient normalised; all zero, with a zero aggregate, when none is kept."""
    coefficient = kept.to(X.dtype) if scale is None else kept.to(X.dtype) * scale
    count = int(kept.sum())
    if count == 0:
        return Robust(torch.zeros_like(X[0]), coefficient)
    return Robust(coefficient @ X / count, coefficient / coefficient.sum())


def dnc(X: torch.Tensor, removed: int, subsets: list[torch.Tensor]) -> Robust:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine",
    Algorithm 2).

    For each coordinate subset r (the plugin draws ``niters`` of them at random): centre
    the sub-vectors at their mean μ, take the top right singular vector v of the centred
    matrix, score s_i = ((x_i[r] − μ) · v)², and keep the n − c·f lowest scores. The kept
    set is the intersection over the subsets; the aggregate is the plain mean of the kept
    updates (zero, and every share zero, when the intersection is empty). A malicious
    direction that moves the mean far enough to matter shows as the top principal direction.
    """
    n = X.shape[0]
    kept = torch.ones(n, dtype=torch.bool, device=X.device)
    for r in subsets:
        centred = X[:, r] - _mean(X[:, r])
        v = torch.linalg.svd(centred.double(), full_matrices=False).Vh[0]
        scores = (centred.double() @ v) ** 2
        lowest = torch.argsort(scores, stable=True)[: n - removed]
        kept &= torch.zeros_like(kept).index_fill_(0, lowest, True)
    return kept_mean(X, kept)


def sign_features(X: torch.Tensor) -> torch.Tensor:
    """(n, 3) each update's fractions of positive, zero and negative coordinates, each column
    divided by its largest value over the clients (as the SignGuard reference code does)."""
    signs = X.sign()
    fractions = torch.stack([(signs == v).double().mean(1) for v in (1.0, 0.0, -1.0)], dim=1)
    return fractions / (fractions.max(0).values + 1e-8)


def largest_cluster(features, clustering: str) -> torch.Tensor:
    """(n,) bool: the members of the largest cluster of the rows of ``features`` (numpy), by
    scikit-learn's MeanShift (bandwidth from ``estimate_bandwidth`` at quantile 0.5, points
    outside every kernel left unclustered) or DBSCAN (ε = 0.05, 2 samples), as SignGuard's
    reference code; noise points (label −1) belong to no cluster."""
    from sklearn.cluster import DBSCAN, MeanShift, estimate_bandwidth

    if clustering == "dbscan":
        labels = DBSCAN(eps=0.05, min_samples=2).fit(features).labels_
    else:
        bandwidth = estimate_bandwidth(features, quantile=0.5)
        if bandwidth == 0:  # every feature vector equal: one cluster
            return torch.ones(len(features), dtype=torch.bool)
        labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False).fit(features).labels_
    labels = torch.as_tensor(labels)
    if (labels < 0).all():
        return torch.zeros(len(labels), dtype=torch.bool)
    return labels == torch.bincount(labels[labels >= 0]).argmax()


def signguard(X: torch.Tensor, low: float, high: float, coordinates: torch.Tensor, clustering: str) -> Robust:
    """SignGuard (Xu et al., ICDCS 2022, "SignGuard: Byzantine-robust federated learning through
    collaborative malicious gradient filtering", arXiv 2109.05872, Algorithm 1).

    1. Norm filter: keep the updates with L ≤ ||x_i|| / median_j ||x_j|| ≤ R.
    2. Sign filter: the fractions of positive, zero and negative values over a random subset
       of the coordinates (``coordinates``, drawn by the plugin), clustered; keep the largest cluster.
    3. The kept set is the intersection; each kept update is clipped to the median norm and
       the clipped updates are averaged. A client's share is its clipping factor, normalised.
    """
    norms = X.norm(dim=1)
    middle = norms.double().quantile(0.5).to(X.dtype)  # numpy's median: the mean of the two middle values
    ratio = norms / middle
    by_norm = (ratio >= low) & (ratio <= high)
    by_sign = largest_cluster(sign_features(X[:, coordinates]).cpu().numpy(), clustering).to(X.device)
    scale = (middle / norms.clamp_min(1e-12)).clamp(max=1.0)
    return kept_mean(X, by_norm & by_sign, scale)
