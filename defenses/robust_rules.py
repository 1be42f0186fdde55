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
change its vote), except ``geomedian`` whose RFA definition weights by examples.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, StrictFloat, StrictInt

from fedsec_bench.ground_truth import RoundTruth
from fedsec_bench.messages import Message, RoundContext, State, plain_updates
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import add_gaussian_noise, flatten, unflatten, zeros_like

from .robust_statistics import Robust, bulyan, centered_clip, geomedian, krum, median, multikrum, norm_bound, trimmed_mean


# --------------------------------------------------------------------------- plugins


class FOptions(Options):
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

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.shares: dict[int, float] = {}
        self.rows: list[dict] = []

    def rule(self, X: torch.Tensor, messages: list[Message]) -> Robust:
        raise NotImplementedError

    @classmethod
    def condition(cls, options: Options, n: int) -> str | None:
        """Why this rule cannot run on n updates, or None."""

    @classmethod
    def check(cls, options: Options, scenario) -> None:
        problem = cls.condition(options, scenario.federation.clients_per_round)
        if problem:
            raise ValueError(f"{problem} (n = federation.clients_per_round)")

    def aggregation(self, round: RoundContext, messages: list[Message]) -> State:
        updates = plain_updates(messages, self.name)
        if not updates:
            self.shares = {}
            return zeros_like(round.global_state)
        problem = self.condition(self.options, len(updates))
        if problem:
            raise ValueError(f"round {round.round}: {problem}")
        result = self.rule(torch.stack([flatten(u) for u in updates]), messages)
        self.shares = {m.client_id: float(s) for m, s in zip(messages, result.share)}
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


class TrimmedMeanOptions(Options):
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


class NormBoundOptions(Options):
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


class CenteredClipOptions(Options):
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


class GeoMedianOptions(Options):
    nu: float = Field(1e-6, gt=0, description="ν: smoothing, the least distance a weight divides by.")
    max_iter: int = Field(4, ge=1, description="Most Weiszfeld updates per round.")
    ftol: float = Field(1e-6, ge=0, description="Stop when the objective improves by less than ftol · objective.")


class GeoMedian(RobustAggregator):
    name = "geomedian"
    summary = "example-weighted geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022)"
    OptionsModel = GeoMedianOptions

    def rule(self, X, messages):
        alpha = torch.tensor([float(m.num_examples) for m in messages], dtype=X.dtype, device=X.device)
        o = self.options
        return geomedian(X, alpha, o.nu, o.max_iter, o.ftol)
