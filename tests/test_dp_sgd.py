"""dp_sgd: per-example gradients against per-example backward passes, accounting, learning, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

import fedsec_bench
from fedsec_bench.client import make_optimizer
from fedsec_bench.data import build_federated_data
from fedsec_bench.errors import ScenarioError
from fedsec_bench.runtime import build_runtime
from fedsec_bench.plan import load_scenario
from fedsec_bench.defenses.accounting import Ledger
from fedsec_bench.defenses.dp_sgd import (
    GRAD_SAMPLE_MODE, ClientBudget, Mechanism, PrivateTraining, per_example_losses, sequence_losses,
)

MODES = ["full", "lora", "prompt"]


def tiny_runtime(tiny, tmp_path, arch, mode):
    tiny["model"]["arch"], tiny["tuning"]["mode"] = arch, mode
    scenario = load_scenario(tiny)
    rt = build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_path)
    for module in rt.model.modules():  # the per-example reference below must see the same computation
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return rt


def reference_gradients(model, batch, params):
    """One backward pass per example, alone and unpadded, through the model's own (PEFT) forward."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        ids, mask, labels = (batch[k][i : i + 1, :length] for k in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -length:]
        rows.append(torch.autograd.grad(sequence_losses(logits, labels).sum(), params))
    return [torch.stack(column) for column in zip(*rows)]


@pytest.mark.parametrize(
    ("arch", "mode", "functorch"),
    [(arch, mode, GRAD_SAMPLE_MODE[mode] == "functorch") for arch in ("gpt2", "llama") for mode in MODES]
    + [("llama", "lora", True)],  # the grad_sample_mode: functorch option
)
def test_per_example_gradients_match_microbatch_reference(tiny, tmp_path, arch, mode, functorch):
    rt = tiny_runtime(tiny, tmp_path, arch, mode)
    batch = rt.batcher.collate(rt.batcher.encode(rt.data.client_texts(0)[:3]))
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the batch must mix lengths (padding)"
    names, params = zip(*rt.trainable.params.items())
    expected = reference_gradients(rt.model, batch, list(params))
    wrapped = GradSampleModule(rt.model, loss_reduction="mean", strict=False, force_functorch=functorch)
    per_example_losses(rt.model, batch, mode).mean().backward()
    for name, p, ref in zip(names, params, expected):
        assert p.grad_sample.shape == ref.shape, name
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-6, msg=name)
    wrapped.cleanup()
    if arch == "gpt2" and mode == "full":  # tied embedding: one parameter, both uses' gradients
        assert rt.model.lm_head.weight is rt.model.transformer.wte.weight


def private_training(rt, steps, sample_rate, sigma=1.0):
    texts = rt.data.client_texts(0)
    return PrivateTraining(
        model=rt.model, optimizer=make_optimizer(list(rt.trainable.params.values()), rt.scenario.federation),
        loader=rt.batcher.loader(texts, seed=0), steps=steps, device=rt.device, tuning_mode="lora",
        mechanism=Mechanism(len(texts), sample_rate, sigma), generator=torch.Generator().manual_seed(0),
    )


def test_private_training_leaves_the_shared_model_plain(tiny, tmp_path):
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "lora")
    training = private_training(rt, steps=3, sample_rate=0.25)
    before = rt.trainable.snapshot()
    training.run()
    assert any(not torch.equal(before[n], p) for n, p in rt.trainable.params.items()), "it trained"
    for module in rt.model.modules():
        assert not module._forward_hooks and not module._backward_hooks, type(module).__name__
        assert not hasattr(module, "activations")
    for p in rt.model.parameters():
        assert not any(hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter")) and p.grad is None


def test_poisson_batches_have_binomial_sizes_and_empty_ones_are_noise_only_steps(tiny, tmp_path):
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "lora")
    training = private_training(rt, steps=400, sample_rate=0.25)
    sizes = torch.tensor([b["input_ids"].shape[0] for b in training.batches()], dtype=torch.float)
    assert sizes.numel() == 400
    assert abs(sizes.mean().item() - 0.25 * training.mechanism.examples) < 0.3  # Binomial(n, q) has mean n·q
    sparse = private_training(rt, steps=3, sample_rate=0.01)  # almost every batch is empty
    assert sum(b["input_ids"].shape[0] for b in sparse.batches()) == 0
    before = rt.trainable.snapshot()
    sparse.run()  # an empty Poisson batch is still a step of the mechanism: noise (and accounted, below)
    assert any(not torch.equal(before[n], p) for n, p in rt.trainable.params.items())


