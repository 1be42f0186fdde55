"""``dp_sgd``: sample-level differential privacy in each client's local training (DP-SGD through Opacus).

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"), per step:
sample a batch (Poisson, each example with probability q), compute every example's
gradient g_i, clip it to ``max_grad_norm`` C (g_i · min(1, C/‖g_i‖)), add N(0, σ²C²I)
to the sum and divide by the expected batch size q·n. The sampled Gaussian mechanism
composed over the client's steps is accounted in a :class:`.accounting.Ledger` (Opacus'
RDP, Mironov et al. 2019, or PRV, Gopi et al. 2021); each client has its own ledger,
kept for the whole run, because each client runs its own mechanism on its own records.
Clients record the mechanism and its steps for the simulator; the ledgers live with the
plugin on the driver, where its scorer (``score_round``) composes them from the round's
truth (:class:`.accounting.ClientLedgers`: the client side may run on a Ray worker). The
guarantee is each client's own: no protocol party needs the ledgers.

How each example's gradient is clipped (option ``clipping``), all through Opacus:

* ``flat`` (default): Opacus' GradSampleModule materialises every per-example gradient
  (``hooks`` mode, see :data:`GRAD_SAMPLE_MODE`) and DPOptimizer clips each whole
  gradient vector to C, as above;
* ``per_layer``: the same per-example gradients, and Opacus' DPPerLayerOptimizer clips
  each trainable parameter tensor l of an example's gradient to its own bound C_l. We
  split C equally, C_l = C/√L over the L tensors (Opacus takes any list and prescribes
  none), so that √(Σ_l C_l²) = C: an example's clipped gradient still has norm at most C,
  the noise std is still σC (Opacus derives it from √(Σ C_l²)), and the sensitivity and
  the accountant's ε are those of flat clipping at C. It clips more than flat does
  (every layer must fit its share), which can cost utility, never privacy;
* ``ghost``: ghost clipping (Li et al. 2022, "Large Language Models Can Be Strong
  Differentially Private Learners"; Bu et al. 2022, "Scalable and Efficient Training
  of Large Convolutional Neural Networks with Differential Privacy"), Opacus' fast
  gradient clipping: a first backward pass computes each example's gradient norm layer
  by layer without materialising the gradients (for a linear layer with inputs a_t and
  output gradients g_t over T tokens, ‖Σ_t g_t a_tᵀ‖² = Σ_{t,t'} (g_t·g_t')(a_t·a_t'),
  a T×T product per example), then a second backward pass on Σ_i c_i ℓ_i with
  c_i = min(1, C/‖g_i‖) yields the sum of clipped gradients, which
  DPOptimizerFastGradientClipping noises. It is the same clipping as ``flat`` (equal up
  to float rounding, tested), hence the same guarantee, with no per-example gradient
  held for layers Opacus has a norm sampler for (Linear, Embedding: all of LoRA's and
  prompt tuning's). The others (Llama's RMSNorm in full tuning) fall back to that one
  layer's per-example gradients, kept only for their norms (tested). Opacus raises on
  parameter tying under ghost clipping, so full tuning of a model whose input and
  output embeddings are tied (GPT-2) is refused with ``clipping: ghost``.

Three traps of Hugging Face + PEFT models are handled here, for every clipping mode,
each checked against per-example backward passes in tests/test_dp_sgd.py:

* the training loss. transformers' ``.loss`` is the mean over every token of the
  batch, so one example's gradient is scaled by the other examples' lengths and
  clipping no longer bounds one record's influence. We use the mean of per-example
  token-mean losses instead, the decomposition Opacus' ``loss_reduction="mean"`` assumes.
  On prompt/response data an example is one pair and its tokens with a label are its
  response's (the batcher masks the prompt), so the pair is the privacy unit and its
  prompt enters only through its response's gradient;
* GPT-2's position embeddings are looked up with ``position_ids`` of batch size 1 and
  broadcast, so Opacus would see one "example"; we pass them with the batch's shape;
* PEFT prompt tuning computes the soft prompt once (``prompt_tokens[:1]``) and repeats
  it over the batch, so again Opacus sees one example and the "per-example" gradient
  is the batch gradient (silently voiding the guarantee). We run the prompt encoder
  on one row of prompt tokens per example (:func:`prompt_forward`) - the same
  computation as PEFT's forward, verified equal in the tests.

GPT-2's tied input/output embedding gets the sum of both uses' per-example gradients
(Opacus accumulates a parameter's grad samples over the modules sharing it); its
``Conv1D`` has no Opacus grad sampler and goes through Opacus' functorch fallback.

The shared model is wrapped only while the client trains: hooks (ours and Opacus') and
every attribute Opacus adds to parameters are removed afterwards, so the next client,
the server and the evaluation see the plain model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.grad_sample import AbstractGradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, DPPerLayerOptimizer
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from pydantic import Field, model_validator
from torch.utils.data import DataLoader

from fedsec_bench.client import LocalTraining, epochs, local_steps
from fedsec_bench.lm import soft_prompted, target_logprobs
from fedsec_bench.messages import ClientContext
from fedsec_bench.plugins import Options, Plugin

from .accounting import ClientLedgers, calibrate, report_runs, reported_runs

GRAD_SAMPLE_MODE = {"full": "hooks", "lora": "hooks", "prompt": "hooks"}
"""Opacus grad-sample mode per tuning mode (``functorch`` is the alternative, for comparison).

