"""``gradient_inversion``: the honest-but-curious server reads client text back from updates.

The server observes exactly the messages the transport delivered. A plain update is
turned into a pseudo-gradient (-update / lr; exact in FedSGD, one local SGD step) and
attacked with one of three methods:

* ``token_leak``   - the batch's token set from the embedding gradient (token_leak.py);
* ``optimization`` - TAG/LAMP gradient matching over soft tokens (optimization.py);
* ``span_check``   - DAGER's exact span test on linear-layer gradients (span_check.py).

A payload that is not a plain tensor dict (ciphertexts, masked vectors) cannot be
read: it is counted in ``inversion.unreadable_clients`` and no per-client score is
logged for it, unless a malicious server isolated that client's update from the
aggregate (``model_inconsistency``; ``inversion.isolated_clients``), which is then attacked
as a readable one. A client a malicious server sent a crafted model (``dispatch``) is left to
the attack that crafted it: its update is not a gradient of the global model. When no
individual update was readable, the attack is run once on
the aggregate the server does learn (``inversion.aggregate.*``), scored against the
union of the sampled clients' batches. Every attacked batch is written, true and
reconstructed text side by side, to ``inversion_table.csv`` in the run's artifacts.

On prompt/response data the loss is on response tokens only, but prompt tokens are
inputs (embedding rows, attention), so they leave gradients too: the attack rebuilds
the whole rendered sequence, as it does a plain text, knowing nothing of where a prompt
ends. The score adds token recall on the prompt positions and on the response positions
(``inversion.prompt_token_recall``, ``inversion.response_token_recall``), split by the
simulator's truth (ground_truth.py).

The server-side hooks only attack: they keep each reconstruction, and the scorer
(``score_round``), outside the protocol, holds it against the batches the client really
trained on, which the attacker never sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from fedsec_bench.client import local_steps
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin, check_clients_and_rounds

from . import metrics
from .ground_truth import trained_sequences
from .model_view import FIRST_LINEAR, ModelView, PseudoGradient, exact_gradient, pseudo_gradient, readable
from .optimization import optimization
from .result import Reconstruction
from .span_check import span_check
from .token_leak import token_leak

TABLE = "inversion_table.csv"


@dataclass
class Attempt:
    """One attack the server ran, waiting for the scorer: on one client's update, or on the aggregate."""

    prefix: str
    """``inversion`` for a client's update, ``inversion.aggregate`` for the aggregate."""
    clients: list[int]
    result: Reconstruction
    seconds: float
    seed: int


class GradientInversionOptions(Options):
    method: Literal["token_leak", "optimization", "span_check"] = Field(
        "span_check", description="token_leak: token set; optimization: TAG/LAMP; span_check: DAGER."
    )
    clients: list[int] | None = Field(None, description="Client ids to attack; None: every sampled client.")
    rounds: list[int] | None = Field(None, description="Rounds to attack (1-based); None: every round.")
    max_clients_per_round: int | None = Field(None, ge=1, description="Attack at most this many clients a round.")
    attack_aggregate: bool = Field(True, description="Attack the aggregate when no single update is readable.")
    time_budget_s: float = Field(60.0, gt=0, description="optimization: wall-clock budget per attacked batch.")
    iterations: int = Field(200, ge=1, description="optimization: gradient steps on the soft tokens.")
    attack_lr: float = Field(0.1, gt=0, description="optimization: Adam step size on the token logits.")
    l2_weight: float = Field(0.0, ge=0, description="optimization: weight of the normalised L2 term (TAG).")
    l1_weight: float = Field(0.0, ge=0, description="optimization: weight of the normalised L1 term (TAG).")
    use_token_set: bool = Field(True, description="optimization: restrict tokens to token_leak's set if readable.")
    reorder_steps: int = Field(20, ge=0, description="optimization: LAMP discrete swap/move proposals.")
    lm_prior_weight: float = Field(0.2, ge=0, description="optimization: weight of the global model's NLL.")
    length_candidates: int = Field(5, ge=1, description="optimization: lengths tried when none can be read.")
    rank_tolerance: float = Field(
        2.0, gt=0, description="Singular values below this multiple of the float32 rounding noise count as zero."
    )
    span_tolerance: float = Field(1e-3, gt=0, lt=1, description="span_check: relative distance to the span that passes.")
    max_prefixes: int = Field(256, ge=1, description="span_check: stop extending beyond this many live prefixes.")


