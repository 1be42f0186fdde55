"""secure_aggregation: masks cancel exactly, dropouts are recovered, a masked update reveals nothing;
and the observer interface: the server-side probe reads nothing under either transport defense.
(That no plugin can recompute the masks is in test_threat_model.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedsec_bench import run
from fedsec_bench.aggregation import fedavg
from fedsec_bench.defenses.secure_aggregation import (
    ClientKeys,
    SecureAggregation,
    SecureAggregationOptions,
    decode,
    encode,
    prg,
    unmask_sum,
)
from fedsec_bench.errors import ScenarioError
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.updates import flatten

BITS = 32
ROUND = 1


def masked_round(updates: dict[int, np.ndarray]) -> tuple[ClientKeys, dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Every client of ``updates`` encodes and masks its update; returns (the clients' keys, encoded, masked)."""
    secrets = ClientKeys(num_clients=max(updates) + 1)
    participants = sorted(updates)
    encoded = {i: encode(u, BITS) for i, u in updates.items()}
    masked = {i: secrets.mask(ROUND, i, participants, x) for i, x in encoded.items()}
    return secrets, encoded, masked


def ring_sum(vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total


@pytest.fixture
def updates() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {i: rng.normal(size=1000) * 0.01 for i in (0, 3, 4, 8, 9)}


def test_masks_cancel_exactly_in_the_fixed_point_ring(updates):
    secrets, encoded, masked = masked_round(updates)
    total = unmask_sum(masked, secrets.reveal(ROUND, sorted(masked), dropped=[]))
    assert np.array_equal(total, ring_sum(list(encoded.values())))  # bit-exact, not approximately
    error = np.abs(decode(total, BITS) - sum(updates.values())).max()
    assert error <= len(updates) * 2.0 ** -(BITS + 1)  # only the rounding of each encoding remains


def test_a_client_dropping_out_after_masking_is_removed_with_the_survivors_seeds(updates):
    secrets, encoded, masked = masked_round(updates)
    dropped = 4
    arrived = {i: y for i, y in masked.items() if i != dropped}
    survivors = sorted(arrived)
    without_recovery = unmask_sum(arrived, secrets.reveal(ROUND, survivors, dropped=[]))
    recovered = unmask_sum(arrived, secrets.reveal(ROUND, survivors, dropped=[dropped]))
    expected = ring_sum([encoded[i] for i in survivors])
    assert not np.array_equal(without_recovery, expected)  # the dropped client's pairwise masks remain
    assert np.array_equal(recovered, expected)
    # The double mask: a late y_u, stripped of every pairwise mask the survivors revealed, is still masked by b_u.
    revealed = secrets.reveal(ROUND, survivors, dropped=[dropped])
    late = masked[dropped].copy()
    for i in survivors:
        stream = prg(revealed[(i, dropped)], late.size)
        late = late - stream if dropped < i else late + stream
    assert not np.array_equal(late, encoded[dropped])
    assert np.array_equal(late - prg(secrets.self_seed(ROUND, dropped), late.size), encoded[dropped])


def test_pairwise_seeds_come_from_the_key_agreement_and_fresh_keys_change_every_mask(updates):
    """s_ij = HKDF(X25519(sk_i, pk_j)) = HKDF(X25519(sk_j, pk_i)), bound to the round and the pair. Another
    set of keys (another run of the same scenario) masks the same updates differently and sums to the same bits."""
    first, encoded, masked = masked_round(updates)
    assert first.pair_seed(ROUND, 3, 8) == first.pair_seed(ROUND, 8, 3)
    assert first.pair_seed(ROUND, 3, 8) not in (first.pair_seed(ROUND + 1, 3, 8), first.pair_seed(ROUND, 3, 9))
    second, _, again = masked_round(updates)
    assert not any(np.array_equal(masked[i], again[i]) for i in masked)
    sums = [unmask_sum(m, keys.reveal(ROUND, sorted(m), dropped=[])) for keys, m in ((first, masked), (second, again))]
    assert np.array_equal(sums[0], sums[1]) and np.array_equal(sums[0], ring_sum(list(encoded.values())))


def test_a_masked_update_is_statistically_unrelated_to_the_true_one():
    """Masks are uniform on Z_(2^64), so y_i is independent of x_i: Pearson r ~ N(0, 1/d)."""
    d = 20_000
    rng = np.random.default_rng(1)
    true = np.sin(np.arange(d) / 50.0) * 0.05 + rng.normal(size=d) * 0.01  # a structured update
    _, encoded, masked = masked_round({0: true, 1: rng.normal(size=d) * 0.01})
    assert np.corrcoef(decode(encoded[0], BITS), true)[0, 1] > 0.999  # the encoding alone keeps everything
    r = np.corrcoef(decode(masked[0], BITS), true)[0, 1]
    assert abs(r) < 4.5 / np.sqrt(d)  # 4.5 standard deviations of r under independence
    top_bits = (masked[0] >> np.uint64(63)).mean()
    assert abs(top_bits - 0.5) < 4.5 * 0.5 / np.sqrt(d)  # and the masked words look uniform


def stub_runtime(num_clients: int, dropout_rate: float = 0.0):
    federation = SimpleNamespace(num_clients=num_clients, clients_per_round=num_clients, sampling="uniform")
    runtime = SimpleNamespace(scenario=SimpleNamespace(seed=0, federation=federation), seed_for=lambda *keys: 0)
    return SecureAggregation(SecureAggregationOptions(dropout_rate=dropout_rate), runtime), runtime


def plugin_round(plugin, runtime, counts: list[int]):
    like = {"a": torch.zeros(10, 30), "b": torch.zeros(77)}
    gen = torch.Generator().manual_seed(0)
    plain = [
        Message.of_update(cid, n, {k: torch.randn(t.shape, generator=gen) * 0.01 for k, t in like.items()})
        for cid, n in enumerate(counts)
    ]
    peers = list(range(len(counts)))
    sent = [plugin.transport(ClientContext(m.client_id, ROUND, 0, runtime, peers=peers), m) for m in plain]
    return like, plain, [m for m in sent if m is not None]  # a dropout's message is lost on the way


@pytest.mark.parametrize("how", ["message_lost", "dropout_rate"])
def test_plugin_aggregates_fedavg_of_the_survivors(how):
    counts = [3, 5, 8, 2, 6, 4]
    plugin, runtime = stub_runtime(len(counts), dropout_rate=0.5 if how == "dropout_rate" else 0.0)
    like, plain, sent = plugin_round(plugin, runtime, counts)
    if how == "message_lost":
        sent = [m for m in sent if m.client_id != 2]
    arrived = [m.client_id for m in sent]
    survivors = [p for p in plain if p.client_id in arrived]
    assert 0 < len(survivors) < len(counts)  # this seed drops some clients but not all
    round = RoundContext(ROUND, runtime, list(range(len(counts))), like, delivered=arrived)
    aggregate = plugin.aggregation(round, sent)
    bound = len(survivors) * 2.0 ** -(BITS + 1) / sum(m.num_examples for m in survivors) + 1e-8  # + float32 rounding
    assert (flatten(aggregate) - flatten(fedavg(survivors, like))).abs().max().item() < bound
    assert plugin.score_round(round, RoundTruth([]), {})["secagg.dropped_clients"] == len(counts) - len(survivors)
    assert all(m.num_bytes == 8 * 377 for m in sent)  # one 64-bit word per value


def test_an_update_outside_the_fixed_point_range_is_an_error():
    plugin, runtime = stub_runtime(2)
    message = Message.of_update(0, 10, {"w": torch.full((4,), 2.0**30)})
    with pytest.raises(ValueError, match="lower fractional_bits"):
        plugin.transport(ClientContext(0, ROUND, 0, runtime, peers=[0, 1]), message)


def test_refuses_plaintext_aggregators_and_single_client_rounds(tiny):
    tiny["defenses"] = [{"name": "secure_aggregation"}]
    load_scenario(tiny)
    krum = {**tiny, "federation": {**tiny["federation"], "num_clients": 5, "clients_per_round": 5, "aggregator": "krum"}}
    with pytest.raises(ScenarioError, match=r"federation.aggregator \(krum\) needs each client's plain update.*"
                       r"defenses\[0\] \(secure_aggregation\) hides the updates"):
        load_scenario(krum)
    alone = {**tiny, "federation": {**tiny["federation"], "clients_per_round": 1}}
    with pytest.raises(ScenarioError, match="clients_per_round=1"):
        load_scenario(alone)


def test_server_observers_read_nothing_under_either_defense_and_the_model_trains_the_same(tiny):
    """The core's update_probe sees exactly the Message payloads: plain tensors, ciphertexts, masked words."""
    tiny["tuning"] = {"mode": "full"}
    tiny["federation"]["rounds"] = 1
    tiny["attacks"] = [{"name": "update_probe"}]
    finals = {}
    for defense in (None, "he_aggregation", "secure_aggregation"):
        tiny["defenses"] = [{"name": defense}] if defense else []
        finals[defense] = run(tiny).final
    assert finals[None]["probe.readable_fraction"] == 1.0
    for defense in ("he_aggregation", "secure_aggregation"):
        assert finals[defense]["probe.readable_fraction"] == 0.0
        assert finals[defense]["utility.eval_loss"] == pytest.approx(finals[None]["utility.eval_loss"], abs=1e-5)
    assert finals["secure_aggregation"]["cost.bytes_up"] == 2 * finals[None]["cost.bytes_up"]  # uint64 vs float32
