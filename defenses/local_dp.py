"""``local_dp``: local differential privacy of each client's update (Flower's ``LocalDpMod``).

Each client, before its update leaves it, clips the update to L2 norm C
(Δ_k · min(1, C/‖Δ_k‖), over all exchanged parameters at once) and adds N(0, σ²I), so
no one (the server, an observer on the wire, the other clients) ever sees the unnoised
update. This is the mod Flower ships as ``flwr.client.mod.LocalDpMod``, with the Gaussian
mechanism's classic calibration (Dwork & Roth 2014, "The Algorithmic Foundations of
Differential Privacy", Theorem A.1):

    σ = Δ · sqrt(2 ln(1.25/δ)) / ε,    valid for 0 < ε < 1 (ε ≥ 1 is refused),

which makes one round's release (ε, δ)-DP for that client. The unit is the client: two
neighbouring inputs are any two of its datasets. Their clipped updates both lie in the
ball of radius C, so they differ by at most Δ = 2C in L2; Flower leaves ``sensitivity``
to the user, here it is fixed at 2C, the only value that bounds replacing the client's
whole data (C would be the add/remove bound, but a sampled client always sends something).

Over the run, a client's releases compose: each of its participations is one Gaussian
mechanism of noise multiplier z = σ/Δ = sqrt(2 ln(1.25/δ))/ε, composed in a per-client
:class:`.accounting.Ledger` (RDP, Mironov 2017, at sampling rate 1: the plain Gaussian, no
amplification claimed from client sampling) and converted to ε at the same δ. Clients
record the release they made in ``client.metrics``; the ledgers live with the plugin on
the driver, where the scorer composes them from the round's truth, as ``dp_sgd`` does
(:class:`.accounting.ClientLedgers`: the client side may run on a Ray worker).

Because it acts in ``client_update``, which runs before every ``transport``, it composes
with secure_aggregation and he_aggregation: they mask or encrypt the noised update.

Figures (lower ε is more private):

* ``privacy.local_epsilon_round``: one round's ε, the calibration's ε (the option);
* ``privacy.local_epsilon``: the largest ε over the clients so far, each composed over its
  own participations (RDP; after one round it is below the classic ε, which is loose);
* ``privacy.local_delta``: the δ of both.

Assumptions: the clipping is the only bound on a client's influence (no other plugin
rewrites the update after it: list it after any attack that should be privatised too), and
the noise is drawn from ``torch.Generator().manual_seed(client.seed)``, a simulation's
reproducible stand-in for the client's own secure randomness.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, RoundContext, State
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import add_gaussian_noise, clip_to_norm

from .accounting import ClientLedgers, report_runs


class LocalDPOptions(Options):
    clipping_norm: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="C: L2 bound on each client's update; sensitivity Δ = 2C."
    )
    epsilon: float = Field(
        0.5, gt=0, lt=1,
        description="ε of one round's release; the classic Gaussian calibration holds only for ε < 1.",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of one round's release and of the composed guarantee.")


def classic_noise_multiplier(epsilon: float, delta: float) -> float:
    """z = σ/Δ of the Gaussian mechanism's classic calibration (Dwork & Roth, Theorem A.1)."""
    return math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class LocalDP(Plugin):
    name = "local_dp"
    kind = "defense"
    summary = "local DP: each client clips its update to C and adds Gaussian noise before sending (Flower LocalDpMod)"
    on_instruction_data = ("acts on the update only (the privacy unit is a client, all its pairs); the same on every "
                           "data format")
    OptionsModel = LocalDPOptions

    def __init__(self, options: LocalDPOptions, runtime):
        super().__init__(options, runtime)
        self.sensitivity = 2 * options.clipping_norm
        self.noise_multiplier = classic_noise_multiplier(options.epsilon, options.delta)
        self.ledgers = ClientLedgers(self.name, "rdp")

    def __getstate__(self) -> dict:
        """A Ray worker's copy needs no ledgers: the driver composes them (a resumed run gets them from
        :meth:`checkpoint`, which keeps them)."""
        return super().__getstate__() | {"ledgers": self.ledgers.empty()}

    @property
    def noise_std(self) -> float:
        """σ = z · Δ, the std of the noise on every coordinate."""
        return self.noise_multiplier * self.sensitivity

    # --- client side --------------------------------------------------------------
    def client_update(self, client: ClientContext, update: State) -> State:
        clipped, _ = clip_to_norm(update, self.options.clipping_norm)
        report_runs(client.metrics, self.name, self.noise_multiplier, sample_rate=1.0, steps=1)  # no amplification
        return add_gaussian_noise(clipped, self.noise_std, torch.Generator().manual_seed(client.seed))

    # --- outside the protocol ---------------------------------------------------------
    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        """Compose each client's release of this round into its ledger: every client that trained released
        a noised update, whether its message arrived or not."""
        self.ledgers.record(truth)
        return {
            "privacy.local_epsilon_round": self.options.epsilon,
            "privacy.local_epsilon": self.ledgers.max_epsilon(self.options.delta),
            "privacy.local_delta": self.options.delta,
        }
