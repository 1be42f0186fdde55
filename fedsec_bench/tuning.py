"""The three federated workloads: which parameters are trained and exchanged.

``full`` trains and exchanges every weight; ``lora`` and ``prompt`` wrap the model with
PEFT and exchange only the adapter or the soft prompt. Everything downstream (the
round loop, defenses, attacks) sees the same thing: a :data:`State` of the trainable
parameters by name, in float32 whatever ``model.dtype`` is, so the server averages in
float32 and a defense's noise or clipping is not rounded to 16 bits.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .errors import ScenarioError, excerpt
from .messages import State
from .scenario import TuningConfig


def apply_tuning(model: PreTrainedModel, tuning: TuningConfig) -> torch.nn.Module:
    """Return the model to train: the model itself (full) or its PEFT wrapper."""
    if tuning.mode == "full":
        return model
    if tuning.mode == "lora":
        lora = tuning.lora
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2 stores its linears as Conv1D (in x out)
        )
    else:
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=tuning.prompt.num_virtual_tokens)
    # autocast_adapter_dtype (the default) keeps LoRA adapters and the soft prompt float32 on a 16-bit base
    try:
        with warnings.catch_warnings():  # PEFT still calls the name transformers deprecated: nothing for a user to do
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT: target modules not found, or no default ones for this architecture
        if tuning.mode != "lora":
            raise
        names = adaptable_modules(model)
        raise ScenarioError(
            f"tuning.lora.target_modules: PEFT refused them ({exc_line(exc).rstrip('.')}); name some of this "
            f"model's layers: {', '.join(names)}"
        ) from None
    if tuning.mode == "lora" and tuning.lora.aggregation == "ffa":
        freeze_lora_a(peft_model)
    return peft_model


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """The names (last part) of the layers LoRA can adapt: linear, GPT-2's Conv1D, embeddings, convolutions."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, Conv1D)
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, kinds)})


def exc_line(exc: BaseException) -> str:
    """An exception's message on one bounded line."""
    return excerpt(" ".join(str(exc).split()), 200)


LORA_A = (".lora_A.", ".lora_embedding_A.")


def freeze_lora_a(model: torch.nn.Module) -> None:
    """FFA-LoRA (Sun et al. 2024): every A stays at its seeded init, so only B is trained and exchanged.

    Every client starts from the server's model, so A is the same everywhere; the update
    of ``W0 + s·BA`` is then linear in B and averaging the Bs averages the clients' models
    exactly (with ``separate``, the mean of products is not the product of means). Only B
    is sent, about half the adapter, and under DP the noise lands on B alone.
    """
    for name, p in model.named_parameters():
        if any(marker in name for marker in LORA_A):
            p.requires_grad_(False)


class TrainableState:
    """Reads, writes and moves the exchanged parameters of a (possibly PEFT-wrapped) model."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no trainable parameters")

    def snapshot(self) -> State:
        """A detached float32 copy, safe to keep while the model trains on."""
        return {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def load(self, state: State) -> None:
        """Set the parameters to ``state``, cast to each parameter's own dtype."""
        for name, p in self.params.items():
            p.copy_(state[name])

    def delta_from(self, reference: State) -> State:
        """Current minus reference, in float32: a client's update."""
        return {n: (p.detach().float() - reference[n]) for n, p in self.params.items()}

    @torch.no_grad()
    def step(self, reference: State, update: State, scale: float) -> None:
        """Set the parameters to reference + scale * update (the server's model step), computed in the
        exchanged float32 and cast to each parameter's own dtype."""
        for name, p in self.params.items():
            p.copy_(reference[name] + scale * update[name].to(reference[name].dtype))

    def num_values(self) -> int:
        return sum(p.numel() for p in self.params.values())
