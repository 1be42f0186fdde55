"""``canary_exposure``: how much of each planted secret the final model has memorised.

Exposure (Carlini et al. 2019, "The Secret Sharer"). For a canary with secret s among
the candidate secrets R of the same format, rank the candidates by the model's
log-perplexity of the whole canary text, Px(r) = −log2 Pr(prefix · r · " ." | model):

    exposure(s) = log2 |R| − log2 rank(s),      rank(s) = 1 + #{r ∈ R : Px(r) < Px(s)}.

It ranges from 0 (the secret is the least likely candidate) to log2 |R| (the most
likely). Small spaces are enumerated exactly. For large ones we use the paper's
extrapolation: fit a skew-normal (or normal) distribution to the Px of candidates
sampled uniformly from R, and take exposure ≈ −log2 F(Px(s)), F the fitted CDF
(capped at log2 |R|, the exact maximum).

Extraction: greedy decoding from the canary's prefix reproduces the secret exactly.
Both are measured on the final global model (black box, ``training_end``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import product
from typing import Callable, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats

from fedsec_bench.data.synthetic import DOMAINS, FIRST_NAMES, LAST_NAMES, Canary
from fedsec_bench.lm import greedy_continuations
from fedsec_bench.plugins import Options, Plugin

from .membership.scores import token_logprobs

DIGITS = tuple("0123456789")
SEED_KEY = 7019


@dataclass(frozen=True)
class SecretSpace:
    """The candidate secrets of one kind: one choice per slot, rendered to text like ``make_secret``."""

    slots: tuple[tuple[str, ...], ...]
    render: Callable[[tuple[str, ...]], str]

    @property
    def size(self) -> int:
        return math.prod(len(slot) for slot in self.slots)

    def enumerate(self) -> list[str]:
        return [self.render(choice) for choice in product(*self.slots)]

    def sample(self, rng: np.random.Generator, count: int) -> list[str]:
        """Uniform draws from the space (with replacement, as the extrapolation assumes)."""
        picks = [rng.integers(len(slot), size=count) for slot in self.slots]
        return [self.render(tuple(slot[p[i]] for slot, p in zip(self.slots, picks))) for i in range(count)]


SPACES = {
    "card": SecretSpace((DIGITS,) * 16, lambda c: " ".join("".join(c[i : i + 4]) for i in range(0, 16, 4))),
    "phone": SecretSpace((DIGITS,) * 10, lambda c: f"{''.join(c[:3])}-{''.join(c[3:6])}-{''.join(c[6:])}"),
    "email": SecretSpace(
        (tuple(FIRST_NAMES), tuple(LAST_NAMES), DIGITS, DIGITS, tuple(DOMAINS)),
        lambda c: f"{c[0]}.{c[1]}{c[2]}{c[3]}@{c[4]}",
    ),
    "name": SecretSpace((tuple(FIRST_NAMES), tuple(LAST_NAMES)), lambda c: f"{c[0]} {c[1]}"),
}
"""One space per canary kind of fedsec_bench.data.synthetic.make_secret (a test checks they agree)."""


def exposure_exact(secret_px: float, candidate_px: np.ndarray, space_size: int) -> float:
    """log2 |R| − log2 rank, the rank counted over every other candidate of the enumerated space."""
    rank = 1 + int(np.sum(np.asarray(candidate_px) < secret_px))
    return math.log2(space_size) - math.log2(rank)


def exposure_extrapolated(secret_px: float, sampled_px: np.ndarray, space_size: int, fit: str) -> float:
    """−log2 F(Px(s)) with F fitted to sampled candidates' Px (Carlini et al. 2019, §4.3)."""
    family = stats.skewnorm if fit == "skewnorm" else stats.norm
    dist = family(*family.fit(sampled_px))
    return float(min(-dist.logcdf(secret_px) / math.log(2), math.log2(space_size)))


def log_perplexity(runtime, texts: list[str]) -> np.ndarray:
    """Px(text) = −log2 Pr(text) under the current model, every predicted token included."""
    return np.array([-lp.sum() / math.log(2) for lp in token_logprobs(runtime, texts)])


def greedy_extractions(runtime, canaries: list[Canary]) -> list[bool]:
    """For each canary: does greedy decoding from its prefix reproduce the secret (and stop the word there)?

    A prefix is fed without its trailing space: byte-level BPE attaches a space to the
    word after it, so the secret's first token carries it. Each canary may decode as
    many tokens as the rest of its own text (the secret and " .") takes.
    """
    tok = runtime.tokenizer
    prompts = [canary.prefix.rstrip() for canary in canaries]
    budgets = [
        max(1, len(tok(canary.text, add_special_tokens=False)["input_ids"])
            - len(tok(prompt, add_special_tokens=False)["input_ids"]))
        for canary, prompt in zip(canaries, prompts)
    ]
    produced = greedy_continuations(runtime.model, tok, prompts, budgets, runtime.device)
    return [extracts(canary.secret, text.strip()) for canary, text in zip(canaries, produced)]


