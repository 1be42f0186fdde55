"""Non-finite losses and weights: a diverged run must not end FINISHED with stale figures.

Once a loss is NaN or a weight infinite, every later figure is meaningless, and a privacy
or attack figure computed on such a model would look like a result. After each round the
runner asks :func:`nonfinite`; with ``federation.on_nonfinite: stop`` (the default) it
raises :class:`Diverged` and the run ends FAILED, with ``continue`` it tags the run and goes on.
"""

from __future__ import annotations

import math

import torch

from .errors import Diverged
from .tuning import TrainableState

WATCHED = ("train.loss", "utility.eval_loss")
"""Losses whose non-finite value means training diverged (an attack's own figure may be inf by design)."""


def nonfinite(metrics: dict[str, float], trainable: TrainableState) -> list[str]:
    """What is not finite after a round: watched losses by name, then the global model's weights."""
    found = [f"{name} is {metrics[name]}" for name in WATCHED if name in metrics and not math.isfinite(metrics[name])]
    if not all(torch.isfinite(p).all() for p in trainable.params.values()):
        found.append("the global model has non-finite weights (the aggregate was not finite)")
    return found


def diverged(rnd: int, found: list[str], federation) -> Diverged:
    return Diverged(
        f"round {rnd}: {'; '.join(found)}: training diverged. Lower federation.lr ({federation.lr:g}) or "
        f"federation.server_lr ({federation.server_lr:g}), or bound the updates (defenses: norm_clip); "
        "federation.on_nonfinite: continue logs such rounds and goes on"
    )
