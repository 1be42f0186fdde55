"""``user_audit``: a one-shot estimate of the user-level ε of the final model, from canary clients.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy Estimation
for Federated Learning" (ICLR 2024), Algorithm 2 (ε of the final model):

1. k canary clients take part in training like any client, but each sends, whenever it is
   sampled, the same update ``canary_norm · c_i``: c_i a uniformly random unit vector in
   the d-dimensional space of the exchanged parameters, drawn once from the scenario seed
   and the client id (on the client, so it works on a Ray worker too). The canary acts in
   ``client_update``, before any client-side defense (the threat model's order), so a
   DP-FedAvg clips it like any user's update; ``canary_norm`` should be that clip norm S
   (a larger norm is clipped to S anyway, a smaller one under-measures).
2. After training, outside the protocol, the auditor regenerates each c_i and takes the
   cosine ρ_i = ⟨Δ, c_i⟩ / ‖Δ‖ of the final model's change Δ = θ_T − θ_0 with it. A
   random direction that was never inserted has cosine distributed as that of two
   independent random directions, ≈ N(0, 1/d) for large d (the paper's null; ``unseen``
   such directions are drawn as a check, and their fitted Gaussian can replace the
   null with ``null: unseen``).
3. With μ, σ the mean and standard deviation of the k canary cosines, the estimate is the
   ε at δ of telling N(0, 1/d) and N(μ, σ²) apart, computed exactly from the hockey-stick
   divergence of the two Gaussians in both directions (:func:`epsilon_between_gaussians`;
   for σ² = 1/d it is μ-GDP with μ = (μ − 0)·√d).

The estimate covers every designated canary, sampled or not: the neighbouring relation
the accountant's subsampling amplification speaks of is a user being in the population,
and a canary that was never sampled is one possible outcome of it.

What it is, and what it is not: an *estimate*, not a bound. It is provably consistent for
the Gaussian mechanism as d grows (the paper's Theorem 3.1), and in general it assumes
(a) the canary cosines are Gaussian (true of the noise DP-FedAvg adds; the spread of the
canaries' participation counts is absorbed in σ), (b) random directions in high dimension
are close to worst-case for the mechanism (a real client's update is not, so real users
leak no more than a canary, unless the training is unusual), (c) the adversary sees only
the final model (an adversary seeing every round's model learns more: the accountant's ε
bounds that one). In the paper's experiments the estimate stays well below the
accountant's ε; one above it means the accounting or the mechanism is wrong, or k is too
small for the fit.

Cost: the canary clients' own data never reaches the model (their update is replaced), and
the auditor draws (k + unseen)·d normal numbers at the end, one direction at a time.

Figures (``training_end``):

* ``privacy.user_eps_estimate`` (lower is better for privacy): the estimate at
  ``user_audit.delta`` (default 1/(2·num_clients), DP-FedAvg's default δ);
* ``user_audit.canary_cosine_mean`` / ``user_audit.canary_cosine_std``: μ and σ of the canary
  cosines (the farther μ from 0 in units of 1/√d, the more the final model gives away);
* ``user_audit.unseen_cosine_mean`` / ``user_audit.unseen_cosine_std``: the same for the
  directions never inserted; they should be ≈ 0 and ≈ 1/√d (a check of the null);
* ``user_audit.canaries``: canaries whose update reached the server at least once.

The per-canary cosines and participation counts go to the ``user_audit.csv`` artifact.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy import optimize
from scipy.stats import norm

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import ClientContext, RoundContext, State
from fedsec_bench.plugins import Options, Plugin, check_clients_and_rounds
from fedsec_bench.updates import flatten, gaussian_noise, l2_norm

SEED_KEY = 7103  # keeps the canary directions apart from the federation's and other plugins' draws
INSERTED, UNSEEN = 0, 1  # second seed key: a canary client's direction, or a direction never inserted
CANARY_MARK = "user_audit.canary"
"""Set in a canary client's metrics when it sent its canary: the scorer counts participations from it."""
GAUSSIAN_NULL_MIN_DIM = 1000
"""Below this the N(0, 1/d) null only roughly approximates the exact cosine distribution (the paper's code)."""


class UserAuditOptions(Options):
    clients: list[int] | None = Field(None, description="Ids of the canary clients (or give count).")
    count: int | None = Field(None, ge=2, description="k: the last k client ids are the canaries (or give clients).")
    canary_norm: float = Field(1.0, gt=0, description="L2 norm of each canary update: set it to the defense's clip norm.")
    unseen: int = Field(1000, ge=2, description="M: random directions never inserted, drawn as the null's check.")
    null: Literal["theory", "unseen"] = Field(
        "theory", description="Cosine distribution of a direction never inserted: N(0, 1/d) (the paper's) or the "
        "Gaussian fitted to the unseen directions.",
    )
    delta: float | None = Field(None, gt=0, lt=1, description="δ of the estimate; default 1/(2·num_clients).")

    @model_validator(mode="after")
    def _canaries_named_once(self) -> UserAuditOptions:
        if (self.clients is None) == (self.count is None):
            raise ValueError("name the canary clients by exactly one of clients: [ids] or count: k")
        if self.clients is not None:
            if len(self.clients) < 2:
                raise ValueError("clients: at least 2 canaries are needed to fit their cosines' spread")
            if len(set(self.clients)) != len(self.clients):
                raise ValueError(f"clients: {self.clients} names a client twice; each canary is one client")
        return self


