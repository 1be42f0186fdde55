"""``secure_aggregation``: pairwise additive masks that cancel in the sum (Bonawitz et al. 2017).

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS 2017). Client ``i`` of the round's participants ``U`` sends

    y_i = x_i + PRG(b_i) + sum_{j in U, j > i} PRG(s_ij) - sum_{j in U, j < i} PRG(s_ij)   (mod 2^64)

where ``x_i`` is its fixed-point encoded update, ``s_ij = s_ji`` a seed it shares with each
other participant and ``b_i`` a seed of its own (the "double mask"). The pairwise terms
cancel in ``sum_i y_i``; the server then removes ``PRG(b_i)`` of every survivor. If a
client ``u`` drops out after masking, the survivors reveal ``s_iu`` so the server can
remove the pairwise masks they added for ``u``; ``b_u`` is never revealed, so even a
late-arriving ``y_u`` stays unreadable (the reason for the double mask).

What is simulated and what a deployment uses instead:

- seeds: here ``s_ij`` and ``b_i`` come from a seeded PRG keyed by (scenario seed, round,
  client ids), i.e. the simulator plays the key agreement. A deployment derives ``s_ij``
  by Diffie-Hellman key agreement (``s_ij = KA(sk_i, pk_j)``, public keys relayed by the
  server) and draws ``b_i`` at random;
- recovery: here survivors hand the needed seeds to the server directly. A deployment
  Shamir-shares ``b_i`` and the DH secret key among the participants, and the server
  reconstructs from ``t`` shares (so it must hold a threshold of honest survivors);
- PRG: numpy's Philox counter-based generator expands a 128-bit seed here; a deployment
  uses AES-CTR (or ChaCha20) keyed with the agreed key.

Fixed point: client ``i`` encodes ``n_i * update_i`` (its example count is public, as in
FedAvg) as ``round(value * 2^fractional_bits)`` in the ring of integers mod 2^64 (numpy
uint64, whose arithmetic wraps), so mask cancellation is exact; the server decodes the
sum and divides by the survivors' total example count. The quantisation error is at most
``|U| * 2^-(fractional_bits+1) / sum(n_i)`` per coordinate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import as_state, flatten, zeros_like

PAIR, SELF, DROP = 1, 2, 3
"""Domain tags that keep the pairwise seeds, self-mask seeds and dropout draws independent."""


# --------------------------------------------------------------------------- fixed point


def encode(values: np.ndarray, fractional_bits: int) -> np.ndarray:
    """Reals to the ring Z_(2^64): two's-complement fixed point with ``fractional_bits`` after the point."""
    return np.rint(values * 2.0**fractional_bits).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray, fractional_bits: int) -> np.ndarray:
    return ring.view(np.int64) / 2.0**fractional_bits


def prg(seed: list[int], size: int) -> np.ndarray:
    """``size`` uniform elements of Z_(2^64) expanded from a seed (Philox, 128-bit key)."""
    return np.random.Philox(np.random.SeedSequence(seed)).random_raw(size)


# --------------------------------------------------------------------------- the protocol


class ClientSecrets:
    """The seeds the clients hold: ``s_ij`` shared per pair, ``b_i`` per client. Never given to the server."""

    def __init__(self, scenario_seed: int):
        self.scenario_seed = scenario_seed

    def pair_seed(self, round: int, i: int, j: int) -> list[int]:
        return [self.scenario_seed, PAIR, round, min(i, j), max(i, j)]

    def self_seed(self, round: int, i: int) -> list[int]:
        return [self.scenario_seed, SELF, round, i]

    def mask(self, round: int, i: int, participants: list[int], encoded: np.ndarray) -> np.ndarray:
        """``y_i``: the encoded update plus its self mask and its signed pairwise masks."""
        masked = encoded + prg(self.self_seed(round, i), encoded.size)
        for j in participants:
            if j < i:
                masked -= prg(self.pair_seed(round, i, j), encoded.size)
            elif j > i:
                masked += prg(self.pair_seed(round, i, j), encoded.size)
        return masked

    def reveal(self, round: int, survivors: list[int], dropped: list[int]) -> dict[tuple[int, ...], list[int]]:
        """What the survivors disclose for unmasking: their own ``b_i``, and ``s_iu`` for each dropped ``u``."""
        seeds = {(i,): self.self_seed(round, i) for i in survivors}
        seeds |= {(i, u): self.pair_seed(round, i, u) for i in survivors for u in dropped}
        return seeds


