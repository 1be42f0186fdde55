"""dp_sgd: per-example gradients against per-example backward passes, accounting, learning, refusals."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

import fedsec_bench
from fedsec_bench.cli import main as fedsec
from fedsec_bench.client import make_optimizer
from fedsec_bench.data import build_federated_data
from fedsec_bench.errors import ScenarioError
from fedsec_bench.ground_truth import ClientReport, RoundTruth
from fedsec_bench.runtime import build_runtime
from fedsec_bench.plan import load_plan, load_scenario
from fedsec_bench.defenses.accounting import ClientLedgers, report_runs
from fedsec_bench.defenses.dp_sgd import (
    GRAD_SAMPLE_MODE, DPSGD, DPSGDOptions, Mechanism, PrivateTraining, per_example_losses,
    sequence_losses,
)

MODES = ["full", "lora", "prompt"]
CLIPPINGS = ["flat", "ghost", "per_layer"]
TUNINGS = [("gpt2", "lora"), ("gpt2", "prompt"), ("llama", "full"), ("gpt2", "full")]


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
    batch = rt.batcher.collate(rt.batcher.encode(rt.data.client_examples(0)[:3]))
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the batch must mix lengths (padding)"
    names, params = zip(*rt.trainable.params.items())
    expected = reference_gradients(rt.model, batch, list(params))
    wrapped = GradSampleModule(rt.model, loss_reduction="mean", strict=False, force_functorch=functorch)
    per_example_losses(rt.model, batch, mode).mean().backward()
    for name, p, ref in zip(names, params, expected):
        assert p.grad_sample.shape == ref.shape, name
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    wrapped.cleanup()
    if arch == "gpt2" and mode == "full":  # tied embedding: one parameter, both uses' gradients
        assert rt.model.lm_head.weight is rt.model.transformer.wte.weight


def private_training(rt, steps, sample_rate, sigma=1.0, mode="lora", clipping="flat", max_grad_norm=1.0,
                     optimizer=None):
    examples = rt.data.client_examples(0)
    params = list(rt.trainable.params.values())
    return PrivateTraining(
        model=rt.model, optimizer=optimizer or make_optimizer(params, rt.scenario.federation),
        loader=rt.batcher.loader(examples, seed=0), steps=steps, device=rt.device, tuning_mode=mode,
        mechanism=Mechanism(len(examples), sample_rate, sigma), max_grad_norm=max_grad_norm, clipping=clipping,
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize(("mode", "clipping"), [("lora", c) for c in CLIPPINGS] + [("prompt", "ghost")])
def test_private_training_leaves_the_shared_model_plain(tiny, tmp_path, mode, clipping):
    rt = tiny_runtime(tiny, tmp_path, "gpt2", mode)
    training = private_training(rt, steps=3, sample_rate=0.25, mode=mode, clipping=clipping)
    before = rt.trainable.snapshot()
    training.run()
    assert any(not torch.equal(before[n], p) for n, p in rt.trainable.params.items()), "it trained"
    for module in rt.model.modules():
        assert not module._forward_hooks and not module._backward_hooks, type(module).__name__
        assert not module._forward_pre_hooks, type(module).__name__
        assert not hasattr(module, "activations")
    for p in rt.model.parameters():
        opacus_attributes = ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample")
        assert not any(hasattr(p, a) for a in opacus_attributes) and p.grad is None


class GradientRecorder(torch.optim.Optimizer):
    """The optimizer under DP-SGD's: keeps the gradient it is handed (the noised, averaged clipped sum) and
    leaves the parameters alone."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]


STABILISER = 1e-6
"""Opacus clips by min(1, C/(‖g‖ + 1e-6)) in every mode: a factor a hair below min(1, C/‖g‖), still a bound,
and visible on prompt tuning's tiny gradients (norms near 1e-4)."""


