"""FedAvg, the default aggregation rule (McMahan et al. 2017)."""

from __future__ import annotations

from .messages import Message, RoundContext, State, plain_updates
from .plugins import Plugin
from .updates import zeros_like


def fedavg(messages: list[Message], like: State) -> State:
    """Example-weighted mean of the clients' updates; zeros when no client took part."""
    total = sum(m.num_examples for m in messages)
    out = zeros_like(like)
    for m, update in zip(messages, plain_updates(messages, "fedavg")):
        for name, value in update.items():
            out[name].add_(value, alpha=m.num_examples / total)  # in place: no temporary the size of the model
    return out


class FedAvg(Plugin):
    name = "fedavg"
    kind = "aggregator"
    summary = "example-weighted mean of the updates (McMahan et al. 2017)"
    on_instruction_data = "weights each update by its client's prompt/response pairs; the same on every data format"
    aggregates_mean = True

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        return fedavg(messages, like=round.global_state)