``hooks`` computes per-example gradients of Linear/Embedding/LayerNorm layers in closed
form from saved activations and backprops (one einsum per layer), the fastest mode:
LoRA's trainable layers are all ``nn.Linear``; in ``full`` mode the layers Opacus has no
formula for (GPT-2 ``Conv1D``, Llama ``RMSNorm``) fall back to functorch per layer, which
``hooks`` mode does by itself; ``prompt`` trains one embedding. ``ew`` (expanded weights)
supports neither Conv1D nor RMSNorm, so it is not offered.
"""


class DPSGDOptions(Options):
    noise_multiplier: float | None = Field(
        None, ge=0, description="σ: noise std / max_grad_norm. 0 = clipping only (ε = ∞). Set this or target_epsilon."
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="Calibrate σ per client so its ε after the whole scenario is at most this."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="C: L2 bound on each example's gradient.")
    delta: float | None = Field(
        None, gt=0, lt=1, description="δ; default 1 / (2 · training examples of the whole federation)."
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: rdp (Mironov) or prv (Gopi).")
    poisson_sampling: bool = Field(
        True, description="Poisson batches (what the accountant assumes). false: shuffled fixed-size batches."
    )
    grad_sample_mode: Literal["auto", "hooks", "functorch"] = Field(
        "auto", description="auto: GRAD_SAMPLE_MODE for the tuning mode; functorch for every layer otherwise."
    )
    clipping: Literal["flat", "ghost", "per_layer"] = Field(
        "flat", description="flat: each example's whole gradient to C; per_layer: each parameter tensor to C/sqrt(L) "
        "(same sensitivity C); ghost: flat clipping from per-example norms, without per-example gradients."
    )

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPSGDOptions:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("set exactly one of noise_multiplier (σ) or target_epsilon (σ calibrated per client)")
        return self


@dataclass(frozen=True)
class Mechanism:
    """One client's sampled Gaussian mechanism, fixed by its number of examples and the scenario."""

    examples: int
    sample_rate: float
    noise_multiplier: float


EXAMPLES = "dp_sgd.examples"
"""The client's number of examples, reported beside its runs (:func:`.accounting.report_runs`) for the table."""


def reported_mechanism(metrics: dict[str, float]) -> Mechanism:
    """The mechanism a client reported running this round."""
    noise_multiplier, sample_rate, _ = reported_runs(metrics, DPSGD.name)
    return Mechanism(int(metrics[EXAMPLES]), sample_rate, noise_multiplier)


def federation_delta(options: DPSGDOptions, data) -> float:
    """δ: the option, else 1 / (2 · training examples of the whole federation)."""
    return options.delta or 1.0 / (2 * sum(data.num_examples(c) for c in range(data.num_clients)))