def clipped_sum(per_example: list[torch.Tensor], clipping: str, max_grad_norm: float
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ_i clip(g_i) from each example's own gradient, by the definition of the clipping mode (flat and ghost:
    the whole vector to C; per_layer: each of the L tensors to C/√L), and every clipping factor."""
    if clipping == "per_layer":
        bound = max_grad_norm / math.sqrt(len(per_example))
        factors = [(bound / (g.flatten(1).norm(dim=1) + STABILISER)).clamp(max=1.0) for g in per_example]
    else:
        total = torch.stack([g.flatten(1).norm(dim=1) for g in per_example]).norm(dim=0)
        factors = [(max_grad_norm / (total + STABILISER)).clamp(max=1.0)] * len(per_example)
    sums = [torch.einsum("i,i...->...", f, g) for f, g in zip(factors, per_example)]
    return sums, torch.stack(factors)


@pytest.mark.parametrize(
    ("arch", "mode", "clipping"),
    [(arch, mode, clipping) for arch, mode in TUNINGS for clipping in CLIPPINGS
     if (arch, mode, clipping) != ("gpt2", "full", "ghost")],  # refused, see below
)
def test_a_noiseless_step_sums_each_examples_own_gradient_clipped_the_modes_way(tiny, tmp_path, arch, mode, clipping):
    """σ = 0: the gradient DP-SGD steps with is Σ_i clip(g_i) / (q·n), with g_i from a backward pass of example i
    alone. Ghost clipping computes flat clipping differently, so it must meet the same flat reference.
    Llama's RMSNorm (full) has no Opacus norm sampler: ghost falls back to its per-example gradients."""
    rt = tiny_runtime(tiny, tmp_path, arch, mode)
    params = list(rt.trainable.params.values())
    batch = next(private_training(rt, steps=1, sample_rate=0.5, mode=mode).batches())  # the run's batch: same seed
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the batch must mix lengths (padding)"
    per_example = reference_gradients(rt.model, batch, params)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_example]).norm(dim=0)
    max_grad_norm = norms.median().item()  # clips about half of the examples, leaves the others whole
    expected, factors = clipped_sum(per_example, clipping, max_grad_norm)
    assert (factors < 1).any() and (factors == 1).any(), "the bound must clip some gradients and not others"
    recorder = GradientRecorder(params)
    training = private_training(rt, steps=1, sample_rate=0.5, sigma=0.0, mode=mode, clipping=clipping,
                                max_grad_norm=max_grad_norm, optimizer=recorder)
    training.run()
    expected_batch = round(0.5 * training.mechanism.examples)
    for name, step, clipped in zip(rt.trainable.params, recorder.grads, expected):
        scale = clipped.abs().max().item()  # float32 rounding of sums that cancel: tolerance relative to the tensor
        torch.testing.assert_close(step * expected_batch, clipped, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")


def test_ghost_clipping_of_a_tied_embedding_is_refused_where_opacus_cannot_do_it(tiny, tmp_path):
    """A built GPT-2 ties wte and lm_head: Opacus' ghost clipping raises on it, so loading refuses it (and
    the plugin refuses it on a loaded model it finds tied); flat clipping sums both uses' gradients."""
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "full")
    with pytest.raises(NotImplementedError, match="Parameter tying"):
        private_training(rt, steps=1, sample_rate=0.5, mode="full", clipping="ghost").run()
    refusal = r"dp_sgd\.clipping to flat or per_layer"
    with pytest.raises(ValueError, match=refusal):  # a loaded tied model, refused before any run is recorded
        DPSGD.check_model(DPSGDOptions(noise_multiplier=1.0, clipping="ghost"), rt.scenario, rt.model)
    tiny["defenses"] = [{"name": "dp_sgd", "noise_multiplier": 1.0, "clipping": "ghost"}]
    with pytest.raises(ScenarioError, match=r"defenses\[0\].*clipping: ghost cannot clip GPT-2's tied .*" + refusal):
        load_scenario(tiny)
    tiny["model"]["arch"] = "llama"  # untied: loads
    assert [d.name for d in load_scenario(tiny).defenses] == ["dp_sgd"]


