"""A malicious server that sends clients different models (the ``dispatch`` hook), checked against
Pasquini et al. (CCS 2022): under secure or encrypted aggregation the aggregate the server reads equals
the target's plain update, an honest-server attack then recovers the target's text exactly where it
recovers nothing from the honest aggregate, and clients that compare model digests stop it.

The true updates and the isolated ones are captured by test plugins of their own (a witness on the
clients' transport, a reader after the attack), never taken from the attack's figures."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedsec_bench import run
from fedsec_bench.errors import ScenarioError
from fedsec_bench.plan import load_scenario
from fedsec_bench.plugins import Plugin
from fedsec_bench.registry import loaded_plugins
from fedsec_bench.updates import flatten

SECAGG_BITS = 32  # secure_aggregation's default fractional_bits
CKKS_TOLERANCE = 2.0**-20  # as in test_he_aggregation


class Witness(Plugin):
    """Each client's plain update as it enters the transport (after the attack's, before a defense's)."""

    name = "witness"
    kind = "attack"
    sent: dict[tuple[int, int], dict] = {}

    def transport(self, client, message):
        self.sent[(client.round, client.client_id)] = {n: t.clone() for n, t in message.payload.items()}
        return message


class Reader(Plugin):
    """What the server holds after the attack's post_aggregation: the updates it isolated, and what it sent."""

    name = "reader"
    kind = "attack"
    isolated: dict[tuple[int, int], dict] = {}
    consistent: list[bool] = []

    def post_aggregation(self, round, aggregate):
        self.isolated |= {(round.round, c): dict(u) for c, u in round.isolated.items()}
        self.consistent.append(round.is_consistent())
        return aggregate


@pytest.fixture
def parties(monkeypatch):
    for cls in (Witness, Reader):
        monkeypatch.setitem(loaded_plugins(), cls.name, cls)
    monkeypatch.setattr(Witness, "sent", {})
    monkeypatch.setattr(Reader, "isolated", {})
    monkeypatch.setattr(Reader, "consistent", [])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A LLaMA-style model without dropout and with an untied embedding, as scenarios/inversion_fedsgd.yaml."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=400, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def fedsgd(model_dir, attacks, defenses=(), clients=6, **federation):
    """FedSGD in full mode, every client sampled: span_check's best case for one client's update, while
    the sum of six clients' batches exceeds the width its rank condition needs."""
    fed = {"num_clients": clients, "clients_per_round": clients, "rounds": 1, "local_steps": 1, "batch_size": 2,
           "lr": 0.1, "optimizer": "sgd", **federation}
    return {
        "name": "malicious", "seed": 0,
        "model": {"name_or_path": model_dir, "tokenizer": {"kind": "bpe", "vocab_size": 400}},
        "tuning": {"mode": "full"},
        "data": {"examples_per_client": 8, "heldout_examples": 16, "seq_len": 32, "canaries": {"count": 0}},
        "federation": fed, "attacks": list(attacks), "defenses": list(defenses),
        "tracking": {"enabled": False}, "device": "cpu",
    }


MI = {"name": "model_inconsistency"}
SPAN = {"name": "gradient_inversion", "method": "span_check"}


@pytest.mark.parametrize("defense, tolerance", [
    ("secure_aggregation", 2.0 ** -SECAGG_BITS), ("he_aggregation", CKKS_TOLERANCE),
])
def test_under_hiding_aggregation_the_server_reads_the_targets_plain_update(llama_dir, parties, defense, tolerance):
    """The crafted clients' updates vanish exactly, so the aggregate the server unmasks or decrypts,
    rescaled by the public example counts, is the target's plain update up to the encoding error."""
    run(fedsgd(llama_dir, [MI, {"name": "witness"}, {"name": "reader"}], [{"name": defense}]))
    (rnd, target), isolated = next(iter(Reader.isolated.items()))
    assert len(Reader.isolated) == 1 and Reader.consistent == [False]
    others = [u for (r, c), u in Witness.sent.items() if c != target]
    assert len(others) == 5 and all(flatten(u).abs().max() == 0 for u in others)
    true_update = Witness.sent[(rnd, target)]
    assert flatten(true_update).norm() > 0
    per_coordinate = (flatten(isolated) - flatten({n: true_update[n] for n in isolated})).abs().max()
    assert per_coordinate <= 8 * tolerance * 6, per_coordinate  # six encoded updates, scaled back by 6


