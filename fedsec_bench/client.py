"""One client's part of a round: its data, local training, its update, and what it sends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import torch
from torch.utils.data import DataLoader

from .ground_truth import ClientReport
from .messages import ClientContext, Message, State
from .plugins import HookChain


@dataclass
class LocalTraining:
    """The local optimisation a client runs; a defense may swap any part (Opacus wraps all three)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    steps: int
    device: torch.device
    accumulation: int = 1
    """Batches whose gradients are summed into each optimizer step (federation.grad_accumulation)."""
    on_step: Callable[[], None] | None = None
    """Called after each optimizer step (pretraining's progress bar)."""

    @classmethod
    def of_federation(cls, runtime, examples: list, seed: int) -> LocalTraining:
        """A client's local optimisation as the federation configures it (optimizer, learning rate, steps
        or epochs, accumulation), on ``examples`` batched with a loader seeded by ``seed``, from the
        model's current state. The same for every party that trains as a client does (the clients, a
        shadow federation, FLTrust's server on its root data)."""
        fed = runtime.scenario.federation
        return cls(
            model=runtime.model,
            optimizer=make_optimizer(list(runtime.trainable.params.values()), fed),
            loader=runtime.batcher.loader(examples, seed=seed),
            steps=local_steps(fed, len(examples)),
            device=runtime.device,
            accumulation=fed.grad_accumulation,
        )

    def run(self) -> float:
        """Take ``steps`` optimizer steps of ``accumulation`` batches each, cycling over the loader; return
        the mean batch loss.

        Each batch's loss is divided by ``accumulation``, so a step's gradient is the mean of
        its batches' gradients: with batches of equal token counts, the gradient of one batch
        ``accumulation`` times as large, at the activation memory of one batch.
        """
        self.model.train()
        total = torch.zeros((), device=self.device)
        batches = epochs(self.loader)
        for _ in range(self.steps):
            for batch in islice(batches, self.accumulation):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss = self.model(**batch).loss
                (loss / self.accumulation).backward()
                total += loss.detach()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.on_step:
                self.on_step()
        return (total / (self.steps * self.accumulation)).item()


def epochs(loader: DataLoader):
    """Batches epoch after epoch; each pass re-iterates the loader, so a shuffled loader reshuffles
    (itertools.cycle would replay the first epoch's order)."""
    if len(loader) == 0:
        raise ValueError("a client has no training batches")
    while True:
        yield from loader


def make_optimizer(params: list[torch.nn.Parameter], federation) -> torch.optim.Optimizer:
    if federation.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=federation.lr, momentum=federation.momentum, weight_decay=federation.weight_decay
        )
    return torch.optim.AdamW(params, lr=federation.lr, weight_decay=federation.weight_decay)


def local_steps(federation, num_examples: int) -> int:
    """Optimizer steps per round: local_steps, or local_epochs passes over the client's batches, each step
    taking grad_accumulation of them."""
    if federation.local_epochs is not None:
        batches = -(-num_examples // federation.batch_size)
        return federation.local_epochs * -(-batches // federation.grad_accumulation)
    return federation.local_steps


def client_seed(runtime, rnd: int, client_id: int) -> int:
    """The seed of a client's local training in a round, the same whichever executor runs it."""
    return runtime.seed_for(rnd, client_id)


def client_round(client: ClientContext, global_state: State, hooks: HookChain) -> tuple[Message | None, ClientReport]:
    """Train from the global state on the client's data; return what it sends (None if lost) and the
    simulator's report of it."""
    rt = client.runtime
    examples = hooks.client_data(client, rt.data.client_examples(client.client_id))
    torch.manual_seed(client.seed)  # dropout and any other randomness in local training
    rt.trainable.load(global_state)
    training = LocalTraining.of_federation(rt, examples, client.seed)
    steps = training.steps  # the schedule the federation set, before any hook changed it
    train_loss = hooks.local_training(client, training).run()
    update = hooks.client_update(client, rt.trainable.delta_from(global_state))
    message = hooks.transport(client, Message.of_update(client.client_id, len(examples), update, client.side))
    report = ClientReport(client.client_id, len(examples), train_loss, steps, dict(client.metrics), dict(client.notes))
    return message, report
