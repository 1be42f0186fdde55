"""dp_ftrl: tree aggregation against its theory, the accountant against dp-accounting and a brute-force node
count, the model as FTRL's prefix sum, refusals, utility and ε end to end (Kairouz et al. 2021)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch

import fedsec_bench
from fedsec_bench.aggregation import fedavg
from fedsec_bench.errors import ScenarioError
from fedsec_bench.federation import sample_clients
from fedsec_bench.ground_truth import ClientReport, RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.runtime import derive_seed
from fedsec_bench.tuning import TrainableState
from fedsec_bench.defenses import dp_ftrl
from fedsec_bench.defenses.dp_ftrl import DPFTRL, Trees, gaussian_epsilon, schedule_accountant


class FakeRuntime:
    """What the plugin reads from the runtime: the scenario and seeds."""

    def __init__(self, scenario):
        self.scenario = scenario

    def seed_for(self, *keys):
        return derive_seed(self.scenario.seed, *keys)


def make_plugin(tiny, num_clients=4, per_round=2, rounds=8, **options):
    tiny["federation"].update(num_clients=num_clients, clients_per_round=per_round, rounds=rounds)
    tiny["defenses"] = [{"name": "dp_ftrl", **options}]
    scenario = load_scenario(tiny)
    return DPFTRL(DPFTRL.OptionsModel.model_validate(options), FakeRuntime(scenario))


def one_round(plugin, updates, rnd):
    """Client side (clip, transport) then FedAvg then the plugin's server side, as the round loop does;
    returns the aggregate and the scorer's figures."""
    like = {name: torch.zeros_like(t) for name, t in updates[0].items()}
    messages, reports = [], []
    for cid, update in enumerate(updates):
        client = ClientContext(cid, rnd, seed=100 + cid, runtime=plugin.runtime)
        sent = plugin.client_update(client, update)
        messages.append(plugin.transport(client, Message.of_update(cid, num_examples=10 + cid, update=sent)))
        reports.append(ClientReport(cid, 10 + cid, 0.0, 1, dict(client.metrics)))
    ids = list(range(len(updates)))
    round = RoundContext(rnd, plugin.runtime, ids, like, delivered=ids)
    aggregate = plugin.post_aggregation(round, fedavg(messages, like))
    return aggregate, plugin.score_round(round, RoundTruth(reports), {})


# --- the tree --------------------------------------------------------------------------


def leaves_under(node):
    return range(node.index * 2**node.level + 1, (node.index + 1) * 2**node.level + 1)


def test_each_prefix_is_covered_by_one_node_per_set_bit():
    trees = Trees(rounds=100, restart_every=None, tree_completion=False)
    for t in range(1, 101):
        cover = trees.cover(t)
        assert sorted(leaf for node in cover for leaf in leaves_under(node)) == list(range(1, t + 1))
        assert len(cover) == bin(t).count("1")


def test_completion_takes_the_padded_root_and_restarts_number_the_leaves_again():
    trees = Trees(rounds=11, restart_every=5, tree_completion=True)
    assert [trees.position(r) for r in (1, 5, 6, 10, 11)] == [(0, 1), (0, 5), (1, 1), (1, 5), (2, 1)]
    (root,) = trees.cover(5)  # leaves 1..5, padded with zero leaves to 8
    assert (root.tree, list(leaves_under(root))) == (0, list(range(1, 9)))
    assert trees.cover(11) == [dp_ftrl.Node(2, 0, 0)]  # the run's last round ends its tree too
    assert len(trees.cover(4)) == 1 and len(trees.cover(3)) == 2  # before the last leaf: the usual cover


# --- accounting ----------------------------------------------------------------------------


def tree_event_epsilon(z, trees_of_one_user, delta):
    """dp-accounting's ε for a user seen at most once per tree: one SingleEpochTreeAggregationDpEvent per
    group of trees that no user repeats across, composed."""
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    for step_counts in trees_of_one_user:
        accountant.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(z, step_counts))
    return accountant.get_epsilon(delta)


def once_per_tree(rounds, per_round, tree_size):
    """Each tree's rounds take disjoint clients, the same ones in every tree (client c at leaf c // per_round + 1)."""
    return [[(r % tree_size) * per_round + k for k in range(per_round)] for r in range(rounds)]


def once_in_the_run(rounds, per_round):
    return [[r * per_round + k for k in range(per_round)] for r in range(rounds)]


@pytest.mark.parametrize(
    ("schedule", "restart_every", "z", "trees_of_one_user"),
    [
        (once_in_the_run(7, 2), None, 1.0, [[7]]),  # one tree of 7: depth 3
        (once_per_tree(12, 3, 4), 4, 2.5, [[4], [4], [4]]),  # three trees of 4, each user in all: 3 · depth 3
        (once_in_the_run(13, 1), 5, 0.7, [[5, 5, 3]]),  # restarts, each user once in the run: depth 3
    ],
)
def test_user_epsilon_agrees_with_dp_accountings_tree_aggregation(schedule, restart_every, z, trees_of_one_user):
    delta = 1e-5
    accountant = schedule_accountant(schedule, restart_every)
    assert accountant.max_participations == 1
    assert gaussian_epsilon(z, accountant.max_sensitivity2, delta) == pytest.approx(
        tree_event_epsilon(z, trees_of_one_user, delta), rel=0.01
    )


