"""Optimised untargeted model poisoning: ``min_max``, ``min_sum``, ``fang`` and ``mimic``.

All four collude (:class:`~.model_poisoning.CollusionAttack`): they run in the ``collusion``
hook, after every client trained and before the server receives, and the malicious clients
mark themselves in the simulator's ground truth as every poisoning attack does. What each
one reads of the round is its paper's *knowledge assumption*, said in its docstring:

- ``min_max``, ``min_sum`` (Shejwalkar & Houmansadr, NDSS 2021) and ``mimic`` (Karimireddy,
  He & Jaggi, ICLR 2022) are *omniscient*: they read every benign update of the round.
- ``fang`` (Fang, Cao, Jia & Gong, USENIX Security 2020) has *partial knowledge* by default:
  it reads only the malicious clients' own honest updates (what they trained before
  crafting); ``knowledge: full`` lets it read the benign updates instead.

All read the updates in the clear, so a transport that hides them rules them out at load time.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from fedsec_bench.defenses.robust_statistics import distances_to, krum, pairwise_sq_distances

from .model_poisoning import CollusionAttack
from .poisoning import PoisoningOptions

FANG_KEY = 0x46414E47  # "FANG": the seed key of Fang's random draws in a round
MIMIC_KEY = 0x4D494D49  # "MIMI": the seed key of Mimic's power-iteration start


# --------------------------------------------------------------------------- Min-Max and Min-Sum


class MinMaxOptions(PoisoningOptions):
    perturbation: Literal["std", "unit_vec", "sign"] = Field(
        "std", description="∇p: −std (coordinate-wise, the paper's best), −μ/‖μ‖ (unit_vec) or −sign(μ) (sign)."
    )
    gamma_init: float = Field(10.0, gt=0, description="γ_init: the first γ tried by Algorithm 1.")
    tolerance: float = Field(1e-5, gt=0, description="τ: Algorithm 1 stops when |γ_succ − γ| ≤ τ.")


def perturbation(benign: torch.Tensor, kind: str) -> torch.Tensor:
    """∇p, the direction the malicious update leaves the benign mean μ in (Shejwalkar & Houmansadr §IV-B)."""
    mu = benign.mean(0)
    if kind == "std":
        return -benign.std(0, correction=0)
    if kind == "unit_vec":
        return -mu / mu.norm().clamp_min(torch.finfo(mu.dtype).tiny)
    return -mu.sign()


def largest_gamma(accepts: Callable[[float], bool], gamma_init: float, tolerance: float) -> float:
    """Algorithm 1 of Shejwalkar & Houmansadr: the largest γ the oracle accepts, by halving steps.

    γ = γ_init, step = γ_init, γ_succ = 0; while |γ_succ − γ| > τ: if O(γ) then γ_succ = γ,
    γ += step/2, else γ −= step/2; step /= 2. (The step and its halving are the authors'
    code's; the search brackets the boundary in [0, 2γ_init].)
    """
    gamma, step, succ = gamma_init, gamma_init, 0.0
    while abs(succ - gamma) > tolerance:
        if accepts(gamma):
            succ, gamma = gamma, gamma + step / 2
        else:
            gamma = gamma - step / 2
        step /= 2
    return succ


class MinMax(CollusionAttack):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine").

    Every malicious client sends ∇m = μ + γ·∇p, μ the mean of the benign updates and ∇p
    the ``perturbation``, with γ the largest value (Algorithm 1) for which the malicious
    update is no farther from any benign update than the benign updates are from each
    other: max_i ‖∇m − ∇i‖ ≤ max_{i,j} ‖∇i − ∇j‖. It is aggregation-agnostic: the
    constraint keeps ∇m inside the benign cloud that distance- and order-based rules accept.

    Knowledge: omniscient (every benign update of the round, the paper's strongest setting).
    """

    name = "min_max"
    summary = "colluding: μ + γ·∇p with the largest γ keeping ∇m within the benign updates' largest distance (Shejwalkar & Houmansadr 2021)"
    OptionsModel = MinMaxOptions

    @staticmethod
    def score(benign: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        """max_i ‖∇m − ∇i‖² (squared: the same order as the distances, as the authors' code compares)."""
        return distances_to(benign, candidate).square().max()

    @staticmethod
    def bound(benign: torch.Tensor) -> torch.Tensor:
        """max_{i,j} ‖∇i − ∇j‖²."""
        return pairwise_sq_distances(benign).max()

    def craft(self, benign, n, m):
        mu, p, o = benign.mean(0), perturbation(benign, self.options.perturbation), self.options
        bound = self.bound(benign)
        gamma = largest_gamma(lambda g: bool(self.score(benign, mu + g * p) <= bound), o.gamma_init, o.tolerance)
        return mu + gamma * p


class MinSum(MinMax):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): as :class:`MinMax` with the constraint
    Σ_i ‖∇m − ∇i‖² ≤ max_i Σ_j ‖∇i − ∇j‖² (the paper's; the authors' notebooks compare with
    the *min* over i, a tighter bound).

    Knowledge: omniscient (every benign update of the round).
    """

    name = "min_sum"
    summary = "colluding: μ + γ·∇p with the largest γ keeping ∇m's sum of squared distances within the benign ones' (Shejwalkar & Houmansadr 2021)"

    @staticmethod
    def score(benign, candidate):
        return distances_to(benign, candidate).square().sum()

    @staticmethod
    def bound(benign):
        return pairwise_sq_distances(benign).sum(1).max()


# --------------------------------------------------------------------------- Fang et al.


class FangOptions(PoisoningOptions):
    target: Literal["krum", "trimmed_mean"] = Field(
        "krum", description="The rule attacked: krum, or trimmed_mean (which also targets median)."
    )
    knowledge: Literal["full", "partial"] = Field(
        "partial", description="partial: estimate from the malicious clients' own honest updates (the paper's main "
        "setting); full: read the benign updates."
    )
    f: int | None = Field(
        None, ge=0, description="target krum: the f the attacker assumes the server's Krum uses; default the "
        "number of malicious clients in the round."
    )

    @model_validator(mode="after")
    def _f_for_krum(self) -> FangOptions:
        if self.f is not None and self.target != "krum":
            raise ValueError(f"f: only target krum simulates Krum; drop f or set target: krum (target is {self.target})")
        return self


FANG_B = 2.0
"""b, how far past the benign extreme the trimmed-mean attack samples (the paper's b = 2)."""
FANG_LAMBDA_THRESHOLD = 1e-5
"""The λ below which the Krum attack stops halving and sends w1 anyway (the authors' code's)."""
FANG_NEAR = 1e-5
"""The other malicious clients' vectors lie within this L2 distance of w1 (Krum attack)."""


def fang_lambda_bound(estimate: torch.Tensor, n: int, m: int) -> float:
    """Fang et al.'s upper bound on λ (Krum attack), with D the Euclidean distance:

    λ ≤ 1 / ((n − 2m − 1)√d) · min_i Σ_{l ∈ Γ(i)} D(w_l, w_i) + 1/√d · max_i D(w_i, w_Re),

    i over the benign updates (here ``estimate``), Γ(i) the n − m − 2 benign updates closest
    to w_i (all the others of ``estimate`` when it holds fewer), and w_Re the model before the
    attack, the zero update here. A round with a malicious majority would make n − 2m − 1 < 1;
    it is then held at 1.
    """
    k, d = estimate.shape
    dist = pairwise_sq_distances(estimate).sqrt() + torch.diag(estimate.new_full((k,), math.inf))
    neighbours = min(n - m - 2, k - 1)
    closest = dist.topk(neighbours, dim=1, largest=False).values.sum(1).min() if neighbours > 0 else 0.0
    return float(closest / (max(n - 2 * m - 1, 1) * math.sqrt(d)) + estimate.norm(dim=1).max() / math.sqrt(d))


def fang_krum(estimate: torch.Tensor, s: torch.Tensor, n: int, m: int, f: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d): w1 = −λ·s and m − 1 vectors within :data:`FANG_NEAR` of it.

    λ starts at :func:`fang_lambda_bound` and is halved until Krum (with the attacker's f)
    run on the crafted vectors and ``estimate`` selects a crafted one, or λ falls below
    :data:`FANG_LAMBDA_THRESHOLD` (then w1 is sent anyway).
    """
    d = estimate.shape[1]
    offsets = (2 * torch.rand(m - 1, d, generator=generator, dtype=torch.float64) - 1) * FANG_NEAR / math.sqrt(d)
    offsets = torch.cat([offsets.new_zeros(1, d), offsets]).to(estimate)
    lam = fang_lambda_bound(estimate, n, m)
    while True:
        crafted = -lam * s + offsets
        if lam < FANG_LAMBDA_THRESHOLD or krum(torch.cat([crafted, estimate]), f).share[:m].sum() > 0:
            return crafted
        lam /= 2


def fang_trimmed_full(benign: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """(m, d), full knowledge: per coordinate j, with s_j the sign of the benign mean,

    s_j = −1: a value in [w_max,j, b·w_max,j] (w_max,j > 0) or [w_max,j / b, w_max,j] (otherwise);
    s_j = +1: a value in [w_min,j / b, w_min,j] (w_min,j > 0) or [b·w_min,j, w_min,j] (otherwise),

    drawn uniformly by each malicious client, so that the aggregate moves against s.
    """
    s = benign.mean(0).sign()
    w_max, w_min = benign.max(0).values, benign.min(0).values
    u = (1 + (FANG_B - 1) * torch.rand(m, benign.shape[1], generator=generator, dtype=torch.float64)).to(benign)
    above = torch.where(w_max > 0, w_max * u, w_max / u)
    below = torch.where(w_min > 0, w_min / u, w_min * u)
    return torch.where(s < 0, above, below)


def fang_trimmed_partial(own: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(m, d), partial knowledge: μ_j, σ_j the mean and standard deviation of the malicious
    clients' own honest updates estimate w_max,j ≈ μ_j + 3σ_j and w_min,j ≈ μ_j − 3σ_j, and
    s_j = sign(μ_j); each malicious client draws uniformly in [μ_j + 3σ_j, μ_j + 4σ_j]
    (s_j = −1) or [μ_j − 4σ_j, μ_j − 3σ_j] (s_j = +1), as the paper's partial-knowledge attack.
    """
    mu, sigma = own.mean(0), own.std(0, correction=0)
    u = (3 + torch.rand(own.shape, generator=generator, dtype=torch.float64)).to(own)
    return torch.where(mu.sign() < 0, mu + u * sigma, mu - u * sigma)


class Fang(CollusionAttack):
    """Fang, Cao, Jia & Gong (USENIX Security 2020), "Local model poisoning attacks to
    Byzantine-robust federated learning": the directed-deviation attacks on Krum and on the
    trimmed mean / median.

    s, the direction the benign updates move each coordinate in (the sign of their mean),
    is what the attack works against. ``target: krum``: one client sends w1 = −λ·s with λ
    the largest of Fang's bound halved until Krum selects it (:func:`fang_krum`), the others
    vectors right beside it, so that their cluster wins Krum's score. ``target:
    trimmed_mean`` (also for ``median``): each client sends per coordinate a value just past
    the benign extreme against s (:func:`fang_trimmed_full`, :func:`fang_trimmed_partial`).

    Knowledge: ``partial`` (default, the paper's main setting) uses only the malicious
    clients' own honest updates, as estimates of the benign ones; ``full`` reads the benign
    updates of the round (omniscient). Random draws are seeded from the round.
    """

    name = "fang"
    summary = "colluding: directed deviation against Krum or the trimmed mean/median (Fang et al. 2020)"
    OptionsModel = FangOptions

    @classmethod
    def check(cls, options, scenario) -> None:
        super().check(options, scenario)
        if options.target != "krum":
            return
        if isinstance(options.clients, float) and options.clients >= 0.5:
            raise ValueError(f"fang (target krum) assumes a malicious minority: clients must be < 0.5, got {options.clients}")
        n = scenario.federation.clients_per_round
        if options.f is not None and n < 2 * options.f + 3:
            raise ValueError(
                f"fang: f={options.f} is no Krum the server can run on federation.clients_per_round={n} "
                f"(Krum needs n ≥ 2f+3); lower f to at most {(n - 3) // 2}"
            )

    def craft_each(self, view):
        generator = torch.Generator().manual_seed(self.runtime.seed_for(view.round, FANG_KEY))
        full = self.options.knowledge == "full"
        if self.options.target == "trimmed_mean":
            return fang_trimmed_full(view.benign, view.m, generator) if full else fang_trimmed_partial(view.own, generator)
        estimate = view.benign if full else view.own
        f = self.options.f if self.options.f is not None else view.m
        return fang_krum(estimate, estimate.mean(0).sign(), view.n, view.m, f, generator)


# --------------------------------------------------------------------------- Mimic


class MimicOptions(PoisoningOptions):
    warmup: int = Field(1, ge=1, description="Attacked rounds in which the attacker tracks the benign updates' top "
                        "principal direction and re-picks the client to mimic; it then keeps that client.")


class Mimic(CollusionAttack):
    """Mimic (Karimireddy, He & Jaggi, ICLR 2022, "Byzantine-robust learning on heterogeneous
    datasets via bucketing").

    Every malicious client sends a copy of one honest client's update. Under heterogeneity
    that over-weights the mimicked client's data and starves the others', while every sent
    update is a genuine honest one that no rule can tell from it. The client is chosen as in
    the paper: during the first ``warmup`` attacked rounds the attacker tracks z, the top
    principal direction of the benign updates (one power-iteration step per round on their
    covariance, z and the mean μ averaged over the rounds), and picks the benign client with
    the largest |⟨x_i − μ, z⟩|; afterwards it keeps mimicking that client, or, in a round
    without it, the benign update closest to its last one.

    Knowledge: omniscient (every benign update of the round and who sent it).
    """

    name = "mimic"
    summary = "colluding: send a copy of one honest client's update, chosen along the benign top principal direction (Karimireddy et al. 2022)"
    OptionsModel = MimicOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.tracked = 0
        self.mu: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.target: int | None = None
        self.last: torch.Tensor | None = None

    def track(self, benign: torch.Tensor, rnd: int) -> None:
        """One step of the running power iteration: μ ← (tμ + mean)/(t + 1),
        z ← normalised((t z + Cz/‖Cz‖)/(t + 1)), C = Σ_i (x_i − μ)(x_i − μ)ᵀ, from a random z."""
        t = self.tracked
        if t == 0:
            generator = torch.Generator().manual_seed(self.runtime.seed_for(rnd, MIMIC_KEY))
            self.mu = benign.mean(0)
            self.z = torch.randn(benign.shape[1], generator=generator, dtype=torch.float64).to(benign)
        else:
            self.mu = (t * self.mu + benign.mean(0)) / (t + 1)
        centred = benign - self.mu
        step = centred.T @ (centred @ self.z)
        step = step / step.norm().clamp_min(torch.finfo(step.dtype).tiny)
        z = step if t == 0 else (t * self.z + step) / (t + 1)
        self.z = z / z.norm().clamp_min(torch.finfo(z.dtype).tiny)
        self.tracked += 1

    def craft_each(self, view):
        if self.tracked < self.options.warmup:
            self.track(view.benign, view.round)
            self.target = view.benign_ids[int(((view.benign - self.mu) @ self.z).abs().argmax())]
        if self.target in view.benign_ids:
            chosen = view.benign_ids.index(self.target)
            self.last = view.benign[chosen]
        else:
            chosen = int(distances_to(view.benign, self.last).argmin())
        return view.benign[chosen].expand(view.m, -1)
