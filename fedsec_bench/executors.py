"""Where clients' local training runs: ``local`` (one after another in this process) or ``ray``.

An executor turns a round into, for each sampled client that completed its part (trained from
the state the server sent it, ``round.sent_to(client)``), what it sent (None when the transport lost it) and the simulator's report. Everything else in the
round (sampling, server-side hooks, evaluation, logging) stays in the round loop. A client
that never completed (executor ray: its task failed twice) has no pair at all; the round
loop counts it in ``fault.failed_clients``.
"""

from __future__ import annotations

from typing import Protocol

from .client import client_round, client_seed
from .ground_truth import ClientReport
from .messages import ClientContext, Message, RoundContext
from .plugins import HookChain
from .runtime import Runtime

ClientResult = tuple[Message | None, ClientReport]


class Executor(Protocol):
    def run_clients(self, round: RoundContext) -> list[ClientResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Clients train one after another on the driver's own model; an exception ends the run."""

    def __init__(self, hooks: HookChain):
        self.hooks = hooks

    def run_clients(self, round: RoundContext) -> list[ClientResult]:
        rt, rnd = round.runtime, round.round
        digests = round.received_digests() if self.hooks.needs_peer_digests else {}
        return [
            client_round(ClientContext(cid, rnd, client_seed(rt, rnd, cid), rt, peers=list(round.sampled),
                                       peer_digests=dict(digests)),
                         round.sent_to(cid), self.hooks)
            for cid in round.sampled
        ]

    def close(self) -> None:
        pass


def make_executor(runtime: Runtime, hooks: HookChain) -> Executor:
    if runtime.scenario.federation.executor == "ray":
        from .ray_executor import RayExecutor  # ray is an optional dependency

        return RayExecutor(runtime, hooks)
    return LocalExecutor(hooks)