def brute_force_sensitivity2(schedule, restart_every, completion):
    """Σ over every released node of every tree of (the user's participations under it)², node by node."""
    size = restart_every or len(schedule)
    totals: dict[int, int] = {}
    for start in range(0, len(schedule), size):
        tree = schedule[start : start + size]
        nodes = [(a, a + 2**h) for h in range(len(tree).bit_length()) for a in range(0, len(tree) - 2**h + 1, 2**h)]
        padded = 1 << (len(tree) - 1).bit_length()
        if completion and padded != len(tree):
            nodes.append((0, len(tree)))  # the padded root: every real leaf of the tree
        for a, b in nodes:
            for user in set(c for leaf in tree[a:b] for c in leaf):
                totals[user] = totals.get(user, 0) + sum(leaf.count(user) for leaf in tree[a:b]) ** 2
    return totals


def test_a_user_in_every_round_of_a_tree_of_four_is_under_all_seven_nodes():
    # leaves 1..4: four leaves (count 1), [1,2] and [3,4] (count 2), [1..4] (count 4)
    assert schedule_accountant([[0]] * 4).sensitivity2[0] == 4 * 1 + 2 * 4 + 16


@pytest.mark.parametrize(("restart_every", "completion"), [(None, False), (6, False), (6, True), (None, True)])
def test_repeated_participation_matches_a_brute_force_node_count(restart_every, completion):
    rng = np.random.default_rng(3)
    schedule = [sorted(rng.choice(5, size=2, replace=False).tolist()) for _ in range(23)]
    accountant = schedule_accountant(schedule, restart_every, completion)
    expected = brute_force_sensitivity2(schedule, restart_every, completion)
    assert dict(accountant.sensitivity2) == expected
    assert accountant.max_sensitivity2 == max(expected.values())
    size = restart_every or len(schedule)
    assert accountant.max_participations == max(
        sum(leaf.count(u) for leaf in schedule[s : s + size]) for s in range(0, len(schedule), size) for u in range(5)
    )


# --- the mechanism ----------------------------------------------------------------------------


def test_the_model_is_theta0_plus_server_lr_times_the_prefix_sum_over_n(tiny, monkeypatch):
    """Every node's noise set to 1 (the reference implementation's test mode): after round t the FTRL model
    holds Σ leaves + one per node of the current cover + each finished tree's last cover (restarts go on
    from the model as it is)."""
    monkeypatch.setattr(dp_ftrl, "gaussian_noise", lambda like, std, generator: {n: torch.ones_like(t) for n, t in like.items()})
    plugin = make_plugin(tiny, rounds=11, restart_every=5, tree_completion=True, clip_norm=10.0)
    model = torch.nn.Linear(3, 1, bias=False)
    trainable = TrainableState(model)
    theta0, server_lr, expected_clients = trainable.snapshot(), 0.5, 2
    leaf_sum, finished_trees = torch.zeros(1, 3), 0
    for rnd in range(1, 12):
        updates = [{"weight": torch.full((1, 3), 0.1 * rnd)}, {"weight": torch.full((1, 3), -0.03)}]
        aggregate, _ = one_round(plugin, updates, rnd)
        trainable.step(trainable.snapshot(), aggregate, scale=server_lr)
        leaf_sum += updates[0]["weight"] + updates[1]["weight"]
        current = len(plugin.trees.cover(rnd))
        prefix = leaf_sum + finished_trees + current
        torch.testing.assert_close(trainable.snapshot()["weight"] - theta0["weight"], server_lr * prefix / expected_clients)
        if plugin.trees.is_last_leaf(rnd):
            finished_trees += current
    assert finished_trees == 3  # each tree ends on its completed root: one node


def test_released_prefix_sums_are_unbiased_with_the_variance_of_their_cover(tiny):
    """Var(Ŝ_t − S_t) = |cover(t)|·(zS)² per coordinate: popcount(t) nodes, one for a completed tree's root."""
    z, clip, per_round, d = 2.0, 0.5, 2, 20_000
    plugin = make_plugin(tiny, rounds=7, per_round=per_round, noise_multiplier=z, clip_norm=clip, tree_completion=True)
    released, exact = torch.zeros(d), torch.zeros(d)
    for rnd in range(1, 8):
        updates = [{"w": torch.full((d,), 1e-5 * rnd)}, {"w": torch.full((d,), -2e-5)}]  # norms < S: not clipped
        aggregate, _ = one_round(plugin, updates, rnd)
        released += aggregate["w"] * per_round
        exact += updates[0]["w"] + updates[1]["w"]
        noise = released - exact
        nodes = 1 if rnd == 7 else bin(rnd).count("1")
        assert noise.var().item() == pytest.approx(nodes * (z * clip) ** 2, rel=0.04), rnd
        assert abs(noise.mean().item()) < 4 * math.sqrt(nodes / d) * z * clip


