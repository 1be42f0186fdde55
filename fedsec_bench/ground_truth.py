"""What the simulator knows and no protocol party does, and the one door to it: :class:`RoundTruth`.

Each client that completes its local training leaves a :class:`ClientReport`: its loss and
steps, the figures its client-side hooks recorded (``client.metrics``) and the objects they
left for their scorer (``client.notes``: a plaintext update under encryption). The round
loop gathers them into a :class:`RoundTruth` and hands it only to ``Plugin.score_round``,
which runs outside the protocol; no server-side hook ever receives it, so no defense can
decide on what the simulator alone knows and no attack can read a plaintext it was not sent.

Who attacked is one such fact: an attacking client marks itself in its client metrics,
and figures computed outside the protocol (a robust rule's exclusion precision and recall)
read the mark here, so no defense needs to import an attack to know what it is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .messages import ClientContext

MALICIOUS_KEY = "poison.malicious"


@dataclass
class ClientReport:
    """Simulator-side facts about one client's round; never shown to protocol parties."""

    client_id: int
    num_examples: int
    train_loss: float
    local_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def mark_malicious(client: ClientContext) -> None:
    """Record, simulator-side only, that this client attacks this round."""
    client.metrics[MALICIOUS_KEY] = 1.0


@dataclass(frozen=True)
class RoundTruth:
    """The simulator's ground truth of one round: the report of every client that trained (whether
    its message arrived or not). For scorers only (``Plugin.score_round``)."""

    reports: list[ClientReport]

    def trained(self) -> list[int]:
        """The clients that completed their local training this round, delivered or not."""
        return [r.client_id for r in self.reports]

    def client_values(self, key: str, among: Iterable[int] | None = None) -> dict[int, float]:
        """``{client_id: value}`` of a figure the clients recorded in ``client.metrics`` (those that did),
        optionally only ``among`` some clients (say, ``round.delivered``)."""
        wanted = None if among is None else set(among)
        return {r.client_id: r.metrics[key] for r in self.reports
                if key in r.metrics and (wanted is None or r.client_id in wanted)}

    def client_mean(self, key: str) -> dict[str, float]:
        """``{key: mean}`` of a figure the clients recorded (empty if none did), as a scorer logs it."""
        values = list(self.client_values(key).values())
        return {key: sum(values) / len(values)} if values else {}

    def notes(self, key: str) -> dict[int, Any]:
        """``{client_id: note}`` of an object the clients left in ``client.notes`` (those that did)."""
        return {r.client_id: r.notes[key] for r in self.reports if key in r.notes}

    def malicious_clients(self) -> set[int]:
        """Who attacked this round (delivered or not)."""
        return {cid for cid, mark in self.client_values(MALICIOUS_KEY).items() if mark > 0}
