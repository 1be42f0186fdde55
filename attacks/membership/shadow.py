"""Reference and shadow models for the calibrated attacks (reference, LiRA, RMIA).

The attacker knows the training recipe (Carlini et al. 2022's assumption) and replays
it: the scenario's architecture, tuning mode and initial weights, and its federated
recipe (clients, rounds, local steps, gradient accumulation, optimizer, lr) simulated in
one process on the attacker's own examples, batched by the run's batcher (so the same
tokens are trained on: the response of a prompted example). Defenses are not applied to
them. To stay cheap they are not separate models: each is a :data:`State` of the
trainable parameters, swapped in and out of the runtime's model.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from fedsec_bench import progress
from fedsec_bench.client import LocalTraining
from fedsec_bench.data import Example
from fedsec_bench.messages import State

from .scores import mean_logprob, token_logprobs, total_logprob


@contextmanager
def using_state(runtime, state: State):
    """Load ``state`` into the runtime's model for the block, then put the previous state back."""
    saved = runtime.trainable.snapshot()
    runtime.trainable.load(state)
    try:
        yield
    finally:
        runtime.trainable.load(saved)


def train_like_target(runtime, start: State, examples: list[Example], seed: int) -> State:
    """FedAvg from ``start`` on ``examples``, with the scenario's own recipe; return the final trainable state.

    The examples are dealt iid to ``num_clients`` simulated clients; every round samples
    ``clients_per_round`` of them, each runs the scenario's local training (optimizer,
    lr, local steps, gradient accumulation, batch size), and the example-weighted mean
    update is applied with ``server_lr``. Averaging dilutes each client's contribution, so a centrally trained
    model with as many passes would memorise its data more than the target did, and
    LiRA's IN distribution would be wrong. Defenses are not simulated. The runtime's
    model is left as it was.
    """
    fed = runtime.scenario.federation
    rng = np.random.default_rng(seed)
    parts = [p for p in np.array_split(rng.permutation(len(examples)), fed.num_clients) if p.size]
    with using_state(runtime, start), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(fed.rounds):
            global_state = runtime.trainable.snapshot()
            total = {n: torch.zeros_like(t) for n, t in global_state.items()}
            chosen = rng.choice(len(parts), size=min(fed.clients_per_round, len(parts)), replace=False)
            round_examples = sum(parts[c].size for c in chosen)
            for c in chosen:
                local = [examples[i] for i in parts[c]]
                runtime.trainable.load(global_state)
                LocalTraining.of_federation(runtime, local, seed=int(rng.integers(2**31))).run()
                for n, delta in runtime.trainable.delta_from(global_state).items():
                    total[n] += delta * (parts[c].size / round_examples)
            runtime.trainable.step(global_state, total, scale=fed.server_lr)
        return runtime.trainable.snapshot()


def balanced_halves(num_models: int, num_examples: int, rng: np.random.Generator) -> np.ndarray:
    """keep[j, i]: example i is in model j's training set; each example is IN for exactly half the models.

    The LiRA reference code's construction: an independent random order of the models
    per example, the first half of which train on it.
    """
    order = np.argsort(rng.random((num_models, num_examples)), axis=0)
    return order < num_models // 2


def reference_logprobs(runtime, initial: State, population: list[Example], universe: list[Example], seed: int):
    """Per-token log-probs of ``universe`` under a reference model trained on ``population`` only."""
    state = train_like_target(runtime, initial, population, seed)
    with using_state(runtime, state):
        return token_logprobs(runtime, universe)


def shadow_statistics(
    runtime, initial: State, targets: list[Example], scored: list[Example], num_shadows: int, rng
):
    """Train ``num_shadows`` models on balanced random halves of ``targets`` and score ``scored`` with each.

    A half of the targets is as large as the target model's own training set when all
    members are attacked, as in the LiRA setup where the target is one more such model.
    Returns (mean, total, keep): −loss and log-likelihood of every scored example under
    every shadow, shape (num_shadows, len(scored)), and keep[j, i] = target i was in
    shadow j's half.
    """
    keep = balanced_halves(num_shadows, len(targets), rng)
    mean, total = np.empty((num_shadows, len(scored))), np.empty((num_shadows, len(scored)))
    with progress.bar(num_shadows, "membership: shadow models", unit="model") as bar:
        for j in range(num_shadows):
            half = [targets[i] for i in np.flatnonzero(keep[j])]
            state = train_like_target(runtime, initial, half, int(rng.integers(2**31)))
            with using_state(runtime, state):
                logprobs = token_logprobs(runtime, scored)
            mean[j], total[j] = mean_logprob(logprobs), total_logprob(logprobs)
            bar.update()
    return mean, total, keep
