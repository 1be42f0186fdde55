"""gradient_inversion on a tiny GPT-2 (2 layers, width 64, no dropout), checked against theory.

The truth is rebuilt here from the core's own batching (the client's first batch in
FedSGD), never from the attack's helpers; the claims checked are the papers':
the pseudo-gradient of one SGD step is the gradient, the embedding gradient gives the
token set exactly, DAGER's span test is exact iff the batch has fewer tokens than the
layer is wide (and says so when not), noise at DP scale leaves nothing to read, and
an unreadable payload is never scored as if it had been read.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fedsec_bench
from fedsec_bench.attacks.gradient_inversion import GradientInversionOptions, metrics
from fedsec_bench.attacks.gradient_inversion.ground_truth import trained_sequences
from fedsec_bench.attacks.gradient_inversion.model_view import (
    ModelView, PseudoGradient, exact_gradient, pseudo_gradient, readable,
)
from fedsec_bench.attacks.gradient_inversion.optimization import optimization
from fedsec_bench.attacks.gradient_inversion.span_check import span_check
from fedsec_bench.attacks.gradient_inversion.token_leak import token_leak
from fedsec_bench.client import client_round
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import Batcher, Encoded
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import ClientContext, Message
from fedsec_bench.plugins import HookChain
from fedsec_bench.runtime import build_runtime
from fedsec_bench.plan import load_scenario

HIDDEN, SEQ_LEN = 64, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GPT-2-style model without dropout, loaded back through from_pretrained like a user's checkpoint."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=2, vocab_size=400, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def scenario(model_dir, mode="full", batch_size=1, rounds=1, attack=None, **extra):
    raw = {
        "name": "inversion", "seed": 0,
        "model": {"name_or_path": model_dir, "tokenizer": {"kind": "bpe", "vocab_size": 400}},
        "tuning": {"mode": mode, "lora": {"r": 4, "alpha": 8}, "prompt": {"num_virtual_tokens": 4}},
        "data": {"examples_per_client": 8, "heldout_examples": 64, "seq_len": SEQ_LEN, "canaries": {"count": 0}},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": rounds, "local_steps": 1,
                       "batch_size": batch_size, "lr": 0.1, "optimizer": "sgd", "eval_every": rounds},
        "attacks": [{"name": "gradient_inversion", **(attack or {})}],
        "tracking": {"enabled": False},
        "device": "cpu",
    }
    raw.update(extra)
    return raw


@pytest.fixture(scope="module")
def world(model_dir, tmp_path_factory):
    """One full-mode runtime; each test picks its batch size with ``observe``."""
    sc = load_scenario(scenario(model_dir))
    return build_runtime(sc, build_federated_data(sc), torch.device("cpu"), tmp_path_factory.mktemp("art"))


def first_batch(rt, client_id: int, rnd: int) -> list[list[int]]:
    """The client's FedSGD batch as the core draws it, each sequence without its appended end-of-text."""
    loader = rt.batcher.loader(rt.data.client_examples(client_id), seed=rt.seed_for(rnd, client_id))
    batch = next(iter(loader))
    seqs = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert all(s[-1] == rt.tokenizer.eos_token_id for s in seqs), "a sequence was truncated; shorten the data"
    return [s[:-1] for s in seqs]


def observe(rt, batch_size: int, client_id: int = 0, rnd: int = 1):
    """One client's FedSGD message from the initial global state, as the server receives it."""
    rt.scenario.federation.batch_size = batch_size
    rt.batcher = Batcher(rt.tokenizer, rt.scenario.data.seq_len, batch_size)
    global_state = rt.trainable.snapshot()
    ctx = ClientContext(client_id, rnd, rt.seed_for(rnd, client_id), rt)
    message, _ = client_round(ctx, global_state, HookChain([]))
    rt.trainable.load(global_state)
    grad = pseudo_gradient(message.payload, global_state, rt.scenario.federation, message.num_examples)
    return ModelView(rt, global_state), grad, first_batch(rt, client_id, rnd), global_state


