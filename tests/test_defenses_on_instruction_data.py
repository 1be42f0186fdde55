"""Every defense on prompt/response data (``data.format: instruction``): what its own tests establish still
holds, each time against theory (per-example backward passes, the accountant of dp-accounting, FedAvg of
the plain updates, numpy's order statistics), never against the defense's own figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from test_dp_fedavg import library_epsilon
from test_dp_sgd import reference_gradients, tiny_runtime
from test_he_aggregation import CKKS_TOLERANCE
from test_robust_rules import ref_krum_scores

import fedsec_bench
from fedsec_bench.aggregation import FedAvg, fedavg
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.batching import IGNORE_INDEX
from fedsec_bench.defenses.dp_sgd import per_example_losses, release
from fedsec_bench.executors import LocalExecutor
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext
from fedsec_bench.plan import load_plan, load_scenario
from fedsec_bench.plugins import HookChain, Options
from fedsec_bench.registry import entry_points_by_name, load_plugin
from fedsec_bench.runtime import build_runtime
from fedsec_bench.updates import flatten

INSTRUCTION = {"format": "instruction", "seq_len": 48}


def on_instructions(tiny: dict) -> dict:
    """The synthetic instruction corpus, with a BPE vocabulary of 1024 so that a pair fits in 48 tokens
    whole (with the tiny scenario's 300, every pair loses the start of its prompt)."""
    tiny["data"].update(INSTRUCTION)
    tiny["model"]["tokenizer"]["vocab_size"] = 1024
    return tiny


def test_every_built_in_defense_and_aggregator_says_what_it_does_with_pairs():
    """``fedsec list`` shows each one's ``on_instruction_data``; a built-in one without it is a gap."""
    built_in = [name for name, ep in entry_points_by_name().items() if ep.value.startswith("fedsec_bench.defenses.")]
    classes = [load_plugin(name) for name in built_in] + [FedAvg]
    assert len(classes) > 10 and not [cls.name for cls in classes if not cls.on_instruction_data]


# --------------------------------------------------------------------------- dp_sgd: one record = one pair


def assert_only_responses_are_labelled(tokenizer, examples, batch) -> None:
    """The loss is on each pair's response tokens (its own tokenization + EOS, at the end), never on its prompt."""
    for row, example in enumerate(examples):
        response = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row, :length]
        assert length > len(response), "the pair has prompt tokens"
        assert labels[: length - len(response)].eq(IGNORE_INDEX).all()
        assert labels[length - len(response) :].tolist() == response


def opacus_gradients(rt, batch, mode) -> list[torch.Tensor]:
    """Opacus' per-example gradients of dp_sgd's loss on ``batch``; the model is left plain."""
    params = list(rt.trainable.params.values())
    wrapped = GradSampleModule(rt.model, loss_reduction="mean", strict=False)
    per_example_losses(rt.model, batch, mode).mean().backward()
    grads = [p.grad_sample.clone() for p in params]
    wrapped.cleanup()
    release(rt.model, params)
    return grads


def instruction_batch(rt, count=3):
    """Client 0's first pairs, whole and of mixed lengths (so padding is in the batch)."""
    examples = rt.data.client_examples(0)[:count]
    encoded = rt.batcher.encode(examples)
    assert all(e.is_prompted for e in examples) and not any(e.truncated for e in encoded)
    assert len({len(e.ids) for e in encoded}) > 1
    return examples, rt.batcher.collate(encoded)


@pytest.mark.parametrize(("arch", "mode"), [("gpt2", "lora"), ("llama", "full"), ("gpt2", "prompt")])
def test_dp_sgd_clips_each_pairs_response_loss_gradient(tiny, tmp_path, arch, mode):
    """Opacus' per-example gradient is the backward pass of each pair alone (mean loss over its response
    tokens); with C the median per-pair norm, the step is Σ_i g_i·min(1, C/‖g_i‖) / B, each term ≤ C."""
    rt = tiny_runtime(on_instructions(tiny), tmp_path, arch, mode)
    examples, batch = instruction_batch(rt)
    assert_only_responses_are_labelled(rt.tokenizer, examples, batch)
    params = list(rt.trainable.params.values())
    expected = reference_gradients(rt.model, batch, params)
    for got, ref in zip(opacus_gradients(rt, batch, mode), expected):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)

    norms = torch.cat([g.flatten(1) for g in expected], dim=1).norm(dim=1)  # over every parameter at once
    clip = norms.median().item()
    factors = (clip / norms).clamp(max=1.0)
    assert (factors * norms <= clip * (1 + 1e-6)).all() and (factors < 1).any() and (factors == 1).any()
    wrapped = GradSampleModule(rt.model, loss_reduction="mean", strict=False)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=len(examples), loss_reduction="mean")
    per_example_losses(rt.model, batch, mode).mean().backward()
    optimizer.pre_step()  # clip per example, add N(0, 0), divide by the expected batch size
    for p, ref in zip(params, expected):
        theory = (ref * factors.view(-1, *[1] * (ref.dim() - 1))).sum(0) / len(examples)
        torch.testing.assert_close(p.grad, theory, rtol=1e-4, atol=1e-7)
    wrapped.cleanup()


