"""``user_inference``: did this user's data train the model? Tested with a few fresh samples of the user.

Kandpal, Pillutla, Oprea, Kairouz, Choquette-Choo, Xu, "User Inference Attacks on Large
Language Models" (arXiv 2310.09266, 2023; EMNLP 2024). The unit of privacy is the user, not
the record: the attacker holds m samples of a user's distribution that were *not* trained on
(:attr:`FederatedData.user_samples`, kept out by ``data.user_samples``), a reference model and
the fine-tuned model θ, and thresholds the mean log-likelihood ratio

    T(x_1..x_m) = (1/m) Σ_i [ log p_θ(x_i) − log p_ref(x_i) ],

the paper's statistic: high when θ moved towards this user's distribution from where it
started. log p(x) is the sequence log-likelihood of the tokens training takes its loss on (the
response given its prompt on prompt/response data; :func:`.membership.scores.token_logprobs`).
Members are the users whose update reached the server in at least one round; non-members are
held-out users of the same distribution (``data.heldout_by_user``), each holding as many fresh
samples at most (a seeded choice of ``data.user_samples`` of their records). A user enters the
attack only if it holds max(samples_per_user) samples, so every m is scored on the same users and
the figures across m differ by the attacker's sample budget alone.

Threats (option ``threat``):

- ``external``: black-box likelihoods of the final global model (``training_end``); the reference is
  the federation's starting point, the pretrained model (a snapshot at plugin init).
- ``server``: the honest-but-curious server attacks each member once, in the first round its update
  arrived. With a plain payload it reads the user's own model, the state it was sent
  (``round.sent_to``) plus its update, against that state as reference (a malicious server that
  isolated the update from the aggregate reads it too). When the payload is not plain (secure
  aggregation, HE) it only holds the aggregate: the round's new global model against the round's
  global state, with that round's newly attacked users as members. ``update_readable`` is the share of
  members attacked through their own update.

Either way which users were members is the simulator's truth: scoring runs outside the protocol
(``score_round``, ``training_end``).

Figures (prefix ``user_mia.``, ``user_mia.server.`` for the server), for each m in ``samples_per_user``:
``auc_m{m}`` (ROC AUC over users, 0.5 is chance; higher = more leakage) and ``tpr_at_1pct_fpr_m{m}``
(below 1/non-members FPR it is the TPR at zero false positives; higher = more leakage); ``auc`` and
``tpr_at_1pct_fpr`` are those of the largest m; ``members`` and ``nonmembers`` count the users
scored, for reading small sets honestly. Each figure is the mean over ``draws`` random draws of the
m samples of every user holding more than m: the likelihoods are computed once per sample, so a draw
costs only index arithmetic, and the mean is the expected figure of an attacker who holds m random
samples rather than the luck of one draw. When several models are attacked (server threat), each
user is ranked against the non-members under the same model, and AUC and TPR pool those per-model
comparisons (weighted by members).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, PositiveInt, field_validator

from fedsec_bench.data import Example
from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State
from fedsec_bench.plugins import Options, Plugin

from .membership.roc import auc, tpr_at_fpr
from .membership.scores import token_logprobs, total_logprob
from .membership.shadow import using_state

SEED_KEY = 7021  # keeps this attack's random draws apart from the federation's and membership_inference's


class UserInferenceOptions(Options):
    threat: Literal["external", "server"] = "external"
    samples_per_user: list[PositiveInt] = Field(
        [1, 4, 16], min_length=1, description="m: fresh samples of each user the attacker holds; one figure per m. "
        "Needs data.user_samples ≥ the largest."
    )
    draws: int = Field(
        20, ge=1, description="Random draws of each user's m samples that every figure is averaged over."
    )

    @field_validator("samples_per_user")
    @classmethod
    def _ascending(cls, value: list[int]) -> list[int]:
        return sorted(set(value))


@dataclass
class Observation:
    """The per-sample log-likelihood ratios of one attacked model: one array per member user, one per non-member."""

    members: list[np.ndarray]
    nonmembers: list[np.ndarray]


class UserInference(Plugin):
    name = "user_inference"
    kind = "attack"
    summary = "user inference (Kandpal et al. 2023): m fresh samples of a user, likelihood ratio to the start model"
    on_instruction_data = "a sample's likelihood is its response given its prompt (the tokens the loss is on)"
    OptionsModel = UserInferenceOptions
    exclusive_by = "threat"

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        external = options.threat == "external"
        self.initial = runtime.trainable.snapshot() if external else None  # the pretrained start: the reference
        self.prefix = "user_mia." if external else "user_mia.server."
        self.participants: set[int] = set()
        self.readable: dict[int, State] = {}
        """Server: this round's plain updates, read in server_observation, scored in score_round."""
        self.observations: list[Observation] = []
        self.read_members = 0
        """Server: members attacked through their own update (the rest through an aggregate)."""

    @classmethod
    def check(cls, options: UserInferenceOptions, scenario) -> None:
        needed = max(options.samples_per_user)
        if scenario.data.user_samples < needed:
            raise ValueError(
                f"samples_per_user: the attacker holds up to {needed} fresh samples of each user, but "
                f"data.user_samples is {scenario.data.user_samples}; set data.user_samples ≥ {needed} (with "
                "data.partition.method natural and data.heldout_by_user: true), or lower samples_per_user"
            )

    @classmethod
    def check_data(cls, options: UserInferenceOptions, scenario, data) -> None:
        needed = max(options.samples_per_user)
        members = sum(len(s) >= needed for s in data.user_samples)
        if members < 2:
            raise ValueError(
                f"samples_per_user: {members} clients hold ≥ {needed} fresh samples (data.user_samples; each client keeps "
                "data.partition.min_examples records to train on), and the attack needs ≥ 2 member users; raise "
                "federation.num_clients, or lower samples_per_user"
            )
        nonmembers = sum(len(u) >= needed for u in data.heldout_users)
        if nonmembers < 2:
            raise ValueError(
                f"samples_per_user: {nonmembers} held-out users have ≥ {needed} records, and the attack needs ≥ 2 "
                "non-member users; raise data.heldout_examples (whole users are held out), or lower samples_per_user"
            )

    # --- hooks ---------------------------------------------------------------------------
    def server_observation(self, round: RoundContext, messages: list[Message]) -> None:
        if self.options.threat == "server":
            self.readable = {m.client_id: m.payload for m in messages if m.is_plain}

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """A malicious server that isolated a client's update from the aggregate reads it as a plain one."""
        if self.options.threat == "server":
            self.readable = {**round.isolated, **self.readable}
        return aggregate

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> None:
        arrived = set(truth.trained()) & set(round.delivered)  # users whose data reached the model
        newcomers = sorted(arrived - self.participants)
        self.participants |= arrived
        if self.options.threat == "server":
            eligible = self.eligible_clients()
            self.attack_round(round, [c for c in newcomers if c in eligible])
        self.readable = {}

    def training_end(self, runtime) -> dict[str, float]:
        if self.options.threat == "external":
            members = sorted(self.participants & self.eligible_clients())
            if members:
                self.observations = [self.observe(runtime.trainable.snapshot(), self.initial, members)]
        if not self.observations:
            raise RuntimeError(f"{self.prefix}: no member user to attack (no client with enough fresh samples "
                               "delivered an update)")
        return self.figures()

    # --- the attack ----------------------------------------------------------------------
    def attack_round(self, round: RoundContext, members: list[int]) -> None:
        """The server's attack on the round's new members: each through its own update where it can read
        it, the others through the only model the server holds, the one the aggregate produced."""
        hidden = [c for c in members if c not in self.readable]
        memos: dict[int, dict] = {}  # likelihoods under each distinct state sent (an honest server sends one)
        for client in (c for c in members if c in self.readable):
            sent, update = round.sent_to(client), self.readable[client]
            local = {n: sent[n] + update[n].to(sent[n].dtype) for n in sent}
            self.observations.append(self.observe(local, sent, [client], memos.setdefault(id(sent), {})))
        if hidden:
            self.observations.append(self.observe(self.runtime.trainable.snapshot(), round.global_state, hidden))
        self.read_members += len(members) - len(hidden)

    def observe(self, target: State, reference: State, members: list[int], memo: dict | None = None) -> Observation:
        """The log-likelihood ratio log p_target(x) − log p_reference(x) of every fresh sample of the
        member users and of the non-member users; ``memo`` keeps the reference's likelihoods for the
        next model attacked against the same reference."""
        pools = [self.runtime.data.user_samples[c] for c in members] + self.nonmember_pools()
        flat = [x for pool in pools for x in pool]
        memo = {} if memo is None else memo
        missing = [x for x in dict.fromkeys(flat) if x not in memo]
        memo.update(zip(missing, self.log_likelihoods(reference, missing)))
        ratio = self.log_likelihoods(target, flat) - np.array([memo[x] for x in flat])
        per_user = np.split(ratio, np.cumsum([len(pool) for pool in pools])[:-1])
        return Observation(per_user[: len(members)], per_user[len(members):])

    def log_likelihoods(self, state: State, examples: list[Example]) -> np.ndarray:
        """log p(x) under ``state`` of each example: the sum over the tokens its training loss is on."""
        if not examples:
            return np.zeros(0)
        with using_state(self.runtime, state):
            return total_logprob(token_logprobs(self.runtime, examples))

    def eligible_clients(self) -> set[int]:
        """Clients holding the largest m of fresh samples: the only member users attacked."""
        needed = max(self.options.samples_per_user)
        return {c for c, s in enumerate(self.runtime.data.user_samples) if len(s) >= needed}

    def nonmember_pools(self) -> list[list[Example]]:
        """Held-out users with the largest m of records, each holding a seeded choice of at most
        data.user_samples of them: as many fresh samples as a member user holds at most."""
        rng = np.random.default_rng(self.runtime.seed_for(SEED_KEY))
        size, needed = self.runtime.scenario.data.user_samples, max(self.options.samples_per_user)
        pools = []
        for records in self.runtime.data.heldout_users:
            if len(records) >= needed:
                held = np.sort(rng.choice(len(records), min(size, len(records)), replace=False))
                pools.append([records[i] for i in held])
        return pools

    def figures(self) -> dict[str, float]:
        p, ms = self.prefix, self.options.samples_per_user
        rng = np.random.default_rng(self.runtime.seed_for(SEED_KEY, 1))
        out: dict[str, float] = {}
        for m in ms:
            draws = [pooled_figures(self.observations, m, rng) for _ in range(self.options.draws)]
            out[f"{p}auc_m{m}"], out[f"{p}tpr_at_1pct_fpr_m{m}"] = map(float, np.mean(draws, axis=0))
        out[f"{p}auc"], out[f"{p}tpr_at_1pct_fpr"] = out[f"{p}auc_m{ms[-1]}"], out[f"{p}tpr_at_1pct_fpr_m{ms[-1]}"]
        members = sum(len(o.members) for o in self.observations)
        out[f"{p}members"], out[f"{p}nonmembers"] = float(members), float(len(self.observations[0].nonmembers))
        if self.options.threat == "server":
            out[f"{p}update_readable"] = self.read_members / members
        return out


def user_statistic(ratios: np.ndarray, m: int, rng: np.random.Generator) -> float:
    """The paper's test statistic: the mean log-likelihood ratio of m of the user's samples, drawn at random."""
    return float(rng.choice(ratios, size=m, replace=False).mean())


def pooled_figures(observations: list[Observation], m: int, rng: np.random.Generator) -> tuple[float, float]:
    """(AUC, TPR at 1 % FPR) of one draw of m samples per user. Each member is compared with the non-members
    under the same model; the per-model figures are pooled weighted by their members (for one model: its figures)."""
    aucs, tprs, weights = [], [], []
    for obs in observations:
        scores = np.array([user_statistic(r, m, rng) for r in obs.members + obs.nonmembers])
        labels = np.r_[np.ones(len(obs.members), bool), np.zeros(len(obs.nonmembers), bool)]
        aucs.append(auc(scores, labels))
        tprs.append(tpr_at_fpr(scores, labels, 0.01))
        weights.append(len(obs.members))
    return float(np.average(aucs, weights=weights)), float(np.average(tprs, weights=weights))
