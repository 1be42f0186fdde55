"""Where clients' local training runs. ``local`` trains them one after another in this process."""

from __future__ import annotations

from .client import client_round
from .messages import ClientContext, ClientReport, Message, RoundContext
from .plugins import HookChain


class LocalExecutor:
    def __init__(self, hooks: HookChain):
        self.hooks = hooks

    def run_clients(self, round: RoundContext) -> list[tuple[Message | None, ClientReport]]:
        rt = round.runtime
        contexts = [ClientContext(cid, round.round, rt.seed_for(round.round, cid), rt, peers=list(round.sampled))
                    for cid in round.sampled]
        return [client_round(client, round.global_state, self.hooks) for client in contexts]


def make_executor(name: str, hooks: HookChain) -> LocalExecutor:
    return {"local": LocalExecutor}[name](hooks)
