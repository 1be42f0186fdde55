"""dp_fedavg: the mechanism of McMahan et al. 2018, its accountant against dp-accounting, refusals, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch

import fedsec_bench
from fedsec_bench.aggregation import fedavg
from fedsec_bench.errors import ScenarioError
from fedsec_bench.ground_truth import ClientReport, RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.defenses.accounting import Ledger
from fedsec_bench.defenses.dp_fedavg import DPFedAvg, update_noise_multiplier


def library_epsilon(q, z, rounds, delta):
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.parametrize(
    ("q", "z", "rounds", "delta"),
    [(0.01, 1.1, 1000, 1e-5), (0.1, 1.0, 100, 1e-6), (0.5, 0.8, 20, 1e-3), (1.0, 2.0, 10, 1e-5), (0.05, 0.5, 50, 1e-5)],
)
def test_user_epsilon_agrees_with_dp_accounting(q, z, rounds, delta):
    ledger = Ledger()
    ledger.compose(z, q, steps=rounds)
    assert ledger.epsilon(delta) == pytest.approx(library_epsilon(q, z, rounds, delta), rel=0.01)


def test_rounds_composed_one_at_a_time_equal_one_composition():
    ledger = Ledger()
    for _ in range(7):
        ledger.compose(1.3, 0.2)
    assert ledger.epsilon(1e-5) == pytest.approx(library_epsilon(0.2, 1.3, 7, 1e-5), rel=0.01)
    assert Ledger().epsilon(1e-5) == 0.0
    no_noise = Ledger()
    no_noise.compose(0.0, 0.2)
    assert no_noise.epsilon(1e-5) == math.inf


class FakeRuntime:
    """What the plugin reads from the runtime: the scenario and seeds."""

    def __init__(self, scenario):
        self.scenario = scenario

    def seed_for(self, *keys):
        return int(np.random.SeedSequence([self.scenario.seed, *keys]).generate_state(1)[0])


def make_plugin(tiny, num_clients=4, per_round=2, **options):
    tiny["federation"].update(num_clients=num_clients, clients_per_round=per_round, sampling="poisson")
    tiny["defenses"] = [{"name": "dp_fedavg", **options}]
    scenario = load_scenario(tiny)
    return DPFedAvg(DPFedAvg.OptionsModel.model_validate(options), FakeRuntime(scenario))


def one_round(plugin, updates, rnd=1):
    """Client side (clip, maybe noise, transport) then FedAvg then the plugin's server side, as the round loop
    does; returns the aggregate and the plugin's scorer's figures."""
    like = {name: torch.zeros_like(t) for name, t in updates[0].items()}
    messages, reports = [], []
    for cid, update in enumerate(updates):
        client = ClientContext(cid, rnd, seed=100 + cid, runtime=plugin.runtime)
        sent = plugin.client_update(client, update)
        message = Message.of_update(cid, num_examples=10 + cid, update=sent, side=client.side)
        messages.append(plugin.transport(client, message))
        reports.append(ClientReport(cid, 10 + cid, 0.0, 1, dict(client.metrics)))
    ids = list(range(len(updates)))
    round = RoundContext(rnd, plugin.runtime, ids, like, delivered=ids)
    plugin.server_observation(round, messages)
    aggregate = plugin.post_aggregation(round, fedavg(messages, like))
    return aggregate, plugin.score_round(round, RoundTruth(reports), {})


def test_clipped_sum_over_the_expected_number_of_clients(tiny):
    plugin = make_plugin(tiny, noise_multiplier=0.0, clip_norm=1.0)
    updates = [{"w": torch.tensor([0.3, 0.4])}, {"w": torch.tensor([6.0, 8.0])}, {"w": torch.tensor([0.0, -2.0])}]
    out, figures = one_round(plugin, updates)
    clipped = torch.tensor([0.3, 0.4]) + torch.tensor([0.6, 0.8]) + torch.tensor([0.0, -1.0])
    torch.testing.assert_close(out["w"], clipped / 2.0)  # q·N = 2/4·4 = 2, though 3 clients took part
    assert figures["dp_fedavg.clipped_fraction"] == pytest.approx(2 / 3)
    assert figures["privacy.user_epsilon"] == math.inf  # clipping only: reported, not a crash


@pytest.mark.parametrize("distributed", [False, True])
def test_noise_on_the_sum_has_std_z_times_clip(tiny, distributed):
    plugin = make_plugin(tiny, noise_multiplier=2.0, clip_norm=0.5, distributed=distributed)
    zeros = [{"w": torch.zeros(200_000)} for _ in range(2)]  # m = floor(q·N) = 2 shares of variance σ²/2
    out, _ = one_round(plugin, zeros)
    assert out["w"].std().item() == pytest.approx(2.0 * 0.5 / 2.0, rel=0.02)
    assert abs(out["w"].mean().item()) < 0.01


def test_distributed_round_below_min_clients_is_skipped(tiny):
    plugin = make_plugin(tiny, noise_multiplier=1.0, distributed=True, min_clients=2)
    out, figures = one_round(plugin, [{"w": torch.ones(10)}])
    assert torch.count_nonzero(out["w"]) == 0
    assert figures["dp_fedavg.skipped_round"] == 1.0 and figures["privacy.user_epsilon"] > 0


def test_adaptive_clipping_tracks_the_quantile_and_corrects_the_noise(tiny):
    options = {"noise_multiplier": 1.0, "adaptive_clipping": True, "count_noise": 2.0}
    z_delta = update_noise_multiplier(DPFedAvg.OptionsModel(**options), 2.0)
    assert z_delta**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)  # the pair costs one Gaussian of multiplier z
    plugin = make_plugin(tiny, num_clients=4, per_round=4, noise_multiplier=0.0, adaptive_clipping=True,
                         count_noise=1e-3, clip_norm=2.0, target_quantile=0.5, clip_lr=0.3)
    norms = [0.2, 0.4, 0.6, 0.8]
    for rnd in range(1, 41):
        one_round(plugin, [{"w": torch.tensor([n, 0.0])} for n in norms], rnd)
    assert 0.4 <= plugin.clip_norm <= 0.6  # the median of the update norms


@pytest.mark.parametrize(
    ("federation", "options", "message"),
    [
        ({"sampling": "uniform"}, {}, "set federation.sampling: poisson"),
        ({"aggregator": "median"}, {}, "use federation.aggregator: fedavg"),
        ({}, {"clip_norm": -1.0}, r"clip_norm: .*greater than 0"),
        ({}, {"delta": 1.5}, r"delta: .*less than 1"),
        ({}, {"noise_multiplier": 2.0, "adaptive_clipping": True, "count_noise": 0.5}, "count_noise > noise_multiplier/2"),
        ({}, {"min_clients": 2}, "min_clients only applies with distributed"),
        ({}, {"adaptive_clipping": True, "distributed": True}, "adaptive_clipping with distributed"),
        ({}, {"distributed": True, "min_clients": 9}, r"min_clients \(9\) exceeds"),
    ],
)
def test_impossible_settings_are_refused_at_load_time(tiny, federation, options, message):
    tiny["federation"].update({"sampling": "poisson", **federation})
    tiny["defenses"] = [{"name": "dp_fedavg", **options}]
    with pytest.raises(ScenarioError, match=message):
        load_scenario(tiny)


def test_end_to_end_user_epsilon_grows_as_the_accountant_says(tiny):
    tiny["federation"].update(sampling="poisson", rounds=3)
    tiny["defenses"] = [{"name": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 0.5}]
    result = fedsec_bench.run(tiny)
    eps = result.metrics["privacy.user_epsilon"]
    for rnd in (1, 2, 3):
        assert eps.loc[rnd] == pytest.approx(library_epsilon(0.5, 1.0, rnd, 1 / 8), rel=0.01)
    assert eps.loc[1] < eps.loc[2] < eps.loc[3]
    assert result.final["privacy.user_delta"] == 1 / 8


def test_distributed_noise_composes_with_secure_aggregation(tiny):
    """The masked sum carries the clients' noise shares: same model as without masking, up to fixed-point rounding."""
    tiny["federation"].update(sampling="poisson", rounds=2, lr=0.05)
    finals = []
    for transport in ([], [{"name": "secure_aggregation"}]):
        tiny["defenses"] = [{"name": "dp_fedavg", "noise_multiplier": 0.3, "clip_norm": 1.0, "distributed": True},
                            *transport]
        finals.append(fedsec_bench.run(tiny).metrics)
    plain, masked = finals
    assert masked["utility.eval_loss"].iloc[-1] == pytest.approx(plain["utility.eval_loss"].iloc[-1], rel=1e-5)
    assert masked["privacy.user_epsilon"].iloc[-1] == plain["privacy.user_epsilon"].iloc[-1] < math.inf


def test_dp_fedavg_must_precede_a_transport_defense(tiny):
    tiny["federation"]["sampling"] = "poisson"
    tiny["defenses"] = [{"name": "secure_aggregation"}, {"name": "dp_fedavg"}]
    with pytest.raises(ScenarioError, match="list dp_fedavg before secure_aggregation"):
        load_scenario(tiny)


def test_ready_scenario_loads():
    scenario = load_scenario(Path(__file__).parents[1] / "scenarios" / "dp_fedavg.yaml")
    assert [d.name for d in scenario.defenses] == ["dp_fedavg"]