OPTIONS = GradientInversionOptions(iterations=60, reorder_steps=5, time_budget_s=30)


def test_fedsgd_pseudo_gradient_is_the_batch_gradient(world):
    """-update/lr after one SGD step is the gradient of the batch loss (computed here by autograd)."""
    view, grad, truth, state = observe(world, 2)
    batch = Batcher(world.tokenizer, SEQ_LEN, 2).collate([Encoded(s + [world.tokenizer.eos_token_id], 0, False) for s in truth])
    params = {n: t.clone().requires_grad_(True) for n, t in state.items()}
    loss = torch.func.functional_call(world.model, params, args=(), kwargs=batch).loss
    reference = torch.autograd.grad(loss, list(params.values()))
    for name, ref in zip(params, reference):
        torch.testing.assert_close(grad[name].float(), ref, rtol=1e-3, atol=1e-5)


def test_token_leak_reads_the_exact_token_set_at_batch_1(world):
    view, grad, truth, _ = observe(world, 1)
    result = token_leak(view, grad, SEQ_LEN, OPTIONS)
    special = set(world.tokenizer.all_special_ids)
    leaked = {t for t in result.sequences[0] if t not in special}
    assert result.rank_condition and leaked == set(truth[0])
    # tied embeddings: rank = N positions with a loss (the output layer) + k distinct inputs
    assert result.rank == len(truth[0]) + len(set(truth[0]))
    figures, _, _ = metrics.score(world.tokenizer, truth, [sorted(leaked)])
    assert figures["token_precision"] == figures["token_recall"] == 1.0


@pytest.mark.parametrize("batch_size", [1, 2])
def test_span_check_is_exact_within_the_rank_condition(world, batch_size):
    view, grad, truth, _ = observe(world, batch_size)
    tokens_with_gradient = sum(len(s) for s in truth)  # every input but each sequence's closing end-of-text
    assert tokens_with_gradient < HIDDEN, "the premise: fewer batch tokens than the layer's width"
    result = span_check(view, grad, SEQ_LEN, OPTIONS)
    assert result.rank == tokens_with_gradient  # the gradient's rank is the number of inputs it sums
    assert result.rank_condition
    assert sorted(result.sequences) == sorted(truth)
    figures, true_text, guess_text = metrics.score(world.tokenizer, truth, result.sequences)
    assert figures["rouge1"] == figures["rouge2"] == figures["exact_match"] == 1.0 and true_text == guess_text


def test_span_check_reports_when_the_batch_outgrows_the_rank_condition(world):
    view, grad, truth, _ = observe(world, 4)
    assert sum(len(s) for s in truth) >= HIDDEN, "the premise: more batch tokens than the layer's width"
    result = span_check(view, grad, SEQ_LEN, OPTIONS)
    assert result.rank_condition is False and result.sequences == []
    assert token_leak(view, grad, SEQ_LEN, OPTIONS).rank_condition is False  # N + k >= d as well


def test_optimization_beats_the_random_token_baseline_at_batch_1(world):
    view, grad, truth, _ = observe(world, 1)
    tokens = [t for t in token_leak(view, grad, SEQ_LEN, OPTIONS).sequences[0]
              if t not in world.tokenizer.all_special_ids]
    result = optimization(view, grad, SEQ_LEN, OPTIONS, tokens, batch=1, seed=0)
    figures, _, _ = metrics.score(world.tokenizer, truth, result.sequences)
    baseline = metrics.random_baseline(world.tokenizer, truth, np.random.default_rng(0))
    print(f"optimization rouge1={figures['rouge1']:.3f} random-token baseline={baseline:.3f}")
    assert figures["rouge1"] >= 0.8 and figures["rouge1"] > baseline + 0.5


