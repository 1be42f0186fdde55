"""``canary_exposure``: how much of each planted secret the final model has memorised.

Exposure (Carlini et al. 2019, "The Secret Sharer"). For a canary with secret s among
the candidate secrets R of the same format, rank the candidates by the model's
log-perplexity of the canary's record with the candidate in the secret's place,
Px(r) = −log2 Pr(prefix · r · suffix | question, model), taken on the tokens training
takes its loss on: every token of a plain-text canary, the response of an instruction
canary given its question (the question's own tokens, scored too with
``data.train_on_prompt``, add the same to every candidate and change no rank):

    exposure(s) = log2 |R| − log2 rank(s),      rank(s) = 1 + #{r ∈ R : Px(r) < Px(s)}.

It ranges from 0 (the secret is the least likely candidate) to log2 |R| (the most
likely). Small spaces are enumerated exactly. For large ones we use the paper's
extrapolation: fit a skew-normal (or normal) distribution to the Px of candidates
sampled uniformly from R, and take exposure ≈ −log2 F(Px(s)), F the fitted CDF
(capped at log2 |R|, the exact maximum). R is the kind's space, or the one a custom
canary's ``format`` spells (:mod:`.membership.canaries`).

Extraction: greedy decoding from what precedes the secret in training (the question,
then the prefix) reproduces the secret exactly.
Both are measured on the final global model (black box, ``training_end``).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats

from fedsec_bench import progress
from fedsec_bench.data import Canary, Example
from fedsec_bench.lm import greedy_continuations
from fedsec_bench.plugins import Options, Plugin

from .membership.canaries import SPACES, format_space, space_of
from .membership.scores import token_logprobs

__all__ = ["SPACES", "CanaryExposure", "exposure_exact", "exposure_extrapolated", "format_space"]  # spaces re-exported
SEED_KEY = 7019


def exposure_exact(secret_px: float, candidate_px: np.ndarray, space_size: int) -> float:
    """log2 |R| − log2 rank, the rank counted over every other candidate of the enumerated space."""
    rank = 1 + int(np.sum(np.asarray(candidate_px) < secret_px))
    return math.log2(space_size) - math.log2(rank)


def exposure_extrapolated(secret_px: float, sampled_px: np.ndarray, space_size: int, fit: str) -> float:
    """−log2 F(Px(s)) with F fitted to sampled candidates' Px (Carlini et al. 2019, §4.3)."""
    family = stats.skewnorm if fit == "skewnorm" else stats.norm
    dist = family(*family.fit(sampled_px))
    return float(min(-dist.logcdf(secret_px) / math.log(2), math.log2(space_size)))


def log_perplexity(runtime, examples: list[Example]) -> np.ndarray:
    """Px = −log2 Pr(the scored tokens | what precedes them) under the current model: every token
    of a plain text, the response (and EOS) of a prompted example given its prompt."""
    return np.array([-lp.sum() / math.log(2) for lp in token_logprobs(runtime, examples)])


def greedy_extractions(runtime, canaries: list[Canary]) -> list[bool | float]:
    """For each canary: does greedy decoding from what precedes its secret reproduce the secret (and stop
    the word there)? NaN when nothing precedes it (a custom text that starts with its secret).

    Generation starts from the tokens training saw before the secret: the rendered
    question (an instruction canary; its prefix is usually empty, so decoding starts
    right after the question), then the prefix without its trailing space, because
    byte-level BPE attaches a space to the word after it, so the secret's first token
    carries it. Each canary may decode as many tokens as the rest of its response (the
    secret and its suffix) takes.
    """
    batcher = runtime.batcher
    starts = [canary.prefix.rstrip() for canary in canaries]
    prompts = batcher.prompt_ids([canary.example for canary in canaries], response_starts=starts)
    responses = batcher.tokens([canary.example.response for canary in canaries])
    budgets = [max(1, len(r) - len(s)) for r, s in zip(responses, batcher.tokens(starts))]
    asked = [i for i, prompt in enumerate(prompts) if prompt]
    produced = greedy_continuations(
        runtime.model, runtime.tokenizer, [prompts[i] for i in asked], [budgets[i] for i in asked], runtime.device
    )
    hits: list[bool | float] = [float("nan")] * len(canaries)
    for i, text in zip(asked, produced):
        hits[i] = extracts(canaries[i].secret, text.strip())
    return hits


