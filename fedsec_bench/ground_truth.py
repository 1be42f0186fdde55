"""What the simulator knows and no protocol party does: who attacked in a round.

An attacking client marks itself in its client metrics; the mark reaches only the
simulator's :class:`~fedsec_bench.messages.ClientReport`, never the server. Figures
computed outside the protocol (a robust rule's exclusion precision and recall) read it
here, so no defense needs to import an attack to know what the mark is called.
"""

from __future__ import annotations

from .messages import ClientContext, RoundContext

MALICIOUS_KEY = "poison.malicious"


def mark_malicious(client: ClientContext) -> None:
    """Record, simulator-side only, that this client attacks this round."""
    client.metrics[MALICIOUS_KEY] = 1.0


def malicious_clients(round: RoundContext) -> set[int]:
    """Who attacked this round (delivered or not), from the simulator-side reports."""
    return {r.client_id for r in round.reports if r.metrics.get(MALICIOUS_KEY, 0.0) > 0}
