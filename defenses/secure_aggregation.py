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

Keys and seeds, as in the paper: each client draws an X25519 key pair (Bernstein 2006) and a
self-mask secret from fresh randomness (``os.urandom``) when the run starts; the server
relays the public keys (AdvertiseKeys). ``s_ij`` is HKDF-SHA256 (RFC 5869) of the X25519
agreement of ``sk_i`` and ``pk_j`` (equal to that of ``sk_j`` and ``pk_i``), bound to the
round; ``b_i`` is HKDF of client i's secret, bound to the round. The PRG is AES-256 in counter
mode keyed with the 32-byte seed. Nothing derives from the scenario seed, so no plugin can
recompute a mask; the masks cancel exactly, so the figures are as deterministic as without
them. Revealing a round's ``s_iu`` or ``b_i`` tells nothing of another round's.

What is simulated and what a deployment does instead:

- keys: one key pair per client for the whole run (the round enters through HKDF); a
  deployment may advertise fresh keys per round or session. Keys are neither signed nor
  authenticated (the honest-but-curious server; the active-adversary variant is not run);
- recovery: here survivors hand the needed seeds (their ``b_i``, and ``s_iu`` for each
  dropped ``u``) to the server directly. A deployment Shamir-shares ``b_i`` and the secret
  key among the participants, and the server reconstructs from ``t`` shares (so it must
  hold a threshold of honest survivors);
- the clients' secrets live in the plugin, which plays every client: under executor ray each
  worker's copy carries them, as a client holds its own; the server side reads them only
  through :meth:`ClientKeys.reveal`. They are never checkpointed: a resumed run draws new ones.

Fixed point: client ``i`` encodes ``n_i * update_i`` (its example count is public, as in
FedAvg) as ``round(value * 2^fractional_bits)`` in the ring of integers mod 2^64 (numpy
uint64, whose arithmetic wraps), so mask cancellation is exact; the server decodes the
sum and divides by the survivors' total example count. The quantisation error is at most
``|U| * 2^-(fractional_bits+1) / sum(n_i)`` per coordinate.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import as_state, flatten, zeros_like

PAIR, SELF = b"fedsec secagg pair mask", b"fedsec secagg self mask"
"""HKDF contexts that keep the pairwise and self-mask seeds of one round apart."""
DROP = 3
"""The seed key of the simulated dropout draws (a fault, not a secret)."""
KEY_BYTES = 32


# --------------------------------------------------------------------------- fixed point


def encode(values: np.ndarray, fractional_bits: int) -> np.ndarray:
    """Reals to the ring Z_(2^64): two's-complement fixed point with ``fractional_bits`` after the point."""
    return np.rint(values * 2.0**fractional_bits).astype(np.int64).view(np.uint64)


def decode(ring: np.ndarray, fractional_bits: int) -> np.ndarray:
    return ring.view(np.int64) / 2.0**fractional_bits


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform elements of Z_(2^64) expanded from a 32-byte seed: the AES-256-CTR keystream
    (each seed keys one stream, so the counter starts at zero)."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * size))
    return np.frombuffer(stream, dtype=np.uint64)


def round_key(secret: bytes, context: bytes, round: int) -> bytes:
    """A 32-byte seed for one round from a secret: HKDF-SHA256 with the context and round as info."""
    info = context + round.to_bytes(8, "big")
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


# --------------------------------------------------------------------------- the protocol


class ClientKeys:
    """What the clients hold: each one's X25519 private key and self-mask secret, drawn from fresh
    randomness, and everyone's public key (relayed by the server). Never given to the server."""

    def __init__(self, num_clients: int):
        self.private = [X25519PrivateKey.generate() for _ in range(num_clients)]
        self.self_secrets = [os.urandom(KEY_BYTES) for _ in range(num_clients)]
        self.public = [k.public_key().public_bytes_raw() for k in self.private]  # AdvertiseKeys: known to all

    def __getstate__(self) -> dict:
        """Private keys as their raw bytes (the key objects do not pickle), for Ray workers and checkpoints."""
        return self.__dict__ | {"private": [k.private_bytes_raw() for k in self.private]}

    def __setstate__(self, state: dict) -> None:
        self.__dict__ = state | {"private": [X25519PrivateKey.from_private_bytes(k) for k in state["private"]]}

    def pair_seed(self, round: int, i: int, j: int) -> bytes:
        """``s_ij``: client i's X25519 agreement with j's public key, bound to the round (``s_ij = s_ji``)."""
        shared = self.private[i].exchange(X25519PublicKey.from_public_bytes(self.public[j]))
        return round_key(shared, PAIR, round)

    def self_seed(self, round: int, i: int) -> bytes:
        """``b_i``: client i's own seed for this round."""
        return round_key(self.self_secrets[i], SELF, round)

    def mask(self, round: int, i: int, participants: list[int], encoded: np.ndarray) -> np.ndarray:
        """``y_i``: the encoded update plus its self mask and its signed pairwise masks."""
        masked = encoded + prg(self.self_seed(round, i), encoded.size)
        for j in participants:
            if j < i:
                masked -= prg(self.pair_seed(round, i, j), encoded.size)
            elif j > i:
                masked += prg(self.pair_seed(round, i, j), encoded.size)
        return masked

    def reveal(self, round: int, survivors: list[int], dropped: list[int]) -> dict[tuple[int, ...], bytes]:
        """What the survivors disclose for unmasking: their own ``b_i``, and ``s_iu`` for each dropped ``u``."""
        seeds = {(i,): self.self_seed(round, i) for i in survivors}
        seeds |= {(i, u): self.pair_seed(round, i, u) for i in survivors for u in dropped}
        return seeds


def unmask_sum(masked: dict[int, np.ndarray], revealed: dict[tuple[int, ...], bytes]) -> np.ndarray:
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
        self.keys = ClientKeys(runtime.scenario.federation.num_clients)
        self._figures: dict[str, float] = {}

    def checkpoint(self) -> dict:
        """Nothing: the keys are the only state across rounds, and a resumed run's clients draw new ones (a
        new session), so no private key is written to disk. The masks cancel whatever the keys: the
        resumed figures are those of an uninterrupted run."""
        return {}

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
        masked = self.keys.mask(client.round, client.client_id, participants, encode(weighted, bits))
        client.metrics["cost.secagg_mask_s"] = time.perf_counter() - started
        if self.drops_out(client):  # masked, then lost: the server must unmask without it
            return None
        return message.carrying(MaskedUpdate(masked), masked.nbytes)

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        started = time.perf_counter()
        arrived = messages
        survivors = round.delivered
        dropped = sorted(set(round.sampled) - set(survivors))
        self._figures = {"secagg.dropped_clients": float(len(dropped))}
        if not arrived:
            return zeros_like(round.global_state)
        revealed = self.keys.reveal(round.round, survivors, dropped)
        total = unmask_sum({m.client_id: m.payload.values for m in arrived}, revealed)
        mean = decode(total, self.options.fractional_bits) / sum(m.num_examples for m in arrived)
        self._figures["cost.secagg_unmask_s"] = time.perf_counter() - started
        return as_state(mean, round.global_state)

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        return self._figures | truth.client_mean("cost.secagg_mask_s")
