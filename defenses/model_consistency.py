"""``model_consistency``: clients refuse a round in which they were not all sent the same model.

The defense Pasquini et al. (CCS 2022, Section 6) point to against model inconsistency:
secure aggregation only protects an update if every participant trained the same model,
so the participants check that they did. Each client hashes the state it received
(SHA-256, :func:`~fedsec_bench.messages.state_digest`) and announces the digest to the
round's other participants over a channel the server does not control (in a deployment: a
broadcast channel or transparency log, signed digests beside secure aggregation's key
advertisement); here the round loop computes the digests from what was dispatched and
hands every client all of them (:attr:`ClientContext.peer_digests`). A client whose digest
differs from any peer's sends nothing: its transport drops the message, so a server that
sent even one client another model learns no update that round, and the model does not
move. (The simulated client still runs its local training before refusing; a deployment
checks before training.)

What it does not stop: a server that sends everyone the same malicious model (``imprint``:
the same trap for all) passes the check; only the isolation of one client through the
aggregate is prevented. An honest round costs each client one hash of the state.

List it before any transport that hides updates (``secure_aggregation``, ``he_aggregation``):
it drops the plain message before it is masked or encrypted (the plan says so otherwise).

Figures: ``consistency.refused_clients`` (clients that refused the round; 0 under an honest
server) and ``consistency.inconsistent_round`` (1 in a round where any did).
"""

from __future__ import annotations

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plugins import Plugin

REFUSED_KEY = "consistency.refused"


class ModelConsistency(Plugin):
    name = "model_consistency"
    kind = "defense"
    summary = "clients compare digests of the model they received and refuse a round in which they differ"
    on_instruction_data = "compares model digests only; the same on every data format"
    needs_peer_digests = True

    def transport(self, client: ClientContext, message: Message) -> Message | None:
        own = client.peer_digests[client.client_id]
        if all(digest == own for digest in client.peer_digests.values()):
            return message
        client.metrics[REFUSED_KEY] = 1.0
        return None

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        refused = len(truth.client_values(REFUSED_KEY))
        return {"consistency.refused_clients": float(refused), "consistency.inconsistent_round": float(refused > 0)}