def test_figures_of_a_round(tiny):
    plugin = make_plugin(tiny, rounds=4, noise_multiplier=1.0, clip_norm=1.0)
    updates = [{"w": torch.tensor([0.3, 0.4])}, {"w": torch.tensor([6.0, 8.0])}, {"w": torch.tensor([0.0, -2.0])}]
    for rnd in (1, 2, 3):
        _, figures = one_round(plugin, updates, rnd)
    assert figures["dp_ftrl.clipped_fraction"] == pytest.approx(2 / 3)
    assert figures["dp_ftrl.tree_depth"] == 2  # leaf 1 of a 3-leaf tree is under [1] and [1, 2]
    assert figures["dp_ftrl.max_participations"] == 3
    assert figures["privacy.user_delta"] == 1 / 8
    # each client in all 3 rounds: [1], [2], [3] (1 each) and [1, 2] (count 2): 3 + 4
    assert figures["privacy.user_epsilon"] == pytest.approx(gaussian_epsilon(1.0 / math.sqrt(7), 1.0, 1 / 8))


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("federation", "defenses", "message"),
    [
        ({}, [{"name": "dp_ftrl", "restart_every": 0}], r"defenses\[0\]\.restart_every: .*greater than or equal to 1"),
        ({"rounds": 3}, [{"name": "dp_ftrl", "restart_every": 4}], r"restart_every \(4\) exceeds federation.rounds \(3\)"),
        ({}, [{"name": "dp_ftrl", "noise_multiplier": -1}], r"noise_multiplier: .*greater than or equal to 0"),
        ({}, [{"name": "dp_ftrl", "clip_norm": 0}], r"clip_norm: .*greater than 0"),
        ({}, [{"name": "dp_ftrl", "delta": 1.0}], r"delta: .*less than 1"),
        ({"aggregator": "median"}, [{"name": "dp_ftrl"}], "use federation.aggregator: fedavg"),
        ({}, [{"name": "secure_aggregation"}, {"name": "dp_ftrl"}], "list dp_ftrl before secure_aggregation"),
    ],
)
def test_impossible_settings_are_refused_at_load_time(tiny, federation, defenses, message):
    tiny["federation"].update(federation)
    tiny["defenses"] = defenses
    with pytest.raises(ScenarioError, match=message):
        load_scenario(tiny)


# --- end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_end_to_end_user_epsilon_is_the_accountant_on_the_runs_schedule(tiny, sampling):
    tiny["federation"].update(sampling=sampling, rounds=3, local_steps=1)
    tiny["defenses"] = [{"name": "dp_ftrl", "noise_multiplier": 1.5, "clip_norm": 0.5, "restart_every": 2}]
    result = fedsec_bench.run(tiny)
    config = load_scenario(tiny).federation
    schedule = [sample_clients(config, derive_seed(tiny["seed"], rnd)) for rnd in (1, 2, 3)]
    eps = result.metrics["privacy.user_epsilon"]
    for rnd in (1, 2, 3):
        sensitivity2 = schedule_accountant(schedule[:rnd], restart_every=2, rounds=3).max_sensitivity2
        assert eps.loc[rnd] == pytest.approx(gaussian_epsilon(1.5, sensitivity2, 1 / 8), rel=1e-9)
    assert 0 < eps.loc[1] <= eps.loc[2] <= eps.loc[3] < math.inf
    assert result.metrics["dp_ftrl.tree_depth"].loc[[1, 2, 3]].tolist() == [1.0, 2.0, 1.0]  # the third round starts a new tree
    assert result.final["privacy.user_delta"] == 1 / 8


def test_listed_before_secure_aggregation_the_noise_goes_on_the_unmasked_sum(tiny):
    """Masking changes nothing the server releases: the same model as without it, up to fixed-point rounding."""
    tiny["federation"].update(local_steps=1)
    finals = []
    for transport in ([], [{"name": "secure_aggregation"}]):
        tiny["defenses"] = [{"name": "dp_ftrl", "noise_multiplier": 0.3}, *transport]
        finals.append(fedsec_bench.run(tiny).metrics)
    plain, masked = finals
    assert masked["utility.eval_loss"].iloc[-1] == pytest.approx(plain["utility.eval_loss"].iloc[-1], rel=1e-5)
    assert masked["privacy.user_epsilon"].iloc[-1] == plain["privacy.user_epsilon"].iloc[-1] < math.inf


def test_utility_degrades_as_the_noise_grows(tiny, pretrained_tiny):
    """Final held-out loss of a LoRA fine-tuning rises with z: the noise swamps the clipped updates."""
    tiny["model"] = {"name_or_path": pretrained_tiny}
    tiny["federation"].update(rounds=2, local_steps=3, lr=0.01)
    losses = []
    for z in (0.0, 1.0, 3.0):
        tiny["defenses"] = [{"name": "dp_ftrl", "noise_multiplier": z, "clip_norm": 0.5}]
        losses.append(fedsec_bench.run(tiny).final["utility.eval_loss"])
    assert losses[0] < losses[1] < losses[2], losses
