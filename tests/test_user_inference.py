"""user_inference: the data layer's fresh user samples, the refusals, the statistic by hand, then end to end.

End-to-end runs use per-user synthetic instruction data in which every user signs their responses
with a name of their own (as Enron emails carry signatures: the paper's "shared features between a
user's examples", what makes a user vulnerable), a tiny model trained from scratch to overfit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.attacks.membership.roc import auc
from fedsec_bench.attacks.user_inference import Observation, pooled_figures
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.synthetic import per_user_records, signed_per_user_records


def scenario_for(tmp_path, rows, **data) -> dict:
    path = tmp_path / "users.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return {
        "name": "user_inference", "seed": 0,
        "model": {"arch": "gpt2", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
                  "tokenizer": {"kind": "bpe", "vocab_size": 300}},
        "tuning": {"mode": "full"},
        "data": {"source": "files", "path": str(path), "format": "instruction", "seq_len": 64,
                 "partition": {"method": "natural", "by": "user", "min_examples": 4, "select": "random"},
                 "heldout_by_user": True, "heldout_examples": 500, "public_examples": 150, "user_samples": 16, **data},
        "federation": {"num_clients": 14, "clients_per_round": 14, "rounds": 4, "local_steps": 30,
                       "batch_size": 8, "lr": 0.01},
        "eval": {"max_examples": 8, "generation_examples": 0},
        "attacks": [{"name": "user_inference"}, {"name": "user_inference", "threat": "server"}],
        "tracking": {"enabled": False, "output_dir": str(tmp_path / "runs")},
        "device": "cpu",
    }


def null_se(members: float, nonmembers: float) -> float:
    """Standard error of the Mann-Whitney AUC when members and non-members score alike (AUC 0.5)."""
    return math.sqrt((members + nonmembers + 1) / (12 * members * nonmembers))


# --------------------------------------------------------------------------- the data layer
def test_the_bundled_scenario_data_is_its_documented_generator_and_gives_the_attack_its_users():
    """scenarios/data/users_signed.jsonl is signed_per_user_records(1, 56, 28), never edited by hand, and
    scenarios/user_privacy.yaml holds every member and non-member user to max m = 16 fresh samples."""
    bundled = Path(__file__).parents[1] / "scenarios" / "data" / "users_signed.jsonl"
    assert [json.loads(line) for line in bundled.read_text().splitlines()] == signed_per_user_records(1, 56, 28)
    scenario = load_scenario(bundled.parents[1] / "user_privacy.yaml")
    data = build_federated_data(scenario)
    assert sum(len(s) >= 16 for s in data.user_samples) >= 8
    assert sum(len(u) >= 16 for u in data.heldout_users) >= 8


def test_user_samples_are_in_no_clients_training_and_the_split_is_deterministic(tmp_path):
    raw = scenario_for(tmp_path, per_user_records(1, 40, 24))
    data = build_federated_data(load_scenario(raw))
    trained = set(data.members())  # every client's training examples, canaries included
    held = [x for samples in data.user_samples for x in samples]
    assert held and not set(held) & trained
    assert not set(held) & set(data.heldout) and not set(held) & set(data.public)
    assert len(data.user_samples) == data.num_clients
    for client, samples in enumerate(data.user_samples):
        assert len(samples) <= 16 and data.num_examples(client) >= 4  # min_examples still trained on
    short = sum(len(s) < 16 for s in data.user_samples)
    assert data.counts["data.user_samples_short"] == short
    # the held-out split grouped by user: each user's distinct records (two users may share a record)
    assert {x for user in data.heldout_users for x in user} == set(data.heldout)
    assert all(len(set(user)) == len(user) for user in data.heldout_users)
    again = build_federated_data(load_scenario(raw))
    assert again.user_samples == data.user_samples and again.heldout_users == data.heldout_users
    assert [p.tolist() for p in again.parts] == [p.tolist() for p in data.parts]
    other = build_federated_data(load_scenario({**raw, "seed": 1}))
    assert other.user_samples != data.user_samples


def test_without_user_samples_the_clients_keep_every_record(tmp_path):
    raw = scenario_for(tmp_path, per_user_records(1, 40, 24), user_samples=0)
    raw["attacks"] = []
    data = build_federated_data(load_scenario(raw))
    assert data.user_samples == [] and data.heldout_users


def test_user_samples_need_a_natural_partition_with_whole_users_held_out(tmp_path):
    raw = scenario_for(tmp_path, per_user_records(1, 40, 24), heldout_by_user=False)
    with pytest.raises(ScenarioError, match="data.user_samples .* data.partition.method natural and data.heldout_by_user"):
        load_scenario(raw)


# --------------------------------------------------------------------------- refusals
def test_the_attack_refuses_too_few_fresh_samples_and_too_few_users(tmp_path):
    from fedsec_bench.attacks.user_inference import UserInference

    rows = per_user_records(1, 40, 24)
    with pytest.raises(ScenarioError, match=r"samples_per_user: .* data.user_samples is 8; set data.user_samples ≥ 16"):
        load_scenario(scenario_for(tmp_path, rows, user_samples=8))
    scenario = load_scenario(scenario_for(tmp_path, rows))
    data = build_federated_data(scenario)
    options = UserInference.OptionsModel(samples_per_user=[1, 16])
    UserInference.check_data(options, scenario, data)  # enough of both
    few_members = type(data)(**{**data.__dict__, "user_samples": data.user_samples[:1]})
    with pytest.raises(ValueError, match="1 clients hold ≥ 16 fresh samples.*federation.num_clients"):
        UserInference.check_data(options, scenario, few_members)
    few_nonmembers = type(data)(**{**data.__dict__, "heldout_users": data.heldout_users[:1]})
    with pytest.raises(ValueError, match="held-out users have ≥ 16 records.*data.heldout_examples"):
        UserInference.check_data(options, scenario, few_nonmembers)


# --------------------------------------------------------------------------- the statistic
def test_with_every_sample_drawn_the_figure_is_the_auc_of_each_users_mean_ratio():
    rng = np.random.default_rng(0)
    obs = Observation([rng.normal(1, 1, 4) for _ in range(5)], [rng.normal(0, 1, 4) for _ in range(6)])
    means = [r.mean() for r in obs.members + obs.nonmembers]
    labels = np.r_[np.ones(5, bool), np.zeros(6, bool)]
    assert pooled_figures([obs], 4, rng)[0] == pytest.approx(auc(np.array(means), labels))
    # two models: each member ranked against the non-members under its own model, pooled by members
    shifted = Observation([r + 100 for r in obs.members[:2]], [r + 100 for r in obs.nonmembers])
    one = auc(np.array(means[:2] + means[5:]), np.r_[np.ones(2, bool), np.zeros(6, bool)])
    got = pooled_figures([obs, shifted], 4, rng)[0]
    assert got == pytest.approx((5 * auc(np.array(means), labels) + 2 * one) / 7)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    from fedsec_bench import run

    tmp = tmp_path_factory.mktemp("user_inference")
    return run(scenario_for(tmp, signed_per_user_records(1, 56, 28))).final


def test_more_fresh_samples_reveal_more_users(overfit_run):
    """The paper's must-hold: averaging the likelihood ratio over more of a user's samples averages
    out per-sample noise, so AUC rises with m; on an overfit undefended run it is well above chance,
    by more than twice the standard error the user counts allow under the null."""
    final = overfit_run
    members, nonmembers = final["user_mia.members"], final["user_mia.nonmembers"]
    assert members >= 8 and nonmembers >= 8
    assert final["user_mia.auc_m16"] > final["user_mia.auc_m1"]
    assert final["user_mia.auc_m16"] > 0.5 + 2 * null_se(members, nonmembers)
    assert final["user_mia.auc"] == final["user_mia.auc_m16"]
    assert 0.0 <= final["user_mia.tpr_at_1pct_fpr"] <= 1.0


def test_the_server_reads_each_users_own_update(overfit_run):
    """One user's update against the state it was sent holds that user's signal alone, undiluted
    by the other clients: at m = 16 the server tells members from non-members better than chance
    by the same margin."""
    final = overfit_run
    assert final["user_mia.server.update_readable"] == 1.0
    assert final["user_mia.server.members"] == final["user_mia.members"]
    members, nonmembers = final["user_mia.server.members"], final["user_mia.server.nonmembers"]
    assert final["user_mia.server.auc_m16"] > final["user_mia.server.auc_m1"]
    assert final["user_mia.server.auc_m16"] > 0.5 + 2 * null_se(members, nonmembers)


def test_under_user_level_dp_the_attack_is_near_chance(tmp_path):
    """dp_fedavg at user-level ε ≤ 1: the final model says little about any user, so the AUC is
    within three null standard errors of 0.5 (smallest honest size: one round, the same users)."""
    from fedsec_bench import run

    raw = scenario_for(tmp_path, signed_per_user_records(1, 56, 28))
    raw["federation"].update(rounds=1, sampling="poisson")
    raw["attacks"] = [{"name": "user_inference"}]
    raw["defenses"] = [{"name": "dp_fedavg", "noise_multiplier": 5.0, "clip_norm": 1.0}]
    final = run(raw).final
    assert final["privacy.user_epsilon"] <= 1.0
    members, nonmembers = final["user_mia.members"], final["user_mia.nonmembers"]
    assert abs(final["user_mia.auc"] - 0.5) <= 3 * null_se(members, nonmembers)
