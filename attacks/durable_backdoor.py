"""Backdoors built to last or to hide: Neurotoxin and the distributed backdoor attack (DBA).

Both are :class:`~fedsec_bench.attacks.backdoor.Backdoor` attacks: the same poisoned records,
the same held-out probes carrying the whole trigger, the same ``poison.backdoor_asr`` (and,
once the window closed, ``poison.backdoor_asr_after``). Combine either with ``scaling``
(same ``clients``) to boost the poisoned update past averaging, as for ``backdoor``.

``neurotoxin`` (Zhang et al., ICML 2022, "Neurotoxin: Durable backdoors in federated
learning") makes the backdoor outlive the attack: the attacker trains only on the
coordinates the benign clients change least, so their later updates do not overwrite it.
``dba`` (Xie et al., ICLR 2020, "DBA: Distributed backdoor attacks against federated
learning") splits the trigger among the malicious clients: each plants only its part, and
the assembled trigger fires the backdoor on the global model.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fedsec_bench.client import LocalTraining
from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.updates import flatten, unflatten

from .backdoor import Backdoor, BackdoorOptions


class NeurotoxinOptions(BackdoorOptions):
    ratio: float = Field(
        0.05, gt=0, lt=1,
        description="Fraction of the trainable coordinates masked: the top-ratio |Δ global| ones, which the benign "
                    "clients move most. The paper's NLP runs keep 95% (mask ratio 0.05).",
    )


def top_coordinates(direction: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the round(ratio · d) largest-magnitude coordinates of a flat vector (Neurotoxin's
    top-k%: the coordinates the attacker must not touch)."""
    mask = torch.zeros_like(direction, dtype=torch.bool)
    mask[direction.abs().topk(round(ratio * direction.numel())).indices] = True
    return mask


def project_steps(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], masked: State) -> None:
    """Projected gradient descent onto {θ : θ_masked = θ_received} for one client's local training.

    Before each optimizer step the masked coordinates of the gradient are zeroed (Neurotoxin's
    g ← g ⊙ (1 − mask), so the optimizer's moments never see it); after it they are set back to the
    received values, which decoupled weight decay would otherwise move, so the update is exactly
    zero there. The hooks live on this
    client's optimizer, which ``client_round`` builds afresh for every client.
    """
    held = [(p, masked[name], p.detach()[masked[name]].clone()) for name, p in params.items() if masked[name].any()]

    def zero_masked_gradient(*_):
        for p, mask, _values in held:
            if p.grad is not None:
                p.grad[mask] = 0

    @torch.no_grad()
    def project(*_):
        for p, mask, values in held:
            p[mask] = values

    optimizer.register_step_pre_hook(zero_masked_gradient)
    optimizer.register_step_post_hook(project)


class Neurotoxin(Backdoor):
    """Neurotoxin: a backdoor trained on the coordinates the benign updates leave alone.

    Algorithm (Zhang et al. 2022, Alg. 1), in each round a malicious client attacks:

    1. the benign direction is the last global step it saw, Δ = θ_t − θ_prev: the global model
       it receives this round minus the last earlier one a malicious client received;
    2. the mask is the top ``ratio`` of the coordinates of |Δ| (:func:`top_coordinates`), over
       all trainable parameters at once;
    3. it trains on its poisoned records (``backdoor``'s data and schedule) by projected gradient
       descent that never moves the masked coordinates (:func:`project_steps`), so its update is
       zero there.

    Knowledge assumed: only what a participating client sees, the global models it has
    received; the paper's attacker participates in consecutive rounds and reads the last
    global step as the benign clients' gradient. The malicious clients share that memory (one
    attacker). Before any malicious client received an earlier global model (the first round
    one is sampled) there is no direction and no mask: the attacker trains as ``backdoor``.
    (The paper's code instead ranks the gradient of the attacker's clean data; the paper's text,
    followed here, uses the previous global update.)

    The memory is recorded on the driver, in the ``collusion`` hook (which replaces no message):
    it runs every round in the same process whichever the executor, so under executor ray the
    workers receive it with the plugin at the round's start, and it is a plain attribute that a
    checkpoint keeps.
    """

    name = "neurotoxin"
    summary = ("backdoor trained by PGD off the top-ratio coordinates of the last global step, so benign "
               "rounds do not erase it (Zhang et al. 2022); logs poison.backdoor_asr(_after)")
    on_instruction_data = ("as backdoor (trigger in the instruction, target as the response); the mask acts on "
                           "the update only")
    OptionsModel = NeurotoxinOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.previous: State | None = None  # the last global model a malicious client received, before this round

    def collusion(self, round: RoundContext, messages: list[Message]) -> list[Message]:
        """Remember the global model a malicious client received this round; the messages pass untouched."""
        if received := sorted(self.malicious.intersection(round.sampled)):
            self.previous = round.sent_to(received[0])
        return messages

    def local_training(self, client: ClientContext, training: LocalTraining) -> LocalTraining:
        training = super().local_training(client, training)
        if self.attacks(client.client_id, client.round) and self.previous is not None:
            trainable = self.runtime.trainable
            project_steps(training.optimizer, trainable.params, self.mask(trainable.snapshot()))
        return training

    def mask(self, received: State) -> State:
        """True on the coordinates the last global step moved most: top ``ratio`` of |received − previous|."""
        direction = {name: t - self.previous[name].to(t.device) for name, t in received.items()}
        return unflatten(top_coordinates(flatten(direction), self.options.ratio), like=direction)


class DBAOptions(BackdoorOptions):
    trigger: str = Field(
        "cf mn bb tq", min_length=1,
        description="The global trigger phrase, split on whitespace into the local triggers (the parts).",
    )
    parts: int | None = Field(
        None, ge=1,
        description="Local triggers the trigger is split into; default the number of malicious clients, at most "
                    "the trigger's word count.",
    )


class DistributedBackdoor(Backdoor):
    """DBA (Xie et al. 2020) on text: the global trigger split into local triggers.

    The trigger's words are cut into ``parts`` contiguous local triggers of near-equal length
    (the text analogue of the paper's four local pixel patterns); the i-th malicious client in
    sorted id order plants only part i mod ``parts``, as ``backdoor`` plants the whole trigger
    (same records, same position rules). No malicious client ever trains on the whole trigger;
    the ASR (``poison.backdoor_asr``) is measured with it, on the held-out probes. Knowledge:
    each client knows only its part; the split is agreed before the attack.
    """

    name = "dba"
    summary = ("distributed backdoor: each malicious client plants one part of the trigger, the ASR uses the whole "
               "(Xie et al. 2020); logs poison.backdoor_asr(_after)")
    on_instruction_data = ("as backdoor, with the client's part of the trigger inserted into the instruction; the "
                           "probes carry the whole trigger")
    OptionsModel = DBAOptions

    @classmethod
    def check(cls, options, scenario) -> None:
        super().check(options, scenario)
        words = len(options.trigger.split())
        if options.parts is not None and options.parts > words:
            raise ValueError(f"parts={options.parts}: the trigger {options.trigger!r} has only {words} word(s); "
                             "give a trigger of at least that many words or fewer parts")

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        words = options.trigger.split()
        parts = options.parts or min(len(self.malicious), len(words))
        self.local_triggers = [" ".join(chunk) for chunk in np.array_split(np.array(words, dtype=object), parts)]
        self.part_of = {cid: i % parts for i, cid in enumerate(sorted(self.malicious))}

    def trigger_for(self, client: ClientContext) -> str:
        return self.local_triggers[self.part_of[client.client_id]]
