"""user_audit: ε of two Gaussians against dp-accounting and the hockey-stick integral, the estimator's
consistency on the Gaussian mechanism (Andrew et al. 2024, Theorem 3.1), the canaries' insertion and
regeneration, refusals, and end to end: clipping only stands out, DP-FedAvg stays below its accountant."""

from __future__ import annotations

import copy
import math
import pickle

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from scipy import integrate, stats

import fedsec_bench
from fedsec_bench.attacks.user_audit import (
    CANARY_MARK, Gaussian, UserAudit, cosines, epsilon_between_gaussians, random_direction,
)
from fedsec_bench.errors import ScenarioError
from fedsec_bench.federation import sample_clients
from fedsec_bench.messages import ClientContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.runtime import derive_seed
from fedsec_bench.tuning import TrainableState


@pytest.mark.parametrize(("mu", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-3), (3.0, 1e-6)])
def test_equal_variances_give_the_gaussian_mechanisms_epsilon(mu, delta):
    """N(0, s²) against N(μs, s²) is the Gaussian mechanism of sensitivity 1 and noise 1/μ (μ-GDP), at any scale s."""
    expected = privacy_loss_distribution.from_gaussian_mechanism(
        1 / mu, sensitivity=1, value_discretization_interval=1e-4).get_epsilon_for_delta(delta)
    for scale in (1.0, 0.003):
        assert epsilon_between_gaussians(Gaussian(0, scale), Gaussian(mu * scale, scale), delta) == pytest.approx(expected, rel=1e-3)


def hockey_stick(p: Gaussian, q: Gaussian, eps: float) -> float:
    """∫ max(0, p − e^ε q) by quadrature, independent of the closed form's roots."""
    lo = min(p.mean - 12 * p.std, q.mean - 12 * q.std)
    hi = max(p.mean + 12 * p.std, q.mean + 12 * q.std)
    gap = lambda y: max(0.0, stats.norm.pdf(y, p.mean, p.std) - math.exp(eps) * stats.norm.pdf(y, q.mean, q.std))  # noqa: E731
    return integrate.quad(gap, lo, hi, points=[p.mean, q.mean], limit=500, epsabs=1e-14)[0]


@pytest.mark.parametrize(("p", "q", "delta"), [
    (Gaussian(0, 1), Gaussian(1.0, 1.4), 1e-3),
    (Gaussian(0, 1), Gaussian(0.5, 0.7), 1e-2),
    (Gaussian(0, 0.01), Gaussian(0.02, 0.012), 1e-4),
])
def test_unequal_variances_match_the_hockey_stick_integral(p, q, delta):
    eps = epsilon_between_gaussians(p, q, delta)
    assert eps > 0
    assert max(hockey_stick(p, q, eps), hockey_stick(q, p, eps)) == pytest.approx(delta, rel=1e-3)


def test_distinct_point_masses_and_equal_distributions():
    assert epsilon_between_gaussians(Gaussian(0, 0.1), Gaussian(0.3, 0.0), 1e-5) == math.inf
    assert epsilon_between_gaussians(Gaussian(0, 0.1), Gaussian(0, 0.1), 1e-5) == 0.0


def test_estimate_is_consistent_for_the_gaussian_mechanism():
    """Theorem 3.1: ρ = Σ_j c_j + N(0, σ² I) with k random unit canaries in d dimensions; each canary's
    cosine·√d is ≈ N(1/σ, 1), so the estimate approaches the ε of 1/σ-GDP. Tolerances: 4 standard
    errors of the mean (1/√k) and of the std (1/√(2k)), and the ε those allow."""
    d, k, sigma, delta = 40_000, 400, 1.0, 1e-5
    like = {"w": torch.zeros(d)}
    seeds = list(range(k))
    rho = sigma * torch.randn(d, generator=torch.Generator().manual_seed(12345))
    for seed in seeds:
        rho += random_direction(like, seed)["w"]
    fit = Gaussian.fit(cosines({"w": rho}, seeds) * math.sqrt(d))
    assert fit.mean == pytest.approx(1 / sigma, abs=4 / math.sqrt(k))
    assert fit.std == pytest.approx(1.0, abs=4 / math.sqrt(2 * k))
    estimate = epsilon_between_gaussians(Gaussian(0, 1), fit, delta)
    assert estimate == pytest.approx(epsilon_between_gaussians(Gaussian(0, 1), Gaussian(1 / sigma, 1), delta), rel=0.25)


class FakeRuntime:
    """What the plugin reads from a runtime: the scenario, seeds, the trainable state, the artifact folder."""

    def __init__(self, scenario, model, tables):
        self.scenario, self.trainable, self.tables = scenario, TrainableState(model), tables

    def seed_for(self, *keys):
        return derive_seed(self.scenario.seed, *keys)

    def write_table(self, name, rows):
        self.tables[name] = rows


