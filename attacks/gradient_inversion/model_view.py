"""The global model as the server holds it, and the round's pseudo-gradients.

Every forward pass here runs the round's *global* trainable state through
``torch.func.functional_call``: ``runtime.model`` itself still holds the last
client's local weights when ``server_observation`` runs, and it must be left as
found. Only two decoder families are mapped (GPT-2 and LLaMA); the span attack needs
to know which linear layer opens each block, and guessing that for an unknown
architecture would give silently wrong answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers.pytorch_utils import Conv1D

from fedsec_bench.client import local_steps
from fedsec_bench.lm import evaluating
from fedsec_bench.messages import Message, State

# The first linear layer of block ``{i}`` whose weight gradient spans the block's inputs.
# GPT-2's fused c_attn (q, k and v in one Conv1D) sees every position; LLaMA's v_proj is
# used because a causal query at position 0 attends only to itself and gets no gradient.
FIRST_LINEAR = {"gpt2": "transformer.h.{i}.attn.c_attn", "llama": "model.layers.{i}.self_attn.v_proj"}
BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers"}


ROUNDING_STD = torch.finfo(torch.float32).eps / (2 * 3**0.5)
"""Standard deviation of float32 rounding, relative to the rounded value."""


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the wanted layer input is seen."""


def readable(message: Message, global_state: State) -> bool:
    """A payload the server can read is a plain dict of tensors over the exchanged parameters."""
    payload = message.payload
    return (
        message.is_plain
        and set(payload) == set(global_state)
        and all(isinstance(t, torch.Tensor) for t in payload.values())
    )


def update_scale(federation, num_examples: int) -> float:
    """The factor turning an update into a pseudo-gradient: -1 / (lr * local steps)."""
    return -1.0 / (federation.lr * local_steps(federation, num_examples))


def exact_gradient(federation, num_examples: list[int]) -> bool:
    """Whether -update/lr is the batch gradient itself: one plain SGD step (FedSGD) for every client."""
    return federation.optimizer == "sgd" and all(local_steps(federation, n) == 1 for n in num_examples)


@dataclass
class PseudoGradient:
    """What the attacks read: the pseudo-gradient by parameter name, and the update-to-gradient factor."""

    values: State
    scale: float

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]


def pseudo_gradient(update: State, global_state: State, federation, num_examples: int) -> PseudoGradient:
    """-update / (lr * steps) - weight_decay * global: the gradient itself for one SGD step (FedSGD).

    With several local steps it is the mean gradient along the local trajectory, an
    approximation; with AdamW one step gives about sign(gradient), which keeps the
    zero pattern (token_leak) but not the low rank (span_check).
    """
    scale = update_scale(federation, num_examples)
    values = {
        name: u.double() * scale - federation.weight_decay * global_state[name].double()
        for name, u in update.items()
    }
    return PseudoGradient(values, scale)


def rounding_noise(param: torch.Tensor, scale: float) -> float:
    """Spectral norm expected of the float32 rounding in ``scale * update`` for a weight ``param``.

    A client's new weight ``p - lr * g`` is rounded to float32 (the update, a difference
    of nearby floats, is then exact), an error uniform within half an ulp: standard
    deviation about eps / (2 sqrt 3) * |p|. A random m x n matrix of such errors has
    spectral norm about std * (sqrt m + sqrt n). Singular values of a pseudo-gradient
    below a few times this are rounding, not signal.
    """
    m, n = (param.shape[0], param[0].numel()) if param.dim() > 1 else (param.numel(), 1)
    return float(ROUNDING_STD * param.double().pow(2).mean().sqrt() * (m**0.5 + n**0.5) * abs(scale))


class ModelView:
    """Forward passes and parameter look-ups on the global model, by role rather than by name."""

    def __init__(self, runtime, global_state: State):
        self.model = runtime.model
        self.state = global_state
        self.tokenizer = runtime.tokenizer
        self.device = runtime.device
        self.base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.arch = self.base.config.model_type
        self.params = dict(self.model.named_parameters())
        self.names = {id(p): n for n, p in self.params.items()}
        emb = self.base.get_input_embeddings().weight
        self.embedding_name = self.names[id(emb)]
        out = self.base.get_output_embeddings()
        self.tied = out is not None and out.weight is emb
        wpe = getattr(getattr(self.base, "transformer", None), "wpe", None)
        self.position_name = self.names[id(wpe.weight)] if wpe is not None else None
        self.eos_id = self.tokenizer.eos_token_id

    # --- parameters -------------------------------------------------------------
    def value(self, name: str) -> torch.Tensor:
        """The global value of a parameter (frozen ones never change, so the module holds it)."""
        if name in self.state:
            return self.state[name]
        return self.params[name].detach()

    def embedding(self) -> torch.Tensor:
        return self.value(self.embedding_name)

    @property
    def num_layers(self) -> int:
        return len(self.base.get_submodule(BLOCKS[self._mapped()]))

    def first_linear(self, layer: int) -> torch.nn.Module:
        return self.base.get_submodule(FIRST_LINEAR[self._mapped()].format(i=layer))

    def _mapped(self) -> str:
        if self.arch not in FIRST_LINEAR:
            raise ValueError(
                f"gradient_inversion maps the layers of {', '.join(FIRST_LINEAR)} models only, this one is "
                f"{self.arch!r}; use method=optimization, which needs no layer map"
            )
        return self.arch

    def input_space_gradient(self, grad: PseudoGradient, layer: int) -> tuple[torch.Tensor, str] | None:
        """The exchanged gradient of block ``layer``'s first linear map, as (input width x k), and its name.

        Its column space is spanned by the layer's inputs: in full mode the weight's own
        gradient (a sum of outer products delta_t x_t^T), in lora mode the LoRA-A gradient
        (B^T delta_t x_t^T, rank <= r). None when neither is exchanged (prompt mode).
        """
        path = re.escape(FIRST_LINEAR[self._mapped()].format(i=layer))
        for name, g in grad.values.items():
            if re.search(rf"(^|\.){path}(\.base_layer)?\.weight$", name):
                return (g if isinstance(self.first_linear(layer), Conv1D) else g.T), name
            if re.search(rf"(^|\.){path}\.lora_A\.[^.]+\.weight$", name):
                return g.T, name
        return None

    # --- forward passes ---------------------------------------------------------
    def forward(self, params: State | None = None, **inputs) -> torch.Tensor:
        """Logits of the global model (``params`` overrides exchanged tensors, e.g. ones requiring grad),
        with soft-prompt positions dropped so position t is always the t-th input."""
        with evaluating(self.model):
            out = torch.func.functional_call(self.model, params or self.state, args=(), kwargs=inputs)
        width = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
        return out.logits[:, -width:]

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor, layer: int, chunk: int = 512) -> torch.Tensor:
        """What block ``layer``'s first linear map receives for each position of each sequence."""
        module, seen = self.first_linear(layer), []

        def hook(_module, args):
            seen.append(args[0].detach())
            raise _Stop

        handle = module.register_forward_pre_hook(hook)
        try:
            for rows in input_ids.split(chunk):
                try:
                    self.forward(input_ids=rows.to(self.device), attention_mask=torch.ones_like(rows))
                except _Stop:
                    pass
        finally:
            handle.remove()
        return torch.cat(seen).double()
