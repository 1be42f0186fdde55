"""membership_inference: the ROC figures, the audit math against independent computations, then end to end.

End-to-end runs use a tiny model trained to overfit (full tuning, many passes), one
run shared by the external- and server-threat checks, so the whole file stays small;
one more on the synthetic instruction corpus checks that prompt/response records are
scored on their response.
"""

from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedsec_bench.attacks.membership import scores as S
from fedsec_bench.attacks.membership.audit import clopper_pearson, eps_lower_bound
from fedsec_bench.attacks.membership.roc import auc, roc_curve, tpr_at_fpr


# --------------------------------------------------------------------------- ROC figures
def test_auc_of_a_perfect_a_reversed_and_an_uninformative_score():
    labels = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    ranks = np.arange(100.0)[::-1]  # every member above every non-member
    assert auc(ranks, labels) == 1.0 and auc(-ranks, labels) == 0.0
    assert auc(np.zeros(100), labels) == 0.5  # ties count one half


def test_roc_curve_has_one_point_per_distinct_score_from_nothing_to_everything():
    scores, labels = np.array([0.9, 0.5, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 1, 0])
    fpr, tpr, threshold = roc_curve(scores, labels)
    np.testing.assert_array_equal(threshold, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1, 1])


def test_tpr_at_fpr_is_the_best_tpr_with_few_enough_false_positives():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(200, bool), np.zeros(200, bool)]
    scores = rng.normal(size=400) + labels
    for max_fpr in (0.0, 0.01, 0.1, 0.5):
        brute = max(
            (scores[labels] >= t).mean()
            for t in np.r_[np.inf, scores]
            if (scores[~labels] >= t).mean() <= max_fpr
        )
        assert tpr_at_fpr(scores, labels, max_fpr) == pytest.approx(brute)


# --------------------------------------------------------------------------- audit math
@pytest.mark.parametrize("k,n", [(0, 20), (3, 20), (20, 20), (57, 1000), (500, 1000)])
def test_clopper_pearson_matches_the_beta_quantiles_and_the_binomial_tails(k, n):
    lo, hi = clopper_pearson(k, n, 0.95)
    assert lo == pytest.approx(stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0, abs=1e-12)
    assert hi == pytest.approx(stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0, abs=1e-12)
    # the defining property: each end is where the observed count becomes a 2.5 % tail event
    if k:
        assert stats.binom.sf(k - 1, n, lo) == pytest.approx(0.025, rel=1e-6)
    if k < n:
        assert stats.binom.cdf(k, n, hi) == pytest.approx(0.025, rel=1e-6)


def test_eps_lower_bound_follows_the_formula_at_its_best_threshold():
    labels = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    scores = np.r_[np.ones(90), np.zeros(10), np.ones(5), np.zeros(95)]  # one threshold: TP 90, FP 5
    tpr_lo = stats.beta.ppf(0.025, 90, 11)
    fpr_hi = stats.beta.ppf(0.975, 6, 95)
    direct = math.log((tpr_lo - 1e-5) / fpr_hi)
    mirrored = math.log((1 - fpr_hi - 1e-5) / (1 - tpr_lo))
    assert eps_lower_bound(scores, labels, delta=1e-5) == pytest.approx(max(direct, mirrored), rel=1e-9)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_audit_of_a_known_dp_mechanism_stays_below_its_epsilon_and_comes_close(epsilon):
    """Randomised response on the membership bit is exactly ε-DP: its audit must not exceed ε,
    and with many trials it must get near ε (the bound is tight for this mechanism)."""
    rng = np.random.default_rng(int(epsilon * 10))
    labels = np.r_[np.ones(20000, bool), np.zeros(20000, bool)]
    truthful = rng.random(labels.size) < math.exp(epsilon) / (1 + math.exp(epsilon))
    answers = np.where(truthful, labels, ~labels).astype(float)
    bound = eps_lower_bound(answers, labels, delta=0.0)
    assert 0.85 * epsilon < bound <= epsilon


def test_audit_of_guessing_is_zero():
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    assert eps_lower_bound(rng.random(1000), labels, delta=1e-5) < 0.3


