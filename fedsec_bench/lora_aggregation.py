"""``tuning.lora.aggregation: exact``: FedEx-LoRA's exact aggregation of LoRA adapters.

Singhal et al. 2024, "Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models". Client i's model has the weight ``W0 + s·B_i A_i`` in every LoRA layer
(s = alpha / r, as PEFT scales it). Averaging A and B on their own (``separate``) gives
the server ``W0 + s·B̄Ā``: the product of the means, not the mean of the clients' models,
``W0 + s·Σ w_i B_i A_i`` (w_i = n_i / Σ n_j). FedEx-LoRA keeps the averaged adapters and
folds the difference, the residual

    R = Σ w_i B_i A_i − (Σ w_i B_i)(Σ w_i A_i),

scaled by s, into the frozen weight of the layer: ``W0 + s·R + s·B̄Ā`` is the clients'
mean model exactly. R has rank at most (k+1)·r for k clients; every client needs it to
train on the server's model, so the plugin reports what sending it costs.

It is not a registered plugin: :func:`fedsec_bench.plan.resolve` plans it, at
``tuning.lora.aggregation``, when the scenario asks for it. Its declared capabilities let
the plan refuse what breaks exactness: it reads each plain update (no encrypted or masked
transport) and relies on the aggregate being their weighted mean (no robust rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from .errors import ScenarioError
from .messages import Message, RoundContext, State, plain_updates
from .plugins import Plugin
from .tuning import TrainableState

BYTES_PER_VALUE = 4  # float32, as every exchanged tensor


@dataclass(frozen=True, eq=False)
class LoraFactors:
    """One LoRA layer: the names of its A and B in the exchanged state, and the frozen weight its
    residual is folded into."""

    a: str
    b: str
    base: torch.nn.Parameter
    scaling: float
    transposed: bool
    """The base weight is stored in x out (GPT-2's Conv1D, PEFT's fan_in_fan_out); B·A is out x in."""

    def residual_factors(self, global_state: State, updates: list[State], weights: list[float]):
        """(U, V) with U·V = R = Σ w_i B_i A_i − B̄Ā, kept factored: (k+1)·r columns, not a dense matrix."""
        a_i = [global_state[self.a] + u[self.a] for u in updates]
        b_i = [global_state[self.b] + u[self.b] for u in updates]
        mean_a = sum(w * a for w, a in zip(weights, a_i))
        mean_b = sum(w * b for w, b in zip(weights, b_i))
        u = torch.cat([w * b for w, b in zip(weights, b_i)] + [-mean_b], dim=1)
        v = torch.cat(a_i + [mean_a], dim=0)
        return u, v

    @torch.no_grad()
    def fold(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """W0 ← W0 + s·U·V, in the base weight's own layout."""
        delta = self.scaling * (u @ v)
        self.base.add_((delta.T if self.transposed else delta).to(self.base.device, self.base.dtype))

    def residual_bytes(self, rank: int) -> int:
        """Bytes of the residual on the wire: dense, or as its factors when they are smaller."""
        out, inner = self.base.shape[::-1] if self.transposed else self.base.shape
        return BYTES_PER_VALUE * min(out * inner, rank * (out + inner))


def lora_factors(model: torch.nn.Module, trainable: TrainableState) -> list[LoraFactors]:
    """Every LoRA layer of the model with its exchanged A and B; only linear layers can be folded into."""
    names = {id(p): n for n, p in trainable.params.items()}
    layers = []
    for where, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise ScenarioError(
                f"tuning.lora.aggregation: exact folds the residual into linear weights, but {where} is a "
                f"{type(module).__name__}; leave it out of tuning.lora.target_modules"
            )
        for adapter in module.active_adapters:
            layers.append(LoraFactors(
                a=names[id(module.lora_A[adapter].weight)], b=names[id(module.lora_B[adapter].weight)],
                base=module.get_base_layer().weight, scaling=module.scaling[adapter],
                transposed=module.fan_in_fan_out,
            ))
    return layers


class ExactLoraAggregation(Plugin):
    name = "fedex_lora"
    kind = "aggregator"
    summary = "FedEx-LoRA (Singhal et al. 2024): fold mean(B_i A_i) - mean(B) mean(A) into the frozen weights"
    modes = frozenset({"lora"})
    needs_plain_updates = True
    needs_mean_aggregate = True
    moves_model_outside_aggregate = True

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.layers = lora_factors(runtime.model, runtime.trainable)
        self.pending: list[tuple[LoraFactors, torch.Tensor, torch.Tensor]] = []

    @classmethod
    def check(cls, options, scenario) -> None:
        """The global adapters must be the clients' mean (server_lr 1), and the frozen weights must hold
        the residual: it is second order in the updates, far below a 16-bit weight's rounding."""
        model = scenario.model
        if scenario.federation.server_lr != 1:
            raise ValueError(f"federation.server_lr is {scenario.federation.server_lr:g}, but exact aggregation "
                             "makes the global model the clients' mean: set federation.server_lr 1")
        if model.dtype != "float32" or model.quantization != "none":
            raise ValueError("exact aggregation folds a residual (second order in the updates) into the frozen "
                             "weights, which a 16-bit or quantized weight would round away: use model.dtype "
                             "float32 and model.quantization none, or tuning.lora.aggregation ffa")

    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float] | None:
        """Compute each layer's residual from the plain updates; folded once the round is aggregated."""
        updates = plain_updates(messages, "tuning.lora.aggregation exact")
        if not updates:
            return None
        total = sum(m.num_examples for m in messages)
        weights = [m.num_examples / total for m in messages]
        self.pending = [(layer, *layer.residual_factors(round.global_state, updates, weights)) for layer in self.layers]
        squared = sum(layer.scaling**2 * torch.sum((u.T @ u) * (v @ v.T)) for layer, u, v in self.pending)
        return {
            "lora.exact_residual_norm": math.sqrt(max(float(squared), 0.0)),  # ‖s·R‖_F over all layers
            "cost.bytes_down_residual": float(sum(layer.residual_bytes(u.shape[1]) for layer, u, _ in self.pending)),
        }

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        for layer, u, v in self.pending:
            layer.fold(u, v)
        self.pending = []
        return aggregate

    def checkpoint(self) -> dict:
        """The frozen weights as the folded residuals left them, by the name of their layer's A: the
        core's checkpoint holds only the exchanged parameters, and ``layers`` points into the model."""
        return {"base_weights": {layer.a: layer.base.detach().cpu().clone() for layer in self.layers}}

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        for layer in self.layers:
            layer.base.copy_(state["base_weights"][layer.a])
