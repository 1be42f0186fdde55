"""``optimization``: find text whose gradient matches the observed one (TAG / LAMP style).

TAG (Deng et al. 2021) and LAMP (Balunovic et al. 2022) optimise dummy inputs so that
the gradient they induce matches the client's:

    min_x  1 - cos(grad(x), g)  +  a_2 ||grad(x) - g||^2 / ||g||^2  +  a_1 ||grad(x) - g||_1 / ||g||_1

A causal LM's labels are its own inputs, so the dummy is a soft token sequence: per
position a distribution q over the allowed tokens (the token_leak set when one can be
read, the whole vocabulary otherwise), embedded as q E and used, shifted by one, as
the soft label, with the end-of-text token the batcher always appends. At a one-hot
q this is exactly the client's loss. The sequence length is read off the position-
embedding gradient when it is exchanged (its non-zero rows are the positions that
got a loss), else chosen from a few lengths by the matching loss. q is projected to
its argmax tokens, then LAMP's discrete step tries random swaps and moves of tokens
and keeps those that lower matching loss + lm_prior_weight * (the global model's
own per-token NLL of the text, the only language model the server has).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .model_view import ModelView
from .result import Reconstruction


class GradientMatcher:
    """The matching loss between the gradient a (soft) token batch induces and the observed one."""

    def __init__(self, view: ModelView, grad, options):
        self.view, self.options = view, options
        self.names = list(grad.values)
        self.target = [grad[n].float().to(view.device) for n in self.names]
        self.target_norm = torch.sqrt(sum((t**2).sum() for t in self.target))
        self.target_l1 = sum(t.abs().sum() for t in self.target)
        self.eos = view.eos_id

    def loss(self, q: torch.Tensor, allowed: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """q: (batch, length, |allowed|) distributions over ``allowed`` token ids."""
        params = {n: self.view.value(n).float().detach().requires_grad_(True) for n in self.names}
        table = params.get(self.view.embedding_name, self.view.embedding().float())
        emb = torch.cat([q @ table[allowed], table[self.eos].expand(q.shape[0], 1, -1)], dim=1)
        with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
            logits = self.view.forward(params, inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2]))
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        next_q = logp[:, :-1, allowed] * q[:, 1:]
        lm_loss = -(next_q.sum() + logp[:, -1, self.eos].sum()) / (q.shape[0] * q.shape[1])
        dummy = torch.autograd.grad(lm_loss, [params[n] for n in self.names], create_graph=create_graph)
        return self._distance(dummy)

    def _distance(self, dummy) -> torch.Tensor:
        o = self.options
        dot = sum((d * t).sum() for d, t in zip(dummy, self.target))
        norm = torch.sqrt(sum((d**2).sum() for d in dummy)).clamp_min(1e-30)
        out = 1 - dot / (norm * self.target_norm)
        if o.l2_weight:
            out = out + o.l2_weight * sum(((d - t) ** 2).sum() for d, t in zip(dummy, self.target)) / self.target_norm**2
        if o.l1_weight:
            out = out + o.l1_weight * sum((d - t).abs().sum() for d, t in zip(dummy, self.target)) / self.target_l1
        return out

    def one_hot_loss(self, sequences: list[list[int]], allowed: torch.Tensor) -> float:
        index = {int(t): i for i, t in enumerate(allowed)}
        ids = torch.tensor([[index[t] for t in s] for s in sequences])
        return float(self.loss(F.one_hot(ids, len(allowed)).float(), allowed, create_graph=False))


def text_length(view: ModelView, grad, positions: int) -> int | None:
    """Tokens before the closing end-of-text: the positions whose embedding got a gradient
    (at most ``positions`` - 1, as the batcher keeps room for the end-of-text; noise fills every row)."""
    if view.position_name not in grad:
        return None
    rows = torch.nonzero(grad[view.position_name].double().norm(dim=1) > 0).flatten()
    return min(int(rows.max()) + 1, positions - 1) if rows.numel() else None


def relax(matcher: GradientMatcher, allowed, batch: int, length: int, steps: int, deadline: float, seed: int):
    """Adam on the logits of q; returns the logits and the final matching loss."""
    generator = torch.Generator().manual_seed(seed)
    z = (0.1 * torch.randn(batch, length, len(allowed), generator=generator)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=matcher.options.attack_lr)
    loss = torch.tensor(float("inf"))
    for _ in range(steps):
        if time.monotonic() > deadline:
            break
        opt.zero_grad()
        loss = matcher.loss(torch.softmax(z, dim=-1), allowed, create_graph=True)
        loss.backward()
        opt.step()
    return z.detach(), float(loss.detach())


def reorder(matcher: GradientMatcher, view: ModelView, sequences, allowed, options, deadline, rng) -> list[list[int]]:
    """LAMP's discrete step: random swaps/moves, kept when matching loss + prior weight * LM NLL drops."""

    def objective(seqs):
        value = matcher.one_hot_loss(seqs, allowed)
        if options.lm_prior_weight:
            ids = torch.tensor([s + [view.eos_id] for s in seqs])
            with torch.no_grad():
                logits = view.forward(input_ids=ids, attention_mask=torch.ones_like(ids))
            value += options.lm_prior_weight * float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))
        return value

    best, best_value = [list(s) for s in sequences], objective(sequences)
    for _ in range(options.reorder_steps):
        if time.monotonic() > deadline:
            break
        trial = [list(s) for s in best]
        seq = trial[rng.integers(len(trial))]
        i, j = sorted(rng.choice(len(seq), size=2, replace=False)) if len(seq) > 1 else (0, 0)
        if rng.random() < 0.5:
            seq[i], seq[j] = seq[j], seq[i]
        else:
            seq.insert(j, seq.pop(i))
        value = objective(trial)
        if value < best_value:
            best, best_value = trial, value
    return best


def optimization(view: ModelView, grad, positions: int, options, tokens: list[int] | None, batch: int, seed: int):
    """Relax, project, reorder. ``tokens`` constrains the vocabulary when token_leak could read it."""
    deadline = time.monotonic() + options.time_budget_s
    special = set(view.tokenizer.all_special_ids)
    vocab = tokens or [t for t in range(view.embedding().shape[0]) if t not in special]
    allowed = torch.tensor(sorted(vocab))
    matcher = GradientMatcher(view, grad, options)
    length = text_length(view, grad, positions)
    if length is None:  # choose among a few lengths with a short run each
        grid = sorted({max(2, round(x)) for x in np.linspace(2, positions - 1, options.length_candidates)})
        trials = {n: relax(matcher, allowed, batch, n, max(1, options.iterations // 10), deadline, seed)[1] for n in grid}
        length = min(trials, key=trials.get)
    z, loss = relax(matcher, allowed, batch, length, options.iterations, deadline, seed)
    sequences = allowed[z.argmax(-1)].tolist()
    if options.reorder_steps:
        sequences = reorder(matcher, view, sequences, allowed, options, deadline, np.random.default_rng(seed))
    return Reconstruction(sequences, notes={"match_loss": loss, "length": float(length)})
