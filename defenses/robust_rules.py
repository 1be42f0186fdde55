"""Byzantine-robust aggregation rules, as ``federation.aggregator`` plugins.

Each plugin refuses impossible parameters at load time, stacks the round's plain updates,
applies its rule (a pure function of :mod:`.robust_statistics`), and reports which
clients the rule kept.

A client whose share of the aggregate is below the plain mean's 1/n was *excluded or
down-weighted*; with the simulator's ground truth of who attacked
(:mod:`fedsec_bench.ground_truth`, recorded client-side by the poisoning attacks, never
seen by the rule) this gives the precision and recall of excluding the truly malicious
clients.

The rules are unweighted, as in their papers (a client's example count does not
change its vote), except ``geomedian`` whose RFA definition weights by examples, and
``robust_lr`` whose aggregate is FedAvg's example-weighted mean.

Every rule takes ``pre``: pre-aggregators (bucketing, nearest neighbour mixing) applied in
order to the stacked updates before the rule. Each produces vectors that are weighted means
of the updates (``rows = weights @ X``, :class:`.robust_statistics.Mixed`), so the rule's
share of row k is split back over the original clients by row k's weights: client j's share
is Σ_k share_k · weights[k, j] (a bucket's share split equally among its members; a mixed
vector's share split over the n − f neighbours it averaged). For a rule that selects or
averages rows this is exactly the coefficient client j's own update carries in the
aggregate, so the ``robust.*`` figures stay about real clients.
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State, plain_updates
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import add_gaussian_noise, flatten, unflatten, zeros_like

from . import robust_statistics as rs
from .robust_statistics import Mixed, Robust, bulyan, centered_clip, geomedian, krum, median, multikrum, norm_bound, trimmed_mean


# --------------------------------------------------------------------------- plugins


class Bucketing(BaseModel):
    """Karimireddy et al. 2022: the means of ⌈n/s⌉ random buckets of s updates."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["bucketing"]
    s: int = Field(2, ge=1, description="s: updates per bucket (the paper uses 2).")

    def rows(self, n: int, f: int | None) -> tuple[int, str | None]:
        return math.ceil(n / self.s), None


class NNM(BaseModel):
    """Allouah et al. 2023: each update replaced by the mean of its n − f nearest neighbours."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["nnm"]
    f: int | None = Field(None, ge=0, description="f of the n − f neighbours; default the rule's own f (required "
                          "with a rule that has none).")

    def rows(self, n: int, f: int | None) -> tuple[int, str | None]:
        f = self.f if self.f is not None else f
        return n, f"nnm needs f < n: got n={n}, f={f}" if f >= n else None


PRE_AGGREGATORS = {"bucketing": Bucketing, "nnm": NNM}
PreAggregator = Annotated[Union[Bucketing, NNM], Field(discriminator="name")]


class RuleOptions(Options):
    """Base of every robust rule's options: what all rules accept besides their own parameters."""

    pre: list[PreAggregator] = Field(
        default_factory=list,
        description="Pre-aggregators applied in order before the rule: bucketing ({name: bucketing, s: 2}) and "
        "nnm ({name: nnm, f: ...}); a bare name takes the defaults.",
    )

    @field_validator("pre", mode="before")
    @classmethod
    def _names(cls, pre):
        """A bare name is that pre-aggregator with its defaults; an unknown name is refused with the known ones."""
        if not isinstance(pre, list):
            return pre
        specs = [{"name": p} if isinstance(p, str) else p for p in pre]
        for spec in specs:
            name = spec.get("name") if isinstance(spec, dict) else None
            if name not in PRE_AGGREGATORS:
                raise ValueError(f"unknown pre-aggregator {name!r}: the known ones are {', '.join(PRE_AGGREGATORS)}")
        return specs

    @model_validator(mode="after")
    def _nnm_has_f(self):
        if "f" not in type(self).model_fields and any(isinstance(p, NNM) and p.f is None for p in self.pre):
            raise ValueError("pre: nnm needs f when the rule has none of its own: write {name: nnm, f: <Byzantine count>}")
        return self

    def rule_f(self) -> int | None:
        return getattr(self, "f", None)


class FOptions(RuleOptions):
    f: int = Field(1, ge=0, description="Number of Byzantine clients per round the rule tolerates.")


