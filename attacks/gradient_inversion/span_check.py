"""``span_check``: exact batch recovery from the span of linear-layer gradients (DAGER).

Petrov et al. 2024, "DAGER: Exact Gradient Inversion for Large Language Models".
For a linear map y = W x applied to the inputs x_1..x_N of a batch, the weight
gradient is sum_t delta_t x_t^T, so its input-side span is spanned by the x_t (the
ones whose delta_t is not zero). If N < d (the input width) the gradient is rank
deficient and, generically, an embedding lies in that span iff it is one of the
batch's inputs. Layer 0 then tests every (token, position) candidate; a second
layer, whose inputs depend on the whole prefix, tests prefix extensions.

Rank condition (exactness): the number of batch tokens that receive a gradient
(every position but each sequence's last) must be below the tested layer's input
width d, i.e. the observed rank r < min(gradient shape). With LoRA the tested
gradient is LoRA-A's (B^T delta_t x_t^T), of rank <= r_lora: it spans all inputs only
while they number fewer than r_lora, and when B is still zero (round 1) it is zero.
When the condition fails the method recovers nothing and says so.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .model_view import ModelView, PseudoGradient, rounding_noise
from .result import Reconstruction

WIDTH_TOL = 1e-5
"""Relative singular-value cut for the width of deterministic float32 forward passes."""


def span_basis(gradient: torch.Tensor, floor: float, width: int) -> tuple[torch.Tensor, int, bool]:
    """Orthonormal basis of the column space (singular values above ``floor``), its rank, and
    whether the condition for exactness holds: 0 < rank < the width of the space the inputs can
    take and of the gradient itself. A zero gradient (LoRA-A's while B is still zero, in round 1)
    spans nothing; a full-rank one contains every candidate."""
    u, s, _ = torch.linalg.svd(gradient.double(), full_matrices=False)
    rank = int((s > floor).sum())
    return u[:, :rank], rank, 0 < rank < min(width, *gradient.shape)


def input_width(inputs: torch.Tensor) -> int:
    """Dimension of the space a layer's inputs span (below the hidden size after a LayerNorm
    with zero bias: its outputs are centred, so they lie in a hyperplane)."""
    s = torch.linalg.svdvals(inputs.reshape(-1, inputs.shape[-1]))
    return int((s > WIDTH_TOL * s[0]).sum())


def layer_basis(view: ModelView, grad: PseudoGradient, layer: int, options, inputs: torch.Tensor):
    """span_basis of block ``layer``'s first linear gradient (None when it is not exchanged);
    ``inputs`` are sample inputs of that layer, to measure the width they span."""
    found = view.input_space_gradient(grad, layer)
    if found is None:
        return None
    gradient, name = found
    floor = options.rank_tolerance * rounding_noise(view.value(name), grad.scale)
    return span_basis(gradient, floor, input_width(inputs))


def token_inputs(view: ModelView, layer: int, positions: int, vocab: int | None = None) -> torch.Tensor:
    """Inputs of block ``layer`` for sequences repeating one token, (tokens, positions, width):
    at layer 0 these are every (token, position) candidate, deeper a sample of the input space."""
    vocab = vocab or view.embedding().shape[0]
    return view.layer_inputs(torch.arange(vocab)[:, None].expand(vocab, positions), layer)


def distance(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Relative distance of each vector (last dim) to the span: 0 inside, about 1 for a random vector."""
    residual = z - (z @ basis) @ basis.T
    return residual.norm(dim=-1) / z.norm(dim=-1).clamp_min(1e-30)


class FirstLayer(NamedTuple):
    candidates: list[list[int]]
    """For each position, the tokens whose layer-0 input lies in the span of the gradient."""
    rank: int
    """The rank of layer 0's input-space gradient."""
    inputs: torch.Tensor
    """Every (token, position) candidate's layer-0 input, from :func:`token_inputs`."""


def search_first_layer(view: ModelView, grad: PseudoGradient, positions: int, options) -> FirstLayer | Reconstruction:
    """Layer 0's candidate tokens per position, or the Reconstruction that says why there are
    none: that layer's gradient is not exchanged, or the rank condition fails."""
    if view.input_space_gradient(grad, 0) is None:
        return Reconstruction([], applicable=False)
    inputs = token_inputs(view, 0, positions)
    basis, rank, ok = layer_basis(view, grad, 0, options, inputs)
    if not ok:
        return Reconstruction([], rank_condition=False, rank=rank)
    dist = distance(inputs, basis)
    candidates = [torch.nonzero(dist[:, p] < options.span_tolerance).flatten().tolist() for p in range(dist.shape[1])]
    return FirstLayer(candidates, rank, inputs)


def extend_prefixes(
    view: ModelView, candidates: list[list[int]], basis: torch.Tensor | None, tol: float, max_prefixes: int
) -> tuple[list[list[int]], bool]:
    """Grow prefixes position by position, keeping s+[v] whose layer-1 input at the new position is in span.

    A prefix that no candidate extends is finished (its next input is the sequence's
    last, which gets no gradient). Returns the sequences and whether the search
    overflowed ``max_prefixes`` (ambiguity the layers could not resolve).
    """
    prefixes, done = [[]], []
    for p, tokens in enumerate(candidates):
        trials = [s + [v] for s in prefixes for v in tokens]
        if basis is not None and trials:
            z = view.layer_inputs(torch.tensor(trials), 1)
            keep = distance(z[:, p], basis) < tol
            if p:  # a repeat of the previous input (a constant prefix, in a model without
                # position embeddings) is no new evidence: it would pass forever
                keep &= (z[:, p] - z[:, p - 1]).norm(dim=-1) > tol * z[:, p].norm(dim=-1)
            trials = [t for t, k in zip(trials, keep.tolist()) if k]
        done += [s for s in prefixes if not any(t[:-1] == s for t in trials)]
        prefixes = trials
        if len(prefixes) > max_prefixes:
            return [s for s in done if s] + prefixes[:max_prefixes], True
        if not prefixes:
            break
    return [s for s in done + prefixes if s], False


def span_check(view: ModelView, grad: PseudoGradient, positions: int, options) -> Reconstruction:
    first = search_first_layer(view, grad, positions, options)
    if isinstance(first, Reconstruction):
        return first
    basis1, ok1 = None, True
    if view.num_layers > 1 and view.input_space_gradient(grad, 1) is not None:
        vocab, width = first.inputs.shape[0], first.inputs.shape[-1]
        sample = token_inputs(view, 1, positions, vocab=min(vocab, 2 * width))
        basis1, _, ok1 = layer_basis(view, grad, 1, options, sample)
        basis1 = basis1 if ok1 else None  # a full-rank layer 1 cannot order; layer 0 still places tokens
    sequences, overflow = extend_prefixes(view, first.candidates, basis1, options.span_tolerance, options.max_prefixes)
    return Reconstruction(
        sequences, rank_condition=ok1 and not overflow, rank=first.rank, notes={"layer1_used": float(basis1 is not None)}
    )