INPUTS_WITHOUT_GRAD = "Full backward hook is firing when gradients are computed with respect to module outputs"
"""torch's warning when Opacus' hooks meet a layer whose input needs no gradient: the first trainable
layer sees token ids or a frozen model's activations, every step. Expected and harmless (the hook only
needs the layer's output gradient), and printed once per round it would break the progress bar."""

TIED_GHOST_REFUSAL = (
    "clipping: ghost cannot clip {model}'s tied input/output embedding in tuning.mode full (Opacus' ghost "
    "clipping does not support parameter tying); set dp_sgd.clipping to flat or per_layer, or tune with "
    "tuning.mode lora or prompt"
)


def tied_trainable_parameters(model: torch.nn.Module) -> list[str]:
    """Names of trainable parameters that more than one module uses (GPT-2's wte and lm_head)."""
    users: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                users.setdefault(id(p), []).append(f"{module_name}.{name}")
    return [names[0] for names in users.values() if len(names) > 1]


def per_layer_bounds(max_grad_norm: float, tensors: int) -> list[float]:
    """C_l = C/√L for each of the L parameter tensors, so that √(Σ_l C_l²) = C, the sensitivity of flat
    clipping."""
    return [max_grad_norm / math.sqrt(tensors)] * tensors


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token loss over its own labelled tokens (a pair's response tokens, on
    prompt/response data): one value per example."""
    logprobs, is_target = target_logprobs(logits, labels)
    return -(logprobs * is_target).sum(1) / is_target.sum(1).clamp(min=1)


def prompt_forward(peft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """PEFT prompt tuning's forward with the soft prompt encoded once per example (:func:`soft_prompted`),
    logits of the real tokens only."""
    embeds, mask = soft_prompted(peft_model, input_ids, attention_mask)
    return peft_model.base_model(inputs_embeds=embeds, attention_mask=mask).logits[:, -input_ids.shape[1] :]


def example_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The logits of each example, computed so that every trainable layer sees the batch dimension."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if mode == "prompt":
        return prompt_forward(model, ids, mask)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def per_example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """The loss of each example (:func:`sequence_losses` of :func:`example_logits`)."""
    return sequence_losses(example_logits(model, batch, mode), batch["labels"])


class SequenceLoss:
    """:func:`sequence_losses` as a criterion with torch's ``reduction`` switch, the interface through which
    Opacus' DPLossFastGradientClipping asks for the per-example losses (``reduction="none"``)."""

    reduction = "mean"

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = sequence_losses(logits, labels)
        return losses if self.reduction == "none" else losses.mean()


