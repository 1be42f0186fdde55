"""``gradient_pruning`` and ``quantization``: the client compresses its update before sending it.

Compression is studied as a defense against gradient inversion because it throws away
part of what the attacker reads. Each plugin, in ``transport``, encodes the update as a
deployment would, and the message then carries what the server decodes from that
encoding (still a plain :data:`~fedsec_bench.messages.State`, which every server-side
hook reads as usual), costed at the encoding's size (``Message.carrying``).

``gradient_pruning`` (Zhu, Liu, Han 2019, "Deep Leakage from Gradients", Sec. 5; LAMP,
Balunović et al. 2022, Table 8): zero the ⌊p·d⌋ coordinates of smallest magnitude over
the whole update of d coordinates (all parameters at once; ⌊·⌋ of the float product p·d,
ties broken by position), keep the rest unchanged. DLG prunes the gradient; under FedAvg
with several local steps the update is what leaves the client, so it is pruned. Encoded
as the kept values at the update's dtype plus their positions: int32 indices (4 bytes
each) or a bitmap of d bits, whichever is smaller (indices need d ≤ 2³¹).

``quantization`` (deterministic uniform quantization, as in the compression baselines of
the same studies; QSGD, Alistarh et al. 2017, is its stochastic-rounding variant, not
offered here): each tensor t is mapped to b-bit codes
q = round((t − min t) / s), s = (max t − min t) / (2^b − 1), and decoded as min t + q·s,
so every coordinate moves by at most s/2. Encoded as b bits per value plus the tensor's
min and s as two float32 (computed in float32; a tensor of one repeated value has s = 0
and decodes exactly).

Figures, from what the server received (each message's ``num_bytes`` against the dense
size of an update, which the server knows from the global state's layout):

* ``compression.bytes_saved``: dense minus received bytes per message, mean over the
  round's delivered messages (higher saves more bandwidth);
* ``compression.ratio``: received / dense bytes per message, mean over them (lower is smaller).

Listed before a hiding transport (secure_aggregation, he_aggregation), which the plan
requires of every plain-rewriting transport, the server receives masked or encrypted
vectors, dense whatever the update: the figures then say so (no saving, ratio ≥ 1).
Both plugins cost the payload they are given as dense: listed together, the cost is the
last one's encoding (quantizing a pruned update does not keep its sparse positions).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field

from fedsec_bench.messages import SIDE_VALUE_BYTES, ClientContext, Message, RoundContext, State, state_bytes
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import flatten, unflatten

INDEX_BYTES = 4
"""A kept coordinate's position as an int32 index into the flattened update."""
RANGE_BYTES = 2 * 4
"""A quantized tensor's min and step, two float32."""


# --------------------------------------------------------------------------- pruning


def kept_coordinates(update: State, fraction: float) -> State:
    """Per tensor, a mask of the coordinates kept: all but the ⌊fraction·d⌋ of smallest magnitude over
    the whole update (``argsort`` is stable, so ties go by position)."""
    magnitudes = flatten(update).detach().abs()
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[torch.argsort(magnitudes, stable=True)[: math.floor(fraction * magnitudes.numel())]] = False
    return unflatten(keep, update)


def sparse_bytes(update: State, keep: State) -> int:
    """The sparse encoding's size: the kept values at their tensors' dtypes, plus their positions as
    int32 indices into the flattened update or as a bitmap of its d bits, whichever is smaller."""
    values = sum(int(keep[name].sum()) * t.element_size() for name, t in update.items())
    kept = sum(int(mask.sum()) for mask in keep.values())
    dimension = sum(mask.numel() for mask in keep.values())
    bitmap = -(-dimension // 8)
    positions = min(INDEX_BYTES * kept, bitmap) if dimension <= 2**31 else bitmap
    return values + positions


# --------------------------------------------------------------------------- quantization


def quantize(tensor: torch.Tensor, bits: int) -> tuple[torch.Tensor, float, float]:
    """b-bit codes of a tensor on the uniform grid from its min to its max: (codes, min, step)."""
    values = tensor.detach().float()
    low, high = values.min(), values.max()
    step = (high - low) / (2**bits - 1)
    if step == 0:  # one repeated value: every code is 0 and min alone decodes it
        return torch.zeros_like(values, dtype=torch.int32), float(low), 0.0
    codes = torch.round((values - low) / step).clamp(0, 2**bits - 1).to(torch.int32)
    return codes, float(low), float(step)


def dequantize(codes: torch.Tensor, low: float, step: float, like: torch.Tensor) -> torch.Tensor:
    """What the server decodes from a tensor's codes: min + code · step, at the tensor's dtype."""
    return (low + codes.float() * step).to(like.dtype)


def quantized_bytes(update: State, bits: int) -> int:
    """b bits per value, packed, plus each tensor's min and step."""
    return sum(-(-bits * t.numel() // 8) + RANGE_BYTES for t in update.values())


# --------------------------------------------------------------------------- the plugins


class Compression(Plugin):
    """A client-side encoding of the update: ``transport`` sends what the server decodes, costed at the
    encoding's size; ``server_observation`` compares what arrived with the dense size."""

    kind = "defense"
    on_instruction_data = "acts on the update only; the same on every data format"

    def encode(self, update: State) -> tuple[State, int]:
        """(the update the server decodes, the encoding's size in bytes)."""
        raise NotImplementedError

    def transport(self, client: ClientContext, message: Message) -> Message:
        decoded, encoded_bytes = self.encode(message.payload)
        return message.carrying(decoded, encoded_bytes)

    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float] | None:
        """Received against dense bytes per message; the server knows the dense size from the global state's
        layout and each message's side values."""
        if not messages:
            return None
        update_bytes = state_bytes(round.global_state)
        dense = np.array([update_bytes + SIDE_VALUE_BYTES * len(m.side) for m in messages], dtype=float)
        received = np.array([m.num_bytes for m in messages], dtype=float)
        return {
            "compression.bytes_saved": float(np.mean(dense - received)),
            "compression.ratio": float(np.mean(received / dense)),
        }


class GradientPruningOptions(Options):
    fraction: float = Field(
        0.9, gt=0, lt=1,
        description="p: the fraction of the update's coordinates, smallest magnitudes first, set to zero.",
    )


class GradientPruning(Compression):
    name = "gradient_pruning"
    summary = "zero the fraction p of smallest-magnitude update coordinates; send the rest sparsely (Zhu et al. 2019)"
    OptionsModel = GradientPruningOptions

    def encode(self, update: State) -> tuple[State, int]:
        keep = kept_coordinates(update, self.options.fraction)
        pruned = {name: t.masked_fill(~keep[name], 0) for name, t in update.items()}
        return pruned, sparse_bytes(update, keep)


class QuantizationOptions(Options):
    bits: int = Field(
        8, ge=1, le=16, description="b: bits per coordinate (2^b levels between each tensor's min and max)."
    )


class Quantization(Compression):
    name = "quantization"
    summary = "deterministic b-bit uniform quantization of each update tensor between its min and max"
    OptionsModel = QuantizationOptions

    def encode(self, update: State) -> tuple[State, int]:
        decoded = {}
        for name, t in update.items():
            codes, low, step = quantize(t, self.options.bits)
            decoded[name] = dequantize(codes, low, step, t)
        return decoded, quantized_bytes(update, self.options.bits)