def canary_ids(options: UserAuditOptions, num_clients: int) -> list[int]:
    """The canary clients: those listed, or the last ``count`` ids."""
    if options.clients is not None:
        return sorted(options.clients)
    return list(range(num_clients - options.count, num_clients))


@dataclass(frozen=True)
class Gaussian:
    mean: float
    std: float

    @classmethod
    def fit(cls, values: np.ndarray) -> Gaussian:
        return cls(float(np.mean(values)), float(np.std(values, ddof=1)))


class UserAudit(Plugin):
    name = "user_audit"
    kind = "attack"
    summary = "one-shot estimate of the final model's user-level ε from random canary clients (Andrew et al. 2024)"
    on_instruction_data = "replaces canary clients' updates by random directions; the same on every data format"
    OptionsModel = UserAuditOptions

    def __init__(self, options: UserAuditOptions, runtime):
        super().__init__(options, runtime)
        fed = runtime.scenario.federation
        self.canaries = canary_ids(options, fed.num_clients)
        self.delta = options.delta or 1.0 / (2 * fed.num_clients)
        self.participations = {cid: 0 for cid in self.canaries}
        # θ_0, the model before the first round (a resumed run gets it back from its checkpoint)
        self.initial = {name: t.cpu() for name, t in runtime.trainable.snapshot().items()}

    @classmethod
    def check(cls, options: UserAuditOptions, scenario) -> None:
        fed = scenario.federation
        if options.count is not None and options.count >= fed.num_clients:
            raise ValueError(f"count: {options.count} canaries leave no real client of federation.num_clients="
                             f"{fed.num_clients}; lower count")
        check_clients_and_rounds(fed, options.clients, None)
        if options.clients is not None and len(options.clients) >= fed.num_clients:
            raise ValueError(f"clients: all {fed.num_clients} clients are canaries, none is real; name fewer")

    def __getstate__(self) -> dict:
        """A Ray worker only inserts canaries: it does not need θ_0."""
        return {k: v for k, v in super().__getstate__().items() if k != "initial"}

    # --- client side --------------------------------------------------------------
    def client_update(self, client: ClientContext, update: State) -> State:
        """A canary client sends canary_norm · c_i, whatever it trained."""
        if client.client_id not in self.canaries:
            return update
        client.metrics[CANARY_MARK] = 1.0
        direction = random_direction(update, self.runtime.seed_for(SEED_KEY, INSERTED, client.client_id))
        return {name: self.options.canary_norm * t for name, t in direction.items()}

    # --- outside the protocol ---------------------------------------------------------
    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> None:
        """Count each canary's participations: the rounds its update reached the server."""
        for cid in truth.client_values(CANARY_MARK, among=round.delivered):
            self.participations[cid] += 1

    def training_end(self, runtime) -> dict[str, float]:
        final = runtime.trainable.snapshot()
        change = {name: final[name].cpu() - self.initial[name] for name in self.initial}
        inserted = cosines(change, [runtime.seed_for(SEED_KEY, INSERTED, cid) for cid in self.canaries])
        unseen = cosines(change, [runtime.seed_for(SEED_KEY, UNSEEN, j) for j in range(self.options.unseen)])
        null = self.null_distribution(unseen, dimension=sum(t.numel() for t in change.values()))
        observed = Gaussian.fit(inserted)
        runtime.write_table("user_audit.csv", [
            {"client": cid, "participations": self.participations[cid], "cosine": cos}
            for cid, cos in zip(self.canaries, inserted)
        ])
        return {
            "privacy.user_eps_estimate": epsilon_between_gaussians(null, observed, self.delta),
            "user_audit.delta": self.delta,
            "user_audit.canary_cosine_mean": observed.mean,
            "user_audit.canary_cosine_std": observed.std,
            "user_audit.unseen_cosine_mean": float(np.mean(unseen)),
            "user_audit.unseen_cosine_std": float(np.std(unseen, ddof=1)),
            "user_audit.canaries": float(sum(n > 0 for n in self.participations.values())),
        }

    def null_distribution(self, unseen: np.ndarray, dimension: int) -> Gaussian:
        """The cosine distribution of a direction never inserted: N(0, 1/d), or the unseen directions' fit."""
        if self.options.null == "unseen":
            return Gaussian.fit(unseen)
        if dimension < GAUSSIAN_NULL_MIN_DIM:
            warnings.warn(
                f"user_audit: only {dimension} parameters are exchanged; N(0, 1/d) approximates the cosine of a "
                f"random direction well from d ≈ {GAUSSIAN_NULL_MIN_DIM}; read the estimate as rough, or set null: unseen"
            )
        return Gaussian(0.0, dimension**-0.5)


