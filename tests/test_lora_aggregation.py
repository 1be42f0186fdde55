"""tuning.lora.aggregation: separate averages A and B on their own, ffa trains and exchanges B alone,
exact (FedEx-LoRA) makes the global model the clients' weighted mean model exactly."""

from __future__ import annotations

import pytest
import torch
import yaml
from peft.tuners.lora import LoraLayer

import fedsec_bench
from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.cli import main
from fedsec_bench.client import LocalTraining
from fedsec_bench.messages import plain_updates
from fedsec_bench.models import make_model, make_tokenizer
from fedsec_bench.plan import load_plan
from fedsec_bench.plugins import Plugin
from fedsec_bench.registry import loaded_plugins
from fedsec_bench.tuning import TrainableState, apply_tuning

from test_model_options import TEXTS, batches, build, saved, sgd


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """W0 + s·BA of every LoRA layer, in the base weight's layout, as PEFT itself computes the delta."""
    return {name: (m.get_base_layer().weight + m.get_delta_weight("default")).detach().clone()
            for name, m in lora_layers(model).items()}


class Witness(Plugin):
    """An observer: each round, every delivered client's own effective weights (computed with PEFT from the
    global state plus its update, on the frozen weights as they were) and then the server's new model."""

    name = "lora_witness"
    kind = "attack"
    rounds: list[dict] = []

    def server_observation(self, round, messages):
        trainable = self.runtime.trainable
        clients = []
        for update in plain_updates(messages, self.name):
            trainable.load({n: round.global_state[n] + update[n] for n in round.global_state})
            clients.append(effective_weights(self.runtime.model))
        trainable.load(round.global_state)
        total = sum(m.num_examples for m in messages)
        self.rounds.append({"weights": [m.num_examples / total for m in messages], "clients": clients})

    def score_round(self, round, truth, metrics):
        self.rounds[-1]["global"] = effective_weights(self.runtime.model)


@pytest.fixture
def witness(monkeypatch):
    monkeypatch.setitem(loaded_plugins(), Witness.name, Witness)
    monkeypatch.setattr(Witness, "rounds", [])
    return Witness


def gaps(rounds: list[dict]) -> list[float]:
    """Per round, the largest |global effective weight − Σ w_i client i's effective weight| over all layers."""
    out = []
    for record in rounds:
        mean = {name: sum(w * c[name] for w, c in zip(record["weights"], record["clients"]))
                for name in record["global"]}
        out.append(max(float((record["global"][n] - mean[n]).abs().max()) for n in mean))
    return out


def federate(tiny, aggregation: str):
    """Two rounds of two clients of unequal sizes with different data, local training that moves both A and B."""
    tiny["tuning"]["lora"]["aggregation"] = aggregation
    tiny["attacks"] = [{"name": "lora_witness"}]
    tiny["data"]["partition"] = {"method": "quantity_skew", "alpha": 1.0}
    tiny["federation"].update(num_clients=2, clients_per_round=2, local_steps=4, lr=0.05)
    return fedsec_bench.run(tiny)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # GPT-2's Conv1D stores its weight transposed (in x out)
def test_exact_aggregation_makes_the_global_model_the_clients_weighted_mean_and_separate_does_not(
    tiny, witness, arch
):
    tiny["model"]["arch"] = arch
    result = federate(tiny, "exact")
    exact = gaps(witness.rounds)
    assert len(witness.rounds) == 2 and all(len(r["clients"]) == 2 for r in witness.rounds)
    assert len(set(witness.rounds[0]["weights"])) == 2  # unequal client sizes: the weighting is tested
    assert witness.rounds[0]["global"] and max(exact) < 1e-6, exact
    assert result.final["lora.exact_residual_norm"] > 0 and result.final["cost.bytes_down_residual"] > 0
    witness.rounds.clear()
    federate(tiny, "separate")
    separate = gaps(witness.rounds)
    assert min(separate) > 1e-3 and max(exact) < 1e-6, (separate, exact)  # mean of products ≠ product of means