class RobustAggregator(Plugin):
    """Stacks the plain updates, applies :meth:`rule`, and reports each client's share.

    Figures (per round): ``robust.selected`` (clients kept at ≥ the mean's 1/n share),
    ``robust.malicious_share`` (share of the aggregate from clients that truly
    attacked; lower is better), ``robust.exclusion_precision`` and
    ``robust.exclusion_recall`` (of excluding or down-weighting exactly the truly
    malicious clients; higher is better, absent when undefined). The per-client table
    ``robust_selection.csv`` goes to the artifacts.
    """

    kind = "aggregator"
    on_instruction_data = "acts on the updates only; the same on every data format"  # every rule below inherits it
    needs_plain_updates = True
    OptionsModel = RuleOptions
    rows_are_clients: ClassVar[str | None] = None
    """Why the rule needs row i to be message i's own update (its example count, its history),
    which a pre-aggregator's mixed rows are not; such a rule is refused with ``pre``."""

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.shares: dict[int, float] = {}
        self.rows: list[dict] = []
        self.round = 0

    def rule(self, X: torch.Tensor, messages: list[Message]) -> Robust:
        raise NotImplementedError

    @classmethod
    def condition(cls, options: Options, n: int) -> str | None:
        """Why this rule cannot run on n updates, or None."""

    @classmethod
    def rows_condition(cls, options: Options, n: int) -> str | None:
        """Why the pre-aggregators, then the rule on the ⌈n/s⌉ (bucketing) or n (nnm) vectors
        they leave, cannot run on n updates, or None."""
        for p in options.pre:
            n, problem = p.rows(n, options.rule_f())
            if problem:
                return problem
        problem = cls.condition(options, n)
        return f"{problem} (after pre: {', '.join(p.name for p in options.pre)})" if problem and options.pre else problem

    @classmethod
    def check(cls, options: Options, scenario) -> None:
        if options.pre and cls.rows_are_clients:
            raise ValueError(f"pre: {cls.name} cannot take pre-aggregators: {cls.rows_are_clients}; drop pre")
        problem = cls.rows_condition(options, scenario.federation.clients_per_round)
        if problem:
            raise ValueError(f"{problem} (n = federation.clients_per_round)")

    def generator(self, key: int) -> torch.Generator:
        """A generator seeded from the scenario, the current round and ``key`` (one per use)."""
        return torch.Generator().manual_seed(self.runtime.seed_for(self.round, key))

    def pre_aggregate(self, X: torch.Tensor) -> Mixed:
        """The ``pre`` chain applied in order; bucketing's permutation is seeded from the round."""
        mixed = Mixed(X, torch.eye(X.shape[0], dtype=X.dtype, device=X.device))
        for p in self.options.pre:
            if isinstance(p, Bucketing):
                step = rs.bucketing(mixed.rows, p.s, self.generator(0x4255))
            else:
                step = rs.nnm(mixed.rows, p.f if p.f is not None else self.options.rule_f())
            mixed = Mixed(step.rows, step.weights @ mixed.weights)
        return mixed

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        updates = plain_updates(messages, self.name)
        if not updates:
            self.shares = {}
            return zeros_like(round.global_state)
        problem = self.rows_condition(self.options, len(updates))
        if problem:
            raise ValueError(f"round {round.round}: {problem}")
        self.round = round.round
        mixed = self.pre_aggregate(torch.stack([flatten(u) for u in updates]))
        result = self.rule(mixed.rows, messages)
        share = result.share @ mixed.weights  # each row's share split back over the clients it mixed
        self.shares = {m.client_id: float(s) for m, s in zip(messages, share)}
        return unflatten(result.aggregate, like=round.global_state)

    def score_round(self, round: RoundContext, truth: RoundTruth, metrics: dict[str, float]) -> dict[str, float]:
        """The rule's selection against who truly attacked, which the rule itself never saw."""
        if not self.shares:
            return {}
        figures, rows = selection_figures(self.shares, truth.malicious_clients() & self.shares.keys())
        self.rows.extend({"round": round.round, **row} for row in rows)
        return figures

    def training_end(self, runtime) -> None:
        if self.rows:
            runtime.write_table("robust_selection.csv", self.rows)


def selection_figures(shares: dict[int, float], malicious: set[int]) -> tuple[dict[str, float], list[dict]]:
    """Figures and per-client rows from the clients' shares and the truly malicious set."""
    n = len(shares)
    excluded = {cid for cid, s in shares.items() if s < (1 - 1e-6) / n}
    caught = len(excluded & malicious)
    figures = {
        "robust.selected": float(n - len(excluded)),
        "robust.malicious_share": float(sum(shares[c] for c in malicious if c in shares)),
    }
    if excluded:
        figures["robust.exclusion_precision"] = caught / len(excluded)
    if malicious:
        figures["robust.exclusion_recall"] = caught / len(malicious)
    rows = [
        {"client_id": cid, "share": s, "excluded": cid in excluded, "malicious": cid in malicious}
        for cid, s in shares.items()
    ]
    return figures, rows