def test_ghost_clipping_of_a_loaded_tied_checkpoint_is_refused_before_the_run_is_recorded(tiny, tmp_path, capsys,
                                                                                       pretrained_tiny):
    """Only loading tells that a checkpoint ties its embeddings: the refusal comes then, before MLflow holds a run."""
    from fedsec_bench.cli import main

    tiny["model"] = {"name_or_path": pretrained_tiny}
    tiny["tuning"] = {"mode": "full"}
    tiny["defenses"] = [{"name": "dp_sgd", "noise_multiplier": 1.0, "clipping": "ghost"}]
    tiny["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": str(tmp_path / "runs")}
    path = tmp_path / "tied.yaml"
    path.write_text(yaml.safe_dump(tiny))
    for command in ("validate", "run"):
        assert main([command, str(path)]) == 2
        assert "defenses[0]" in (err := capsys.readouterr().err) and "dp_sgd.clipping to flat or per_layer" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))
    assert not (tmp_path / "mlflow.db").exists()  # nothing recorded, not even an experiment


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_a_private_step_prints_no_backward_hook_warning(tiny, tmp_path, clipping):
    """torch warns, every step, that Opacus' hooks meet a first layer whose input needs no gradient: expected,
    so silenced where it happens (a warning per round would break the progress bar, in the API and workers too)."""
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "lora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        private_training(rt, steps=2, sample_rate=0.5, clipping=clipping).run()
    assert not [w for w in caught if "backward hook" in str(w.message)]


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_every_clipping_mode_noises_at_sigma_times_c_the_sensitivity_of_flat_clipping(tiny, tmp_path, clipping):
    """Per-layer bounds C_l = C/√L give √(Σ C_l²) = C: Opacus' noise std (σ · its max_grad_norm) is σC in
    every mode."""
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "lora")
    training = private_training(rt, steps=1, sample_rate=0.25, sigma=1.3, clipping=clipping, max_grad_norm=0.7)
    wrapped, optimizer = training.wrap()
    wrapped.cleanup()
    assert optimizer.noise_multiplier * optimizer.max_grad_norm == pytest.approx(1.3 * 0.7)
    if clipping == "per_layer":
        bounds = torch.tensor(optimizer.max_grad_norms)
        assert len(bounds) == len(rt.trainable.params) > 1 and bounds.norm().item() == pytest.approx(0.7)


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


@pytest.mark.parametrize("clipping", ["ghost", "per_layer"])
def test_an_empty_batch_is_a_noise_only_step_in_the_other_clipping_modes(tiny, tmp_path, clipping):
    rt = tiny_runtime(tiny, tmp_path, "gpt2", "lora")
    sparse = private_training(rt, steps=3, sample_rate=0.01, clipping=clipping)
    assert sum(b["input_ids"].shape[0] for b in sparse.batches()) == 0
    before = rt.trainable.snapshot()
    sparse.run()
    assert all(not torch.equal(before[n], p) for n, p in rt.trainable.params.items()), "noise moves every parameter"


def test_one_round_in_each_clipping_mode_trains_and_spends_the_same_epsilon(tiny):
    """The mechanism, hence the ledger, is the clipping's business only through the sensitivity C, the same
    in every mode: equal ε at equal σ; each mode's run learns a little and stays finite."""
    results = {c: dp_run(tiny, rounds=1, noise_multiplier=1.0, clipping=c) for c in CLIPPINGS}
    epsilons = {c: r.final["privacy.epsilon"] for c, r in results.items()}
    assert 0 < epsilons["flat"] < math.inf and epsilons["ghost"] == epsilons["per_layer"] == epsilons["flat"]
    for clipping, result in results.items():
        loss = result.metrics["utility.eval_loss"]
        assert loss.iloc[-1] < loss.iloc[0], clipping


def test_the_ledger_composes_each_reported_step_of_the_mechanism():
    budgets = ClientLedgers("dp_sgd")
    for steps in (3, 2):
        metrics: dict[str, float] = {}
        report_runs(metrics, "dp_sgd", noise_multiplier=1.0, sample_rate=0.25, steps=steps)
        budgets.record(RoundTruth([ClientReport(7, 64, 0.0, steps, metrics)]))
    ledger = budgets[7]
    assert ledger.steps == 5 and ledger.accountant.history == [(1.0, 0.25, 5)]
    at_once = RDPAccountant()
    at_once.history = [(1.0, 0.25, 5)]
    assert ledger.epsilon(1e-5) == pytest.approx(at_once.get_epsilon(delta=1e-5))


def dp_run(tiny, mode="lora", arch="gpt2", optimizer="sgd", lr=4.0, examples=64, batch=32, rounds=2, **options):
    """``rounds`` (two) of three DP-SGD steps at expected batch ``batch`` of ``examples`` per client (q = 1/2 by
    default): tiny, yet the noise σC/batch is small enough next to the clipped mean gradient for learning to show."""
    tiny["model"]["arch"], tiny["tuning"]["mode"] = arch, mode
    tiny["data"]["examples_per_client"] = examples
    tiny["federation"].update(rounds=rounds, local_steps=3, batch_size=batch, optimizer=optimizer, lr=lr)
    tiny["defenses"] = [{"name": "dp_sgd", "max_grad_norm": 1.0, **options}]
    return fedsec_bench.run(tiny)