def test_ffa_trains_and_exchanges_lora_b_only_and_keeps_a_at_its_init(tiny):
    scenario, tokenizer, model = build(tiny, "tuning.lora.aggregation=ffa", "model.dropout=0")
    tuned = apply_tuning(model, scenario.tuning)
    trainable = TrainableState(tuned)
    a = {n: p.detach().clone() for n, p in tuned.named_parameters() if ".lora_A." in n}
    assert a and trainable.params and all(".lora_B." in n for n in trainable.params)
    start = trainable.snapshot()
    LocalTraining(tuned, sgd(tuned), batches(2, 2, len(tokenizer)), steps=2, device=torch.device("cpu")).run()
    assert all(p.equal(a[n]) for n, p in tuned.named_parameters() if n in a)
    assert all(d.abs().max() > 0 for d in trainable.delta_from(start).values())


def test_lora_init_is_seeded_for_a_loaded_model_so_ffa_freezes_the_same_a_in_every_run(tiny, tmp_path):
    tiny["model"] = {"name_or_path": saved(tiny, tmp_path / "tiny")}
    scenario = load_scenario(tiny, ["tuning.lora.aggregation=ffa"])
    tokenizer = make_tokenizer(scenario.model, TEXTS)
    runs = []
    for _ in range(2):
        torch.rand(7)  # whatever ran before
        tuned = apply_tuning(make_model(scenario.model, tokenizer, scenario.seed), scenario.tuning)
        runs.append({n: p for n, p in tuned.named_parameters() if ".lora_A." in n})
    assert runs[0] and all(p.equal(runs[1][n]) for n, p in runs[0].items())


def refusal(tiny, tmp_path, capsys) -> str:
    path = tmp_path / "exact.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["validate", str(path)]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("transport", ["he_aggregation", "secure_aggregation"])
def test_exact_is_refused_with_a_transport_that_hides_the_updates(tiny, tmp_path, capsys, transport):
    tiny["tuning"]["lora"]["aggregation"] = "exact"
    tiny["defenses"] = [{"name": transport}]
    err = refusal(tiny, tmp_path, capsys)
    assert "error: tuning.lora.aggregation (fedex_lora) needs each client's plain update" in err
    assert f"but defenses[0] ({transport}) hides the updates" in err


def test_exact_is_refused_with_an_aggregator_other_than_the_mean(tiny, tmp_path, capsys):
    tiny["tuning"]["lora"]["aggregation"] = "exact"
    tiny["federation"]["aggregator"] = {"name": "krum", "f": 0}
    err = refusal(tiny, tmp_path, capsys)
    assert ("error: tuning.lora.aggregation (fedex_lora) needs the round's aggregate to be the weighted mean of "
            "the updates, but federation.aggregator (krum) aggregates otherwise") in err


@pytest.mark.parametrize(("override", "named"), [("federation.server_lr=0.5", "federation.server_lr"),
                                                 ("model.dtype=bfloat16", "model.dtype float32")])
def test_exact_is_refused_where_the_fold_cannot_be_exact(tiny, override, named):
    with pytest.raises(ScenarioError) as caught:
        load_scenario(tiny, ["tuning.lora.aggregation=exact", override])
    [problem] = caught.value.problems
    assert problem.startswith("tuning.lora.aggregation (fedex_lora): ") and named in problem


def test_separate_and_ffa_plan_no_extra_plugin(tiny):
    for aggregation in ("separate", "ffa"):
        plan = load_plan(tiny, [f"tuning.lora.aggregation={aggregation}"])
        assert [p.where for p in plan.plugins] == ["federation.aggregator"]
    plan = load_plan(tiny, ["tuning.lora.aggregation=exact"])
    assert [p.where for p in plan.plugins] == ["federation.aggregator", "tuning.lora.aggregation"]


def test_exact_aggregation_is_refused_with_dp_fedavg(tiny):
    """FedEx-LoRA's residual comes from each client's own update, outside the noised mean DP-FedAvg guarantees."""
    from fedsec_bench import ScenarioError, load_scenario

    tiny["tuning"]["lora"]["aggregation"] = "exact"
    tiny["defenses"] = [{"name": "dp_fedavg", "noise_multiplier": 1.0, "clip_norm": 1.0}]
    with pytest.raises(ScenarioError, match="moves the global model by more than the aggregate"):
        load_scenario(tiny)