def test_dp_sgd_a_prompt_token_moves_only_its_own_pairs_gradient(tiny, tmp_path):
    """The prompt carries no loss but is the context of the response: changing one of its tokens moves that
    pair's gradient, and no other pair's (the privacy unit is the pair, prompt included)."""
    rt = tiny_runtime(on_instructions(tiny), tmp_path, "gpt2", "lora")
    _, batch = instruction_batch(rt)
    changed = {k: v.clone() for k, v in batch.items()}
    prompt_tokens = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    position = prompt_tokens // 2  # inside the instruction's own words, between the template's markers
    changed["input_ids"][0, position] = (changed["input_ids"][0, position] + 1) % len(rt.tokenizer)
    before, after = opacus_gradients(rt, batch, "lora"), opacus_gradients(rt, changed, "lora")
    first = [torch.cat([g[0].flatten() for g in grads]) for grads in (before, after)]
    assert (first[1] - first[0]).norm() > 1e-3 * first[0].norm()
    for a, b in zip(after, before):
        torch.testing.assert_close(a[1:], b[1:], rtol=1e-6, atol=1e-9)


def test_dp_sgd_end_to_end_on_instruction_data_spends_what_the_accountant_says(tiny):
    """Both clients train both rounds: ε is the largest client's Poisson-subsampled Gaussian, q = B/n_c,
    composed over 2 × 2 steps at δ = 1/(2N), as dp-accounting computes it."""
    on_instructions(tiny)["federation"].update(num_clients=2, clients_per_round=2)
    tiny["defenses"] = [{"name": "dp_sgd", "noise_multiplier": 1.0}]
    data = build_federated_data(load_scenario(tiny))
    sizes = [data.num_examples(c) for c in range(data.num_clients)]
    fed = tiny["federation"]
    steps, delta = fed["rounds"] * fed["local_steps"], 1 / (2 * sum(sizes))
    final = fedsec_bench.run(tiny).final
    expected = max(library_epsilon(fed["batch_size"] / n, 1.0, steps, delta) for n in sizes)
    assert final["privacy.epsilon"] == pytest.approx(expected, rel=0.01)
    assert final["privacy.delta"] == pytest.approx(delta)
    assert math.isfinite(final["utility.rougeL"])  # the instruction workload's own figure, logged beside it


# --------------------------------------------------------------------------- transport and aggregation defenses


def instruction_runtime(tiny, tmp_path, **federation):
    """The driver's runtime and plan of a scenario on instruction data in which every client takes part."""
    on_instructions(tiny)["federation"].update(clients_per_round=tiny["federation"]["num_clients"], **federation)
    plan = load_plan(tiny)
    return build_runtime(plan.scenario, build_federated_data(plan.scenario), torch.device("cpu"), tmp_path), plan


def train_round(rt, hooks) -> tuple[list[Message], RoundContext, RoundTruth]:
    """Round 1's local training of every client through ``hooks``, as the local executor runs it: what the
    server receives, the round as it knows it, and the simulator's truth of it."""
    round = RoundContext(1, rt, list(range(rt.data.num_clients)), rt.trainable.snapshot())
    messages, reports = zip(*LocalExecutor(hooks).run_clients(round))
    round.delivered = [m.client_id for m in messages]
    return list(messages), round, RoundTruth(list(reports))


def plain_messages(round) -> list[Message]:
    """The same clients' training in the same round without any plugin but FedAvg: from the same global
    state with the same seeds, so the same updates, as sent in the clear."""
    messages, _ = zip(*LocalExecutor(HookChain([FedAvg(Options(), round.runtime)])).run_clients(round))
    return list(messages)


def server_aggregate(hooks, round, messages):
    """The server's side of the round loop: the aggregating plugin, then every post-aggregation step."""
    return flatten(hooks.post_aggregation(round, hooks.aggregation(round, messages)))


def clipped_mean(messages, clip, weighted):
    """Σ w_k Δ_k·min(1, S/‖Δ_k‖) with FedAvg's example weights, or equal ones."""
    weights = torch.tensor([float(m.num_examples) if weighted else 1.0 for m in messages])
    rows = torch.stack([flatten(m.payload) for m in messages])
    return (rows * (clip / rows.norm(dim=1)).clamp(max=1.0)[:, None] * (weights / weights.sum())[:, None]).sum(0)


