"""FLAME (Nguyen et al., USENIX Security 2022, "FLAME: Taming backdoors in federated learning"),
as a ``federation.aggregator`` plugin.

Algorithm 1 of the paper, per round, on the n updates W_i − G_{t−1}:

1. cosine distances c_ij = 1 − cos(W_i, W_j) between all updates;
2. HDBSCAN on them (min_cluster_size = ⌊n/2⌋ + 1, min_samples = 1, a single cluster allowed,
   as the authors' setting): the majority cluster is kept, the rest (label −1) dropped;
3. S_t = the median L2 norm of *all* n updates; each kept update is scaled by min(1, S_t/e_i);
4. the kept, clipped updates are averaged;
5. adaptive noise: N(0, σ²) with σ = λ·S_t on every coordinate of the aggregate.

The paper's Algorithm 1 writes the cosine distances between the local models W_i; with
every model starting from the same G_{t−1}, the angle between what each client changed
(the update, what clients send here) is the direction a backdoor shows in.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedsec_bench.messages import RoundContext, State
from fedsec_bench.updates import add_gaussian_noise

from .robust_rules import RobustAggregator, RuleOptions
from .robust_statistics import Robust, cosine_similarities, kept_mean

NOISE_KEY = 0x464C  # "FL": the noise generator's key beside the round


def majority_cluster(distances: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the largest HDBSCAN cluster of the precomputed distances, with FLAME's
    min_cluster_size = ⌊n/2⌋ + 1 (so at most one cluster: a majority), min_samples = 1 and a
    single cluster allowed; no one when HDBSCAN leaves every point as noise."""
    from sklearn.cluster import HDBSCAN

    n = distances.shape[0]
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                     allow_single_cluster=True, copy=True).fit(distances.clamp_min(0).cpu().numpy()).labels_
    labels = torch.as_tensor(labels, device=distances.device)
    if (labels < 0).all():
        return torch.zeros(n, dtype=torch.bool, device=distances.device)
    return labels == torch.bincount(labels[labels >= 0]).argmax()


def flame(X: torch.Tensor) -> tuple[Robust, float]:
    """Steps 1-4 of FLAME's Algorithm 1 (the noise is the plugin's): the mean of the majority
    cluster's updates, each clipped to S_t, the median norm of all the updates; and S_t.

    A client's share is its clipping factor min(1, S_t/e_i), normalised over the kept ones."""
    distances = (1 - cosine_similarities(X)).fill_diagonal_(0)
    kept = majority_cluster(distances).to(X.device)
    norms = X.norm(dim=1)
    median = norms.double().quantile(0.5).to(X.dtype)  # the mean of the two middle norms for even n
    scale = (median / norms.clamp_min(1e-12)).clamp(max=1.0)
    return kept_mean(X, kept, scale), float(median)


class FlameOptions(RuleOptions):
    noise_lambda: float = Field(
        0.001, ge=0, description="λ: the noise σ = λ·S_t (S_t the round's median update norm); the paper's 0.001 "
        "for its NLP task, 0 for no noise."
    )


class Flame(RobustAggregator):
    name = "flame"
    summary = "HDBSCAN majority cluster by cosine distance, clipped to the median norm, plus noise (Nguyen et al. 2022)"
    OptionsModel = FlameOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.noise_std = 0.0

    @classmethod
    def condition(cls, options, n):
        if n < 2:
            return f"flame clusters the updates: it needs n ≥ 2, got n={n}"

    def aggregation(self, round, messages):
        self.noise_std = 0.0  # a round without updates adds no noise
        return super().aggregation(round, messages)

    def rule(self, X, messages):
        result, median = flame(X)
        self.noise_std = self.options.noise_lambda * median
        return result

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Step 5: N(0, (λ·S_t)²) on every coordinate, seeded from the scenario and the round."""
        if self.noise_std == 0:
            return aggregate
        return add_gaussian_noise(aggregate, self.noise_std, self.generator(NOISE_KEY))
