"""he_aggregation: the server cannot decrypt, the decrypted sum is FedAvg within CKKS error, costs are logged."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tenseal as ts
import torch

from fedsec_bench import load_scenario, run
from fedsec_bench.aggregation import fedavg
from fedsec_bench.defenses.he_aggregation import EncryptedSum, HEAggregation, HEAggregationOptions, KeyHolders
from fedsec_bench.errors import ScenarioError
from fedsec_bench.ground_truth import ClientReport, RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.updates import flatten

CKKS_TOLERANCE = 2.0**-20
"""Loose bound on the CKKS error at scale 2^40, N = 8192: encryption noise decodes to about
N * 3.2 / 2^40 ~ 2e-8 per value (Cheon et al. 2017); the weighted sum only averages it."""


@pytest.fixture(scope="module")
def parties():
    keys = KeyHolders(HEAggregationOptions())
    return keys, EncryptedSum(keys.public_context())


def test_server_holds_no_secret_key_and_cannot_decrypt(parties):
    keys, server = parties
    assert keys.context.is_private()
    assert server.context.is_public() and not server.context.has_secret_key()
    update = np.linspace(-1.0, 1.0, 100)
    (ciphertext,) = keys.encrypt(update)
    aggregate = server.weighted_sum([ciphertext, ciphertext], [0.25, 0.75])
    for held in (ciphertext, aggregate):
        with pytest.raises(ValueError, match="secret_key"):
            ts.ckks_vector_from(server.context, held).decrypt()
    np.testing.assert_allclose(keys.decrypt(aggregate), update, atol=CKKS_TOLERANCE)


def stub_runtime(mode: str) -> SimpleNamespace:
    return SimpleNamespace(scenario=SimpleNamespace(seed=0, tuning=SimpleNamespace(mode=mode)))


def encrypted_round(plugin, runtime, plain: list[Message], like) -> tuple[list[Message], RoundContext, RoundTruth]:
    """Each client's transport, then the round as the server's hooks get it, and the simulator's truth of it
    (the clients' reports, for the scorer)."""
    clients = [ClientContext(m.client_id, 1, 0, runtime) for m in plain]
    sent = [plugin.transport(c, m) for c, m in zip(clients, plain)]
    reports = [ClientReport(c.client_id, m.num_examples, 0.0, 1, c.metrics, c.notes) for c, m in zip(clients, plain)]
    ids = [m.client_id for m in plain]
    return sent, RoundContext(1, runtime, ids, like, delivered=ids), RoundTruth(reports)


@pytest.mark.parametrize("spool", ["memory", "disk"])
def test_decrypted_aggregate_is_fedavg_within_ckks_error(spool):
    """Three clients, an update spanning three ciphertexts (the last one partial), unequal example counts."""
    runtime = stub_runtime("full")
    plugin = HEAggregation(HEAggregationOptions(spool=spool), runtime)
    assert not plugin.server.context.has_secret_key()  # the plugin's server side got only the public context
    gen = torch.Generator().manual_seed(0)
    like = {"a": torch.zeros(64, 100), "b": torch.zeros(1900)}  # 8300 values: 4096 + 4096 + 108
    counts = [3, 5, 8]
    plain = [
        Message.of_update(cid, n, {k: torch.randn(t.shape, generator=gen) * 0.01 for k, t in like.items()})
        for cid, n in enumerate(counts)
    ]
    sent, round, truth = encrypted_round(plugin, runtime, plain, like)
    for message in sent:
        chunks = message.payload.chunks
        assert len(chunks) == math.ceil(8300 / 4096)  # packed N/2 values per ciphertext, not one per value
        assert message.num_bytes == sum(len(chunks[j]) for j in range(len(chunks)))
    aggregate = plugin.aggregation(round, sent)
    error = (flatten(aggregate) - flatten(fedavg(plain, like))).abs().max().item()
    figures = plugin.score_round(round, truth, {})
    assert error < CKKS_TOLERANCE
    assert figures["he.max_abs_error"] == pytest.approx(error, abs=1e-8)  # up to the float32 rounding of the model
    assert figures["he.expansion_ratio"] == pytest.approx(np.mean([m.num_bytes for m in sent]) / (4 * 8300))
    if spool == "disk":
        assert os.listdir(plugin.spool_dir.name) == []  # the server released every client's spool file


@pytest.mark.parametrize("mode", ["lora", "prompt", "full"])
def test_every_mode_runs_encrypted_and_logs_costs(tiny, mode):
    """(That the model then trains exactly like plain FedAvg is in test_secure_aggregation's observer test.)"""
    tiny["tuning"] = {"mode": mode}
    tiny["federation"]["rounds"] = 1
    tiny["attacks"] = [{"name": "update_probe"}]
    tiny["defenses"] = [{"name": "he_aggregation"}]
    he = run(tiny).final
    assert he["probe.readable_fraction"] == 0.0
    assert he["he.max_abs_error"] < CKKS_TOLERANCE
    for cost in ("cost.he_encrypt_s", "cost.he_aggregate_s", "cost.he_decrypt_s"):
        assert he[cost] > 0
    # bytes_up is the serialized ciphertexts' size; bytes_down the float32 global state
    assert he["cost.bytes_up"] == pytest.approx(he["he.expansion_ratio"] * he["cost.bytes_down"])
    assert he["he.expansion_ratio"] > 1  # ciphertexts always cost more than float32


def test_refuses_aggregators_that_need_plaintext_updates(tiny):
    tiny["federation"].update(num_clients=5, clients_per_round=5, aggregator={"name": "krum", "f": 1})
    tiny["defenses"] = [{"name": "he_aggregation"}]
    with pytest.raises(ScenarioError, match=r"federation.aggregator \(krum\) needs each client's plain update.*"
                       r"defenses\[0\] \(he_aggregation\) hides the updates"):
        load_scenario(tiny)


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"coeff_mod_bit_sizes": [60]}, r"coeff_mod_bit_sizes: .*at least 2 primes"),
        ({"poly_modulus_degree": 4096}, r"coeff_mod_bit_sizes: .*128-bit security"),
        ({"global_scale": 2.0**50}, r"global_scale: 2\^50 squared .* leaves 0 of the 100 data-prime bits"),
        ({"global_scale": 2.0**10}, r"global_scale: 1024 is below 2\^20"),
    ],
)
def test_unsafe_ckks_parameters_are_refused_at_load_time(tiny, options, problem):
    tiny["defenses"] = [{"name": "he_aggregation", **options}]
    with pytest.raises(ScenarioError, match=problem):
        load_scenario(tiny)
