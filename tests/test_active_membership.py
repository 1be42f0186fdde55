"""active_membership on a tiny GPT-2 trained from scratch, checked against what Nasr et al. 2019 say must hold.

The setting: two clients of 16 records each, local SGD (the attack's lever is the size of the
gradients the ascent leaves on members, which SGD turns into a step and Adam normalises away),
the last round attacked, 16 members against 16 held-out non-members. With 16 + 16 candidates,
an uninformative score's AUC has standard deviation sqrt(16·16·33/12)/256 ≈ 0.10 (Mann–Whitney),
so the AUC ≥ 0.85 asserted is 3.4 standard deviations above chance (p < 0.001), and the gain
of ≥ 0.1 over the passive control is measured on the same candidates. On seeds 0-4 the ascent
gave 0.92-0.97 against a passive 0.65-0.79; seed 1 (0.93 against 0.67) is typical.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fedsec_bench import load_scenario, run
from fedsec_bench.attacks.active_membership import ActiveMembership, ActiveMembershipOptions, candidate_losses
from fedsec_bench.data import build_federated_data
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import RoundContext
from fedsec_bench.runtime import build_runtime

SETTING = {
    "name": "active_mia", "seed": 1,
    "model": {"arch": "gpt2", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
              "tokenizer": {"kind": "bpe", "vocab_size": 300}},
    "tuning": {"mode": "full"},
    "data": {"examples_per_client": 16, "heldout_examples": 32, "seq_len": 32, "canaries": {"count": 0}},
    "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2, "local_steps": 2,
                   "batch_size": 8, "optimizer": "sgd", "lr": 0.3},
    "tracking": {"enabled": False},
    "device": "cpu",
}


def scenario(tmp_path, attack: dict, defenses=(), **federation) -> dict:
    raw = copy.deepcopy(SETTING)
    raw["attacks"] = [{"name": "active_membership", **attack}]
    raw["defenses"] = list(defenses)
    raw["federation"].update(federation)
    raw["tracking"]["output_dir"] = str(tmp_path / "runs")
    return raw


def test_the_ascent_makes_members_stand_out_more_than_the_passive_control(tmp_path):
    active = run(scenario(tmp_path, {"ascent_steps": 5, "ascent_lr": 0.1})).final
    passive = run(scenario(tmp_path, {"ascent_steps": 0})).final
    for final in (active, passive):
        assert final["mia.active.update_readable"] == 1.0
        assert final["mia.active.num_samples"] == 16  # the target's 16 records, against 16 held-out ones
    assert active["mia.active.auc"] >= 0.85
    assert active["mia.active.auc"] >= passive["mia.active.auc"] + 0.1


@pytest.fixture(scope="module")
def attacker(tmp_path_factory):
    """The plugin on a built runtime, to call dispatch the way the round loop does."""
    sc = load_scenario(scenario(tmp_path_factory.mktemp("am"), {"ascent_steps": 5, "ascent_lr": 0.1}))
    rt = build_runtime(sc, build_federated_data(sc), torch.device("cpu"), tmp_path_factory.mktemp("art"))
    return ActiveMembership(ActiveMembershipOptions(ascent_steps=5, ascent_lr=0.1), rt)


def test_only_the_target_in_the_attack_round_gets_a_crafted_state(attacker):
    rt = attacker.runtime
    state = rt.trainable.snapshot()
    kept = {n: t.clone() for n, t in state.items()}
    for rnd in (1, 2):  # the attack round is the last, 2; its first sampled client, 0, is the target
        round = RoundContext(rnd, rt, [0, 1], state)
        for client in (0, 1):
            sent = attacker.dispatch(round, client, state)
            if (rnd, client) != (2, 0):
                assert sent is state
    crafted = attacker.dispatch(RoundContext(2, rt, [0, 1], state), 0, state)
    assert all(torch.equal(state[n], kept[n]) for n in state)  # the global state is not touched...
    assert all(torch.equal(t, state[n]) for n, t in rt.trainable.snapshot().items())  # ...nor the runtime's model
    assert {n: (t.shape, t.dtype) for n, t in crafted.items()} == {n: (t.shape, t.dtype) for n, t in state.items()}
    # gradient ascent raises the candidates' loss, members' and non-members' alike
    before = candidate_losses(rt, state, attacker.candidates)
    after = candidate_losses(rt, crafted, attacker.candidates)
    assert after.mean() > before.mean()


def test_a_masked_update_gives_no_figure_but_unreadable(tmp_path):
    final = run(scenario(tmp_path, {}, defenses=[{"name": "secure_aggregation"}], rounds=1)).final
    assert final["mia.active.update_readable"] == 0.0
    assert not {"mia.active.auc", "mia.active.tpr_at_1pct_fpr", "mia.active.num_samples"} & set(final)


@pytest.mark.parametrize("change, message", [
    ({"attack": {"attack_round": 3}}, "after the last round"),
    ({"attack": {"target_client": 2}}, "not a client id"),
    ({"tuning": {"mode": "prompt"}}, "does not support tuning.mode=prompt"),
])
def test_settings_it_cannot_attack_are_refused_naming_the_option(tmp_path, change, message):
    raw = scenario(tmp_path, change.get("attack", {}))
    raw["tuning"].update(change.get("tuning", {}))
    with pytest.raises(ScenarioError, match=message):
        load_scenario(raw)


def test_through_secure_aggregation_the_isolated_update_gives_the_plain_updates_figures(tmp_path):
    """Under secure aggregation with model inconsistency listed first, the attack reads the target's update
    the server isolated from the sum: the same candidates scored on the same update (to fixed point)."""
    plain = run(scenario(tmp_path, {})).final
    raw = scenario(tmp_path, {}, defenses=[{"name": "secure_aggregation"}])
    raw["attacks"].insert(0, {"name": "model_inconsistency", "rounds": [2]})  # round 1 as in the plain run
    isolated = run(raw).final
    assert isolated["inconsistency.isolated"] == 1.0 and isolated["mia.active.update_readable"] == 1.0
    assert isolated["mia.active.auc"] == pytest.approx(plain["mia.active.auc"], abs=1 / 256)
