"""The federated round loop. Each line is one step of the protocol in docs/design.md.

The server-side hooks get the round's public facts (:class:`RoundContext`: what the server
sent each client, which messages arrived) and the delivered messages; the simulator's reports become the round's :class:`RoundTruth`, which
only the scorers (``score_round``) see, after the server has stepped.
"""

from __future__ import annotations

import time

import numpy as np

from .evaluation import answer_quality, evaluate
from .executors import Executor
from .ground_truth import RoundTruth
from .messages import Message, RoundContext, State, state_bytes
from .plugins import HookChain
from .runtime import Runtime
from .scenario import FederationConfig


class Federation:
    def __init__(self, runtime: Runtime, hooks: HookChain, executor: Executor):
        self.rt = runtime
        self.hooks = hooks
        self.executor = executor
        self.config = runtime.scenario.federation

    def run_round(self, rnd: int) -> dict[str, float]:
        started = time.perf_counter()
        round = RoundContext(rnd, self.rt, self.sample_clients(rnd), self.rt.trainable.snapshot())
        round.dispatched = self.dispatch(round)
        sent, reports = _unzip(self.executor.run_clients(round))
        truth = RoundTruth(reports)
        self.rt.trainable.load(round.global_state)  # the last local client's model must not reach the server
        messages = [m for m in sent if m is not None]  # lost on the way: the server never sees them
        round.delivered = [m.client_id for m in messages]
        messages = self.hooks.collusion(round, messages)
        metrics = self.hooks.server_observation(round, messages)
        aggregate = self.hooks.aggregation(round, messages)
        aggregate = self.hooks.post_aggregation(round, aggregate)
        self.rt.trainable.step(round.global_state, aggregate, scale=self.config.server_lr)
        metrics |= self.round_figures(round, truth, messages, started)
        if rnd % self.config.eval_every == 0 or rnd == self.config.rounds:
            metrics |= self.evaluate()
        metrics |= self.hooks.score_round(round, truth, metrics)
        return metrics

    def dispatch(self, round: RoundContext) -> dict[int, State]:
        """What the server sends each sampled client: the global state, unless a malicious server's
        ``dispatch`` crafts another (checked to have the global state's names and shapes, as a
        client loading it would)."""
        sent = {cid: self.hooks.dispatch(round, cid, round.global_state) for cid in round.sampled}
        for cid, state in sent.items():
            if state is not round.global_state:
                check_layout(state, round.global_state, f"round {round.round}: the state dispatched to client {cid}")
        return sent

    def evaluate(self) -> dict[str, float]:
        rt, config = self.rt, self.rt.scenario.eval
        figures = evaluate(rt.model, rt.eval_loader, rt.device)
        if rt.answered:
            figures |= answer_quality(rt.model, rt.batcher, rt.answered, config.max_new_tokens, config.batch_size, rt.device)
        return figures

    def sample_clients(self, rnd: int) -> list[int]:
        return sample_clients(self.config, self.rt.seed_for(rnd))

    def round_figures(self, round: RoundContext, truth: RoundTruth, messages: list[Message], started: float) -> dict[str, float]:
        """The core's figures of a round. ``train.loss`` is the mean loss of the clients whose update
        arrived (the ones the model learned from); a round in which none arrived logs
        ``round.clients`` 0 and no ``train.loss`` (FedAvg's aggregate is then zero: the model stays).
        ``poison.malicious_clients``, in rounds someone attacked, is how many did (the simulator's truth:
        a figure outside the protocol, never shown to the server)."""
        sent = [m.num_bytes for m in messages]
        delivered = set(round.delivered)
        losses = [r.train_loss for r in truth.reports if r.client_id in delivered]
        figures = {"train.loss": float(np.mean(losses))} if losses else {}
        if attackers := truth.malicious_clients():
            figures["poison.malicious_clients"] = float(len(attackers))  # the real count, beside a rule's declared f
        return figures | {
            "round.clients": float(len(messages)),
            "fault.dropped_clients": float(len(round.sampled) - len(round.delivered)),
            "fault.failed_clients": float(len(round.sampled) - len(truth.reports)),
            "cost.bytes_up": float(np.mean(sent)) if sent else 0.0,
            "cost.bytes_up_total": float(sum(sent)),
            "cost.bytes_down": float(state_bytes(round.global_state)),
            "cost.round_seconds": time.perf_counter() - started,
        }


def sample_clients(config: FederationConfig, seed: int) -> list[int]:
    """uniform: clients_per_round without replacement; poisson: each client with q = k / n."""
    rng = np.random.default_rng(seed)
    n, k = config.num_clients, config.clients_per_round
    if config.sampling == "poisson":
        return np.flatnonzero(rng.random(n) < k / n).tolist()
    return np.sort(rng.choice(n, size=k, replace=False)).tolist()


def check_layout(state: State, like: State, what: str) -> None:
    """Refuse a state whose parameter names, shapes or dtypes differ from ``like``'s."""
    if set(state) != set(like):
        raise ValueError(f"{what} has other parameters than the global state: "
                         f"{sorted(set(state) ^ set(like))[:3]}")
    for name, tensor in state.items():
        if tensor.shape != like[name].shape or tensor.dtype != like[name].dtype:
            raise ValueError(f"{what}: {name} is {tuple(tensor.shape)} {tensor.dtype}, the global state's "
                             f"{tuple(like[name].shape)} {like[name].dtype}")


def _unzip(pairs):
    return [m for m, _ in pairs], [r for _, r in pairs]
