"""Free riders: clients that take the global model without contributing, sending an update they never trained.

Lin, Du & Liu 2019 ("Free-riders in federated learning: attacks and defenses"; FedML's lazy
worker): a free rider skips local training, saving its compute, and fabricates the update it
sends so that the server cannot tell (``mode``):

- ``stale``: the last global-model change it observed, the global state it receives now minus
  the one it received the previous time it was sampled (Lin et al.'s delta-weights free rider;
  zero the first time, when it has nothing to subtract). It needs only what it was sent;
- ``noise``: N(0, std²) on every coordinate (Lin et al.'s disguised free rider: a fabricated
  update of small random values);
- ``zero``: nothing at all.

It runs no optimizer step (its local training is replaced by one that takes none) and records
the steps it skipped: ``free_rider.saved_steps`` per round (the local steps the round's free
riders did not run). What it costs the others is read against the clean run in
``fedsec compare`` (utility.eval_loss, utility.perplexity): the model learns from fewer clients.
Whether the aggregation rule catches it is a robust rule's ``robust.exclusion_recall``: a free
rider is marked malicious in the rounds it free-rides, so that figure is the fraction of its
updates the rule excluded or down-weighted, and this attack does not duplicate it.

Knowledge assumed: its own client's view only (what it was sent); stale mode keeps the last
state it received, carried across rounds and checkpoints on the plugin, so it needs
``executor: local`` (under Ray that memory would stay on a worker).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from fedsec_bench.client import LocalTraining
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, RoundContext, State
from fedsec_bench.updates import gaussian_noise, zeros_like

from .poisoning import PoisoningAttack, PoisoningOptions

SAVED_STEPS = "free_rider.saved_steps"


class FreeRiderOptions(PoisoningOptions):
    mode: Literal["stale", "noise", "zero"] = Field(
        "stale", description="What a free rider sends: the global change it last observed (stale), N(0, std²) "
        "noise, or zero."
    )
    std: float = Field(1e-3, gt=0, description="mode noise: the standard deviation of each sent coordinate.")

    @model_validator(mode="after")
    def _std_needs_noise(self) -> FreeRiderOptions:
        if "std" in self.model_fields_set and self.mode != "noise":
            raise ValueError(f"std: only mode noise sends noise, but mode is {self.mode}; drop std or set mode: noise")
        return self


class SkippedTraining(LocalTraining):
    """Local training that takes no optimizer step."""

    def run(self) -> float:
        """The loss of the received model on one of the client's batches, without gradients: the simulator's
        report (``train.loss``) needs a finite loss, and the mean over no step would be 0/0."""
        batch = {k: v.to(self.device) for k, v in next(iter(self.loader)).items()}
        self.model.eval()
        with torch.no_grad():
            return self.model(**batch).loss.item()


class FreeRider(PoisoningAttack):
    """Skip local training and send a fabricated update (Lin et al. 2019)."""

    name = "free_rider"
    summary = "free riders skip local training and send a stale global change, noise or zero; logs free_rider.saved_steps"
    on_instruction_data = "never trains on its records; the same on every data format"
    OptionsModel = FreeRiderOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.received: dict[int, State] = {}
        """stale: the state each free rider received the last time it was sampled."""
        self.observed: dict[int, State] = {}
        """stale: each free rider's latest observed global change (received now minus received before)."""

    @classmethod
    def check(cls, options, scenario) -> None:
        super().check(options, scenario)
        if options.mode == "stale" and scenario.federation.executor == "ray":
            raise ValueError("free_rider mode stale remembers the global state each free rider last received, which "
                             "under federation.executor ray stays on a worker; use executor: local, or mode noise or zero")

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        if self.options.mode == "stale" and client.client_id in self.malicious:
            self.observe(client.client_id, client.runtime.trainable.snapshot())  # also when honest: it still sees
        if not self.attacking(client):
            return training
        client.metrics[SAVED_STEPS] = float(training.steps)
        return SkippedTraining(**{**vars(training), "steps": 0})

    def observe(self, client_id: int, received: State) -> None:
        """Remember what the client received; its observed change is that minus what it received before."""
        before = self.received.get(client_id)
        self.observed[client_id] = zeros_like(received) if before is None else {
            name: t - before[name] for name, t in received.items()
        }
        self.received[client_id] = received

    def client_update(self, client: ClientContext, update: State) -> State:
        if not self.attacks(client.client_id, client.round):
            return update
        if self.options.mode == "stale":
            return {name: t.clone() for name, t in self.observed[client.client_id].items()}
        if self.options.mode == "noise":
            return gaussian_noise(update, self.options.std, torch.Generator().manual_seed(client.seed))
        return zeros_like(update)

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        saved = truth.client_values(SAVED_STEPS)
        return {SAVED_STEPS: float(sum(saved.values()))} if saved else {}