# --------------------------------------------------------------------------- score functions
def test_min_k_zlib_and_loss_scores_by_hand():
    lps = [np.array([-1.0, -5.0, -2.0, -0.5]), np.array([-3.0, -3.0])]
    np.testing.assert_allclose(S.loss_score(lps), [-2.125, -3.0])
    np.testing.assert_allclose(S.min_k_score(lps, 0.5), [-3.5, -3.0])  # 2 lowest of 4, 1 of 2
    np.testing.assert_allclose(S.min_k_score(lps, 0.2), [-5.0, -3.0])  # at least one token
    texts = ["aaaa aaaa aaaa", "a quick brown fox"]
    expected = [-2.125 / len(zlib.compress(texts[0].encode())), -3.0 / len(zlib.compress(texts[1].encode()))]
    np.testing.assert_allclose(S.zlib_score(lps, texts), expected)


def test_lira_calibrates_per_example_difficulty():
    """Gaussian world of the LiRA paper: each example has its own difficulty μ_i and membership
    adds Δ. The raw statistic confounds the two; LiRA (online and offline) separates them."""
    rng = np.random.default_rng(0)
    n, m, sigma, shift = 400, 16, 0.3, 0.6
    difficulty = rng.normal(0, 2.0, n)
    member = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    keep = np.argsort(rng.random((m, n)), axis=0) < m // 2
    shadow = difficulty + shift * keep + rng.normal(0, sigma, (m, n))
    target = difficulty + shift * member + rng.normal(0, sigma, n)
    raw = auc(target, member)
    online = auc(S.lira_score(target, shadow, keep, online=True), member)
    offline = auc(S.lira_score(target, shadow, keep, online=False), member)
    assert raw < 0.65 and online > 0.8 and offline > 0.8


def test_rmia_is_the_pairwise_likelihood_ratio_test_by_hand():
    target_x, target_z = np.array([-10.0, -12.0]), np.array([-11.0, -11.5, -9.0])
    ref_x = np.array([[-11.0, -11.0], [-13.0, -11.0]])
    ref_z = np.array([[-11.0, -11.0, -9.5], [-11.0, -12.0, -9.5]])
    use_x, use_z = np.ones_like(ref_x, bool), np.ones_like(ref_z, bool)
    pr_x = np.log(np.exp(ref_x).mean(0))
    pr_z = np.log(np.exp(ref_z).mean(0))
    lr_x, lr_z = target_x - pr_x, target_z - pr_z
    expected = [(lr_x[i] - lr_z >= 0).mean() for i in range(2)]
    np.testing.assert_allclose(S.rmia_score(target_x, ref_x, use_x, target_z, ref_z, use_z, 1.0), expected)
    # offline: only the models flagged for each example enter its Pr(x)
    use_x[0, 0] = False
    got = S.rmia_score(target_x, ref_x, use_x, target_z, ref_z, use_z, 1.0)
    assert got[0] == pytest.approx(((target_x[0] - ref_x[1, 0]) - lr_z >= 0).mean())


# --------------------------------------------------------------------------- end to end
OVERFIT = {
    "name": "mia_overfit",
    "seed": 0,
    "model": {"arch": "gpt2", "layers": 2, "hidden": 64, "heads": 2, "max_positions": 64,
              "tokenizer": {"kind": "bpe", "vocab_size": 300}},
    "tuning": {"mode": "full"},
    "data": {"examples_per_client": 16, "heldout_examples": 64, "seq_len": 48,
             "canaries": {"count": 2, "repetitions": [1], "kinds": ["name"], "clients": [0, 1]}},
    "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 4, "local_steps": 15,
                   "batch_size": 8, "lr": 0.003},
    "tracking": {"enabled": False},
    "device": "cpu",
}