class ToleratesF(RobustAggregator):
    """A rule that tolerates f Byzantine clients among n ≥ ``factor``·f + 3."""

    OptionsModel = FOptions
    factor: ClassVar[int]

    @classmethod
    def condition(cls, options, n):
        if n < cls.factor * options.f + 3:
            return f"{cls.name} needs n ≥ {cls.factor}f+3: got n={n}, f={options.f}"


class Krum(ToleratesF):
    name = "krum"
    summary = "the one update closest to its n − f − 2 nearest others (Blanchard et al. 2017)"
    factor = 2

    def rule(self, X, messages):
        return krum(X, self.options.f)


class MultiKrumOptions(FOptions):
    m: int | None = Field(None, ge=1, description="How many lowest-score updates to average; default n − f.")


class MultiKrum(Krum):
    name = "multikrum"
    summary = "average of the m updates with the lowest Krum scores (Blanchard et al. 2017)"
    OptionsModel = MultiKrumOptions

    @classmethod
    def condition(cls, options, n):
        if options.m is not None and options.m > n:
            return f"multikrum needs m ≤ n: got n={n}, m={options.m}"
        return super().condition(options, n)

    def rule(self, X, messages):
        m = self.options.m if self.options.m is not None else X.shape[0] - self.options.f
        return multikrum(X, self.options.f, m)


class Median(RobustAggregator):
    name = "median"
    summary = "coordinate-wise median (Yin et al. 2018)"

    def rule(self, X, messages):
        return median(X)


class TrimmedMeanOptions(RuleOptions):
    trim: StrictInt | StrictFloat = Field(
        0.1, ge=0, description="Trimmed from each end per coordinate: a fraction β < 0.5 (float) or a count b (int)."
    )


class TrimmedMean(RobustAggregator):
    name = "trimmed_mean"
    summary = "coordinate-wise mean after dropping the b largest and b smallest values (Yin et al. 2018)"
    OptionsModel = TrimmedMeanOptions

    @staticmethod
    def count(trim: int | float, n: int) -> int:
        """b = trim for a count; ⌊β·n⌋ for a fraction β (Yin et al.)."""
        return trim if isinstance(trim, int) else int(trim * n)

    @classmethod
    def condition(cls, options, n):
        trim = options.trim
        if isinstance(trim, float) and trim >= 0.5:
            return f"trimmed_mean needs a fraction trim < 0.5: got trim={trim}"
        b = cls.count(trim, n)
        if n - 2 * b < 1:
            return f"trimmed_mean needs n − 2b ≥ 1: got n={n}, b={b}"

    def rule(self, X, messages):
        return trimmed_mean(X, self.count(self.options.trim, X.shape[0]))


class Bulyan(ToleratesF):
    name = "bulyan"
    summary = "repeated Krum selection, then a coordinate-wise average around the median (El Mhamdi et al. 2018)"
    factor = 4

    def rule(self, X, messages):
        return bulyan(X, self.options.f)


class NormBoundOptions(RuleOptions):
    max_norm: float = Field(1.0, gt=0, description="M: each update is scaled down to L2 norm ≤ M.")
    noise_std: float = Field(0.0, ge=0, description="σ of the Gaussian noise added to the aggregate (Sun et al.'s weak DP).")


class NormBound(RobustAggregator):
    name = "norm_bound"
    summary = "server-side norm thresholding, optionally with weak-DP noise (Sun et al. 2019)"
    OptionsModel = NormBoundOptions

    def rule(self, X, messages):
        return norm_bound(X, self.options.max_norm)

    def post_aggregation(self, round: RoundContext, aggregate: State) -> State:
        """Sun et al.'s weak DP: N(0, σ²) noise on every coordinate of the aggregate."""
        if self.options.noise_std == 0:
            return aggregate
        generator = torch.Generator().manual_seed(self.runtime.seed_for(round.round, 0x4E42))
        return add_gaussian_noise(aggregate, self.options.noise_std, generator)


class CenteredClipOptions(RuleOptions):
    tau: float = Field(1.0, gt=0, description="τ: clipping radius around the current centre.")
    iterations: int = Field(1, ge=1, description="L: clipping iterations per round (the paper uses 1).")


class CenteredClip(RobustAggregator):
    name = "centered_clip"
    summary = "iterative clipping around the previous aggregate (Karimireddy et al. 2021)"
    OptionsModel = CenteredClipOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.previous: torch.Tensor | None = None

    def rule(self, X, messages):
        start = self.previous if self.previous is not None else torch.zeros_like(X[0])
        result = centered_clip(X, start, self.options.tau, self.options.iterations)
        self.previous = result.aggregate
        return result


