"""What every poisoning attack shares: who is malicious, when, and the simulator's record of it.

A fraction of the federation (drawn once from the scenario seed) or an explicit list
of client ids is malicious, optionally only inside a window of rounds. Attacks with
the same ``clients`` option pick the same clients, so a ``backdoor`` and a
``scaling`` entry with equal ``clients`` are one attacker poisoning both its data and
its update.

A client that attacks in a round is marked in the simulator's ground truth
(:mod:`fedsec_bench.ground_truth`), never shown to the server: the robust rules' scorers
use it for their exclusion precision and recall; the rules cannot see it to decide.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, StrictFloat, model_validator

from fedsec_bench.ground_truth import mark_malicious
from fedsec_bench.messages import ClientContext
from fedsec_bench.plugins import Options, Plugin

SELECTION_KEY = 0x504F4953  # "POIS": the seed key of the malicious draw, shared by every attack


class PoisoningOptions(Options):
    clients: StrictFloat | list[int] = Field(
        0.2, description="Malicious clients: a fraction of federation.num_clients (drawn from the seed) or a list of ids."
    )
    rounds: tuple[int, int] | None = Field(
        None, description="[first, last] rounds (inclusive) in which the malicious clients attack; default all."
    )

    @model_validator(mode="after")
    def _ranges(self) -> PoisoningOptions:
        if isinstance(self.clients, float) and not 0 < self.clients <= 1:
            raise ValueError(f"clients: a fraction must be in (0, 1], got {self.clients}")
        if self.rounds is not None and not 1 <= self.rounds[0] <= self.rounds[1]:
            raise ValueError(f"rounds: need 1 ≤ first ≤ last, got {list(self.rounds)}")
        return self


def malicious_ids(clients: float | list[int], num_clients: int, seed: int) -> frozenset[int]:
    """round(fraction · num_clients) clients drawn without replacement, or the given list."""
    if isinstance(clients, list):
        return frozenset(clients)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SELECTION_KEY]))
    return frozenset(rng.choice(num_clients, size=round(clients * num_clients), replace=False).tolist())


class PoisoningAttack(Plugin):
    """Base of the poisoning attacks: the malicious set, the round window, the ground-truth mark."""

    kind = "attack"
    OptionsModel = PoisoningOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.malicious = malicious_ids(options.clients, runtime.scenario.federation.num_clients, runtime.scenario.seed)

    @classmethod
    def check(cls, options, scenario) -> None:
        num_clients = scenario.federation.num_clients
        if isinstance(options.clients, list):
            bad = [c for c in options.clients if not 0 <= c < num_clients]
            if bad:
                raise ValueError(f"clients: {bad} are not client ids (0..{num_clients - 1})")
            if not options.clients:
                raise ValueError("clients: the list names no client; give ids or a fraction")
        elif round(options.clients * num_clients) == 0:
            raise ValueError(
                f"clients={options.clients} of federation.num_clients={num_clients} makes no client malicious; "
                "raise the fraction or list the ids"
            )

    def attacks(self, client_id: int, rnd: int) -> bool:
        window = self.options.rounds
        return client_id in self.malicious and (window is None or window[0] <= rnd <= window[1])

    def attacking(self, client: ClientContext) -> bool:
        """True when this client attacks this round; records the simulator-side ground truth."""
        if self.attacks(client.client_id, client.round):
            mark_malicious(client)
            return True
        return False
