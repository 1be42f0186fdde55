"""FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020, "The limitations of federated learning in
sybil settings"), as a ``federation.aggregator`` plugin.

Sybils pushing one poisoning goal send updates that point the same way round after round,
while honest clients, each with its own data, differ. Algorithm 1 of the paper, per round:

1. H_i ← H_i + Δ_i: each client's history, the sum of every update it has sent (the server
   knows who sent what, so the history is kept by client id, across rounds);
2. cs_ij = cos(H_i, H_j) for i ≠ j, and v_i = max_j cs_ij;
3. pardoning: cs_ij ← cs_ij · v_i / v_j where v_j > v_i (an honest client that merely looks
   like a sybil is not punished for the sybil's similarity);
4. α_i = 1 − max_j cs_ij, clipped to [0, 1], then α ← α / max α;
5. the logit: α_i ← κ(ln[α_i / (1 − α_i)] + 0.5), clipped to [0, 1] (α_i = 1 taken as 0.99,
   whose logit would be infinite, as the authors' code does);
6. the aggregate Σ_i α_i Δ_i.

The similarities are taken between every client the server has a history for (with client
sampling, sybils sampled in different rounds still meet through their histories); the
round's clients get their weights from that. Step 6 is divided by n, so that a round in
which every α_i = 1 is the plain mean, the step the harness's ``federation.server_lr`` scales.
The paper's optional importance weighting of the output-layer features is left out: the
updates here are a language model's (or its adapters'), with no classifier layer to weight.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from .robust_rules import RobustAggregator, RuleOptions
from .robust_statistics import Robust, cosine_similarities


def foolsgold_weights(histories: torch.Tensor, kappa: float) -> torch.Tensor:
    """(m,) float64 α of each history (steps 2-5 of Algorithm 1)."""
    cs = cosine_similarities(histories).fill_diagonal_(-math.inf)  # max over j ≠ i
    v = cs.max(dim=1).values
    pardon = v[:, None] < v[None, :]  # v_j > v_i
    cs = torch.where(pardon, cs * v[:, None] / v[None, :], cs)
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)  # a lone history (max over no j: −∞) gets 1
    alpha = alpha / alpha.max() if alpha.max() > 0 else alpha
    alpha = torch.where(alpha == 1, 0.99, alpha)
    return (kappa * (torch.log(alpha / (1 - alpha)) + 0.5)).clamp(0, 1)


def foolsgold(X: torch.Tensor, alpha: torch.Tensor) -> Robust:
    """Step 6: Σ_i α_i Δ_i / n; a client's share is α_i / Σ α (all 0 when every α_i is 0)."""
    alpha = alpha.to(X.dtype)
    total = alpha.sum()
    share = alpha / total if total > 0 else alpha
    return Robust(alpha @ X / X.shape[0], share)


class FoolsGoldOptions(RuleOptions):
    kappa: float = Field(1.0, gt=0, description="κ: the logit's confidence (the paper's 1).")


class FoolsGold(RobustAggregator):
    name = "foolsgold"
    summary = "down-weights clients whose update histories point alike, as sybils' do (Fung et al. 2020)"
    OptionsModel = FoolsGoldOptions
    rows_are_clients = "its history sums each client's own updates across rounds, which a mixed row is not"

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.history: dict[int, torch.Tensor] = {}
        """Each client's summed updates, by client id (kept in checkpoints)."""

    def rule(self, X, messages):
        for m, x in zip(messages, X):
            self.history[m.client_id] = self.history[m.client_id] + x if m.client_id in self.history else x.clone()
        ids = list(self.history)
        alpha = foolsgold_weights(torch.stack([self.history[c] for c in ids]), self.options.kappa)
        row = {c: k for k, c in enumerate(ids)}
        return foolsgold(X, alpha[[row[m.client_id] for m in messages]].to(X.device))