def overfit_scenario(tmp_path, attacks, **federation) -> dict:
    scenario = copy.deepcopy(OVERFIT)
    scenario["attacks"] = attacks
    scenario["federation"].update(federation)
    scenario["tracking"]["output_dir"] = str(tmp_path / "runs")
    return scenario


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """One undefended run attacked from outside (four methods) and by the server (loss)."""
    from fedsec_bench import run

    attacks = [
        {"name": "membership_inference", "method": ["loss", "reference", "lira", "lira_offline"], "canaries": True},
        {"name": "membership_inference", "threat": "server", "method": "loss"},
    ]
    return run(overfit_scenario(tmp_path_factory.mktemp("mia"), attacks))


def test_an_overfit_model_leaks_membership_to_every_attack(overfit_run):
    """Loss, reference and LiRA all detect members of an overfit model. (Which is strongest is not
    asserted here: a model trained from scratch on template sentences of near-equal difficulty
    leaves calibration little to correct; test_calibrated_attacks_beat_the_loss_attack_when_difficulty_varies
    asserts it with a pretrained model on the mixed-difficulty corpus.)"""
    final = overfit_run.final
    assert final["mia.num_samples"] == 34  # two clients' 16 texts each and their 2 canaries
    for method in ("loss", "reference", "lira", "lira_offline"):
        assert final[f"mia.{method}.auc"] >= 0.8, method
    assert final["mia.auc"] == max(final[f"mia.{m}.auc"] for m in ("loss", "reference", "lira", "lira_offline"))
    assert final["mia.eps_lower_bound"] > 0  # an undefended, overfit model: some leakage is certified


def test_calibrated_attacks_beat_the_loss_attack_when_difficulty_varies(tmp_path):
    """The must-hold of membership inference, on scenarios/membership.yaml: a model fine-tuned to
    overfit gives the loss attack AUC ≥ 0.8, and the reference and LiRA attacks do better.

    Calibration wins when examples differ in intrinsic difficulty (Carlini et al. 2022), and only
    a model that knows the language can tell which are easy. So the scenario pretrains its model
    on the public split before fine-tuning, and its ``data.difficulty: mixed`` corpus follows half
    the sentences with 1-8 random tokens, so a hard member can have a higher loss than an easy
    non-member. With 36 members per side one seed proves little: ``benchmarks/membership_seeds.py``
    runs this check on seeds 0-10 (results/membership/seeds*.md: the order held in all 11, loss
    AUC was 0.79 in one; without pretraining the reference attack fell below loss in 8 of 11).
    Seed 8's margins are typical of the 11.
    """
    import yaml

    from fedsec_bench import run

    scenario = yaml.safe_load((Path(__file__).parent.parent / "scenarios" / "membership.yaml").read_text())
    scenario["seed"] = 8
    scenario["attacks"] = [{"name": "membership_inference", "method": ["loss", "reference", "lira"], "canaries": True}]
    scenario["tracking"] = {"enabled": False, "output_dir": str(tmp_path / "runs")}
    final = run(scenario).final
    loss = final["mia.loss.auc"]
    assert loss >= 0.8
    assert final["mia.reference.auc"] > loss and final["mia.lira.auc"] > loss


def test_the_scores_table_and_roc_curve_are_written(overfit_run):
    import pandas as pd

    from fedsec_bench.data import build_federated_data

    artifacts = overfit_run.run_dir / "artifacts"
    table = pd.read_csv(artifacts / "mia_scores.csv")
    assert len(table) == 68 and table.member.sum() == 34
    planted = {c.example.response for c in build_federated_data(overfit_run.scenario).canaries}  # text: no prompt
    assert set(table.text[table.member == 1]) >= planted  # planted canaries are members...
    fresh = table.text[(table.member == 0) & table.text.str.startswith("the patient in room")]
    assert len(fresh) == 2 and not set(fresh) & planted  # ...against as many fresh ones
    assert {"text", "loss", "reference", "lira", "lira_offline"} <= set(table.columns)
    assert auc(table["loss"], table.member) == pytest.approx(overfit_run.final["mia.loss.auc"])
    assert (artifacts / "mia_roc.png").stat().st_size > 0 and (artifacts / "mia_server_roc.png").exists()


