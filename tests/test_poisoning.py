"""Poisoning attacks: each crafted update against its paper's formula, the data poisoning
texts, the attack success rate, and the backdoor must-hold end to end."""

from __future__ import annotations

import copy
import re
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedsec_bench
from fedsec_bench.attacks import backdoor as bd
from fedsec_bench.attacks import model_poisoning as mp
from fedsec_bench.attacks.poisoning import malicious_ids
from fedsec_bench.ground_truth import MALICIOUS_KEY
from fedsec_bench.data import build_federated_data
from fedsec_bench.errors import ScenarioError
from fedsec_bench.lm import greedy_continuations
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.runtime import build_runtime
from fedsec_bench.plan import load_scenario


def make(cls, scenario, runtime=None, **options):
    runtime = runtime or SimpleNamespace(scenario=scenario)
    return cls(cls.OptionsModel(**options), runtime)


def client(cid, rnd=1, runtime=None):
    return ClientContext(cid, rnd, seed=1000 + cid, runtime=runtime)


# --------------------------------------------------------------------------- who is malicious


def test_malicious_draw_is_a_deterministic_shared_fraction():
    drawn = malicious_ids(0.3, 10, seed=7)
    assert len(drawn) == 3 and drawn == malicious_ids(0.3, 10, seed=7)
    assert malicious_ids([1, 4], 10, seed=7) == {1, 4}


@pytest.mark.parametrize(
    "attack, message",
    [
        ({"name": "sign_flip", "clients": [3, 12]}, "[12] are not client ids (0..9)"),
        ({"name": "sign_flip", "clients": 0.01}, "makes no client malicious"),
        ({"name": "alie", "clients": 0.5}, "alie assumes a malicious minority"),
        ({"name": "ipm", "clients": 0.2, "rounds": [3, 2]}, "rounds: need 1 ≤ first ≤ last"),
    ],
)
def test_impossible_attacks_are_refused_at_load_time(tiny, attack, message):
    tiny["federation"].update(num_clients=10, clients_per_round=10)
    tiny["attacks"] = [attack]
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(tiny)


# --------------------------------------------------------------------------- updates


@pytest.fixture
def scenario(tiny):
    tiny["federation"].update(num_clients=10, clients_per_round=5, server_lr=0.5)
    return load_scenario(tiny)


def test_sign_flip_reverses_only_malicious_clients_inside_the_window(scenario):
    attack = make(mp.SignFlip, scenario, clients=[2], rounds=(2, 3), scale=4.0)
    update = {"w": torch.tensor([1.0, -2.0])}
    inside, outside, honest = client(2, rnd=2), client(2, rnd=4), client(5, rnd=2)
    assert attack.client_update(inside, update)["w"].tolist() == [-4.0, 8.0]
    assert inside.metrics[MALICIOUS_KEY] == 1.0
    assert attack.client_update(outside, update) is update and MALICIOUS_KEY not in outside.metrics
    assert attack.client_update(honest, update) is update and MALICIOUS_KEY not in honest.metrics


def test_scaling_boosts_by_n_over_server_lr(scenario):
    attack = make(mp.Scaling, scenario, clients=[0])
    assert attack.boost == 5 / 0.5  # Bagdasaryan et al.: γ = n / η
    assert attack.client_update(client(0), {"w": torch.ones(2)})["w"].tolist() == [10.0, 10.0]


def test_gaussian_sends_noise_of_the_given_scale(scenario):
    attack = make(mp.Gaussian, scenario, clients=[0], std=0.3)
    sent = attack.client_update(client(0), {"w": torch.zeros(20_000)})["w"]
    assert abs(sent.std().item() - 0.3) < 0.01 and abs(sent.mean().item()) < 0.01


def colluding_round(attack):
    """Six clients, 0 and 3 malicious; run the client hook (ground truth) then the collusion hook."""
    gen = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(5, generator=gen, dtype=torch.float64)} for _ in range(6)]
    for cid, u in enumerate(updates):
        attack.client_update(client(cid), u)
    messages = [Message.of_update(cid, 8, u) for cid, u in enumerate(updates)]
    rnd = RoundContext(1, None, list(range(6)), {"w": torch.zeros(5, dtype=torch.float64)})
    sent = attack.collusion(rnd, messages)
    benign = np.stack([updates[i]["w"].numpy() for i in (1, 2, 4, 5)])
    for i in (1, 2, 4, 5):
        assert sent[i] is messages[i]
    return benign, sent[0].payload["w"].numpy(), sent[3].payload["w"].numpy()


def test_alie_sends_mean_minus_z_std_with_the_papers_z(scenario):
    attack = make(mp.Alie, scenario, clients=[0, 3])
    benign, first, second = colluding_round(attack)
    n, m = 6, 2
    s = (n // 2 + 1) - m  # Baruch et al.: supporters needed
    z = NormalDist().inv_cdf((n - s) / n)
    assert mp.alie_z(n, m) == pytest.approx(z, abs=1e-12)
    np.testing.assert_allclose(first, benign.mean(0) - z * benign.std(0), rtol=1e-12)
    np.testing.assert_array_equal(first, second)


def test_ipm_sends_minus_epsilon_times_the_benign_mean(scenario):
    attack = make(mp.Ipm, scenario, clients=[0, 3], epsilon=0.5)
    benign, first, _ = colluding_round(attack)
    np.testing.assert_allclose(first, -0.5 * benign.mean(0), rtol=1e-12)


# --------------------------------------------------------------------------- data poisoning


@pytest.fixture
def runtime(tiny, tmp_path):
    tiny["tuning"] = {"mode": "full"}
    scenario = load_scenario(tiny)
    return build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_path)