@pytest.mark.parametrize("defense", ["secure_aggregation", "he_aggregation"])
def test_span_check_recovers_the_targets_text_through_hiding_aggregation(llama_dir, defense):
    """Honest server: the aggregate of six clients fails DAGER's rank condition and yields nothing. Malicious
    server: the same attack, unchanged, on the isolated update recovers the target's batch exactly, as it
    does on one plain update without the defense."""
    honest = run(fedsgd(llama_dir, [SPAN], [{"name": defense}])).final
    assert honest["inversion.aggregate.rank_condition"] == 0 and honest["inversion.aggregate.exact_match"] == 0
    malicious = run(fedsgd(llama_dir, [MI, SPAN], [{"name": defense}])).final
    assert malicious["inversion.isolated_clients"] == 1 and malicious["inversion.unreadable_clients"] == 1
    assert malicious["inversion.exact_match"] == 1.0 and malicious["inversion.rouge1"] == 1.0
    assert "inversion.aggregate.exact_match" not in malicious
    plain = run(fedsgd(llama_dir, [SPAN], clients=1)).final  # the same client alone, no defense
    assert plain["inversion.exact_match"] == 1.0


def test_server_membership_threat_reads_the_isolated_update(llama_dir):
    figures = run(fedsgd(llama_dir, [MI, {"name": "membership_inference", "threat": "server"}],
                         [{"name": "secure_aggregation"}])).final
    assert figures["mia.server.update_readable"] == 1.0


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.9), ("adamw", 0.0)])
def test_a_zero_model_gives_an_exactly_zero_update(tiny, parties, mode, optimizer, momentum):
    """The premise of the crafted model, on GPT-2 with dropout, several local steps and weight decay."""
    tiny["tuning"]["mode"] = mode
    tiny["federation"].update(optimizer=optimizer, momentum=momentum, weight_decay=0.01, local_steps=3,
                              clients_per_round=3)
    tiny["attacks"] = [MI, {"name": "witness"}, {"name": "reader"}]
    run(tiny)
    targets = {c for _, c in Reader.isolated}
    others = [u for (_, c), u in Witness.sent.items() if c not in targets]
    assert len(others) >= 2 and all(flatten(u).abs().max() == 0 for u in others)
    assert all(flatten(u).norm() > 0 for (_, c), u in Witness.sent.items() if c in targets)


def test_model_consistency_stops_the_isolation(llama_dir, parties):
    """Clients that compare digests refuse the inconsistent round: nothing is isolated or read, the model stays."""
    defenses = [{"name": "model_consistency"}, {"name": "secure_aggregation"}]
    result = run(fedsgd(llama_dir, [MI, SPAN, {"name": "reader"}], defenses))
    figures = result.final
    assert figures["consistency.refused_clients"] == 6 and figures["inconsistency.isolated"] == 0
    assert Reader.isolated == {} and figures["round.clients"] == 0
    assert not any(k.startswith("inversion.") and k.endswith(("rouge1", "exact_match")) for k in figures)


def test_model_consistency_changes_nothing_under_an_honest_server(tiny):
    without = run(tiny).final
    tiny["defenses"] = [{"name": "model_consistency"}]
    with_check = run(tiny).final
    assert with_check["consistency.refused_clients"] == 0
    assert with_check["utility.eval_loss"] == without["utility.eval_loss"]


@pytest.mark.parametrize("change, message", [
    ({"attacks": [SPAN, MI]}, "list model_inconsistency before gradient_inversion"),
    ({"federation.aggregator": {"name": "median"}}, "weighted mean"),
    ({"tuning.mode": "prompt"}, "does not support tuning.mode=prompt"),
    ({"attacks": [{"name": "model_inconsistency", "rounds": [3]}]}, "rounds: [3]"),
    ({"defenses": [{"name": "secure_aggregation"}, {"name": "model_consistency"}]},
     "list model_consistency before secure_aggregation"),
])
def test_refusals(tiny, change, message):
    tiny["attacks"] = [MI]
    for path, value in change.items():
        section, _, key = path.partition(".")
        if key:
            tiny[section][key] = value
        else:
            tiny[section] = value
    with pytest.raises(ScenarioError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_scenario(tiny)


def test_a_crafted_state_of_another_layout_is_refused(tiny, monkeypatch):
    class Truncating(Plugin):
        name, kind = "truncating", "attack"

        def dispatch(self, round, client_id, state):
            return dict(list(state.items())[1:])

    monkeypatch.setitem(loaded_plugins(), Truncating.name, Truncating)
    tiny["attacks"] = [{"name": "truncating"}]
    with pytest.raises(ValueError, match="other parameters than the global state"):
        run(tiny)

