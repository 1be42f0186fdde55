"""``active_membership``: a malicious server's active membership inference by gradient ascent.

Nasr, Shokri and Houmansadr, "Comprehensive Privacy Analysis of Deep Learning: Passive and
Active White-box Inference Attacks against Centralized and Federated Learning" (IEEE S&P
2019), the active "gradient ascent" attacker (their Section IV-C). The server holds a set of
candidate records and wants to know which of them one client trains on. Before the attack
round it runs gradient ascent on the candidates' loss, ``W ← W + γ ∇_W L(candidates)``, and
sends that model to the target client only. Local training pulls the loss of the records
the client holds sharply back down. Records it does not hold go back down only as far as
the client's other data generalises to them. The sharper descent is the membership signal.

Per candidate x, with ``L`` its mean token loss, the server measures (option ``statistic``):

- ``net_drop`` (default): ``L(x; global) − L(x; sent + update)``, how far below the honest
  model the client's round took x. The ascent raises each candidate's loss by its own amount,
  which depends on the record and not on membership; the server knows that rise (it made it),
  and this statistic takes it off, leaving what the client's training did beyond undoing it;
- ``drop``: ``L(x; sent) − L(x; sent + update)``, the plain recovery, rise included.

Higher means "more likely a member", the package convention. With ``ascent_steps: 0`` the
server sends the honest global state, both statistics are the same loss drop, and that is the
passive control: the active attack's gain is measured on the same draw. The lever is the size
of the gradients the ascent leaves on members: local SGD turns it into a larger step; Adam
normalises it away (on the tiny test models the active attack gains nothing under adamw).

Assumptions: the server controls the state it dispatches (any plugin's ``dispatch`` output is
what the client trains from). It reads the target's plain update, or the update that
``model_inconsistency`` isolated from a secure aggregate or an HE sum (``round.isolated``;
list that attack first). It knows the candidates, never which are members. Candidates are
``num_samples`` of the target's ordinary records and as many held-out records, drawn as
``membership_inference`` draws them (:func:`.membership.draw_samples`). Which is which is
the simulator's truth, read only by the scorer. Modes: ``full``, and ``lora``, where the
server sends (and so ascends) only the adapters. ``prompt`` is refused: a soft prompt of a few
vectors conditions every text alike. Ascent on it raises every candidate's loss by a shared
shift that the client's descent takes back for members and non-members alike, so it adds
no per-record signal.

Figures, logged at ``attack_round`` (``score_round``, against the truth):

- ``mia.active.auc``: ROC AUC of the statistic (0.5 is chance; higher = more leakage);
- ``mia.active.tpr_at_1pct_fpr``: TPR at 1 % FPR (higher = more leakage; below 1/num_samples
  FPR this is the TPR at zero false positives);
- ``mia.active.num_samples``: members attacked (as many non-members);
- ``mia.active.update_readable``: 1 when the server read the target's update, 0 when it
  could not (masked or encrypted and not isolated, or the target was not sampled, or its
  message was lost). Then no other figure is logged.

The per-candidate table is the artifact ``mia_active_scores.csv``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from fedsec_bench.data import Example
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.lm import evaluating
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin

from .membership import draw_samples
from .membership.roc import auc, tpr_at_fpr
from .membership.scores import SCORING_BATCH, mean_logprob, token_logprobs
from .membership.shadow import using_state

PREFIX = "mia.active."
SEED_KEY = 7019  # keeps this attack's draw of candidates apart from the federation's and other attacks'


class ActiveMembershipOptions(Options):
    target_client: int | None = Field(None, ge=0, description="Client attacked (default: the attack round's first sampled).")
    attack_round: int | None = Field(None, ge=1, description="Round whose dispatch is crafted (default: the last).")
    num_samples: int | None = Field(
        None, ge=2, description="Candidate members from the target's records, and as many held-out non-members; "
        "default: all the target's records (at most as many as the held-out split)."
    )
    ascent_steps: int = Field(
        5, ge=0, le=1000, description="Full-batch gradient-ascent steps on the candidates' loss before sending "
        "(0: the honest global state, the passive control)."
    )
    ascent_lr: float = Field(0.1, gt=0, le=100, description="Step size γ of the gradient ascent.")
    statistic: Literal["net_drop", "drop"] = Field(
        "net_drop", description="net_drop: loss under the global state minus loss after the client's round; "
        "drop: loss under the sent state minus loss after the round."
    )


class ActiveMembership(Plugin):
    name = "active_membership"
    kind = "attack"
    summary = "malicious server: gradient ascent on candidate records in the model sent to one client (Nasr et al. 2019)"
    on_instruction_data = "ascends and scores the loss on the response given its prompt, the tokens the client trains on"
    modes = frozenset({"full", "lora"})
    OptionsModel = ActiveMembershipOptions

    def __init__(self, options: ActiveMembershipOptions, runtime):
        super().__init__(options, runtime)
        self.attack_round = options.attack_round or runtime.scenario.federation.rounds
        self.candidates: list[Example] = []
        self.is_member = np.zeros(0, bool)
        """Which candidates are the target's records: the simulator's truth, read only in score_round."""
        self.update: State | None = None
        self.loss_honest = np.zeros(0)
        self.losses: pd.DataFrame | None = None

    @classmethod
    def check(cls, options: ActiveMembershipOptions, scenario) -> None:
        fed = scenario.federation
        if options.attack_round is not None and options.attack_round > fed.rounds:
            raise ValueError(f"attack_round ({options.attack_round}) is after the last round ({fed.rounds})")
        if options.target_client is not None and options.target_client >= fed.num_clients:
            raise ValueError(f"target_client ({options.target_client}) is not a client id (0..{fed.num_clients - 1})")

    # --- hooks -------------------------------------------------------------------------
    def dispatch(self, round: RoundContext, client_id: int, state: State) -> State:
        """The target, in the attack round, gets ``state`` after gradient ascent on the candidates; all else ``state``."""
        if round.round != self.attack_round or client_id != self.target(round):
            return state
        self.candidates, self.is_member = self.draw_candidates(client_id)
        self.loss_honest = candidate_losses(self.runtime, state, self.candidates)
        if self.options.ascent_steps == 0:
            return state
        return gradient_ascent(self.runtime, state, self.candidates, self.options.ascent_steps, self.options.ascent_lr)

    def server_observation(self, round: RoundContext, messages: list[Message]) -> None:
        if round.round != self.attack_round:
            return
        target = self.target(round)
        plain = [m.payload for m in messages if m.client_id == target and m.is_plain]
        self.update = plain[0] if plain else None

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Measure each candidate's loss before and after the target's round, from its plain or isolated update."""
        if round.round != self.attack_round or not self.candidates:
            return aggregate
        target = self.target(round)
        update = self.update if self.update is not None else round.isolated.get(target)
        if update is not None:
            sent = round.sent_to(target)
            trained = {n: sent[n] + update[n].to(sent[n].dtype) for n in sent}
            self.losses = pd.DataFrame({
                "loss_honest": self.loss_honest,
                "loss_sent": candidate_losses(self.runtime, sent, self.candidates),
                "loss_trained": candidate_losses(self.runtime, trained, self.candidates),
            })
        self.update = None  # nothing of the client's is kept past the round
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float] | None:
        if round.round != self.attack_round:
            return None
        losses, self.losses = self.losses, None  # nothing of the round is kept past its scoring
        if losses is None:
            return {f"{PREFIX}update_readable": 0.0}
        before = losses.loss_honest if self.options.statistic == "net_drop" else losses.loss_sent
        scores = (before - losses.loss_trained).to_numpy()
        self.write_scores(losses, scores)
        return {
            f"{PREFIX}auc": auc(scores, self.is_member),
            f"{PREFIX}tpr_at_1pct_fpr": tpr_at_fpr(scores, self.is_member, 0.01),
            f"{PREFIX}num_samples": float(self.is_member.sum()),
            f"{PREFIX}update_readable": 1.0,
        }

    # --- the attack ----------------------------------------------------------------------
    def target(self, round: RoundContext) -> int:
        """The client attacked: ``target_client``, or the round's first sampled client."""
        if self.options.target_client is not None:
            return self.options.target_client
        return round.sampled[0]

    def draw_candidates(self, target: int) -> tuple[list[Example], np.ndarray]:
        """The candidates, members first, and which are members (``membership_inference``'s server draw)."""
        rng = np.random.default_rng(self.runtime.seed_for(SEED_KEY, self.attack_round))
        members, nonmembers, _ = draw_samples(self.runtime, [target], rng, self.options.num_samples, prefix=PREFIX)
        return members + nonmembers, np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]

    def write_scores(self, losses: pd.DataFrame, scores: np.ndarray) -> None:
        texts = [self.runtime.batcher.renderer.full_text(e) for e in self.candidates]  # as the model read them
        table = losses.assign(text=texts, member=self.is_member.astype(int), score=scores)
        self.runtime.write_table("mia_active_scores.csv", table.rename_axis("sample").reset_index())


def gradient_ascent(runtime, start: State, examples: list[Example], steps: int, lr: float) -> State:
    """``start`` after ``steps`` full-batch SGD steps up the examples' mean token loss (the paper's
    ``W + γ ∇L``); the runtime's model is left as it was.

    Each step averages the gradients of every batch of the examples, so the ascent is on all
    candidates at once, members and non-members alike: the server cannot tell them apart.
    Dropout is off (eval mode): the crafted state is a function of the candidates alone and
    draws nothing from the run's random state.
    """
    model, params = runtime.model, list(runtime.trainable.params.values())
    loader = runtime.batcher.loader(examples, batch_size=SCORING_BATCH)
    optimizer = torch.optim.SGD(params, lr=lr, maximize=True)
    with using_state(runtime, start), evaluating(model):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            for batch in loader:
                batch = {k: v.to(runtime.device) for k, v in batch.items()}
                (model(**batch).loss / len(loader)).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no gradient of the server's is left on the model
        return runtime.trainable.snapshot()


def candidate_losses(runtime, state: State, examples: list[Example]) -> np.ndarray:
    """Each example's mean token loss under ``state`` (the runtime's model left as it was)."""
    with using_state(runtime, state):
        return -mean_logprob(token_logprobs(runtime, examples))
