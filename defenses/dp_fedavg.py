"""``dp_fedavg``: user-level differential privacy of the federation (McMahan et al. 2018, DP-FedAvg).

McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models", Algorithm 1 with flat clipping and equal user weights: each round
every user takes part independently with probability q; each participant's update
Δ_k is clipped to L2 norm S (Δ_k · min(1, S/‖Δ_k‖), over all exchanged parameters at
once); the server releases

    Δ = (Σ_k clip(Δ_k) + N(0, σ²I)) / (q·N),    σ = z·S,

a sum over the fixed denominator q·N (the expected number of participants), not a mean
over whoever showed up: the denominator must not depend on the data. One round is the
sampled Gaussian mechanism with sensitivity S at rate q, so the user-level budget is
the Poisson-subsampled Gaussian's RDP composed over rounds (a :class:`.accounting.Ledger`).

Options beyond the paper:

* adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
  Learning with Adaptive Clipping"): each participant also sends b_k = 1[‖Δ_k‖ ≤ S] (in
  ``Message.side``, beside its update, in the clear: so adaptive clipping beside a hiding
  transport shows the server one bit per client); the server releases
  b̄ = (Σ b_k + N(0, σ_b²)) / (q·N) and moves S ← S·exp(−η(b̄ − γ))
  towards the γ-quantile of update norms. The count is a second Gaussian query of
  sensitivity 1/2 (with centred bits), so the update noise is raised to
  z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the pair costs what one Gaussian of multiplier z
  costs (their Theorem 1): the accounting does not change.
* distributed noise: each participant adds N(0, σ²/m) to its own clipped update, so
  the sum is private before the server sees it and the defense composes with encrypted
  or masked aggregation. With at least m participants the summed noise is at least
  σ²; a round with fewer is skipped (the model does not move), as secure aggregation
  aborts below its threshold, so the same accountant holds.

Transport: every message is sent with ``num_examples = 1`` (equal user weights, and no
dataset size on the wire), so FedAvg's example-weighted mean becomes the plain mean of
the n participants' updates and ``post_aggregation`` turns it back into the sum
(· n) before adding the noise and dividing by q·N: the steps every user-level mechanism
on FedAvg shares (:mod:`.user_level`, with what they rely on).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.plugins import Options
from fedsec_bench.updates import add_gaussian_noise, zeros_like

from .accounting import Ledger
from .user_level import UserLevelDP, clip_update, clipped_fraction, clipped_sum, over_expected_clients, user_delta

UNCLIPPED = "dp_fedavg.unclipped"
"""b_k = 1[‖Δ_k‖ ≤ S]: sent with adaptive clipping, and recorded for the clipped-fraction figure."""


class DPFedAvgOptions(Options):
    clip_norm: float = Field(1.0, gt=0, description="S: L2 bound on each user's update (the initial S if adaptive).")
    noise_multiplier: float = Field(1.0, ge=0, description="z: noise std on the sum / S. 0 = clipping only (ε = ∞).")
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the user-level guarantee; default 1/(2·num_clients).")
    adaptive_clipping: bool = Field(False, description="Track a quantile of update norms (Andrew et al. 2021).")
    target_quantile: float = Field(0.5, gt=0, lt=1, description="γ: fraction of updates left unclipped (adaptive).")
    clip_lr: float = Field(0.2, gt=0, description="η: geometric step of the clip norm per round (adaptive).")
    count_noise: float | None = Field(
        None, gt=0, description="σ_b: noise std on the unclipped count (adaptive); default q·N/20 as in the paper."
    )
    distributed: bool = Field(False, description="Each client adds its share N(0, σ²/m) instead of the server.")
    min_clients: int | None = Field(
        None, ge=1, description="m (distributed): noise shares are sized for m participants; rounds with fewer "
        "are skipped. Default floor(q·N).",
    )

    @model_validator(mode="after")
    def _distributed_only(self) -> DPFedAvgOptions:
        if self.min_clients is not None and not self.distributed:
            raise ValueError("min_clients only applies with distributed: true")
        if self.adaptive_clipping and self.distributed:
            raise ValueError(
                "adaptive_clipping with distributed: true is not supported: the unclipped count would reach the "
                "server per client, outside the masked sum; use one of them"
            )
        return self


class DPFedAvg(UserLevelDP):
    name = "dp_fedavg"
    summary = "user-level DP-FedAvg: clip each update, Gaussian noise on the sum, fixed denominator (McMahan et al. 2018)"
    OptionsModel = DPFedAvgOptions

    def __init__(self, options: DPFedAvgOptions, runtime):
        super().__init__(options, runtime)
        fed = runtime.scenario.federation
        self.sample_rate = fed.clients_per_round / fed.num_clients
        self.expected_clients = self.sample_rate * fed.num_clients
        self.delta = user_delta(options.delta, fed.num_clients)
        self.clip_norm = options.clip_norm
        self.count_noise = options.count_noise or self.expected_clients / 20
        self.update_noise = update_noise_multiplier(options, self.count_noise)
        self.min_clients = options.min_clients or max(1, math.floor(self.expected_clients))
        self.ledger = Ledger()
        self.unclipped = 0.0  # Σ b_k over the round's delivered messages (adaptive clipping), as received
        self.round_figures: dict[str, float] = {}

    @classmethod
    def check(cls, options: DPFedAvgOptions, scenario) -> None:
        fed = scenario.federation
        if fed.sampling != "poisson":
            raise ValueError(
                "the user-level accountant analyses Poisson client sampling (each client with q = "
                "clients_per_round/num_clients), not exactly k clients per round; set federation.sampling: poisson"
            )
        expected = fed.clients_per_round
        if options.adaptive_clipping and options.noise_multiplier > 0:
            count_noise = options.count_noise or expected / 20
            if count_noise <= options.noise_multiplier / 2:
                raise ValueError(
                    f"adaptive clipping needs count_noise > noise_multiplier/2 (got {count_noise:.3g} ≤ "
                    f"{options.noise_multiplier / 2:.3g}): the count query alone would spend more than the budget; "
                    "raise count_noise"
                )
        if options.distributed and (options.min_clients or 1) > fed.num_clients:
            raise ValueError(f"min_clients ({options.min_clients}) exceeds federation.num_clients ({fed.num_clients})")

    # --- client side --------------------------------------------------------------
    def client_update(self, client: ClientContext, update: State) -> State:
        clipped = clip_update(client, update, self.clip_norm, UNCLIPPED)
        if self.options.adaptive_clipping:
            client.side[UNCLIPPED] = client.metrics[UNCLIPPED]
        if self.options.distributed:
            std = self.update_noise * self.clip_norm / math.sqrt(self.min_clients)
            clipped = add_gaussian_noise(clipped, std, torch.Generator().manual_seed(client.seed))
        return clipped

    # --- server side --------------------------------------------------------------
    def server_observation(self, round: RoundContext, messages: list[Message]) -> None:
        """Sum the unclipped bits the delivered messages carry (adaptive clipping's count query)."""
        if self.options.adaptive_clipping:
            self.unclipped = sum(m.side[UNCLIPPED] for m in messages)

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        participants = len(round.delivered)  # the updates in the mean: the sampled clients whose message arrived
        skipped = self.options.distributed and participants < self.min_clients
        total = clipped_sum(aggregate, round)
        if not self.options.distributed:
            generator = torch.Generator().manual_seed(self.runtime.seed_for(round.round, 0, 1))
            total = add_gaussian_noise(total, self.update_noise * self.clip_norm, generator)
        self.round_figures = {"dp_fedavg.clip_norm": self.clip_norm, "dp_fedavg.skipped_round": float(skipped)}
        if self.options.adaptive_clipping:
            self.adapt_clip_norm(self.unclipped, participants, round.round)
        self.ledger.compose(self.options.noise_multiplier, self.sample_rate)
        if skipped:
            return zeros_like(aggregate)
        return over_expected_clients(total, self.expected_clients)

    def adapt_clip_norm(self, unclipped: float, participants: int, rnd: int) -> None:
        """S ← S·exp(−η(b̄ − γ)), b̄ = (Σ(b_k − ½) + N(0, σ_b²))/(q·N) + ½ (Andrew et al. 2021, Algorithm 1)."""
        generator = torch.Generator().manual_seed(self.runtime.seed_for(rnd, 0, 2))
        centred = unclipped - participants / 2 + self.count_noise * float(torch.randn((), generator=generator))
        fraction = centred / self.expected_clients + 0.5
        self.clip_norm *= math.exp(-self.options.clip_lr * (fraction - self.options.target_quantile))

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        """The server's figures, the guarantee so far, and the share of the delivered updates clipped."""
        return {
            **self.round_figures,
            "dp_fedavg.clipped_fraction": clipped_fraction(round, truth, UNCLIPPED),
            "privacy.user_epsilon": self.ledger.epsilon(self.delta),
            "privacy.user_delta": self.delta,
        }


def update_noise_multiplier(options: DPFedAvgOptions, count_noise: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) with adaptive clipping, else z (Andrew et al. 2021, Theorem 1)."""
    z = options.noise_multiplier
    if not options.adaptive_clipping or z == 0:
        return z
    return (z**-2 - (2 * count_noise) ** -2) ** -0.5
