"""imprint (Robbing the Fed / Decepticons) on a tiny GPT-2 (2 layers, width 64, MLP 256, no dropout), FedSGD.

What theory says must hold, checked against the truth rebuilt here (the core's own batching,
the measurement m . LayerNorm(wte[token] + wpe[position]) computed with torch's layer_norm,
never the attack's helpers): an input alone in its bin is read back exactly, and nothing the
attack claims is wrong; the number read follows n (1 - 1/N)^(n-1), itself checked by
simulation; clients not targeted and rounds not attacked get the global state itself; lora,
prompt and LLaMA are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import fedsec_bench
from fedsec_bench.attacks.imprint import Imprint, ImprintOptions, expected_isolated
from fedsec_bench.client import client_round
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import Batcher
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import ClientContext, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.plugins import HookChain
from fedsec_bench.runtime import build_runtime

HIDDEN, SEQ_LEN, EXAMPLES = 64, 32, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, vocab_size=400, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def scenario(model_dir, mode="full", batch_size=1, rounds=1, attack=None, **extra):
    raw = {
        "name": "imprint", "seed": 0,
        "model": {"name_or_path": model_dir, "tokenizer": {"kind": "bpe", "vocab_size": 400}},
        "tuning": {"mode": mode, "lora": {"r": 4, "alpha": 8}, "prompt": {"num_virtual_tokens": 4}},
        "data": {"examples_per_client": EXAMPLES, "heldout_examples": 16, "seq_len": SEQ_LEN, "canaries": {"count": 0}},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": rounds, "local_steps": 1,
                       "batch_size": batch_size, "lr": 0.1, "optimizer": "sgd", "eval_every": rounds},
        "attacks": [{"name": "imprint", **(attack or {})}],
        "tracking": {"enabled": False},
        "device": "cpu",
    }
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def world(model_dir, tmp_path_factory):
    sc = load_scenario(scenario(model_dir))
    return build_runtime(sc, build_federated_data(sc), torch.device("cpu"), tmp_path_factory.mktemp("art"))


def true_inputs(rt, client_id: int, rnd: int) -> list[tuple[int, int]]:
    """(token, position) of every input of the client's FedSGD batch that receives a gradient: each
    sequence's positions but its last (the appended end-of-text), as the core's loader draws it."""
    loader = rt.batcher.loader(rt.data.client_examples(client_id), seed=rt.seed_for(rnd, client_id))
    batch = next(iter(loader))
    inputs = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        seq = ids[mask.bool()].tolist()
        assert seq[-1] == rt.tokenizer.eos_token_id, "a sequence was truncated; shorten the data"
        inputs += [(token, position) for position, token in enumerate(seq[:-1])]
    return inputs


def alone_in_their_bin(inputs, state, direction, thresholds) -> set[tuple[int, int]]:
    """The distinct inputs no other distinct input shares a bin [t_j, t_{j+1}) with."""
    wte, wpe = state["transformer.wte.weight"].double(), state["transformer.wpe.weight"].double()
    x = torch.stack([wte[token] + wpe[position] for token, position in inputs])
    measure = F.layer_norm(x, (HIDDEN,), eps=1e-5) @ direction
    bins: dict[int, set] = {}
    for pair, b in zip(inputs, (torch.searchsorted(thresholds, measure, right=True) - 1).tolist()):
        bins.setdefault(b, set()).add(pair)
    return {next(iter(held)) for held in bins.values() if len(held) == 1}


def attack_one_client(rt, plugin, batch_size: int, rnd: int, client_id: int = 0):
    """One FedSGD round of one client as the protocol runs it: dispatch, train, server reads."""
    rt.scenario.federation.batch_size = batch_size
    rt.batcher = Batcher(rt.tokenizer, SEQ_LEN, batch_size)
    global_state = rt.trainable.snapshot()
    round = RoundContext(rnd, rt, [client_id], global_state)
    round.dispatched = {client_id: plugin.dispatch(round, client_id, global_state)}
    ctx = ClientContext(client_id, rnd, rt.seed_for(rnd, client_id), rt)
    message, _ = client_round(ctx, round.sent_to(client_id), HookChain([]))
    rt.trainable.load(global_state)
    plugin.server_observation(round, [message])
    layer = plugin.layers.pop(rnd)
    attempt = plugin.attempts.pop()
    return global_state, layer, attempt


@pytest.mark.parametrize("rnd", [1, 2, 3])
def test_every_input_alone_in_its_bin_is_read_exactly_at_batch_1(world, rnd):
    plugin = Imprint(ImprintOptions(), world)
    state, layer, attempt = attack_one_client(world, plugin, 1, rnd)
    inputs = true_inputs(world, 0, rnd)
    alone = alone_in_their_bin(inputs, state, layer.direction, layer.thresholds)
    assert len(alone) >= 0.8 * len(inputs), "the premise: at batch 1 (n << N) most inputs are alone"
    recovered = set(attempt.inputs)
    assert alone <= recovered  # token and position, exactly
    assert recovered <= set(inputs)  # nothing claimed wrongly (precision 1 on matched inputs)


def test_the_isolated_count_formula_matches_a_simulation():
    rng = np.random.default_rng(0)
    for n, bins in [(10, 256), (256, 256), (1000, 256)]:
        draws = rng.integers(0, bins, size=(4000, n))
        counts = np.stack([np.bincount(row, minlength=bins) for row in draws])
        simulated = (counts == 1).sum(1).mean()
        assert simulated == pytest.approx(expected_isolated(n, bins), rel=0.03)


def test_the_recovered_count_follows_the_formula_as_the_batch_grows(world):
    """Mean over three rounds of the inputs read against n (1-1/N)^(n-1), n the distinct inputs of the
    batch (the same token at the same position is one point), N the bins the attack set: within 25%
    (the bins are equiprobable for the public split, only about so for a client's few examples),
    rising while n < N and falling beyond."""
    plugin = Imprint(ImprintOptions(), world)
    read, predicted = {}, {}
    for batch_size in (1, 4, 16, 64):
        counts, formula = [], []
        for rnd in (1, 2, 3):
            _, layer, attempt = attack_one_client(world, plugin, batch_size, rnd)
            counts.append(len(attempt.inputs))
            formula.append(expected_isolated(len(set(true_inputs(world, 0, rnd))), len(layer.thresholds)))
        read[batch_size], predicted[batch_size] = np.mean(counts), np.mean(formula)
        print(f"batch {batch_size}: read {read[batch_size]:.1f}, formula {predicted[batch_size]:.1f}")
        assert read[batch_size] == pytest.approx(predicted[batch_size], rel=0.25)
    assert read[1] < read[4] < read[16] and read[64] < read[16]


def test_clients_not_targeted_and_rounds_not_attacked_get_the_global_state_itself(world):
    plugin = Imprint(ImprintOptions(target_clients=[0], rounds=[2]), world)
    state = world.trainable.snapshot()
    before = {n: t.clone() for n, t in state.items()}
    assert plugin.dispatch(RoundContext(1, world, [0, 1], state), 0, state) is state  # round not attacked
    attacked = RoundContext(2, world, [0, 1], state)
    assert plugin.dispatch(attacked, 1, state) is state  # client not targeted
    crafted = plugin.dispatch(attacked, 0, state)
    assert crafted is not state and set(crafted) == set(state)
    assert all(crafted[n].shape == state[n].shape and crafted[n].dtype == state[n].dtype for n in state)
    changed = {n for n in state if not torch.equal(crafted[n], state[n])}
    assert changed and all(n.startswith("transformer.h.0.") for n in changed)  # only block 0 is repurposed
    assert all(torch.equal(state[n], before[n]) for n in state)  # not modified in place


def test_a_run_scores_the_read_inputs_and_under_secure_aggregation_reads_the_aggregate(model_dir, tmp_path):
    raw = scenario(model_dir)
    raw["tracking"]["output_dir"] = str(tmp_path)
    row = fedsec_bench.run(raw).metrics.loc[1]
    assert row["imprint.attacked_clients"] == 2 and row["imprint.unreadable_clients"] == 0
    assert row["imprint.exact_gradient"] == 1 and row["imprint.token_precision"] == 1.0
    assert row["imprint.token_recall"] >= 0.8 and row["imprint.rouge1"] > row["imprint.baseline_rouge1"]
    raw = scenario(model_dir, defenses=[{"name": "secure_aggregation"}])
    raw["tracking"]["output_dir"] = str(tmp_path / "masked")
    result = fedsec_bench.run(raw)
    row = result.metrics.loc[1]
    assert row["imprint.attacked_clients"] == 0 and row["imprint.unreadable_clients"] == 2
    assert "imprint.token_recall" not in result.metrics.columns
    # two batch-1 clients: their inputs fill the union's bins sparsely, and the bins add
    assert row["imprint.aggregate.token_precision"] == 1.0 and row["imprint.aggregate.token_recall"] >= 0.8


@pytest.mark.parametrize("change, reason", [
    ({"tuning": {"mode": "lora", "lora": {"r": 4, "alpha": 8}}}, "tuning.mode lora keeps frozen"),
    ({"tuning": {"mode": "prompt", "prompt": {"num_virtual_tokens": 4}}}, "tuning.mode prompt keeps frozen"),
    ({"model": {"arch": "llama", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
                "tokenizer": {"kind": "bpe", "vocab_size": 300}}}, "LLaMA's RMSNorm has no bias"),
    ({"attack": {"bins": 1000}}, "over the MLP width"),
])
def test_settings_it_cannot_attack_are_refused_with_the_reason(model_dir, change, reason):
    raw = scenario(model_dir, attack=change.pop("attack", None))
    raw.update(change)
    if "model" in change:
        raw["tuning"] = {"mode": "full"}
    if "bins" in (raw["attacks"][0]):  # a built model states its width at load time
        raw["model"] = {"arch": "gpt2", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
                        "tokenizer": {"kind": "bpe", "vocab_size": 300}}
    with pytest.raises(ScenarioError, match=reason):
        load_scenario(raw)
