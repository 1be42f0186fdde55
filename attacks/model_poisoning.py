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
from dataclasses import dataclass

import torch
from pydantic import Field

from fedsec_bench.messages import ClientContext, Message, RoundContext, State, plain_updates, state_bytes
from fedsec_bench.updates import flatten, gaussian_noise, unflatten

from .poisoning import PoisoningAttack, PoisoningOptions


class UpdatePoisoning(PoisoningAttack):
    """A malicious client replaces its own update by :meth:`poison` of it, in the rounds it attacks."""

    on_instruction_data = "acts on the update only; the same on every data format"

    def client_update(self, client: ClientContext, update: State) -> State:
        return self.poison(client, update) if self.attacking(client) else update

    def poison(self, client: ClientContext, update: State) -> State:
        raise NotImplementedError


class SignFlipOptions(PoisoningOptions):
    scale: float = Field(1.0, gt=0, description="The malicious update is −scale × the honest one.")


class SignFlip(UpdatePoisoning):
    """Send −scale · Δ: the honest update reversed (the sign-flipping attack of Li et al. 2019, RSA)."""

    name = "sign_flip"
    summary = "malicious clients send their update reversed and scaled (−scale·Δ)"
    OptionsModel = SignFlipOptions

    def poison(self, client: ClientContext, update: State) -> State:
        return {name: -self.options.scale * t for name, t in update.items()}


class GaussianOptions(PoisoningOptions):
    std: float = Field(1.0, gt=0, description="Standard deviation of each coordinate of the sent noise.")


class Gaussian(UpdatePoisoning):
    """Send N(0, std² I) in place of the update: Blanchard et al. 2017's Gaussian Byzantine worker."""

    name = "gaussian"
    summary = "malicious clients send Gaussian noise N(0, std²) instead of their update"
    OptionsModel = GaussianOptions

    def poison(self, client: ClientContext, update: State) -> State:
        return gaussian_noise(update, self.options.std, torch.Generator().manual_seed(client.seed))


class ScalingOptions(PoisoningOptions):
    boost: float | None = Field(
        None, gt=0, description="γ, the update's multiplier; default n / η (clients_per_round / server_lr)."
    )


class Scaling(UpdatePoisoning):
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

    def poison(self, client: ClientContext, update: State) -> State:
        return {name: self.boost * t for name, t in update.items()}


@dataclass
class RoundView:
    """A round as the colluding clients see it in the simulator (which parts they may use is
    each attack's knowledge assumption)."""

    round: int
    n: int
    """Clients whose messages the server receives this round."""
    benign: torch.Tensor
    """(n − m, d) the benign updates, in message order."""
    benign_ids: list[int]
    own: torch.Tensor
    """(m, d) the malicious clients' own honest updates (what they trained, before crafting)."""

    @property
    def m(self) -> int:
        return self.own.shape[0]


class CollusionAttack(PoisoningAttack):
    """Malicious clients of the round send vectors crafted from the round's updates.

    By default all of them send one vector crafted from the benign updates (:meth:`craft`);
    an attack whose clients each send their own, or that reads their own honest updates,
    overrides :meth:`craft_each`. A round with no benign client (or no malicious one) is left
    as it is. The crafting reads the updates in the clear, so a transport that hides them
    rules these attacks out.
    """

    needs_plain_updates = True
    on_instruction_data = "crafts its update from the round's updates only; the same on every data format"

    def client_update(self, client: ClientContext, update: State) -> State:
        self.attacking(client)  # the ground-truth mark; the update itself is replaced in collusion()
        return update

    def craft(self, benign: torch.Tensor, n: int, m: int) -> torch.Tensor:
        """The malicious vector from the (k, d) benign updates, n clients of which m malicious."""
        raise NotImplementedError

    def craft_each(self, view: RoundView) -> torch.Tensor:
        """(m, d): the vector each malicious client of the round sends, in message order."""
        return self.craft(view.benign, view.n, view.m).expand(view.m, -1)

    def collusion(self, round: RoundContext, messages: list[Message]) -> list[Message]:
        bad = [self.attacks(msg.client_id, round.round) for msg in messages]
        if not any(bad) or all(bad):
            return messages
        flat = [flatten(u) for u in plain_updates(messages, f"{self.name} (crafting from the round's updates)")]
        view = RoundView(
            round.round, len(messages),
            benign=torch.stack([u for u, b in zip(flat, bad) if not b]),
            benign_ids=[msg.client_id for msg, b in zip(messages, bad) if not b],
            own=torch.stack([u for u, b in zip(flat, bad) if b]),
        )
        crafted = iter(self.craft_each(view))
        out = []
        for msg, b in zip(messages, bad):
            if b:
                state = unflatten(next(crafted), like=round.global_state)
                msg = msg.carrying(dict(state), state_bytes(state))
            out.append(msg)
        return out


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