def test_the_ledger_composes_each_reported_step_of_the_mechanism():
    mechanism = Mechanism(examples=64, sample_rate=0.25, noise_multiplier=1.0)
    budget = ClientBudget(mechanism, Ledger())
    budget.spend(mechanism, 3)
    budget.spend(mechanism, 2)
    assert budget.ledger.steps == 5 and budget.ledger.accountant.history == [(1.0, 0.25, 5)]
    at_once = RDPAccountant()
    at_once.history = [(1.0, 0.25, 5)]
    assert budget.ledger.epsilon(1e-5) == pytest.approx(at_once.get_epsilon(delta=1e-5))


def dp_run(tiny, mode="lora", arch="gpt2", optimizer="sgd", lr=4.0, **options):
    """Two rounds of three DP-SGD steps at expected batch 32 of 64 examples (q = 1/2): tiny, yet the
    noise σC/32 is small enough next to the clipped mean gradient for learning to show."""
    tiny["model"]["arch"], tiny["tuning"]["mode"] = arch, mode
    tiny["data"]["examples_per_client"] = 64
    tiny["federation"].update(rounds=2, local_steps=3, batch_size=32, optimizer=optimizer, lr=lr)
    tiny["defenses"] = [{"name": "dp_sgd", "max_grad_norm": 1.0, **options}]
    return fedsec_bench.run(tiny)


def test_noise_lowers_utility_moderate_noise_still_learns_and_epsilon_grows(tiny):
    finals = {}
    for sigma in (0.0, 1.5, 8.0):
        result = dp_run(tiny, noise_multiplier=sigma)
        loss, eps = result.metrics["utility.eval_loss"], result.metrics["privacy.epsilon"]
        finals[sigma] = loss.iloc[-1]
        if sigma == 0.0:
            assert (eps.iloc[1:] == math.inf).all()  # clipping only: no guarantee, reported, not a crash
        if sigma == 1.5:
            assert loss.iloc[2] < loss.iloc[1] < loss.iloc[0], "DP-SGD on LoRA must still learn at moderate noise"
            assert 0 < eps.iloc[1] < eps.iloc[2] < math.inf
            table = pd.read_csv(result.run_dir / "artifacts" / "dp_sgd_epsilon.csv")
            assert table["epsilon"].max() == pytest.approx(eps.iloc[-1])
            assert (table["noise_multiplier"] == sigma).all()
            assert result.final["privacy.delta"] == pytest.approx(1 / (2 * 4 * 64), rel=0.1)  # 1/(2N), N ≈ 4·64
    assert finals[0.0] < finals[1.5] < finals[8.0]


@pytest.mark.parametrize(
    ("mode", "arch", "optimizer", "lr", "options"),
    [
        # every client trains every round (the calibration's worst case), so the largest ε meets the target
        ("full", "llama", "sgd", 1.0, {"target_epsilon": 3.0, "delta": 1e-3}),
        # prompt gradients are tiny: C near their norm (else the noise σC/B drowns them), Adam's scale-free step
        ("prompt", "gpt2", "adamw", 0.1, {"noise_multiplier": 0.7, "max_grad_norm": 0.01}),
    ],
)
def test_full_and_prompt_tuning_learn_under_moderate_noise(tiny, mode, arch, optimizer, lr, options):
    tiny["federation"].update(num_clients=2, clients_per_round=2)
    result = dp_run(tiny, mode, arch, optimizer, lr, **options)
    loss, eps = result.metrics["utility.eval_loss"], result.metrics["privacy.epsilon"]
    assert loss.iloc[2] < loss.iloc[1] < loss.iloc[0]
    assert 0 < eps.iloc[1] < eps.iloc[2]
    if "target_epsilon" in options:
        assert 2.9 < eps.iloc[2] <= 3.0 + 1e-9  # Opacus' search stops within 0.01 below the target


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"defenses\[0\]\.delta: .*less than 1"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, r"max_grad_norm: .*greater than 0"),
        ({"noise_multiplier": -0.5}, r"noise_multiplier: .*greater than or equal to 0"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of noise_multiplier"),
        ({}, "exactly one of noise_multiplier"),
        ({"target_epsilon": 1e-4, "delta": 1e-9}, "unreachable"),
    ],
)
def test_impossible_settings_are_refused_at_load_time(tiny, options, message):
    tiny["defenses"] = [{"name": "dp_sgd", **options}]
    with pytest.raises(ScenarioError, match=message):
        load_scenario(tiny)


def test_ready_scenario_loads():
    scenario = load_scenario(Path(__file__).parents[1] / "scenarios" / "dp_sgd.yaml")
    assert [d.name for d in scenario.defenses] == ["dp_sgd"]
