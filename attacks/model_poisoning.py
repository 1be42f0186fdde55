"""Model poisoning: malicious clients send a crafted update instead of (or on top of) their honest one.

``sign_flip``, ``gaussian`` and ``scaling`` act alone, on the client, before any
client-side defense (the threat model's order). ``alie`` and ``ipm`` are colluding
attacks that need the benign clients' updates: they run in the ``collusion`` hook,
after every client trained and before the server receives. That is an
*omniscience assumption*: the attackers see every benign update of the round, the
strongest attacker these papers consider (in a deployment they would have to
estimate them from their own data).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.updates import flatten, unflatten

from .poisoning import PoisoningAttack, PoisoningOptions


class SignFlipOptions(PoisoningOptions):
    scale: float = Field(1.0, gt=0, description="The malicious update is −scale × the honest one.")


class SignFlip(PoisoningAttack):
    """Send −scale · Δ: the honest update reversed (the sign-flipping attack of Li et al. 2019, RSA)."""

    name = "sign_flip"
    summary = "malicious clients send their update reversed and scaled (−scale·Δ)"
    OptionsModel = SignFlipOptions

    def client_update(self, client: ClientContext, update: State) -> State:
        if not self.attacking(client):
            return update
        return {name: -self.options.scale * t for name, t in update.items()}


class GaussianOptions(PoisoningOptions):
    std: float = Field(1.0, gt=0, description="Standard deviation of each coordinate of the sent noise.")


class Gaussian(PoisoningAttack):
    """Send N(0, std² I) in place of the update: Blanchard et al. 2017's Gaussian Byzantine worker."""

    name = "gaussian"
    summary = "malicious clients send Gaussian noise N(0, std²) instead of their update"
    OptionsModel = GaussianOptions

    def client_update(self, client: ClientContext, update: State) -> State:
        if not self.attacking(client):
            return update
        generator = torch.Generator().manual_seed(client.seed)
        return {
            name: (self.options.std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(t.device)
            for name, t in update.items()
        }


class ScalingOptions(PoisoningOptions):
    boost: float | None = Field(
        None, gt=0, description="γ, the update's multiplier; default n / η (clients_per_round / server_lr)."
    )


class Scaling(PoisoningAttack):
    """Model replacement (Bagdasaryan et al. 2020, "How to backdoor federated learning").

    The attacker wants the global model to become its local model X. Under
    G' = G + (η/n) Σ_i (L_i − G) it submits γ (X − G) with γ = n / η, so the boosted
    term cancels the averaging (exactly, when the benign updates sum to ≈ 0). Combine
    with ``backdoor`` (same ``clients``) to implant a backdoor that survives averaging.
    """

    name = "scaling"
    summary = "model replacement: boost the malicious update by γ = n/η so it survives averaging"
    OptionsModel = ScalingOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        fed = runtime.scenario.federation
        self.boost = options.boost if options.boost is not None else fed.clients_per_round / fed.server_lr

    def client_update(self, client: ClientContext, update: State) -> State:
        if not self.attacking(client):
            return update
        return {name: self.boost * t for name, t in update.items()}


class CollusionAttack(PoisoningAttack):
    """Malicious clients of the round all send one vector crafted from the benign updates.

    A round with no benign client (or no malicious one) is left as it is.
    """

    def client_update(self, client: ClientContext, update: State) -> State:
        self.attacking(client)  # the ground-truth mark; the update itself is replaced in collusion()
        return update

    def craft(self, benign: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """The malicious vector from the (k, d) benign updates, n clients of which m malicious."""
        raise NotImplementedError

    def collusion(self, round: RoundContext, messages: list[Message]) -> list[Message]:
        bad = [self.attacks(msg.client_id, round.round) for msg in messages]
        if not any(bad) or all(bad):
            return messages
        for msg in messages:
            if not isinstance(msg.payload, dict):
                raise TypeError(
                    f"{self.name} needs the plain benign updates in the collusion hook, but client "
                    f"{msg.client_id}'s was a {type(msg.payload).__name__} (encrypted or masked in transport)"
                )
        benign = torch.stack([flatten(msg.payload) for msg, b in zip(messages, bad) if not b])
        crafted = unflatten(self.craft(benign, len(messages), sum(bad)), like=round.global_state)
        return [Message.plain(msg.client_id, msg.num_examples, dict(crafted)) if b else msg
                for msg, b in zip(messages, bad)]


class AlieOptions(PoisoningOptions):
    z: float | None = Field(None, description="Deviations below the mean; default the paper's z_max for n and m.")


def alie_z(n: int, m: int) -> float:
    """Baruch et al.'s z_max: s = ⌊n/2 + 1⌋ − m supporters needed, z = Φ⁻¹((n − s) / n).

    With a malicious majority in a round (possible under sampling) s would fall below
    1 and z be infinite; s is then held at 1.
    """
    s = max(math.floor(n / 2 + 1) - m, 1)
    return float(torch.special.ndtri(torch.tensor((n - s) / n, dtype=torch.float64)))


class Alie(CollusionAttack):
    """A Little Is Enough (Baruch, Baruch & Goldberg 2019).

    Every malicious client sends μ − z·σ, μ and σ the coordinate-wise mean and
    (population) standard deviation of the benign updates, z = z_max (:func:`alie_z`):
    just far enough to shift the aggregate while staying inside the benign spread
    that distance- and order-based rules accept.
    """

    name = "alie"
    summary = "colluding: send mean − z·std of the benign updates (Baruch et al. 2019)"
    OptionsModel = AlieOptions

    @classmethod
    def check(cls, options, scenario) -> None:
        super().check(options, scenario)
        if isinstance(options.clients, float) and options.clients >= 0.5:
            raise ValueError(f"alie assumes a malicious minority: clients must be < 0.5, got {options.clients}")

    def craft(self, benign, n, m):
        z = self.options.z if self.options.z is not None else alie_z(n, m)
        return benign.mean(0) - z * benign.std(0, correction=0)


class IpmOptions(PoisoningOptions):
    epsilon: float = Field(0.1, gt=0, description="ε: the malicious update is −ε × the benign mean.")


class Ipm(CollusionAttack):
    """Inner product manipulation (Xie, Koyejo & Gupta 2020, "Fall of empires").

    Every malicious client sends −ε · (mean of the benign updates), making the inner
    product of the aggregate with the true update negative for large ε, and slipping
    through Krum and the median for small ε.
    """

    name = "ipm"
    summary = "colluding: send −ε × the mean of the benign updates (Xie et al. 2020)"
    OptionsModel = IpmOptions

    def craft(self, benign, n, m):
        return -self.options.epsilon * benign.mean(0)

