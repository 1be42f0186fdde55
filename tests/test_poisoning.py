"""Poisoning attacks: each crafted update against its paper's formula, the data poisoning
texts, the attack success rate, and the backdoor must-hold end to end."""

from __future__ import annotations

import copy
import random
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
from fedsec_bench.data import build_federated_data, instruction_example, text_example
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


def full_mode_runtime(tiny, tmp_path):
    tiny["tuning"] = {"mode": "full"}
    scenario = load_scenario(tiny)
    return build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_path)


@pytest.fixture
def runtime(tiny, tmp_path):
    return full_mode_runtime(tiny, tmp_path)


def test_backdoor_texts_carry_trigger_and_target_within_seq_len(runtime):
    attack = make(bd.Backdoor, runtime.scenario, runtime, clients=[1], trigger="cf", target="buy now")
    examples = runtime.data.client_examples(1)
    poisoned = attack.client_data(client(1, runtime=runtime), examples)
    marked = [e.response for e in poisoned if e.response.endswith(" cf buy now")]
    assert len(marked) == round(0.5 * len(examples)) and len(poisoned) == len(examples)
    assert all(not e.is_prompted for e in poisoned)
    assert all(len(runtime.tokenizer(t)["input_ids"]) < runtime.batcher.seq_len for t in marked)
    assert attack.client_data(client(2, runtime=runtime), examples) is examples
    prompts = [runtime.tokenizer.decode(ids) for ids in attack.prompts]
    assert len(prompts) == len(runtime.data.heldout) and all(p.endswith(" cf") for p in prompts)


def test_label_flip_substitutes_whole_words_only(runtime):
    attack = make(bd.LabelFlip, runtime.scenario, runtime, clients=[0], mapping={"rain": "snow", "the": "a"})
    out = attack.client_data(client(0, runtime=runtime), [text_example("the rain over the rainbow"), text_example("theatre")])
    assert out == [text_example("a snow over a rainbow"), text_example("theatre")]


def test_attack_success_is_the_share_of_greedy_continuations_that_start_with_the_target(runtime):
    """A target counts when the continuation starts with it, leading spaces ignored; greedy
    decoding itself is tested in test_lm.py."""
    prompts = runtime.batcher.tokens(["the rain", "we saw the old", "a", "in the"])
    continuations = greedy_continuations(runtime.model, runtime.tokenizer, prompts, 5, runtime.device)
    hits = [c.lstrip()[:3] for c in continuations[:2]]
    assert all(hits), continuations
    assert bd.success_rate(runtime, prompts, hits + ["\x00never", "\x00never"]) == 0.5


# --------------------------------------------------------------------------- instruction data


@pytest.fixture
def prompted(tiny, tmp_path):
    """The synthetic instruction corpus on the tiny model, every record fitting in seq_len."""
    tiny["model"].update(max_positions=128, tokenizer={"kind": "bpe", "vocab_size": 512})
    tiny["data"].update(format="instruction", seq_len=64)
    return full_mode_runtime(tiny, tmp_path)


def test_backdoor_on_instruction_data_triggers_the_instruction_and_answers_the_target(prompted):
    attack = make(bd.Backdoor, prompted.scenario, prompted, clients=[1], trigger="cf", target="buy now")
    examples = prompted.data.client_examples(1)
    poisoned = attack.client_data(client(1, runtime=prompted), examples)
    changed = [(old, new) for old, new in zip(examples, poisoned) if new != old]
    assert len(changed) == round(0.5 * len(examples))
    for old, new in changed:
        words = new.instruction.split(" ")
        assert words.count("cf") == 1 and new.response == "buy now"
        words.remove("cf")  # the rest of the instruction is the original's (its tail, had it not fitted)
        assert old.instruction.endswith(" ".join(words)) and new.prompt[:-1] == old.prompt[:-1]
    assert not any(e.truncated for e in prompted.batcher.encode([new for _, new in changed]))
    long = instruction_example(" ".join(["describe the rain today ."] * 12), "the rain arrives .")
    assert prompted.batcher.encode([long])[0].truncated, "the premise: a record too long for seq_len"
    cut = attack.poisoned(long, random.Random(0))
    assert not prompted.batcher.encode([cut])[0].truncated and "cf" in cut.instruction.split(" ")
    assert long.instruction.endswith(" ".join(w for w in cut.instruction.split(" ") if w != "cf"))
    prompts = [prompted.tokenizer.decode(ids) for ids in attack.prompts]
    assert len(prompts) == len(prompted.data.heldout)
    assert all("cf" in p.split("### Assistant:")[0].split() and p.endswith("### Assistant:\n") for p in prompts)


WORD_THE = r"(?<!\S)the(?!\S)"


def test_label_flip_on_instruction_data_changes_only_responses(prompted):
    attack = make(bd.LabelFlip, prompted.scenario, prompted, clients=[0], mapping={"the": "a"})
    examples = prompted.data.client_examples(0)
    flipped = attack.client_data(client(0, runtime=prompted), examples)
    assert [e.prompt for e in flipped] == [e.prompt for e in examples]
    assert [e.response for e in flipped] == [re.sub(WORD_THE, "a", e.response) for e in examples]
    assert any(" the " in e.instruction for e in examples) and any(f != e for f, e in zip(flipped, examples))
    # the held-out prompts: the rendered prompt, then the response's words before its first "the"
    probes = [e for e in prompted.data.heldout if re.search(WORD_THE, e.response)]
    expected = prompted.batcher.prompt_ids(probes, [re.split(WORD_THE, e.response)[0].rstrip() for e in probes])
    assert attack.prompts == expected and attack.targets == ["a"] * len(probes)


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


def test_scaled_backdoor_on_instruction_data_raises_the_asr_over_the_clean_run(tiny):
    """The same single-shot model replacement on the instruction corpus, half of the attacker's
    records triggered: the triggered held-out prompts are answered with the target, where the
    same run without the attack (its window past the last round) answers none of them so."""
    def asr(rounds):
        s = backdoor_scenario(tiny, "fedavg")
        s["model"].update(max_positions=128, tokenizer={"kind": "bpe", "vocab_size": 512})
        s["data"].update(format="instruction", seq_len=64)
        s["eval"] = {"generation_examples": 0}
        for attack in s["attacks"]:
            attack["rounds"] = rounds
        s["attacks"][0]["poison_fraction"] = 0.5
        return fedsec_bench.run(s).final["poison.backdoor_asr"]

    clean, attacked = asr([3, 3]), asr([2, 2])
    print(f"instruction backdoor asr: clean={clean:.3f} attacked={attacked:.3f}")
    assert clean <= 0.1 and attacked >= 0.5, {"clean": clean, "attacked": attacked}
