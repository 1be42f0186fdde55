"""Helpers for updates seen as one flat vector, the form most defenses and attacks reason in."""

from __future__ import annotations

import numpy as np
import torch

from .messages import State


def flatten(update: State) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in update.values()])


def unflatten(vector: torch.Tensor, like: State) -> State:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].view_as(t)
        start += t.numel()
    return out


def l2_norm(update: State) -> float:
    return float(torch.sqrt(sum((t.float() ** 2).sum() for t in update.values())))


def as_state(flat: np.ndarray, like: State) -> State:
    """A flat aggregate (as a defense decrypts or unmasks it) back to named tensors of the global
    state's dtypes and device."""
    return {
        name: t.to(dtype=like[name].dtype, device=like[name].device)
        for name, t in unflatten(torch.from_numpy(flat), like).items()
    }


def zeros_like(state: State) -> State:
    """The aggregate of a round in which no update arrived: the model does not move."""
    return {name: torch.zeros_like(t) for name, t in state.items()}


def clip_to_norm(update: State, max_norm: float) -> tuple[State, float]:
    """``update · min(1, max_norm / ‖update‖)`` over all parameters at once, and the norm before clipping."""
    norm = l2_norm(update)
    scale = min(1.0, max_norm / (norm + 1e-12))
    return {name: t * scale for name, t in update.items()}, norm


def gaussian_noise(like: State, std: float, generator: torch.Generator) -> State:
    """N(0, std²) on every coordinate, drawn on the CPU from ``generator`` (so reproducibly on any device)."""
    return {
        name: (std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(t.device)
        for name, t in like.items()
    }


def add_gaussian_noise(state: State, std: float, generator: torch.Generator) -> State:
    """``state`` + N(0, std²) on every coordinate (see :func:`gaussian_noise`)."""
    noise = gaussian_noise(state, std, generator)
    return {name: t + noise[name] for name, t in state.items()}
