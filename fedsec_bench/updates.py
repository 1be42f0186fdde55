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
