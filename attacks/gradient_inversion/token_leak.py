"""``token_leak``: which tokens were in the client's batch, read off the embedding gradient.

An input embedding is a lookup: its gradient is non-zero exactly on the rows of the
tokens the batch fed in (those whose position receives a gradient; each sequence's
last input, the end-of-text token, does not). With an untied output layer this is
exact whatever the batch (Melis et al. 2019; Gupta et al. 2022, FILM).

With tied input/output embeddings (GPT-2) every row also carries the output
layer's gradient sum_t (p_t[v] - y_t[v]) h_t, which lies in the span of the N final
hidden states H. An input row adds its own embedding gradient, a direction no other
row has, so it has leverage 1 in the gradient matrix (removing it lowers the rank)
while every other row, one of V-k rows sharing span(H), has leverage below 1 (well
below while predictions are spread; closer to 1 once they concentrate on few tokens).
This is exact when the gradient is rank deficient, N + k < d (N positions with a
loss, k distinct input tokens, d the hidden width); beyond that the figure is a
heuristic and the result says the condition failed.

In lora mode no embedding is exchanged; the tokens whose layer-0 input lies in the
span of the LoRA-A gradient are used instead (see span_check). Prompt mode exchanges
nothing a token can be read from, and the result says so.
"""

from __future__ import annotations

import torch

from .model_view import ROUNDING_STD, ModelView, PseudoGradient, rounding_noise
from .result import Reconstruction
from .span_check import search_first_layer

LEVERAGE_CUT = 1 - 1e-5
"""Input rows have leverage 1 up to rounding (measured 1 - lev < 1e-7 on the tiny models of the
tests); others stay below 1 - 1e-3 there, even after rounds that concentrate the predictions."""


def nonzero_rows(gradient: torch.Tensor, table: torch.Tensor, scale: float, tol: float) -> list[int]:
    """Rows above ``tol`` times their float32 rounding (zero exactly, unless weight decay was undone)."""
    noise = ROUNDING_STD * table.double().norm(dim=1) * abs(scale)
    return torch.nonzero(gradient.double().norm(dim=1) > tol * noise).flatten().tolist()


def high_leverage_rows(gradient: torch.Tensor, floor: float, skip: list[int]) -> tuple[list[int], int, bool]:
    """Rows that carry a direction no other row has: leverage ||U_v||^2 > LEVERAGE_CUT (G = U S V^T).

    Rows in ``skip`` (the special tokens the batcher adds; the end-of-text is every
    sequence's last label, and its row stands out almost as much as an input's) are left
    out. The condition is checked on what is observed: G is rank deficient, some rows stand out
    (a batch has at least one input), and the rows found add one dimension each (rank G =
    rank of the other rows + their number), as input rows do when N + k < d. Past that the
    other rows alone fill the space the rows can take (d - 1 for GPT-2: LayerNorm's backward
    pass centres the embedding gradient) and no row stands out.
    """
    keep = torch.ones(gradient.shape[0], dtype=torch.bool)
    keep[skip] = False
    rows = torch.nonzero(keep).flatten()
    g = gradient.double()[rows]
    u, s, _ = torch.linalg.svd(g, full_matrices=False)
    rank = int((s > floor).sum())
    found = torch.nonzero((u[:, :rank] ** 2).sum(dim=1) > LEVERAGE_CUT).flatten()
    rest = torch.ones(g.shape[0], dtype=torch.bool)
    rest[found] = False
    rest_rank = int((torch.linalg.svdvals(g[rest]) > floor).sum())
    return rows[found].tolist(), rank, rank < min(g.shape) and 0 < len(found) == rank - rest_rank


def token_leak(view: ModelView, grad: PseudoGradient, positions: int, options) -> Reconstruction:
    if view.embedding_name in grad:
        g, table = grad[view.embedding_name], view.embedding()
        if not view.tied:
            return Reconstruction([nonzero_rows(g, table, grad.scale, options.rank_tolerance)])
        floor = options.rank_tolerance * rounding_noise(table, grad.scale)
        tokens, rank, ok = high_leverage_rows(g, floor, skip=view.tokenizer.all_special_ids)
        return Reconstruction([tokens], rank_condition=ok, rank=rank)
    first = search_first_layer(view, grad, positions, options)
    if isinstance(first, Reconstruction):
        return first
    return Reconstruction([sorted({t for ts in first.candidates for t in ts})], rank_condition=True, rank=first.rank)