@dataclass
class PrivateTraining(LocalTraining):
    """The client's LocalTraining run as DP-SGD; the model is plain again when run() returns."""

    mechanism: Mechanism = None
    max_grad_norm: float = 1.0
    tuning_mode: str = "lora"
    poisson: bool = True
    functorch: bool = False
    clipping: str = "flat"
    generator: torch.Generator = field(default_factory=torch.Generator)

    def run(self) -> float:
        wrapped, optimizer = self.wrap()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()
        total, nonempty = 0.0, 0
        try:
            for batch in islice(self.batches(), self.steps):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if batch["input_ids"].shape[0] == 0:  # a Poisson batch can be empty: noise only
                    self.empty_batch(params)
                else:
                    total, nonempty = total + self.backward(wrapped, optimizer, batch), nonempty + 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            wrapped.cleanup()
            release(self.model, params)
        return total / max(nonempty, 1)

    def wrap(self) -> tuple[AbstractGradSampleModule, DPOptimizer]:
        """The model wrapped for per-example norms or gradients, and the DP optimizer of the clipping mode."""
        noise = dict(
            noise_multiplier=self.mechanism.noise_multiplier, loss_reduction="mean",
            expected_batch_size=max(1, round(self.mechanism.sample_rate * self.mechanism.examples)),
        )
        hooks = dict(loss_reduction="mean", strict=False, force_functorch=self.functorch)
        if self.clipping == "ghost":
            wrapped = GradSampleModuleFastGradientClipping(self.model, max_grad_norm=self.max_grad_norm, **hooks)
            return wrapped, DPOptimizerFastGradientClipping(self.optimizer, max_grad_norm=self.max_grad_norm, **noise)
        wrapped = GradSampleModule(self.model, **hooks)
        if self.clipping == "per_layer":
            tensors = sum(len(group["params"]) for group in self.optimizer.param_groups)
            bounds = per_layer_bounds(self.max_grad_norm, tensors)
            return wrapped, DPPerLayerOptimizer(self.optimizer, max_grad_norm=bounds, **noise)
        return wrapped, DPOptimizer(self.optimizer, max_grad_norm=self.max_grad_norm, **noise)

    def backward(self, wrapped: AbstractGradSampleModule, optimizer: DPOptimizer, batch: dict[str, torch.Tensor]
                 ) -> float:
        """Per-example gradients (flat, per_layer) or the sum of clipped ones (ghost's two passes); the batch's
        mean loss."""
        if self.clipping == "ghost":
            criterion = DPLossFastGradientClipping(wrapped, optimizer, SequenceLoss(), loss_reduction="mean")
            loss = criterion(example_logits(self.model, batch, self.tuning_mode), batch["labels"])
        else:
            loss = per_example_losses(self.model, batch, self.tuning_mode).mean()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=INPUTS_WITHOUT_GRAD, category=UserWarning)
            loss.backward()
        return loss.item()

    def empty_batch(self, params: list[torch.nn.Parameter]) -> None:
        """What an empty batch leaves for the optimizer: no per-example gradients, or (ghost) a zero clipped sum."""
        for p in params:
            if self.clipping == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def batches(self):
        if not self.poisson:
            return epochs(self.loader)
        sampler = UniformWithReplacementSampler(
            num_samples=self.mechanism.examples, sample_rate=self.mechanism.sample_rate,
            generator=self.generator, steps=self.steps,
        )
        return iter(DataLoader(self.loader.dataset, batch_sampler=sampler, collate_fn=self.loader.collate_fn))