def unmask_sum(masked: dict[int, np.ndarray], revealed: dict[tuple[int, ...], list[int]]) -> np.ndarray:
    """The server's step: sum the masked vectors it received and strip the masks the survivors revealed.

    ``revealed[(i,)]`` is survivor i's self-mask seed; ``revealed[(i, u)]`` the seed of the
    pair (i, u) with dropped client u, whose term i added (i < u) or subtracted (i > u).
    """
    size = next(iter(masked.values())).size
    total = np.zeros(size, dtype=np.uint64)
    for y in masked.values():
        total += y
    for key, seed in revealed.items():
        stream = prg(seed, size)
        if len(key) == 1 or key[0] < key[1]:
            total -= stream
        else:
            total += stream
    return total


# --------------------------------------------------------------------------- the plugin


@dataclass
class MaskedUpdate:
    """What a client sends: its masked vector in Z_(2^64); uniformly random to anyone without the seeds."""

    values: np.ndarray


class SecureAggregationOptions(Options):
    fractional_bits: int = Field(
        32, ge=8, le=48,
        description="Fixed-point precision: updates are scaled by 2^fractional_bits before masking. More bits, "
        "less quantisation error, smaller range: |n_i * update| must stay below 2^(63 - fractional_bits) / |U|.",
    )
    dropout_rate: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Simulated fault: each sampled client drops out after masking with this probability "
        "(its message never arrives; the survivors' seeds remove its masks).",
    )


class SecureAggregation(Plugin):
    name = "secure_aggregation"
    kind = "defense"
    summary = "pairwise additive masks that cancel in the sum; the server reads only the aggregate (Bonawitz et al. 2017)"
    on_instruction_data = "acts on the update only; the same on every data format"
    OptionsModel = SecureAggregationOptions
    sends_plain = False  # masked vectors: only their sum means anything
    aggregates_mean = True

    def __init__(self, options: SecureAggregationOptions, runtime):
        super().__init__(options, runtime)
        self.secrets = ClientSecrets(runtime.scenario.seed)
        self._figures: dict[str, float] = {}

    @classmethod
    def check(cls, options: SecureAggregationOptions, scenario) -> None:
        if scenario.federation.clients_per_round < 2:
            raise ValueError(
                "federation.clients_per_round=1: the sum of one masked update is that update, so the server "
                "would read it in the clear; set federation.clients_per_round >= 2"
            )

    def drops_out(self, client: ClientContext) -> bool:
        draw = np.random.default_rng([self.runtime.scenario.seed, DROP, client.round, client.client_id]).random()
        return draw < self.options.dropout_rate

    def transport(self, client: ClientContext, message: Message) -> Message:
        started = time.perf_counter()
        participants = client.peers  # announced by the server before masking (Bonawitz's AdvertiseKeys)
        weighted = flatten(message.payload).detach().cpu().double().numpy() * message.num_examples
        bits = self.options.fractional_bits
        limit = 2.0 ** (63 - bits) / len(participants)
        if np.abs(weighted).max(initial=0.0) >= limit:
            raise ValueError(
                f"secure_aggregation: client {client.client_id}'s weighted update reaches "
                f"{np.abs(weighted).max():.3g}, beyond the fixed-point range {limit:.3g} of fractional_bits={bits} "
                f"with {len(participants)} participants; lower fractional_bits"
            )
        masked = self.secrets.mask(client.round, client.client_id, participants, encode(weighted, bits))
        client.metrics["cost.secagg_mask_s"] = time.perf_counter() - started
        if self.drops_out(client):  # masked, then lost: the server must unmask without it
            return None
        return Message(client.client_id, message.num_examples, MaskedUpdate(masked), masked.nbytes)

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        started = time.perf_counter()
        arrived = messages
        survivors = round.delivered
        dropped = sorted(set(round.sampled) - set(survivors))
        self._figures = {"secagg.dropped_clients": float(len(dropped))}
        if not arrived:
            return zeros_like(round.global_state)
        revealed = self.secrets.reveal(round.round, survivors, dropped)
        total = unmask_sum({m.client_id: m.payload.values for m in arrived}, revealed)
        mean = decode(total, self.options.fractional_bits) / sum(m.num_examples for m in arrived)
        self._figures["cost.secagg_unmask_s"] = time.perf_counter() - started
        return as_state(mean, round.global_state)

    def round_end(self, round: RoundContext, metrics: dict[str, float]) -> dict[str, float]:
        return self._figures | round.client_mean("cost.secagg_mask_s")
