"""What travels in a round and what each party knows, as plain data.

The split follows the threat model in DESIGN.md: a :class:`Message` is exactly what
a client puts on the wire (the server and any server-side observer see this and
nothing else), while a :class:`ClientReport` is the simulator's own bookkeeping
(training loss, per-client privacy spend) that no party of the protocol sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runtime import Runtime

State = dict[str, torch.Tensor]
"""Trainable parameters (or an update of them) by parameter name."""


@dataclass
class ClientContext:
    """One client in one round, as seen by client-side hooks."""

    client_id: int
    round: int
    seed: int
    runtime: Runtime
    peers: list[int] = field(default_factory=list)
    """The round's sampled clients, as the server announces them (secure aggregation masks against them)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Client-side hooks may record figures here; they reach round_end through the report."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Simulator-only objects a client-side hook hands to its plugin's server side (e.g. a plaintext
    update to measure an encryption error), through the report. Client-side hooks may run in another
    process (executor: ray), so this and ``metrics`` are their only way back: attributes they set
    on the plugin stay where they ran."""


@dataclass
class Message:
    """What one client sends to the server.

    ``payload`` is a plain :data:`State` unless a transport defense replaced it
    (ciphertexts, masked vectors...). ``num_bytes`` is what it would cost on the
    wire and feeds ``cost.bytes_up``.
    """

    client_id: int
    num_examples: int
    payload: Any
    num_bytes: int

    @classmethod
    def of_update(cls, client_id: int, num_examples: int, update: State) -> Message:
        """The message of a plain update, costed at its tensors' size."""
        size = sum(t.numel() * t.element_size() for t in update.values())
        return cls(client_id, num_examples, update, size)

    @property
    def is_plain(self) -> bool:
        """Whether the payload is the client's update in the clear (a :data:`State`), as a server reading
        it would find; False once a transport defense replaced it (ciphertexts, masked vectors)."""
        return isinstance(self.payload, dict)


def plain_updates(messages: list[Message], reader: str) -> list[State]:
    """The updates of messages that must be plain; a clear error when one is not (a transport defense
    that hides updates must also aggregate them; :func:`~fedsec_bench.plugins.check_plugins` refuses
    such scenarios at load time, this guards third-party code paths)."""
    for m in messages:
        if not m.is_plain:
            raise TypeError(
                f"{reader} needs each client's plain update, but client {m.client_id} sent a "
                f"{type(m.payload).__name__}: the defense that changed the transport must also aggregate"
            )
    return [m.payload for m in messages]


@dataclass
class ClientReport:
    """Simulator-side facts about one client's round; never shown to protocol parties."""

    client_id: int
    num_examples: int
    train_loss: float
    local_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundContext:
    """One round as seen by server-side hooks and by round_end."""

    round: int
    runtime: Runtime
    sampled: list[int]
    global_state: State
    reports: list[ClientReport] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    """Clients whose message reached the server (a transport may lose one: a dropout)."""

    def client_seed(self, client_id: int) -> int:
        """The seed of a client's local training this round, the same whichever executor runs it."""
        return self.runtime.seed_for(self.round, client_id)

    def client_mean(self, key: str) -> dict[str, float]:
        """``{key: mean}`` of a figure the clients recorded in ``client.metrics`` (empty if none did)."""
        values = [r.metrics[key] for r in self.reports if key in r.metrics]
        return {key: sum(values) / len(values)} if values else {}
