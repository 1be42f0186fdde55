"""What travels in a round and what each protocol party is shown, as plain data.

The split follows the threat model in docs/design.md: a :class:`Message` is exactly what a
client puts on the wire, and a :class:`RoundContext` the public facts of a round (its
number, the clients the server sampled, which messages arrived, the global state); the
server and every server-side hook get these and nothing else. What only the simulator
knows (each client's training loss, privacy spend, who attacked, plaintexts under
encryption) is in :mod:`fedsec_bench.ground_truth`, handed to scorers alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .runtime import Runtime

State = dict[str, torch.Tensor]
"""Trainable parameters (or an update of them) by parameter name."""

SIDE_VALUE_BYTES = 8
"""What one side value costs on the wire: a float64."""


def state_bytes(state: State) -> int:
    """The size of a state's tensors, as sent in the clear."""
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class ClientContext:
    """One client in one round, as seen by client-side hooks."""

    client_id: int
    round: int
    seed: int
    runtime: Runtime
    peers: list[int] = field(default_factory=list)
    """The round's sampled clients, as the server announces them (secure aggregation masks against them)."""
    peer_digests: dict[int, str] = field(default_factory=dict)
    """SHA-256 digest of the model each of the round's clients received (this one's included), as the
    clients announce them to each other over a channel the server does not control (simulated: the
    round loop computes them from what was dispatched). Filled only when a client-side plugin
    declares ``needs_peer_digests`` (``model_consistency``)."""
    side: dict[str, float] = field(default_factory=dict)
    """Values the client sends beside its update, in the clear (DP-FedAvg's unclipped bit): they become
    the message's :attr:`Message.side`. Client-side hooks that run before the message exists write them here."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Figures for the scorers, never sent: they reach ``score_round`` through the round's
    :class:`~fedsec_bench.ground_truth.RoundTruth`."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Simulator-only objects a client-side hook hands to its plugin's scorer (e.g. a plaintext update
    to measure an encryption error), through the round's truth. Client-side hooks may run in another
    process (executor: ray), so this, ``metrics`` and what they send are their only way back:
    attributes they set on the plugin stay where they ran."""


@dataclass
class Message:
    """What one client sends to the server.

    ``payload`` is a plain :data:`State` unless a transport defense replaced it
    (ciphertexts, masked vectors...); ``side`` holds a few public values sent beside it,
    in the clear whatever hides the payload. ``num_bytes`` is what it all costs on the
    wire and feeds ``cost.bytes_up``.
    """

    client_id: int
    num_examples: int
    payload: Any
    num_bytes: int
    side: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of_update(cls, client_id: int, num_examples: int, update: State, side: dict[str, float] | None = None) -> Message:
        """The message of a plain update, costed at its tensors' size and its side values'."""
        return cls(client_id, num_examples, None, 0, dict(side or {})).carrying(update, state_bytes(update))

    def carrying(self, payload: Any, payload_bytes: int) -> Message:
        """This message with another payload (encrypted, masked, crafted), costed at ``payload_bytes``
        plus the side values, which travel on unchanged."""
        return replace(self, payload=payload, num_bytes=payload_bytes + SIDE_VALUE_BYTES * len(self.side))

    @property
    def is_plain(self) -> bool:
        """Whether the payload is the client's update in the clear (a :data:`State`), as a server reading
        it would find; False once a transport defense replaced it (ciphertexts, masked vectors)."""
        return isinstance(self.payload, dict)


def plain_updates(messages: list[Message], reader: str) -> list[State]:
    """The updates of messages that must be plain; a clear error when one is not (a transport defense
    that hides updates must also aggregate them; :func:`~fedsec_bench.plan.resolve` refuses
    such scenarios at load time, this guards third-party code paths)."""
    for m in messages:
        if not m.is_plain:
            raise TypeError(
                f"{reader} needs each client's plain update, but client {m.client_id} sent a "
                f"{type(m.payload).__name__}: the defense that changed the transport must also aggregate"
            )
    return [m.payload for m in messages]


@dataclass
class RoundContext:
    """One round as the server knows it, given to every server-side hook.

    Public round facts only: no client's report, no plaintext. ``runtime`` stays because
    plugins need the model, the tokenizer, the public data and the scenario; it also holds
    every client's data, which a server-side hook must not read (a convention, not enforced:
    the truth of what a client trained on is for scorers, see ``score_round``). Between the
    clients' training and the server's step, the runtime's model holds the global state.
    """

    round: int
    runtime: Runtime
    sampled: list[int]
    """The clients the server picked for this round (it announces them as each client's ``peers``)."""
    global_state: State
    delivered: list[int] = field(default_factory=list)
    """Clients whose message reached the server (a transport may lose one: a dropout)."""
    dispatched: dict[int, State] = field(default_factory=dict)
    """What the server sent each sampled client (``dispatch``); a client missing here got the global state."""
    isolated: dict[int, State] = field(default_factory=dict)
    """Single clients' updates the server recovered from the aggregate (a malicious server's model
    inconsistency, in ``post_aggregation``): readers treat them as the clients' plain updates."""

    def sent_to(self, client_id: int) -> State:
        """The state client ``client_id`` received this round."""
        return self.dispatched.get(client_id, self.global_state)

    def is_consistent(self) -> bool:
        """Whether every sampled client received the global state itself (an honest server's round)."""
        return all(self.sent_to(c) is self.global_state for c in self.sampled)

    def received_digests(self) -> dict[int, str]:
        """Each sampled client's digest of the state it received (:func:`state_digest`); a state sent to
        several clients is hashed once."""
        by_object: dict[int, str] = {}
        for client in self.sampled:
            state = self.sent_to(client)
            if id(state) not in by_object:
                by_object[id(state)] = state_digest(state)
        return {client: by_object[id(self.sent_to(client))] for client in self.sampled}


def state_digest(state: State) -> str:
    """SHA-256 over a state's names, dtypes, shapes and values in name order: equal digests mean the
    same model (a server cannot find two states that collide)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