def test_backdoor_texts_carry_trigger_and_target_within_seq_len(runtime):
    attack = make(bd.Backdoor, runtime.scenario, runtime, clients=[1], trigger="cf", target="buy now")
    texts = runtime.data.client_texts(1)
    poisoned = attack.client_data(client(1, runtime=runtime), texts)
    marked = [t for t in poisoned if t.endswith(" cf buy now")]
    assert len(marked) == round(0.5 * len(texts)) and len(poisoned) == len(texts)
    assert all(attack.num_tokens(t) < runtime.batcher.seq_len for t in marked)
    assert attack.client_data(client(2, runtime=runtime), texts) is texts
    assert len(attack.prompts) == len(runtime.data.heldout) and all(p.endswith(" cf") for p in attack.prompts)


def test_label_flip_substitutes_whole_words_only(runtime):
    attack = make(bd.LabelFlip, runtime.scenario, runtime, clients=[0], mapping={"rain": "snow", "the": "a"})
    out = attack.client_data(client(0, runtime=runtime), ["the rain over the rainbow", "theatre"])
    assert out == ["a snow over a rainbow", "theatre"]


def test_attack_success_is_the_share_of_greedy_continuations_that_start_with_the_target(runtime):
    """A target counts when the continuation starts with it, leading spaces ignored; greedy
    decoding itself is tested in test_lm.py."""
    prompts = ["the rain", "we saw the old", "a", "in the"]
    continuations = greedy_continuations(runtime.model, runtime.tokenizer, prompts, 5, runtime.device)
    hits = [c.lstrip()[:3] for c in continuations[:2]]
    assert all(hits), continuations
    assert bd.success_rate(runtime, prompts, hits + ["\x00never", "\x00never"]) == 0.5


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "mode, attacks, aggregator",
    [
        ("lora", [{"name": "alie", "clients": [0]}, {"name": "gaussian", "clients": [1], "std": 0.1}], "geomedian"),
        ("lora", [{"name": "ipm", "clients": [0], "epsilon": 2.0},
                  {"name": "label_flip", "clients": [1], "mapping": {"the": "a"}}], {"name": "centered_clip", "tau": 0.5}),
        ("prompt", [{"name": "backdoor", "clients": [0]}, {"name": "scaling", "clients": [0]}], {"name": "multikrum", "f": 1}),
    ],
)
def test_attacks_run_against_rules_in_every_mode(tiny, mode, attacks, aggregator):
    tiny["tuning"]["mode"] = mode
    tiny["federation"].update(num_clients=5, clients_per_round=5, rounds=1, local_steps=1, aggregator=aggregator)
    tiny["attacks"] = attacks
    final = fedsec_bench.run(tiny).final
    assert np.isfinite(final["utility.eval_loss"])
    assert all(f"poison.{a['name']}_asr" in final for a in attacks if a["name"] in ("backdoor", "label_flip"))
    assert 0.0 <= final["robust.malicious_share"] <= 1.0 and "robust.exclusion_recall" in final


def backdoor_scenario(tiny, aggregator):
    """Bagdasaryan et al.'s single-shot model replacement in the last of two rounds: client 0
    trains on trigger texts with its own schedule and boosts its update by n/η = 10."""
    s = copy.deepcopy(tiny)
    s["tuning"] = {"mode": "full"}
    s["data"]["canaries"] = {"count": 0}
    s["federation"].update(num_clients=10, clients_per_round=10, rounds=2, local_steps=2, lr=0.002,
                           aggregator=aggregator)
    rounds = [2, 2]
    s["attacks"] = [
        {"name": "backdoor", "clients": [0], "poison_fraction": 1.0,
         "local_steps": 100, "lr": 0.005, "rounds": rounds},
        {"name": "scaling", "clients": [0], "rounds": rounds},
    ]
    return s


def test_scaled_backdoor_succeeds_under_fedavg_and_norm_bound_cuts_it(tiny):
    """Bagdasaryan et al. 2020: the boosted backdoor replaces the FedAvg model; Sun et al. 2019:
    bounding each update's norm (with or without weak-DP noise) takes that power away."""
    def asr(aggregator):
        return fedsec_bench.run(backdoor_scenario(tiny, aggregator)).metrics["poison.backdoor_asr"]

    fedavg = asr("fedavg")
    control, attacked = fedavg[1], fedavg[2]  # after round 1 no one has attacked yet: the clean model's ASR
    bounded = asr({"name": "norm_bound", "max_norm": 1.0})[2]
    noisy = asr({"name": "norm_bound", "max_norm": 1.0, "noise_std": 0.001})[2]
    report = {"control": control, "fedavg": attacked, "norm_bound": bounded, "norm_bound+noise": noisy}
    assert control <= 0.1 and attacked >= 0.75, report
    assert bounded <= attacked / 2 and noisy <= attacked / 2, report
