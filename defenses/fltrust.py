"""FLTrust (Cao, Fang, Liu & Gong, NDSS 2021, "FLTrust: Byzantine-robust federated learning via
trust bootstrapping"), as a ``federation.aggregator`` plugin.

The server holds a small clean *root dataset* and, each round, trains its own update g_0
from the global model on it, exactly as a client would (the federation's optimiser, learning
rate, batch size and local steps). Algorithm 2 of the paper, per round:

1. trust score TS_i = ReLU(cos(g_i, g_0)): an update pointing away from the server's gets 0;
2. each g_i is rescaled to ||g_0||: ḡ_i = g_i · ||g_0|| / ||g_i|| (no update can win by size);
3. the aggregate Σ_i TS_i ḡ_i / Σ_i TS_i (zero when every score is 0).

The root dataset is the first ``root_examples`` examples of the scenario's public split
(``data.public_examples``): data the server legitimately holds, in no client's data set.
The paper uses 100 root examples.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fedsec_bench.client import LocalTraining
from fedsec_bench.messages import RoundContext, State
from fedsec_bench.updates import flatten

from .robust_rules import RobustAggregator, RuleOptions
from .robust_statistics import Robust

TRAINING_KEY = 0x4654  # "FT": the server's training seed beside the round


def fltrust(X: torch.Tensor, g0: torch.Tensor) -> Robust:
    """Steps 1-3 of Algorithm 2 on the clients' updates X and the server's g0; a client's share is
    TS_i / Σ TS (all 0 when every score is 0)."""
    g0_norm = g0.norm()
    norms = X.norm(dim=1).clamp_min(1e-12)
    trust = ((X @ g0) / (norms * g0_norm.clamp_min(1e-12))).clamp_min(0)
    total = trust.sum()
    if total == 0:
        return Robust(torch.zeros_like(g0), trust)
    coefficient = trust * g0_norm / norms  # TS_i scaled so that ||ḡ_i|| = ||g_0||
    return Robust(coefficient @ X / total, trust / total)


class FLTrustOptions(RuleOptions):
    root_examples: int = Field(100, ge=1, description="Examples of the public split the server trains g_0 on each "
                               "round (the paper's root dataset of 100).")


class FLTrust(RobustAggregator):
    name = "fltrust"
    summary = "trust ReLU(cos) with the server's update on public root data, norms rescaled to it (Cao et al. 2021)"
    OptionsModel = FLTrustOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.server_update: torch.Tensor | None = None

    @classmethod
    def check(cls, options, scenario):
        if options.root_examples > scenario.public_examples:
            raise ValueError(
                f"root_examples: fltrust's root dataset takes {options.root_examples} examples of the public split, "
                f"but data.public_examples is {scenario.public_examples}; raise data.public_examples or lower "
                "root_examples")
        super().check(options, scenario)

    @classmethod
    def check_data(cls, options, scenario, data):
        if options.root_examples > len(data.public):
            raise ValueError(
                f"root_examples: fltrust's root dataset takes {options.root_examples} examples of the public split, "
                f"but the data left {len(data.public)} distinct public examples; raise data.public_examples or lower "
                "root_examples")

    def root_update(self, round: RoundContext) -> State:
        """g_0: the server's own update, trained from the global state on the root dataset as a client
        trains (seeded from the round); the model is left holding the global state again."""
        rt = self.runtime
        root = rt.data.public[: self.options.root_examples]
        seed = rt.seed_for(round.round, TRAINING_KEY)
        torch.manual_seed(seed)
        rt.trainable.load(round.global_state)
        LocalTraining.of_federation(rt, root, seed).run()
        update = rt.trainable.delta_from(round.global_state)
        rt.trainable.load(round.global_state)
        return update

    def aggregation(self, round, messages):
        self.server_update = flatten(self.root_update(round))
        aggregate = super().aggregation(round, messages)
        self.server_update = None  # a round's own: not carried to the next, nor into checkpoints
        return aggregate

    def rule(self, X, messages):
        return fltrust(X, self.server_update.to(X.dtype))