def extracts(secret: str, produced: str) -> bool:
    """The decoded text starts with the whole secret, not with a longer word that begins like it."""
    return produced.startswith(secret) and not produced[len(secret) : len(secret) + 1].isalnum()


class ExposureOptions(Options):
    exact_max: int = Field(
        4096, ge=1, description="Enumerate the candidate space exactly when it has at most this many secrets."
    )
    samples: int = Field(1000, ge=10, description="Candidates sampled for the extrapolation in larger spaces.")
    fit: Literal["skewnorm", "normal"] = Field("skewnorm", description="Distribution fitted to the sampled Px.")
    extraction: bool = Field(True, description="Also try greedy extraction from each canary's prefix.")


class CanaryExposure(Plugin):
    name = "canary_exposure"
    kind = "attack"
    summary = "exposure (Carlini et al. 2019) and greedy extraction of the planted canaries, by repetition count"
    OptionsModel = ExposureOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.participants: set[int] = set()

    @classmethod
    def check(cls, options: ExposureOptions, scenario) -> None:
        if scenario.data.canaries.count == 0:
            raise ValueError("no canaries are planted; set data.canaries.count ≥ 1")

    def round_end(self, round, metrics) -> None:
        self.participants.update(r.client_id for r in round.reports)

    def training_end(self, runtime) -> dict[str, float]:
        canaries = runtime.data.canaries
        rows = [self.measure(canary) for canary in canaries]
        if self.options.extraction:
            whole = [i for i, row in enumerate(rows) if row["method"] != "truncated"]
            for i, hit in zip(whole, greedy_extractions(runtime, [canaries[i] for i in whole])):
                rows[i]["extracted"] = hit
        table = pd.DataFrame(rows)
        runtime.write_table("canary_exposure.csv", table)
        return self.figures(table[table.trained])

    def measure(self, canary: Canary) -> dict:
        space = SPACES[canary.kind]
        row = {
            "canary": canary.index, "kind": canary.kind, "client": canary.client_id,
            "repetitions": canary.repetitions, "trained": canary.client_id in self.participants,
            "log2_space": math.log2(space.size),
        }
        tokens = len(self.runtime.tokenizer(canary.text, add_special_tokens=False)["input_ids"])
        if tokens >= self.runtime.scenario.data.seq_len:  # training cut the text (EOS included) before its end
            warnings.warn(
                f"canary {canary.index} ({tokens} tokens) is truncated by data.seq_len="
                f"{self.runtime.scenario.data.seq_len}: its secret was never fully trained on; raise data.seq_len"
            )
            return {**row, "method": "truncated", "exposure": float("nan"), "extracted": float("nan")}
        secret_px = log_perplexity(self.runtime, [canary.text])[0]
        exact = space.size <= self.options.exact_max
        if exact:
            others = [c for c in space.enumerate() if c != canary.secret]
            px = log_perplexity(self.runtime, [canary.prefix + c + " ." for c in others])
            exposure = exposure_exact(secret_px, px, space.size)
        else:
            rng = np.random.default_rng(self.runtime.seed_for(SEED_KEY, canary.index))
            sampled = space.sample(rng, self.options.samples)
            px = log_perplexity(self.runtime, [canary.prefix + c + " ." for c in sampled])
            exposure = exposure_extrapolated(secret_px, px, space.size, self.options.fit)
        return row | {
            "method": "exact" if exact else f"extrapolated ({self.options.fit})",
            "secret_log_perplexity": secret_px, "exposure": exposure,
        }

    def figures(self, trained: pd.DataFrame) -> dict[str, float]:
        """Means over the canaries whose client trained at least once (truncated ones skipped), overall
        and per repetition count."""
        if trained.empty:
            return {"canary.exposure": float("nan")}
        out = {"canary.exposure": float(trained.exposure.mean())}
        for reps, group in trained.groupby("repetitions"):
            out[f"canary.exposure.rep_{reps}"] = float(group.exposure.mean())
        if self.options.extraction:
            out["canary.extraction_rate"] = float(trained.extracted.astype(float).mean())
            for reps, group in trained.groupby("repetitions"):
                out[f"canary.extraction_rate.rep_{reps}"] = float(group.extracted.astype(float).mean())
        return out
