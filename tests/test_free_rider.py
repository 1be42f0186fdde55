"""Free riders (Lin et al. 2019): what each mode sends against its definition, that no optimizer step
runs, that the stale memory survives a checkpoint, and a tiny run against Krum."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedsec_bench
import fedsec_bench.client as client_module
from fedsec_bench.attacks.free_rider import SAVED_STEPS, FreeRider, SkippedTraining
from fedsec_bench.client import LocalTraining
from fedsec_bench.federation import sample_clients
from fedsec_bench.ground_truth import MALICIOUS_KEY
from fedsec_bench.messages import ClientContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.runtime import derive_seed
from fedsec_bench.tuning import TrainableState


@pytest.fixture
def runtime(tiny):
    """Just what a free rider reads: the scenario, and the exchanged parameters of a small model."""
    return SimpleNamespace(scenario=load_scenario(tiny), trainable=TrainableState(torch.nn.Linear(50, 40)))


def make(runtime, **options):
    return FreeRider(FreeRider.OptionsModel(**options), runtime)


def random_state(runtime, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in runtime.trainable.params.items()}


def client_round(attack, runtime, cid, rnd, received):
    """The client-side hooks of one round, as client_round calls them: the model holds what was sent."""
    runtime.trainable.load(received)
    client = ClientContext(cid, rnd, seed=100 * rnd + cid, runtime=runtime)
    training = LocalTraining(runtime.trainable.model, torch.optim.SGD(runtime.trainable.params.values(), lr=0.1),
                             loader=[], steps=7, device=torch.device("cpu"))
    training = attack.local_training(client, training)
    honest = {n: torch.full_like(t, 0.5) for n, t in received.items()}
    return client, training, attack.client_update(client, honest)


def test_stale_update_is_exactly_the_global_change_the_free_rider_observed(runtime):
    """Lin et al.'s delta-weights free rider: what it receives now minus what it received before (it still
    observes in rounds it is honest), zero when it has nothing to subtract; the memory survives a checkpoint."""
    attack = make(runtime, clients=[0, 1], rounds=(2, 3), mode="stale")
    a, b, c = (random_state(runtime, s) for s in (1, 2, 3))
    client, training, sent = client_round(attack, runtime, 0, 1, a)  # before its window: honest
    assert training.steps == 7 and torch.equal(sent["weight"], torch.full_like(a["weight"], 0.5))
    assert MALICIOUS_KEY not in client.metrics

    client, training, sent = client_round(attack, runtime, 0, 2, b)
    assert isinstance(training, SkippedTraining) and training.steps == 0
    assert client.metrics[MALICIOUS_KEY] == 1 and client.metrics[SAVED_STEPS] == 7
    for name in a:  # element by element, in float32 as the state is exchanged
        expected = np.array([np.float32(x) - np.float32(y) for x, y in zip(b[name].flatten().tolist(),
                                                                            a[name].flatten().tolist())])
        assert np.array_equal(sent[name].numpy().ravel(), expected)
    _, _, first = client_round(attack, runtime, 1, 2, b)  # client 1's first round: nothing observed yet
    assert all(torch.count_nonzero(t) == 0 for t in first.values())
    _, training, other = client_round(attack, runtime, 2, 2, b)  # an honest client is left alone
    assert training.steps == 7 and torch.equal(other["bias"], torch.full_like(b["bias"], 0.5))

    resumed = make(runtime, clients=[0, 1], rounds=(2, 3), mode="stale")
    resumed.restore(attack.checkpoint())
    _, _, sent = client_round(resumed, runtime, 0, 3, c)
    assert all(torch.equal(sent[n], c[n] - b[n]) for n in c)


def test_noise_update_has_the_stated_std_and_zero_sends_nothing(runtime):
    """N(0, std²) per coordinate: over d values the sample mean is within 4·std/√d of 0 and the sample std within
    4·std/√(2d) of std (their standard errors); the draw follows the client's seed."""
    std = 0.003
    attack = make(runtime, clients=[0], mode="noise", std=std)
    _, training, sent = client_round(attack, runtime, 0, 1, random_state(runtime, 1))
    values = torch.cat([t.flatten() for t in sent.values()]).double()
    d = values.numel()
    assert training.steps == 0 and d == 50 * 40 + 40
    assert abs(values.mean().item()) < 4 * std / math.sqrt(d)
    assert abs(values.std(correction=1).item() - std) < 4 * std / math.sqrt(2 * d)
    _, _, again = client_round(attack, runtime, 0, 1, random_state(runtime, 2))
    assert all(torch.equal(sent[n], again[n]) for n in sent)

    _, training, zero = client_round(make(runtime, clients=[0], mode="zero"), runtime, 0, 1, random_state(runtime, 1))
    assert training.steps == 0 and all(torch.count_nonzero(t) == 0 for t in zero.values())


def test_options_that_cannot_work_are_refused(runtime):
    with pytest.raises(ValueError, match="std: only mode noise"):
        FreeRider.OptionsModel(mode="zero", std=0.1)
    on_ray = SimpleNamespace(federation=SimpleNamespace(num_clients=4, executor="ray"))
    with pytest.raises(ValueError, match="executor: local, or mode noise or zero"):
        FreeRider.check(FreeRider.OptionsModel(clients=[0], mode="stale"), on_ray)
    FreeRider.check(FreeRider.OptionsModel(clients=[0], mode="noise"), on_ray)


def test_free_riders_run_no_optimizer_step_and_krum_reports_whether_it_caught_them(tiny, monkeypatch):
    """Every optimizer step a run takes is an honest client's; the free rider's skipped steps are logged,
    and Krum's exclusion figures, fed by the free rider's ground-truth mark, are there in every round."""
    steps = []

    def counting(params, federation):
        optimizer = make_optimizer(params, federation)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
        return optimizer

    make_optimizer = client_module.make_optimizer
    monkeypatch.setattr(client_module, "make_optimizer", counting)
    tiny["federation"].update(num_clients=6, clients_per_round=5, rounds=3, aggregator={"name": "krum", "f": 1})
    tiny["attacks"] = [{"name": "free_rider", "clients": [0], "mode": "stale"}]
    result = fedsec_bench.run(tiny)

    fed = load_scenario(tiny).federation
    rides = [r for r in range(1, fed.rounds + 1) if 0 in sample_clients(fed, derive_seed(tiny["seed"], r))]
    assert rides and len(steps) == (fed.rounds * fed.clients_per_round - len(rides)) * fed.local_steps
    metrics = result.metrics.set_index("round") if "round" in result.metrics else result.metrics
    for r in rides:
        assert metrics.loc[r, SAVED_STEPS] == fed.local_steps
        assert metrics.loc[r, "robust.exclusion_recall"] in (0.0, 1.0)
