"""``model_inconsistency``: a malicious server reads one client's update through secure aggregation.

Pasquini, Francati, Ateniese, "Eluding Secure Aggregation in Federated Learning via Model
Inconsistency" (CCS 2022). Secure aggregation and encrypted aggregation show the server
only the weighted mean ``sum_i n_i u_i / sum_i n_i`` of the updates, on the assumption that
every client trained the same model. A server that sends different models breaks it:

1. ``dispatch``: the target gets the real global state; every other sampled client gets a
   crafted state whose update the server knows in advance. Here every exchanged tensor is
   zero. In full mode every hidden state of that model is then zero (zero embeddings, zero
   weights, zero norm gains), so each weight's gradient, an outer product of a zero input or
   a zero output gradient, vanishes; LoRA adapters with A = B = 0 likewise (the gradient of
   A carries B, that of B carries A). Local training then leaves the model where it is
   (SGD, momentum, AdamW and weight decay all map zero to zero), so the update is exactly
   zero. (Pasquini et al. use dead ReLUs for the same end; a zero model works on any decoder.)
2. ``post_aggregation``: the aggregate is ``n_t u_t / sum_i n_i``; the example counts are
   public (they travel in the clear in every message), so the server reads
   ``u_t = aggregate * sum_i n_i / n_t`` and files it in :attr:`RoundContext.isolated`.
   The honest-server attacks listed after this one (``gradient_inversion``,
   ``membership_inference`` with ``threat: server``) attack it as a plain update, unchanged.

Assumptions, as in the paper: the server chooses what each client receives and clients do
not compare models (the ``model_consistency`` defense does); the aggregate is the
example-weighted mean (FedAvg, ``secure_aggregation``, ``he_aggregation``; the plan refuses
other rules); the server adds nothing before it reads the aggregate, so central DP
(``dp_fedavg``'s server noise) does not stop it, while noise the clients add themselves
(``dp_sgd``, ``dp_fedavg`` with ``distributed: true``) stays in the non-targets' updates
and shows in ``inconsistency.isolation_error``. Prompt mode is refused: a zero soft prompt
still reaches a real base model, whose gradient does not vanish.

Figures (per attacked round):

* ``inconsistency.isolated``: 1 when the server isolated the target's update, 0 when it
  could not (the target did not deliver, or the clients refused the round);
* ``inconsistency.crafted_clients``: clients that were sent the crafted model;
* ``inconsistency.isolation_error`` (scorer, lower is better for the attacker): the
  relative L2 distance of the isolated update to the target's true plain update, which the
  target leaves in the simulator's notes (0 up to the defense's encoding error);
* ``inconsistency.others_update_norm``: the largest L2 norm of a crafted client's update
  (0 when they vanish as planned).
"""

from __future__ import annotations

from pydantic import Field

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin, check_clients_and_rounds
from fedsec_bench.updates import l2_norm, zeros_like

TRUE_UPDATE_NOTE = "inconsistency.true_update"
OTHERS_NORM_KEY = "inconsistency.others_update_norm"


class ModelInconsistencyOptions(Options):
    target_clients: list[int] | None = Field(
        None, description="Clients to isolate, one per round: the first of them sampled; None: the first sampled client."
    )
    rounds: list[int] | None = Field(None, description="Rounds to attack (1-based); None: every round.")


class ModelInconsistency(Plugin):
    name = "model_inconsistency"
    kind = "attack"
    summary = "malicious server: crafted models to all but a target, whose update secure aggregation then reveals"
    on_instruction_data = "isolates the target's whole update; the attacks after it read it whatever the data format"
    modes = frozenset({"full", "lora"})
    OptionsModel = ModelInconsistencyOptions
    needs_mean_aggregate = True
    isolates_updates = True

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.counts: dict[int, int] = {}
        self.figures: dict[str, float] = {}

    @classmethod
    def check(cls, options: ModelInconsistencyOptions, scenario) -> None:
        check_clients_and_rounds(scenario.federation, options.target_clients, options.rounds, "target_clients")

    def target(self, rnd: int, sampled: list[int]) -> int | None:
        """The client isolated in round ``rnd`` (None: the round is not attacked)."""
        if self.options.rounds is not None and rnd not in self.options.rounds:
            return None
        wanted = self.options.target_clients
        return next((c for c in sampled if wanted is None or c in wanted), None)

    # --- the server -------------------------------------------------------------------
    def dispatch(self, round: RoundContext, client_id: int, state: State) -> State:
        target = self.target(round.round, round.sampled)
        if target is None or client_id == target:
            return state
        return zeros_like(state)

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        target = self.target(round.round, round.sampled)
        if target is None:
            return aggregate
        counts, self.counts = self.counts, {}
        isolated = target in counts and isinstance(aggregate, dict)
        if isolated:
            factor = sum(counts.values()) / counts[target]
            round.isolated[target] = {name: value * factor for name, value in aggregate.items()}
        self.figures = {"inconsistency.isolated": float(isolated),
                        "inconsistency.crafted_clients": float(len(round.sampled) - 1)}
        return aggregate

    def server_observation(self, round: RoundContext, messages: list[Message]) -> None:
        """The public example count of every delivered message, which the isolation scales by."""
        self.counts = {m.client_id: m.num_examples for m in messages}

    # --- the simulator's measurement (outside the protocol) ---------------------------
    def transport(self, client: ClientContext, message: Message) -> Message:
        """Leave the plain update each client is about to send (after its client-side defenses, before
        any transport hides it) for the scorer: the target's in full, the others' norms."""
        target = self.target(client.round, client.peers)
        if target is not None and message.is_plain:
            if client.client_id == target:
                client.notes[TRUE_UPDATE_NOTE] = {n: t.detach().cpu().clone() for n, t in message.payload.items()}
            else:
                client.metrics[OTHERS_NORM_KEY] = l2_norm(message.payload)
        return message

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float] | None:
        figures, self.figures = self.figures, {}
        if not figures:
            return None
        others = truth.client_values(OTHERS_NORM_KEY)
        if others:
            figures[OTHERS_NORM_KEY] = max(others.values())
        target = self.target(round.round, round.sampled)
        true_update = truth.notes(TRUE_UPDATE_NOTE).get(target)
        if target in round.isolated and true_update is not None:
            error = {n: round.isolated[target][n].cpu() - t for n, t in true_update.items()}
            figures["inconsistency.isolation_error"] = l2_norm(error) / max(l2_norm(true_update), 1e-30)
        return figures