def release(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Remove what Opacus leaves behind after its own cleanup: saved activations, clipped sums, gradients."""
    for module in model.modules():
        for attr in ("activations", "max_batch_len"):
            if hasattr(module, attr):
                delattr(module, attr)
    for p in params:
        for attr in ("summed_grad", "grad_sample", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


class DPSGD(Plugin):
    name = "dp_sgd"
    kind = "defense"
    summary = "DP-SGD in each client's local training (Opacus): per-example clipping, Gaussian noise, accounting"
    on_instruction_data = ("one record = one prompt/response pair: each pair's gradient (response-token loss) is clipped "
                           "and noised; its prompt tokens enter only through that gradient")
    OptionsModel = DPSGDOptions

    def __init__(self, options: DPSGDOptions, runtime):
        super().__init__(options, runtime)
        self.budgets = ClientLedgers(self.name, options.accountant)
        self.mechanisms: dict[int, Mechanism] = {}  # the last one each client ran, for the table
        self.delta = federation_delta(options, runtime.data)

    def __getstate__(self) -> dict:
        """A Ray worker's copy needs no ledgers: they stay with the driver, which composes them (a
        resumed run gets them from :meth:`checkpoint`, which keeps them)."""
        return super().__getstate__() | {"budgets": self.budgets.empty(), "mechanisms": {}}

    @classmethod
    def check(cls, options: DPSGDOptions, scenario) -> None:
        """Refuse gradient accumulation, and ghost clipping of a built GPT-2's tied embedding.

        DP-SGD's step is one sampled batch, clipped per example and noised once, and the
        accountant composes one sampled Gaussian per batch of rate batch_size / n; summing
        batches into a step would change both. Opacus' ghost clipping raises on a parameter
        used by two layers; a built GPT-2 ties its input and output embeddings, trainable in
        full tuning (a loaded checkpoint's tying is checked once it is loaded: :meth:`check_model`).
        """
        if options.clipping == "ghost" and scenario.tuning.mode == "full" and scenario.model.arch == "gpt2":
            raise ValueError(TIED_GHOST_REFUSAL.format(model="GPT-2"))
        if scenario.federation.grad_accumulation > 1:
            raise ValueError(
                "federation.grad_accumulation > 1 is not supported: each DP-SGD step clips and noises one "
                "sampled batch of federation.batch_size, as its accountant counts; set grad_accumulation 1 "
                "(raise federation.batch_size for a larger batch)"
            )

    @classmethod
    def check_model(cls, options: DPSGDOptions, scenario, model: torch.nn.Module) -> None:
        """A loaded checkpoint's tying is known only once it is loaded (a built GPT-2 was refused by check())."""
        if options.clipping == "ghost" and (tied := tied_trainable_parameters(model)):
            raise ValueError(TIED_GHOST_REFUSAL.format(model=f"the model ({tied[0]})"))

    @classmethod
    def check_data(cls, options: DPSGDOptions, scenario, data) -> None:
        """With target_epsilon: every client, at its real size, must be able to reach it (σ is calibrated
        per client, assuming it trains every round)."""
        if options.target_epsilon is None:
            return
        fed = scenario.federation
        sizes = sorted({data.num_examples(c) for c in range(data.num_clients)})
        delta = federation_delta(options, data)
        for examples in sizes:
            steps = local_steps(fed, examples) * fed.rounds
            calibrate(options.target_epsilon, delta, min(1.0, fed.batch_size / examples), steps, options.accountant)

    def mechanism(self, examples: int, steps_per_round: int) -> Mechanism:
        """The client's mechanism; σ from target_epsilon assumes it trains every round."""
        fed = self.runtime.scenario.federation
        rate = min(1.0, fed.batch_size / examples)
        sigma = self.options.noise_multiplier
        if sigma is None:
            sigma = calibrate(self.options.target_epsilon, self.delta, rate, steps_per_round * fed.rounds, self.options.accountant)
        return Mechanism(examples, rate, sigma)

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        """Train privately and record the mechanism and its steps for the scorer, which keeps the ledger
        on the driver (``score_round``), since the client side may run in another process (executor: ray)."""
        mechanism = self.mechanism(len(training.loader.dataset), training.steps)
        client.metrics[EXAMPLES] = mechanism.examples
        report_runs(client.metrics, self.name, mechanism.noise_multiplier, mechanism.sample_rate, training.steps)
        mode = self.runtime.scenario.tuning.mode
        choice = GRAD_SAMPLE_MODE[mode] if self.options.grad_sample_mode == "auto" else self.options.grad_sample_mode
        return PrivateTraining(
            model=training.model, optimizer=training.optimizer, loader=training.loader, steps=training.steps,
            device=training.device, mechanism=mechanism, max_grad_norm=self.options.max_grad_norm, tuning_mode=mode,
            poisson=self.options.poisson_sampling, functorch=choice == "functorch", clipping=self.options.clipping,
            generator=torch.Generator().manual_seed(client.seed),
        )

    def score_round(self, round, truth, metrics):
        for report in self.budgets.record(truth):  # every client that trained spent budget, delivered or not
            self.mechanisms[report.client_id] = reported_mechanism(report.metrics)
        table = self.table()
        self.runtime.write_table("dp_sgd_epsilon.csv", table)
        return {
            "privacy.epsilon": max((row["epsilon"] for row in table), default=0.0),
            "privacy.delta": self.delta,
        }

    def table(self) -> list[dict]:
        """Per-client ε so far: one row per client that has trained."""
        return [
            {"client_id": cid, "examples": self.mechanisms[cid].examples,
             "sample_rate": self.mechanisms[cid].sample_rate, "noise_multiplier": self.mechanisms[cid].noise_multiplier,
             "steps": ledger.steps, "epsilon": ledger.epsilon(self.delta), "delta": self.delta}
            for cid, ledger in sorted(self.budgets.items())
        ]