class GeoMedianOptions(RuleOptions):
    nu: float = Field(1e-6, gt=0, description="ν: smoothing, the least distance a weight divides by.")
    max_iter: int = Field(4, ge=1, description="Most Weiszfeld updates per round.")
    ftol: float = Field(1e-6, ge=0, description="Stop when the objective improves by less than ftol · objective.")


class GeoMedian(RobustAggregator):
    name = "geomedian"
    summary = "example-weighted geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022)"
    OptionsModel = GeoMedianOptions
    rows_are_clients = "RFA weights each row by its client's example count, which a mixed row does not have"

    def rule(self, X, messages):
        alpha = torch.tensor([float(m.num_examples) for m in messages], dtype=X.dtype, device=X.device)
        o = self.options
        return geomedian(X, alpha, o.nu, o.max_iter, o.ftol)


class RobustLROptions(RuleOptions):
    threshold: int = Field(..., ge=1, description="θ: the least |Σ_i sign(Δ_i,j)| at which coordinate j keeps the "
                           "server learning rate +η (else −η); 1 ≤ θ ≤ n.")


class RobustLR(RobustAggregator):
    name = "robust_lr"
    summary = "per-coordinate sign vote: the server lr flips to −η where fewer than θ clients agree (Ozdayi et al. 2021)"
    OptionsModel = RobustLROptions
    rows_are_clients = "its mean is FedAvg's, weighted by each row's own client's example count"

    @classmethod
    def condition(cls, options, n):
        if options.threshold > n:
            return f"robust_lr needs threshold θ ≤ n (n clients can agree at most n-fold): got n={n}, θ={options.threshold}"

    def rule(self, X, messages):
        alpha = torch.tensor([float(m.num_examples) for m in messages], dtype=torch.float64, device=X.device)
        return rs.robust_lr(X, alpha, self.options.threshold)


class DnCOptions(FOptions):
    niters: int = Field(5, ge=1, description="Iterations, each on a fresh random coordinate subset (the paper uses 5).")
    subsample_dim: int = Field(10_000, ge=1, description="b: coordinates per subset (all of them when the update "
                               "has fewer; the paper uses 10,000).")
    c: float = Field(1.0, gt=0, description="Filtering fraction: each iteration drops the ⌊c·f⌋ highest scores.")


class DnC(RobustAggregator):
    name = "dnc"
    summary = "drops the updates farthest along the top singular vector of random coordinate subsets (Shejwalkar & Houmansadr 2021)"
    OptionsModel = DnCOptions

    @staticmethod
    def removed(options) -> int:
        return math.floor(options.c * options.f)

    @classmethod
    def condition(cls, options, n):
        if n - cls.removed(options) < 1:
            return f"dnc needs n − ⌊c·f⌋ ≥ 1: got n={n}, c={options.c}, f={options.f}"

    def rule(self, X, messages):
        generator = self.generator(0x446E43)
        d, b = X.shape[1], min(self.options.subsample_dim, X.shape[1])
        subsets = [torch.randperm(d, generator=generator)[:b].to(X.device) for _ in range(self.options.niters)]
        return rs.dnc(X, self.removed(self.options), subsets)


class SignGuardOptions(RuleOptions):
    low: float = Field(0.1, ge=0, description="L: least norm / median norm kept (the paper's 0.1).")
    high: float = Field(3.0, gt=0, description="R: largest norm / median norm kept (the paper's 3.0).")
    coordinates: float = Field(0.1, gt=0, le=1, description="Fraction of the coordinates, drawn at random each round, "
                               "the sign statistics are taken over (the reference code's 0.1).")
    clustering: Literal["meanshift", "dbscan"] = Field("meanshift", description="How the sign statistics are "
                                                       "clustered (scikit-learn), as the paper offers.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.low >= 1 or self.high <= 1:
            raise ValueError(f"signguard needs low < 1 < high (the median norm itself must pass): got low={self.low}, "
                             f"high={self.high}")
        return self


class SignGuard(RobustAggregator):
    name = "signguard"
    summary = "norm filter ∩ largest cluster of sign statistics, clipped to the median norm (Xu et al. 2022)"
    OptionsModel = SignGuardOptions

    def rule(self, X, messages):
        generator = self.generator(0x5347)
        d = X.shape[1]
        coordinates = torch.randperm(d, generator=generator)[: max(1, int(self.options.coordinates * d))].to(X.device)
        o = self.options
        return rs.signguard(X, o.low, o.high, coordinates, o.clustering)
