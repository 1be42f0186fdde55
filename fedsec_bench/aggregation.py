"""FedAvg, the default aggregation rule (McMahan et al. 2017)."""

from __future__ import annotations

import torch

from .messages import Message, RoundContext, State
from .plugins import Plugin


def fedavg(messages: list[Message], like: State) -> State:
    """Example-weighted mean of the clients' updates; zeros when no client took part."""
    total = sum(m.num_examples for m in messages)
    out = {name: torch.zeros_like(t) for name, t in like.items()}
    for m in messages:
        if not isinstance(m.payload, dict):
            raise TypeError(
                f"client {m.client_id} sent a {type(m.payload).__name__}, not plain tensors: "
                "the defense that changed the transport must also provide the aggregation"
            )
        for name, value in m.payload.items():
            out[name] += value * (m.num_examples / total)
    return out


def refuse_nonlinear_aggregator(scenario, holds: str) -> None:
    """Load-time check of the transport defenses (encryption, masking): only a weighted sum runs on what they send.

    Robust rules (krum, median, trimmed mean...) need distances between, or the
    coordinate-wise order of, individual plaintext updates; the server has only ``holds``.
    """
    rule = scenario.federation.aggregator.name
    if rule != "fedavg":
        raise ValueError(
            f"federation.aggregator={rule} needs each client's plaintext update (distances or coordinate-wise "
            f"order), but the server holds only {holds}; only fedavg (a weighted sum) can be computed on them. "
            "Set federation.aggregator: fedavg, or drop this defense to use a robust rule"
        )


class FedAvg(Plugin):
    name = "fedavg"
    kind = "aggregator"
    summary = "example-weighted mean of the updates (McMahan et al. 2017)"

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        return fedavg(messages, like=round.global_state)