def random_direction(like: State, seed: int) -> State:
    """A uniformly random unit vector over ``like``'s parameters (a normalised N(0, I) draw on the CPU,
    so the same for the same seed on any device and in any process)."""
    draw = gaussian_noise(like, 1.0, torch.Generator().manual_seed(seed))
    length = l2_norm(draw)
    return {name: t / length for name, t in draw.items()}


def cosines(change: State, seeds: list[int]) -> np.ndarray:
    """cos(Δ, c) for the random direction c of each seed, one direction in memory at a time; 0 for Δ = 0."""
    flat = flatten(change)
    length = float(flat.norm())
    if length == 0:
        return np.zeros(len(seeds))
    return np.array([float(torch.sum(flat * flatten(random_direction(change, seed)))) / length for seed in seeds])


# --- ε of telling two Gaussians apart ---------------------------------------------------------------
def log_hockey_stick(p: Gaussian, q: Gaussian, eps: float) -> float:
    """log δ_{P‖Q}(ε), δ_{P‖Q}(ε) = sup_S P(S) − e^ε Q(S) = P(L > ε) − e^ε Q(L > ε), L = log(dP/dQ).

    L(y) = a y² + b y + c is quadratic, so {L > ε} is a half-line (equal variances), or the
    outside or inside of the two roots; both masses are taken in log space, so that ε far
    in the tails stays exact (Steinke 2022, as Andrew et al. compute it). −∞ when δ ≤ 0.
    """
    a = 0.5 * (q.std**-2 - p.std**-2)
    b = p.mean / p.std**2 - q.mean / q.std**2
    c = 0.5 * ((q.mean / q.std) ** 2 - (p.mean / p.std) ** 2) + math.log(q.std / p.std)
    if a == 0:
        if b == 0:  # the same distribution
            return -math.inf
        threshold = (eps - c) / b
        log_p, log_q = (log_above(p, threshold), log_above(q, threshold)) if b > 0 else \
            (log_below(p, threshold), log_below(q, threshold))
    else:
        discriminant = b * b - 4 * a * (c - eps)
        if discriminant <= 0:  # L − ε keeps the sign of a: {L > ε} is everything (δ = 1 − e^ε ≤ 0) or nothing
            return -math.inf
        half = -0.5 * (b + math.copysign(math.sqrt(discriminant), b))  # the roots without cancellation
        low, high = sorted((half / a, (c - eps) / half))
        mass = log_outside if a > 0 else log_between
        log_p, log_q = mass(p, low, high), mass(q, low, high)
    excess = eps + log_q - log_p
    return -math.inf if excess >= 0 else log_p + math.log1p(-math.exp(excess))


def log_above(g: Gaussian, t: float) -> float:
    return float(norm.logsf(t, g.mean, g.std))


def log_below(g: Gaussian, t: float) -> float:
    return float(norm.logcdf(t, g.mean, g.std))


def log_outside(g: Gaussian, low: float, high: float) -> float:
    return float(np.logaddexp(log_below(g, low), log_above(g, high)))


def log_between(g: Gaussian, low: float, high: float) -> float:
    """log P(low < Y < high), from the tail the interval lies in (no cancellation far from the mean)."""
    if low > g.mean:
        outer, inner = log_above(g, low), log_above(g, high)
    else:
        outer, inner = log_below(g, high), log_below(g, low)
    return -math.inf if inner >= outer else outer + math.log1p(-math.exp(inner - outer))


def epsilon_between_gaussians(p: Gaussian, q: Gaussian, delta: float, max_epsilon: float = 1e6) -> float:
    """The smallest ε ≥ 0 at which both δ_{P‖Q}(ε) and δ_{Q‖P}(ε) are at most δ: the (ε, δ) of the
    mechanism whose output on neighbours is P or Q. ∞ if a distribution is a point mass (std 0)
    unlike the other, or if ε would exceed ``max_epsilon``."""
    if p == q:
        return 0.0
    if p.std == 0 or q.std == 0:
        return math.inf
    floor = math.log(delta) - 50  # δ(ε) that far below δ counts as below it: keeps the root search finite

    def excess(eps: float) -> float:
        log_delta = max(log_hockey_stick(p, q, eps), log_hockey_stick(q, p, eps), floor)
        return log_delta - math.log(delta)

    if excess(0.0) <= 0:
        return 0.0
    high = 1.0
    while excess(high) > 0:
        if high >= max_epsilon:
            return math.inf
        high *= 2
    return float(optimize.brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-9, rtol=1e-10))