def test_canaries_send_a_fixed_direction_that_the_auditor_regenerates(tiny):
    options = {"clients": [1, 3], "canary_norm": 0.7, "unseen": 50}
    tiny["attacks"] = [{"name": "user_audit", **options}]
    model, tables = torch.nn.Linear(40, 30), {}
    runtime = FakeRuntime(load_scenario(tiny), model, tables)
    plugin = UserAudit(UserAudit.OptionsModel(**options), runtime)
    update = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    on_worker = pickle.loads(pickle.dumps(plugin))  # a Ray worker's copy, bound to its own runtime
    on_worker.runtime = runtime
    assert not hasattr(on_worker, "initial")
    sent = {}
    for cid, copy_ in ((0, plugin), (1, on_worker), (3, plugin)):
        client = ClientContext(cid, 1, seed=cid, runtime=runtime)
        sent[cid] = copy_.client_update(client, update)
        assert (CANARY_MARK in client.metrics) == (cid in (1, 3))
    assert sent[0] is update  # a real client's update goes through untouched
    for cid in (1, 3):
        assert {n: t.shape for n, t in sent[cid].items()} == {n: t.shape for n, t in update.items()}
        assert math.sqrt(sum((t**2).sum() for t in sent[cid].values())) == pytest.approx(0.7, rel=1e-5)
    again = plugin.client_update(ClientContext(1, 5, seed=99, runtime=runtime), update)
    assert all(torch.equal(again[n], sent[1][n]) for n in update)  # the same direction in every round
    with torch.no_grad():  # the final model moved exactly along canary 1's direction
        for name, p in model.named_parameters():
            p += 2.0 * sent[1][name]
    figures = plugin.training_end(runtime)
    cosine = dict(zip([r["client"] for r in tables["user_audit.csv"]], [r["cosine"] for r in tables["user_audit.csv"]]))
    assert cosine[1] == pytest.approx(1.0, abs=1e-5)
    assert abs(cosine[3]) < 4 / math.sqrt(40 * 30 + 30)  # an independent direction: ≈ N(0, 1/d)
    assert figures["user_audit.canaries"] == 0.0  # no round was scored: none reached a server


@pytest.mark.parametrize(("options", "message"), [
    ({}, "exactly one of clients: [ids] or count: k"),
    ({"clients": [0, 1], "count": 2}, "exactly one of clients: [ids] or count: k"),
    ({"clients": [1, 9]}, "clients: [9] are not client ids (0..3)"),
    ({"clients": [1, 1]}, "names a client twice"),
    ({"clients": [2]}, "at least 2 canaries"),
    ({"clients": [0, 1, 2, 3]}, "clients: all 4 clients are canaries"),
    ({"count": 4}, "count: 4 canaries leave no real client"),
    ({"count": 1}, "count: Input should be greater than or equal to 2"),
    ({"count": 2, "canary_norm": 0}, "canary_norm: Input should be greater than 0"),
    ({"count": 2, "unseen": 1}, "unseen: Input should be greater than or equal to 2"),
    ({"count": 2, "null": "empirical"}, "null: Input should be 'theory' or 'unseen'"),
    ({"count": 2, "delta": 1.0}, "delta: Input should be less than 1"),
])
def test_bad_options_are_refused_naming_the_field(tiny, options, message):
    tiny["attacks"] = [{"name": "user_audit", **options}]
    with pytest.raises(ScenarioError) as refused:
        load_scenario(tiny)
    assert message in str(refused.value)


def audited_run(tiny, noise, num_clients, per_round, rounds, canaries):
    """Full tuning (d ≈ 24k exchanged values) under DP-FedAvg with clip S = canary norm = 0.5."""
    scenario = copy.deepcopy(tiny)
    scenario["tuning"] = {"mode": "full"}
    scenario["data"]["examples_per_client"] = 4
    scenario["federation"].update(num_clients=num_clients, clients_per_round=per_round, rounds=rounds,
                                  sampling="poisson", local_steps=1, eval_every=rounds)
    scenario["defenses"] = [{"name": "dp_fedavg", "noise_multiplier": noise, "clip_norm": 0.5}]
    scenario["attacks"] = [{"name": "user_audit", "count": canaries, "canary_norm": 0.5}]
    return fedsec_bench.run(scenario).final, load_scenario(scenario)


def test_without_noise_the_canaries_stand_out(tiny):
    final, scenario = audited_run(tiny, noise=0.0, num_clients=12, per_round=6, rounds=3, canaries=8)
    d = 24_416
    assert final["privacy.user_epsilon"] == math.inf
    assert final["privacy.user_eps_estimate"] > 10
    assert final["user_audit.canary_cosine_mean"] > 10 / math.sqrt(d)
    # the directions never inserted follow the null N(0, 1/d): 1000 of them, std within 4 standard errors
    assert final["user_audit.unseen_cosine_std"] * math.sqrt(d) == pytest.approx(1.0, abs=4 / math.sqrt(2000))
    assert abs(final["user_audit.unseen_cosine_mean"]) * math.sqrt(d) < 4 / math.sqrt(1000)
    fed = scenario.federation
    sampled = set().union(*(sample_clients(fed, derive_seed(scenario.seed, rnd)) for rnd in range(1, 4)))
    assert final["user_audit.canaries"] == len(sampled & set(range(4, 12)))


def test_under_dp_fedavg_the_estimate_stays_below_the_accountant(tiny):
    """The paper's regime: q = 0.05, 12 rounds, 80 canaries, noise z = 0.5; the accountant composes every
    round's release, the final model shows a canary's few participations under all rounds' noise. Simulating
    the estimator on the linear model of this setting (cosine·√d ≈ (n + z√T·ξ)/(z√T), n ~ Bin(T, q), 80
    canaries) puts its 99th percentile near 2.4, the accountant at 5.4."""
    final, _ = audited_run(tiny, noise=0.5, num_clients=100, per_round=5, rounds=12, canaries=80)
    q, delta = 0.05, 1 / 200
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(0.5)), 12)
    accountant = dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)
    assert final["privacy.user_epsilon"] == pytest.approx(accountant, rel=0.01)
    assert 1 < accountant < 8
    assert final["user_audit.delta"] == delta
    assert 0 <= final["privacy.user_eps_estimate"] < final["privacy.user_epsilon"]
    assert final["user_audit.canaries"] > 0