def plain_fedavg(messages, like):
    return flatten(fedavg(messages, like))


CLIP = 0.2
"""Below every LoRA update's norm of this round (0.32, AdamW's two steps of about lr per coordinate): each
update is cut to S, so the aggregate is that of the clipped updates (norm 0.15, plain FedAvg's 0.23)."""

TRANSPORTS = {
    # defense entry: (federation fields it needs, the aggregate in theory from the plain messages, tolerance)
    "he_aggregation": ({}, plain_fedavg, CKKS_TOLERANCE),
    # fixed point: |U| · 2^-(32+1) / Σ n_k with Σ n_k ≥ 3 · 16, plus float32 rounding
    "secure_aggregation": ({}, plain_fedavg, 3 * 2.0**-33 / 48 + 1e-8),
    # noise 0 and q = 1: the clipped sum over q·N = N, i.e. the clipped mean with equal user weights
    "dp_fedavg": ({"sampling": "poisson"}, lambda plain, like: clipped_mean(plain, CLIP, weighted=False), 1e-7),
    "norm_clip": ({}, lambda plain, like: clipped_mean(plain, CLIP, weighted=True), 1e-7),
}
OPTIONS = {"dp_fedavg": {"noise_multiplier": 0.0, "clip_norm": CLIP}, "norm_clip": {"max_norm": CLIP}}


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_transport_defenses_aggregate_the_plain_fedavg_of_instruction_updates(tiny, tmp_path, name):
    """Three clients of unequal sizes train one round on pairs; what the server ends up with is the theory's
    aggregate of their plain updates, to the mechanism's own error."""
    federation, theory, tolerance = TRANSPORTS[name]
    tiny["federation"].update(num_clients=3, **federation)
    tiny["defenses"] = [{"name": name, **OPTIONS.get(name, {})}]
    rt, plan = instruction_runtime(tiny, tmp_path)
    hooks = plan.hook_chain(rt)
    messages, round, _ = train_round(rt, hooks)
    plain = plain_messages(round)
    assert all(flatten(m.payload).norm() > CLIP for m in plain)
    assert len({m.num_examples for m in plain}) > 1, "unequal example counts: the weighting shows"
    error = (server_aggregate(hooks, round, messages) - theory(plain, round.global_state)).abs().max().item()
    assert error < tolerance, (name, error)


# --------------------------------------------------------------------------- robust rules under sign flip

FLIPPERS = [0, 1, 2]
RULES = {
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim": 0.3},
    "krum": {"name": "krum", "f": 3},
    "multikrum": {"name": "multikrum", "f": 3, "m": 4},
    "bulyan": {"name": "bulyan", "f": 1},
}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def test_robust_rules_keep_the_honest_direction_on_instruction_updates(tiny, tmp_path):
    """3 of 10 clients send −8Δ: FedAvg's aggregate turns against the honest mean (7 − 3·8 < 0; cosine
    −0.36), every rule's stays with it (cosine 0.67 for Krum to 0.96) and excludes or down-weights every
    flipper. Krum returns one honest update exactly, the one of lowest score by the paper's definition; the
    median is numpy's."""
    tiny["federation"].update(num_clients=10)
    tiny["attacks"] = [{"name": "sign_flip", "clients": FLIPPERS, "scale": 8.0}]
    rt, plan = instruction_runtime(tiny, tmp_path)
    messages, round, truth = train_round(rt, plan.hook_chain(rt))
    honest = torch.stack([flatten(m.payload) for m in plain_messages(round)[len(FLIPPERS):]]).mean(0)
    assert cosine(flatten(fedavg(messages, round.global_state)), honest) < 0
    X = torch.stack([flatten(m.payload) for m in messages])
    for name, entry in RULES.items():
        tiny["federation"]["aggregator"] = entry
        hooks = load_plan(tiny).hook_chain(rt)
        aggregate = server_aggregate(hooks, round, messages)
        assert cosine(aggregate, honest) > 0.5, name
        assert hooks.score_round(round, truth, {})["robust.exclusion_recall"] == 1.0, name
        if name == "krum":
            scores = ref_krum_scores(X.double().tolist(), f=3)
            assert torch.equal(aggregate, X[int(np.argmin(scores))]) and np.argmin(scores) not in FLIPPERS
        if name == "median":
            np.testing.assert_allclose(aggregate.numpy(), np.median(X.numpy(), axis=0), rtol=0, atol=0)
