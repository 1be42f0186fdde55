"""Where clients' local training runs. ``local`` trains them one after another in this process."""

from __future__ import annotations

from .client import client_round
from .messages import ClientContext, ClientReport, Message, RoundContext
from .plugins import HookChain


class LocalExecutor:
    def __init__(self, hooks: HookChain):
        self.hooks = hooks

    def run_clients(self, round: RoundContext) -> list[tuple[Message, ClientReport]]:
        rt = round.runtime
        return [
            client_round(ClientContext(cid, round.round, rt.seed_for(round.round, cid), rt), round.global_state, self.hooks)
            for cid in round.sampled
        ]


def make_executor(name: str, hooks: HookChain) -> LocalExecutor:
    return {"local": LocalExecutor}[name](hooks)