def test_dp_scale_noise_leaves_nothing_to_read(world):
    """DP-SGD's release, clip to C then add N(0, (sigma C)^2): the gradient turns full rank, every
    row non-zero; the span attack must say its condition failed, the token set must not survive."""
    view, grad, truth, _ = observe(world, 1)
    norm = torch.sqrt(sum((g**2).sum() for g in grad.values.values()))
    gen = torch.Generator().manual_seed(0)
    noisy = {n: g / norm + 1.0 * torch.randn(g.shape, generator=gen, dtype=g.dtype) for n, g in grad.values.items()}
    noisy = PseudoGradient(noisy, grad.scale)
    span = span_check(view, noisy, SEQ_LEN, OPTIONS)
    assert span.rank_condition is False and span.sequences == []
    leak = token_leak(view, noisy, SEQ_LEN, OPTIONS)
    figures, _, _ = metrics.score(world.tokenizer, truth, leak.sequences)
    assert leak.rank_condition is False and figures["token_precision"] < 0.5


def test_the_attack_leaves_the_model_as_found(world):
    view, grad, _, _ = observe(world, 1)
    before = {n: p.detach().clone() for n, p in world.model.named_parameters()}
    world.model.train()
    span_check(view, grad, SEQ_LEN, OPTIONS)
    optimization(view, grad, SEQ_LEN, OPTIONS.model_copy(update={"iterations": 2, "reorder_steps": 1}), None, 1, 0)
    assert world.model.training
    for name, p in world.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_several_local_steps_are_a_pseudo_gradient_over_every_batch_seen(world):
    """FedAvg with k local steps: the truth is every sequence of the k batches the core's loader gives,
    and the attack says its gradient is not exact."""
    fed = world.scenario.federation
    fed.local_steps, fed.batch_size = 2, 2
    world.batcher = Batcher(world.tokenizer, SEQ_LEN, 2)
    try:
        loader = world.batcher.loader(world.data.client_examples(1), seed=world.seed_for(3, 1))
        batches = [b for _, b in zip(range(2), loader)]
        expected = [ids[mask.bool()].tolist()[:-1] for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
        truth = trained_sequences(world, 3, 1)
        assert [s.ids for s in truth] == expected and all(all(s.is_response) for s in truth)  # a text is all response
        assert not exact_gradient(fed, [8]) and exact_gradient(fed.model_copy(update={"local_steps": 1}), [8])
    finally:
        fed.local_steps = 1


def test_unreadable_payloads_are_not_read(world):
    state = world.trainable.snapshot()
    assert not readable(Message(0, 4, b"ciphertext", 10), state)
    assert not readable(Message(0, 4, {"masked": torch.zeros(3)}, 10), state)
    assert readable(Message.of_update(0, 4, {n: torch.zeros_like(t) for n, t in state.items()}), state)


# --- end to end, through the plugin -----------------------------------------------


def test_fedsgd_run_logs_scores_and_the_side_by_side_table(model_dir, tmp_path):
    raw = scenario(model_dir, batch_size=2, attack={"method": "span_check"})
    raw["tracking"]["output_dir"] = str(tmp_path)
    result = fedsec_bench.run(raw)
    row = result.metrics.loc[1]
    assert row["inversion.attacked_clients"] == 2 and row["inversion.unreadable_clients"] == 0
    for name in ("rouge1", "rouge2", "rougeL", "token_precision", "token_recall", "exact_match"):
        assert row[f"inversion.{name}"] == row[f"inversion.{name}_max"] == 1.0
    table = pd.read_csv(result.run_dir / "artifacts" / "inversion_table.csv")
    assert table["client"].astype(str).tolist() == ["0", "1"]
    assert (table["true_text"] == table["reconstructed_text"]).all()
    assert not any(name in row for name in metrics.PART_FIGURES)  # plain text has no prompt part


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_dp_sgd_noise_not_clipping_stops_the_span_attack(model_dir, tmp_path, sigma):
    """Clipping alone rescales each example's gradient, leaving its span, so DAGER stays exact;
    Gaussian noise of sigma * C makes the gradient full rank and nothing is recovered."""
    dp = {"name": "dp_sgd", "noise_multiplier": sigma, "max_grad_norm": 1.0, "poisson_sampling": False}
    raw = scenario(model_dir, batch_size=2, attack={"method": "span_check"}, defenses=[dp])
    raw["tracking"]["output_dir"] = str(tmp_path)
    row = fedsec_bench.run(raw).metrics.loc[1]
    if sigma == 0.0:
        assert row["inversion.rank_condition"] == 1 and row["inversion.rouge1"] == 1.0
    else:
        assert row["inversion.rank_condition"] == 0
        assert row["inversion.rouge1_max"] <= row["inversion.baseline_rouge1"]


def test_masked_updates_are_counted_and_only_the_aggregate_is_attacked(model_dir, tmp_path):
    """Secure aggregation: no individual update, so no per-client score; the aggregate is what leaks."""
    raw = scenario(model_dir, attack={"method": "span_check"}, defenses=[{"name": "secure_aggregation"}])
    raw["tracking"]["output_dir"] = str(tmp_path)
    result = fedsec_bench.run(raw)
    row = result.metrics.loc[1]
    assert row["inversion.attacked_clients"] == 0 and row["inversion.unreadable_clients"] == 2
    assert "inversion.rouge1" not in result.metrics.columns
    # two batch-1 FedSGD clients sum to one batch-2 gradient, within the rank condition: the
    # aggregate gives both texts back exactly, only not who wrote which
    assert row["inversion.aggregate.rank_condition"] == 1 and row["inversion.aggregate.rouge1"] == 1.0
    table = pd.read_csv(result.run_dir / "artifacts" / "inversion_table.csv")
    assert list(table["client"]) == ["aggregate"]


def test_lora_exposes_a_rank_r_span_and_recovers_less(model_dir, tmp_path):
    """LoRA-A's gradient is B^T delta x^T: zero while B is zero (round 1), then of rank <= r < batch tokens."""
    raw = scenario(model_dir, mode="lora", rounds=2, attack={"method": "span_check"})
    raw["tracking"]["output_dir"] = str(tmp_path)
    result = fedsec_bench.run(raw)
    table = pd.read_csv(result.run_dir / "artifacts" / "inversion_table.csv")
    assert (table["rank"] <= 4).all() and (table.loc[table["round"] == 1, "rank"] == 0).all()
    assert (result.metrics.loc[[1, 2], "inversion.rank_condition"] == 0).all()
    assert (result.metrics.loc[[1, 2], "inversion.rouge1"] < 1.0).all()


def test_prompt_mode_refuses_layer_methods_and_optimization_recovers_less(model_dir, tmp_path):
    with pytest.raises(ScenarioError, match="use method=optimization"):
        load_scenario(scenario(model_dir, mode="prompt", attack={"method": "span_check"}))
    raw = scenario(model_dir, mode="prompt",
                   attack={"method": "optimization", "iterations": 40, "reorder_steps": 0, "max_clients_per_round": 1})
    raw["tracking"]["output_dir"] = str(tmp_path)
    row = fedsec_bench.run(raw).metrics.loc[1]
    print(f"prompt-mode optimization rouge1={row['inversion.rouge1']:.3f}")
    assert row["inversion.rouge1"] < 0.5  # full mode reaches >= 0.8 with this budget (test above)


# --- instruction data: the whole rendered sequence, scored by part -----------------

PROMPTED_LEN = 64
INSTRUCTION_DATA = {"format": "instruction", "examples_per_client": 8, "heldout_examples": 64,
                    "seq_len": PROMPTED_LEN, "canaries": {"count": 0}}


@pytest.fixture(scope="module")
def prompted_world(model_dir, tmp_path_factory):
    """A full-mode runtime on the synthetic instruction corpus; the loss is on response tokens only."""
    sc = load_scenario(scenario(model_dir, data=INSTRUCTION_DATA))
    return build_runtime(sc, build_federated_data(sc), torch.device("cpu"), tmp_path_factory.mktemp("art"))


def test_truth_marks_exactly_the_response_tokens_whatever_train_on_prompt_says(prompted_world):
    """The ground truth is the whole rendered record; its response mark is the response's own tokens
    (tokenized apart, as the batcher does), the rest the rendered prompt (its tail, if it was cut)."""
    rt = prompted_world
    observe(rt, 2)
    truth = trained_sequences(rt, 1, 0)
    records = {tuple(rt.batcher.tokens([e.response])[0]): rt.batcher.tokens([rt.batcher.renderer.render(e)])[0]
               for e in rt.data.client_examples(0)}
    assert len(truth) == 2
    for seq in truth:
        response = tuple(t for t, r in zip(seq.ids, seq.is_response) if r)
        prompt = [t for t, r in zip(seq.ids, seq.is_response) if not r]
        assert response in records and prompt and records[response][-len(prompt):] == prompt
        assert seq.is_response == sorted(seq.is_response)  # the prompt, then the response
    rt.batcher.train_on_prompt = True
    try:
        assert trained_sequences(rt, 1, 0) == truth
    finally:
        rt.batcher.train_on_prompt = False


def test_part_recalls_count_each_part_on_its_own_positions(prompted_world):
    observe(prompted_world, 2)
    truth = trained_sequences(prompted_world, 1, 0)
    prompt, response = metrics.part_tokens(truth, response=False), metrics.part_tokens(truth, response=True)
    assert prompt - response and response - prompt, "the premise: each part has tokens of its own"
    only_response = metrics.part_recalls(truth, [sorted(response)])
    assert only_response["response_token_recall"] == 1.0
    assert only_response["prompt_token_recall"] == len(prompt & response) / len(prompt) < 1.0
    only_prompt = metrics.part_recalls(truth, [sorted(prompt)])
    assert only_prompt["prompt_token_recall"] == 1.0
    assert only_prompt["response_token_recall"] == len(prompt & response) / len(response) < 1.0


def test_token_leak_reads_the_prompt_tokens_the_loss_masks_out(prompted_world):
    """Prompt tokens get no loss but are inputs: their embedding rows get a gradient all the same.
    Only the output layer's part shrinks, to the N positions that predict a response token."""
    rt = prompted_world
    view, grad, batch, _ = observe(rt, 1)
    truth = trained_sequences(rt, 1, 0)
    assert [s.ids for s in truth] == batch
    result = token_leak(view, grad, PROMPTED_LEN, OPTIONS)
    leaked = sorted(set(result.sequences[0]) - set(rt.tokenizer.all_special_ids))
    scored = sum(truth[0].is_response) + 1  # each response token and the end-of-text has a predicting position
    assert result.rank_condition and set(leaked) == set(truth[0].ids)
    assert result.rank == scored + len(set(truth[0].ids)) and scored < len(truth[0].ids)
    assert metrics.part_recalls(truth, [leaked]) == {"prompt_token_recall": 1.0, "response_token_recall": 1.0}


def test_fedsgd_run_on_instruction_data_scores_prompt_and_response(model_dir, tmp_path):
    """DAGER recovers the whole rendered sequence, prompt included, and the run says so by part."""
    raw = scenario(model_dir, batch_size=1, attack={"method": "span_check"}, data=INSTRUCTION_DATA,
                   eval={"generation_examples": 0})  # answers would run past the model's 64 positions
    raw["tracking"]["output_dir"] = str(tmp_path)
    row = fedsec_bench.run(raw).metrics.loc[1]
    print({name: row[f"inversion.{name}"] for name in ("rouge1", "exact_match", *metrics.PART_FIGURES)})
    assert row["inversion.attacked_clients"] == 2 and row["inversion.rank_condition"] == 1
    for name in ("rouge1", "exact_match", "prompt_token_recall", "response_token_recall"):
        assert row[f"inversion.{name}"] == row[f"inversion.{name}_max"] == 1.0


def test_options_are_checked_at_load_time(model_dir):
    with pytest.raises(ScenarioError, match=r"clients: \[7\]"):
        load_scenario(scenario(model_dir, attack={"clients": [7]}))
    with pytest.raises(ScenarioError, match=r"rounds: \[3\]"):
        load_scenario(scenario(model_dir, attack={"rounds": [3]}))
