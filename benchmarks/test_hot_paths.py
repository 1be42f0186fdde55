"""pytest-benchmark suite for the hot paths: aggregation, the HE and masking paths, a DP-SGD step, a round.

Not part of the test suite (CI must not fail on timing noise). Run, store, compare:

    python -m pytest benchmarks/test_hot_paths.py --benchmark-only \\
        --benchmark-storage=results/benchmarks --benchmark-autosave          # store a baseline
    python -m pytest benchmarks/test_hot_paths.py --benchmark-only \\
        --benchmark-storage=results/benchmarks --benchmark-compare \\
        --benchmark-compare-fail=median:25%                                   # fail if 25% slower
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from fedsec_bench.aggregation import fedavg
from fedsec_bench.client import LocalTraining, make_optimizer
from fedsec_bench.data import build_federated_data
from fedsec_bench.executors import make_executor
from fedsec_bench.federation import Federation
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plan import load_plan
from fedsec_bench.registry import get_plugin
from fedsec_bench.runtime import build_runtime

CLIENTS, VALUES = 10, 100_000

SCENARIO = {
    "name": "bench",
    "model": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 4, "tokenizer": {"kind": "bpe", "vocab_size": 512}},
    "tuning": {"mode": "lora", "lora": {"r": 8, "alpha": 16}},
    "data": {"examples_per_client": 32, "seq_len": 48},
    "federation": {"num_clients": 8, "clients_per_round": 4, "rounds": 1, "local_steps": 5, "batch_size": 8},
    "tracking": {"enabled": False},
    "device": "cpu",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    torch.set_num_threads(1)


def messages(values: int = VALUES):
    generator = torch.Generator().manual_seed(0)
    like = {"w": torch.zeros(values)}
    return like, [Message.of_update(c, 10 + c, {"w": torch.randn(values, generator=generator) * 0.01}) for c in range(CLIENTS)]


def runtime_for(raw: dict, tmp_path: Path, *overrides: str):
    plan = load_plan(copy.deepcopy(raw), list(overrides))
    scenario = plan.scenario
    runtime = build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_path)
    hooks = plan.hook_chain(runtime)
    return runtime, hooks


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "krum"])
def test_aggregation_rule(benchmark, tmp_path, rule):
    like, sent = messages()
    if rule == "fedavg":
        benchmark(fedavg, sent, like)
        return
    runtime, _ = runtime_for(SCENARIO, tmp_path, "federation.num_clients=10", "federation.clients_per_round=10")
    cls = get_plugin(rule, "aggregator")
    plugin = cls(cls.OptionsModel(), runtime)
    round = RoundContext(1, runtime, list(range(CLIENTS)), like, delivered=list(range(CLIENTS)))
    benchmark(plugin.aggregation, round, sent)


@pytest.mark.parametrize("defense", ["he_aggregation", "secure_aggregation"])
def test_protected_aggregation_path(benchmark, tmp_path, defense):
    """Every client's transport (encrypt or mask) then the server's aggregation, for CLIENTS clients."""
    values = 16_384 if defense == "he_aggregation" else VALUES
    like, plain = messages(values)
    runtime, hooks = runtime_for({**SCENARIO, "defenses": [{"name": defense}]}, tmp_path,
                                 "federation.num_clients=10", "federation.clients_per_round=10")
    plugin = hooks.plugins[0]
    peers = list(range(CLIENTS))
    round = RoundContext(1, runtime, peers, like, delivered=peers)

    def protected_round():
        sent = [plugin.transport(ClientContext(m.client_id, 1, 0, runtime, peers=peers), m) for m in plain]
        plugin.aggregation(round, sent)

    benchmark(protected_round)


@pytest.mark.parametrize("private", [False, True], ids=["plain_step", "dp_sgd_step"])
def test_local_training_step(benchmark, tmp_path, private):
    raw = {**SCENARIO, "defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0}] if private else []}
    runtime, hooks = runtime_for(raw, tmp_path)
    client = ClientContext(0, 1, 0, runtime, peers=[0])
    texts = runtime.data.client_examples(0)

    def one_step():
        training = LocalTraining(runtime.model, make_optimizer(list(runtime.trainable.params.values()),
                                                               runtime.scenario.federation),
                                 runtime.batcher.loader(texts, seed=0), 1, runtime.device)
        hooks.local_training(client, training).run()

    benchmark(one_step)


def test_one_round(benchmark, tmp_path):
    """A whole round: 4 clients x 5 local steps, FedAvg, held-out evaluation."""
    runtime, hooks = runtime_for(SCENARIO, tmp_path)
    federation = Federation(runtime, hooks, make_executor(runtime, hooks))
    benchmark.pedantic(federation.run_round, args=(1,), rounds=5, warmup_rounds=1)