def extracts(secret: str, produced: str) -> bool:
    """The decoded text starts with the whole secret, not with a longer word that begins like it."""
    return produced.startswith(secret) and not produced[len(secret) : len(secret) + 1].isalnum()


class ExposureOptions(Options):
    exact_max: int = Field(
        4096, ge=1, description="Enumerate the candidate space exactly when it has at most this many secrets."
    )
    samples: int = Field(1000, ge=10, description="Candidates sampled for the extrapolation in larger spaces.")
    fit: Literal["skewnorm", "normal"] = Field("skewnorm", description="Distribution fitted to the sampled Px.")
    extraction: bool = Field(
        True, description="Also try greedy extraction from what precedes each secret (its question and prefix)."
    )


class CanaryExposure(Plugin):
    name = "canary_exposure"
    kind = "attack"
    summary = "exposure (Carlini et al. 2019) and greedy extraction of the planted canaries, by repetition count"
    on_instruction_data = "ranks candidate answers by log-perplexity given the canary's question; extracts by asking it"
    OptionsModel = ExposureOptions

    def __init__(self, options, runtime):
        super().__init__(options, runtime)
        self.participants: set[int] = set()

    @classmethod
    def check(cls, options: ExposureOptions, scenario) -> None:
        if scenario.data.canary_count == 0 and not scenario.data.canaries.custom:
            raise ValueError("no canaries are planted; set data.canaries.count ≥ 1 or add data.canaries.custom")

    def score_round(self, round, truth, metrics) -> None:
        """Only collect who trained (the simulator's truth): a canary counts once its client trained."""
        self.participants.update(truth.trained())

    def training_end(self, runtime) -> dict[str, float]:
        canaries = runtime.data.canaries
        with progress.bar(len(canaries), "canary exposure", unit="canary") as bar:
            rows = []
            for canary in canaries:
                rows.append(self.measure(canary))
                bar.update()
        if self.options.extraction:
            whole = [i for i, row in enumerate(rows) if row["method"] != "truncated"]
            for i, hit in zip(whole, greedy_extractions(runtime, [canaries[i] for i in whole])):
                rows[i]["extracted"] = hit
        table = pd.DataFrame(rows)
        runtime.write_table("canary_exposure.csv", table)
        return self.figures(table[table.trained])

    def measure(self, canary: Canary) -> dict:
        """One canary's row: exposure among its space's candidates, exact or extrapolated."""
        space = space_of(canary)
        row = {
            "canary": canary.index, "kind": canary.kind, "client": canary.client_id,
            "repetitions": canary.repetitions, "trained": canary.client_id in self.participants,
            "log2_space": math.log2(space.size),
        }
        encoded = self.runtime.batcher.encode([canary.example])[0]
        if encoded.truncated:  # training cut the record (prompt + response + EOS) to seq_len
            warnings.warn(
                f"canary {canary.index} (its question and answer take more than data.seq_len="
                f"{self.runtime.scenario.data.seq_len} tokens) is truncated: it was never trained on whole; "
                "raise data.seq_len"
            )
            return {**row, "method": "truncated", "exposure": float("nan"), "extracted": float("nan")}
        secret_px = log_perplexity(self.runtime, [canary.example])[0]
        exact = space.size <= self.options.exact_max
        if exact:
            others = [c for c in space.enumerate() if c != canary.secret]
            px = log_perplexity(self.runtime, [canary.with_secret(c) for c in others])
            exposure = exposure_exact(secret_px, px, space.size)
        else:
            rng = np.random.default_rng(self.runtime.seed_for(SEED_KEY, canary.index))
            sampled = space.sample(rng, self.options.samples)
            px = log_perplexity(self.runtime, [canary.with_secret(c) for c in sampled])
            exposure = exposure_extrapolated(secret_px, px, space.size, self.options.fit)
        return row | {
            "method": "exact" if exact else f"extrapolated ({self.options.fit})",
            "secret_log_perplexity": secret_px, "exposure": exposure,
        }

    def figures(self, trained: pd.DataFrame) -> dict[str, float]:
        """Means over the canaries whose client trained at least once (truncated ones, and extraction where
        nothing precedes the secret, skipped), overall and per repetition count."""
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