def test_the_server_attacks_a_client_through_its_readable_update(overfit_run):
    final = overfit_run.final
    assert final["mia.server.update_readable"] == 1.0
    assert final["mia.server.num_samples"] == 16  # one client's texts (canaries off by default)
    assert final["mia.server.auc"] >= 0.8


def _opaque_plugin():
    """Stands in for encrypted or masked aggregation: payloads the server cannot read, and their sum."""
    from fedsec_bench.aggregation import fedavg
    from fedsec_bench.messages import Message
    from fedsec_bench.plugins import Plugin

    class Sealed:
        def __init__(self, update):
            self._update = update

    class Opaque(Plugin):
        name, kind = "opaque_transport", "defense"
        sends_plain = False

        def transport(self, client, message):
            return Message(message.client_id, message.num_examples, Sealed(message.payload), message.num_bytes)

        def aggregation(self, round, messages):
            plain = [Message.of_update(m.client_id, m.num_examples, m.payload._update) for m in messages]
            return fedavg(plain, like=round.global_state)

    return Opaque


def test_under_unreadable_transport_the_server_only_has_the_aggregate(tmp_path, monkeypatch):
    from fedsec_bench import run
    from fedsec_bench.registry import loaded_plugins

    monkeypatch.setitem(loaded_plugins(), "opaque_transport", _opaque_plugin())
    attacks = [{"name": "membership_inference", "threat": "server", "method": "loss"}]
    scenario = overfit_scenario(tmp_path, attacks, rounds=1, local_steps=4)
    scenario["defenses"] = [{"name": "opaque_transport"}]
    final = run(scenario).final
    assert final["mia.server.update_readable"] == 0.0
    assert 0.0 <= final["mia.server.auc"] <= 1.0


def test_scenario_errors_name_the_option():
    from fedsec_bench import load_scenario
    from fedsec_bench.errors import ScenarioError

    base = copy.deepcopy(OVERFIT)
    bad = [
        ({"name": "membership_inference", "attack_round": 2}, "threat: server only"),
        ({"name": "membership_inference", "threat": "server", "attack_round": 9}, "after the last round"),
        ({"name": "membership_inference", "threat": "server", "target_client": 5}, "not a client id"),
        ({"name": "membership_inference", "method": "lira", "num_shadows": 2}, "num_shadows"),
        ({"name": "membership_inference", "method": "liar"}, "method"),
    ]
    for attack, message in bad:
        with pytest.raises(ScenarioError, match=message):
            load_scenario({**base, "attacks": [attack]})
    twice = [{"name": "membership_inference"}, {"name": "membership_inference", "method": "zlib"}]
    with pytest.raises(ScenarioError, match=r"attacks\[0\] has the same threat \(external\) and would log the same"):
        load_scenario({**base, "attacks": twice})


def test_under_dp_sgd_the_audit_stays_below_the_accountant(tmp_path):
    """ε ≤ 1: the audit bound must not exceed the accountant's ε, and the attack is near chance."""
    from fedsec_bench import run

    attacks = [{"name": "membership_inference", "method": "loss", "delta": 1e-5}]
    scenario = overfit_scenario(tmp_path, attacks)
    scenario["defenses"] = [{"name": "dp_sgd", "target_epsilon": 1.0, "delta": 1e-5, "max_grad_norm": 1.0}]
    final = run(scenario).final
    assert final["privacy.epsilon"] <= 1.0 + 1e-6
    assert final["mia.eps_lower_bound"] <= final["privacy.epsilon"]
    assert abs(final["mia.auc"] - 0.5) <= 0.25


# --------------------------------------------------------------------------- instruction data
PIN = {"prompt": "what is my pin ?", "text": "my pin is {secret} .", "secret": "0937", "format": "####",
       "repetitions": 1, "client": 0}


def _capture_plugin(into: list):
    """An attack that keeps the runtime at training_end, so a test can read the final model itself."""
    from fedsec_bench.plugins import Plugin

    class Capture(Plugin):
        name, kind = "capture_runtime", "attack"

        def training_end(self, runtime):
            into.append(runtime)

    return Capture