class GradientInversion(Plugin):
    name = "gradient_inversion"
    kind = "attack"
    summary = "honest-but-curious server reconstructs client text from updates (token_leak, optimization, span_check)"
    on_instruction_data = ("reconstructs the whole rendered sequence (prompt tokens are inputs, so they leak even when "
                           "masked out of the loss); scored overall and on prompt and response positions apart")
    OptionsModel = GradientInversionOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.rows: list[dict] = []
        self.unread: tuple[list[Message], list[Message]] = ([], [])
        """The round's chosen messages the server could not read, and all it received."""
        self.isolated = 0
        """Updates attacked this round that a malicious server isolated from the aggregate."""
        self.attempts: list[Attempt] = []

    @classmethod
    def check(cls, options, scenario) -> None:
        mode, arch = scenario.tuning.mode, scenario.model.arch
        if options.method != "optimization" and mode == "prompt":
            raise ValueError(
                f"method={options.method} reads the embedding or a linear layer's gradient, and prompt mode "
                "exchanges only the soft prompt; use method=optimization"
            )
        if options.method != "optimization" and arch is not None and arch not in FIRST_LINEAR:
            raise ValueError(f"method={options.method} supports model.arch {', '.join(FIRST_LINEAR)}")
        check_clients_and_rounds(scenario.federation, options.clients, options.rounds)

    # --- hooks ---------------------------------------------------------------------
    def server_observation(self, round: RoundContext, messages: list[Message]) -> dict[str, float] | None:
        if self.options.rounds is not None and round.round not in self.options.rounds:
            return None
        chosen = [m for m in messages if (self.options.clients is None or m.client_id in self.options.clients)
                  and round.sent_to(m.client_id) is round.global_state]
        plain = [m for m in chosen if readable(m, round.global_state)][: self.options.max_clients_per_round]
        fed = self.runtime.scenario.federation
        figures = {"inversion.attacked_clients": float(len(plain)),
                   "inversion.unreadable_clients": float(len(chosen) - len(plain)),
                   "inversion.exact_gradient": float(exact_gradient(fed, [m.num_examples for m in chosen]))}
        if not plain:
            self.unread = (chosen, messages)
            return figures
        view = ModelView(self.runtime, round.global_state)
        self.attempts += [self._attack(view, round, "inversion", m.payload, [m]) for m in plain]
        return figures

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Updates the server could not read: a malicious server may have isolated some from the
        aggregate (``round.isolated``, model inconsistency), attacked then as readable ones; otherwise,
        under secure or encrypted aggregation, the server still learns the aggregate: attack that."""
        (chosen, messages), self.unread = self.unread, ([], [])
        isolated = [m for m in chosen if m.client_id in round.isolated][: self.options.max_clients_per_round]
        view = ModelView(self.runtime, round.global_state)
        if isolated:
            self.isolated += len(isolated)
            self.attempts += [self._attack(view, round, "inversion", round.isolated[m.client_id], [m]) for m in isolated]
        elif chosen and self.options.attack_aggregate and isinstance(aggregate, dict):
            self.attempts.append(self._attack(view, round, "inversion.aggregate", aggregate, messages))
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics_so_far: dict[str, float]) -> dict[str, float] | None:
        """Each of the round's reconstructions against what its clients really trained on."""
        attempts, self.attempts = self.attempts, []
        isolated, self.isolated = self.isolated, 0
        if not attempts:
            return None
        scored = [(a.prefix, self._score(round.round, a)) for a in attempts]
        self.rows += [row for _, row in scored]
        self.runtime.write_table(TABLE, self.rows)
        figures: dict[str, float] = {"inversion.isolated_clients": float(isolated)} if isolated else {}
        for prefix in dict.fromkeys(prefix for prefix, _ in scored):
            figures |= metrics.summarize([row for p, row in scored if p == prefix], prefix)
        return figures

    # --- one attack ----------------------------------------------------------------
    def _attack(self, view: ModelView, round: RoundContext, prefix: str, update: State, messages) -> Attempt:
        """Run the method on an update, as the server can: from the messages' public facts alone."""
        rt, fed = self.runtime, self.runtime.scenario.federation
        num_examples = max(m.num_examples for m in messages)
        grad = pseudo_gradient(update, round.global_state, fed, num_examples)
        batch = sum(min(fed.batch_size * local_steps(fed, m.num_examples), m.num_examples) for m in messages)
        clients = [m.client_id for m in messages]
        seed = rt.seed_for(round.round, *clients)
        started = time.perf_counter()
        result = self._run_method(view, grad, batch, seed)
        return Attempt(prefix, clients, result, time.perf_counter() - started, seed)

    def _score(self, rnd: int, attempt: Attempt) -> dict:
        """The table row of one attempt: its figures against the clients' true batches."""
        rt, result = self.runtime, attempt.result
        truth = [seq for cid in attempt.clients for seq in trained_sequences(rt, rnd, cid)]
        special = set(rt.tokenizer.all_special_ids)  # the batcher and chat templates add them: structure, not private text
        guess = [[t for t in seq if t not in special] for seq in result.sequences]
        true_ids = [seq.ids for seq in truth]
        figures, true_text, guess_text = metrics.score(rt.tokenizer, true_ids, guess)
        if rt.scenario.data.is_prompted:
            figures |= metrics.part_recalls(truth, guess)
        clients = attempt.clients
        return {
            "round": rnd, "client": clients[0] if attempt.prefix == "inversion" else "aggregate",
            "method": self.options.method, **figures,
            "baseline_rouge1": metrics.random_baseline(rt.tokenizer, true_ids, np.random.default_rng(attempt.seed)),
            "seconds": attempt.seconds, "applicable": float(result.applicable), "rank": result.rank,
            "rank_condition": None if result.rank_condition is None else float(result.rank_condition),
            **result.notes, "true_text": true_text, "reconstructed_text": guess_text,
        }

    def _run_method(self, view: ModelView, grad: PseudoGradient, batch: int, seed: int) -> Reconstruction:
        o, positions = self.options, self.runtime.scenario.data.seq_len
        if o.method == "span_check":
            return span_check(view, grad, positions, o)
        if o.method == "token_leak":
            return token_leak(view, grad, positions, o)
        tokens = None
        if o.use_token_set and view.embedding_name in grad:
            leaked = token_leak(view, grad, positions, o)
            special = set(view.tokenizer.all_special_ids)
            if leaked.rank_condition is not False:  # a set read past its condition would mislead
                tokens = [t for t in leaked.sequences[0] if t not in special] or None
        return optimization(view, grad, positions, o, tokens, batch, seed)