def test_noise_lowers_utility_moderate_noise_still_learns_and_epsilon_grows(tiny):
    """LoRA on a random base learns slowly, so the noise per coordinate σC/B is kept low with B = 64 (of
    128, q = 1/2) and SGD's step large: seeds 0-3 all keep the orderings below, at round-to-round margins
    of about 0.001 nats for σ = 1.5."""
    finals = {}
    for sigma in (0.0, 1.5, 8.0):
        result = dp_run(tiny, lr=8.0, examples=128, batch=64, noise_multiplier=sigma)
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
            assert result.final["privacy.delta"] == pytest.approx(1 / (2 * 4 * 128), rel=0.1)  # 1/(2N), N ≈ 4·128
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
    ],
)
def test_impossible_settings_are_refused_at_load_time(tiny, options, message):
    tiny["defenses"] = [{"name": "dp_sgd", **options}]
    with pytest.raises(ScenarioError, match=message):
        load_scenario(tiny)


UNREACHABLE = {"target_epsilon": 1e-4, "delta": 1e-9}
"""Below what any σ reaches: at RDP's largest order α = 1024, converting to (ε, δ) alone costs
(log(1/δ) − log α)/(α − 1) ≈ 0.013, whatever the noise."""


def unreachable_at(steps: int, rate: float) -> str:
    """The refusal for UNREACHABLE at one client's (steps, sample rate): Opacus' search, the size it used."""
    return rf"defenses\[0\] \(dp_sgd\): target_epsilon=0.0001 is unreachable in {steps} steps at sample rate {rate:.3g} "


def test_an_unreachable_target_epsilon_is_refused_on_the_built_data_before_any_run(tiny, tmp_path):
    """Loading cannot know the clients' sizes; Plan.check_data (run, sweep, validate) sees the built data."""
    tiny["defenses"] = [{"name": "dp_sgd", **UNREACHABLE}]
    plan = load_plan(tiny)
    fed = tiny["federation"]  # 16 examples a client (canaries add to some): q = 4/16, 2 steps × 2 rounds
    refusal = unreachable_at(fed["local_steps"] * fed["rounds"], fed["batch_size"] / 16)
    with pytest.raises(ScenarioError, match=refusal):
        plan.check_data(build_federated_data(plan.scenario))
    with pytest.raises(ScenarioError, match=refusal):
        fedsec_bench.run(tiny)
    assert not (tmp_path / "runs").exists(), "refused before any run is recorded"


def write_user_records(path: Path, sizes: dict[str, int]) -> None:
    """A jsonl of instruction records, ``sizes[user]`` of them per user, each record distinct."""
    rows = [{"user": user, "instruction": f"what did {user} note as item {i} ?", "output": f"{user} noted {i} apples ."}
            for user, count in sizes.items() for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_file_data_is_checked_at_each_users_real_size_by_validate(tiny, tmp_path, capsys):
    """A natural partition by user: clients of very different sizes, known only once the files are read.
    ``fedsec validate`` refuses with the smallest client's own steps and sample rate (exit code 2)."""
    records = tmp_path / "records.jsonl"
    write_user_records(records, {"ann": 40, "bob": 12, "cy": 12, "dee": 12})
    tiny["data"] = {"source": "files", "path": str(records), "format": "instruction", "seq_len": 32,
                    "heldout_examples": 4, "public_examples": 12, "partition": {"method": "natural", "by": "user"}}
    tiny["federation"].update(num_clients=2, clients_per_round=2, local_steps=None, local_epochs=1)
    tiny["defenses"] = [{"name": "dp_sgd", **UNREACHABLE}]
    data = build_federated_data(load_scenario(tiny))
    smallest, largest = sorted(data.num_examples(c) for c in range(data.num_clients))
    assert largest >= 2 * smallest, "the users' sizes differ: no nominal size stands for them"
    steps = tiny["federation"]["rounds"] * math.ceil(smallest / 4)  # one epoch of batches of 4, each round
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(tiny))
    assert fedsec(["validate", str(scenario)]) == 2
    assert re.search(unreachable_at(steps, 4 / smallest), capsys.readouterr().err)
    assert fedsec(["validate", str(scenario), "--set", "defenses.0.target_epsilon=8"]) == 0


def test_ready_scenario_loads():
    scenario = load_scenario(Path(__file__).parents[1] / "scenarios" / "dp_sgd.yaml")
    assert [d.name for d in scenario.defenses] == ["dp_sgd"]