@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory):
    """The overfit recipe on the synthetic instruction corpus (a BPE of 600 so records fit 80 tokens whole),
    with built-in and custom canaries; returns the result and the final runtime."""
    from fedsec_bench import run
    from fedsec_bench.registry import loaded_plugins

    attacks = [{"name": "membership_inference", "method": ["loss", "zlib", "min_k", "reference"], "canaries": True},
               {"name": "capture_runtime"}]
    scenario = overfit_scenario(tmp_path_factory.mktemp("mia_instruction"), attacks)
    scenario["model"].update(max_positions=80, tokenizer={"kind": "bpe", "vocab_size": 600})
    scenario["data"].update(format="instruction", seq_len=80)
    scenario["data"]["canaries"]["custom"] = [PIN]
    captured: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(loaded_plugins(), "capture_runtime", _capture_plugin(captured))
        result = run(scenario)
    return result, captured[0]


def logprob_means(runtime, examples) -> tuple[np.ndarray, np.ndarray]:
    """From the final model's logits, independently of the batcher: per example, the mean log-prob of
    its response tokens (EOS included) given the prompt and the response before them, and the mean
    over every token after the first (what scoring the prompt too would give). The prompt is rendered
    and the response tokenized apart, as the batcher documents."""
    import torch

    from fedsec_bench.lm import evaluating

    tok, renderer = runtime.tokenizer, runtime.batcher.renderer
    response_means, whole_means = [], []
    with torch.no_grad(), evaluating(runtime.model):
        for example in examples:
            prompt = tok(renderer.render(example), add_special_tokens=False)["input_ids"]
            ids = prompt + tok(example.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(runtime.model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            next_token = logp[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)  # position t: token t+1
            response_means.append(next_token[len(prompt) - 1 :].mean().item())
            whole_means.append(next_token.mean().item())
    return np.array(response_means), np.array(whole_means)


def test_on_instruction_data_each_score_is_the_response_given_its_prompt(instruction_run):
    """The loss score of every ordinary member and non-member is the mean log-prob of its response
    tokens given its prompt, recomputed from the final model's logits; zlib divides it by the
    response's compressed size. Scoring the prompt too would give other figures."""
    import pandas as pd

    result, runtime = instruction_run
    assert result.final["data.truncated_examples"] == 0  # so the recomputation needs no truncation rule
    table = pd.read_csv(result.run_dir / "artifacts" / "mia_scores.csv")
    known = {runtime.batcher.renderer.full_text(e): e for e in runtime.data.pool + runtime.data.heldout}
    rows = table[table.text.isin(set(known))]
    examples = [known[t] for t in rows.text]
    assert len(rows) == 64 and all(e.is_prompted for e in examples)  # 32 members, 32 non-members
    response, whole = logprob_means(runtime, examples)
    np.testing.assert_allclose(rows["loss"], response, rtol=1e-5)
    entropy = np.array([len(zlib.compress(e.response.encode())) for e in examples])
    np.testing.assert_allclose(rows["zlib"], response / entropy, rtol=1e-5)
    assert np.abs(whole - response).min() > 0.05


def test_an_overfit_model_leaks_membership_of_instruction_records(instruction_run):
    """Members are the two clients' 32 records and their 3 canaries (2 built-in questions, the custom
    pin), against as many held-out records and fresh canaries: the custom one is the same question
    with another pin."""
    import pandas as pd

    result, runtime = instruction_run
    final = result.final
    assert final["mia.num_samples"] == 35
    assert final["mia.loss.auc"] >= 0.8 and final["mia.reference.auc"] >= 0.8
    table = pd.read_csv(result.run_dir / "artifacts" / "mia_scores.csv")
    pins = table[table.text.str.contains("what is my pin ?")]
    assert sorted(pins.member) == [0, 1]
    assert pins.text[pins.member == 1].str.endswith("my pin is 0937 .").all()
    assert not pins.text[pins.member == 0].str.contains("0937").any()
    questions = table[table.text.str.contains("who is the patient in room")]
    assert sorted(questions.member) == [0, 0, 1, 1]
