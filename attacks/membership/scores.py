"""Per-example membership scores computed from a language model's per-token log-probabilities.

Every score follows one convention: **higher means "more likely a member"**, so one
ROC routine and one audit serve every method. The statistic each paper thresholds is
kept as published; only its sign is turned where needed.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from fedsec_bench.data import Example
from fedsec_bench.lm import example_logprobs

SCORING_BATCH = 64


def token_logprobs(runtime, examples: list[Example]) -> list[np.ndarray]:
    """log p(token_t | tokens_<t) of every scored token of each example, under the runtime's model as it is now.

    Examples go through the run's own batcher (EOS appended, fitted to ``data.seq_len``,
    the prompt masked unless ``data.train_on_prompt``), so a member is scored on exactly
    the tokens its training loss was taken on: a plain text's every token, an
    instruction's response given its prompt.
    """
    return example_logprobs(runtime.model, runtime.batcher.loader(examples, batch_size=SCORING_BATCH), runtime.device)


def scored_texts(runtime, examples: list[Example]) -> list[str]:
    """The words each example's scored tokens spell, for text statistics such as zlib entropy: the
    response, or with ``data.train_on_prompt`` every word of the record (a plain text is its response)."""
    if runtime.scenario.data.train_on_prompt:
        return [e.plain_text() for e in examples]
    return [e.response for e in examples]


def mean_logprob(logprobs: list[np.ndarray]) -> np.ndarray:
    """Minus the per-token loss of each example: the statistic of the loss attack and of LiRA."""
    return np.array([lp.mean() for lp in logprobs])


def total_logprob(logprobs: list[np.ndarray]) -> np.ndarray:
    """log Pr(text | model): the sequence likelihood RMIA takes ratios of."""
    return np.array([lp.sum() for lp in logprobs])


def loss_score(logprobs: list[np.ndarray]) -> np.ndarray:
    """Yeom et al. 2018: a member has lower loss. Score = −loss."""
    return mean_logprob(logprobs)


def zlib_score(logprobs: list[np.ndarray], texts: list[str]) -> np.ndarray:
    """Carlini et al. 2021: log-perplexity divided by zlib entropy (bytes of the compressed text).

    Dividing by the text's own compressibility discounts texts that are easy for any
    model; a low ratio flags memorisation. Score = −loss / zlib bytes. ``texts`` are the
    words the log-probs were taken on (:func:`scored_texts`), so both sides measure the same.
    """
    entropy = np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)
    return mean_logprob(logprobs) / entropy


def min_k_score(logprobs: list[np.ndarray], k: float) -> np.ndarray:
    """Shi et al. 2023 (Min-K% Prob): the mean of the k·100 % lowest token log-probs.

    A non-member tends to contain a few outlier tokens of very low probability; a
    member does not. Higher (less negative) = member.
    """
    out = []
    for lp in logprobs:
        count = max(1, math.ceil(k * lp.size))
        out.append(np.sort(lp)[:count].mean())
    return np.array(out)


def reference_score(target: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    """Loss minus a reference model's loss (Carlini et al. 2021; Mireshghallah et al. 2022).

    The reference model, trained on disjoint data of the same distribution, measures
    how hard each text is in itself; what is left is what the target learnt from it.
    Score = reference loss − target loss.
    """
    return mean_logprob(target) - mean_logprob(reference)


def lira_score(target: np.ndarray, shadow: np.ndarray, keep: np.ndarray, online: bool) -> np.ndarray:
    """LiRA (Carlini et al. 2022, "Membership inference attacks from first principles").

    ``target[i]`` is the target model's statistic on example i (here −loss),
    ``shadow[j, i]`` shadow model j's, and ``keep[j, i]`` whether i was in shadow j's
    training half. Per example, the IN and OUT statistics are modelled as Gaussians.
    Online: score = log N(s; μ_in, σ_in²) − log N(s; μ_out, σ_out²), the likelihood
    ratio. Offline (OUT models only): the one-sided test log Pr[Z ≤ s], Z ~ N(μ_out, σ_out²).
    With few shadows the paper uses one global variance; we pool the per-example
    residual variances (each example's own mean removed), the unbiased pooled estimate.
    """
    mu_out, sd_out = _gaussian(shadow, ~keep)
    if not online:
        return norm.logcdf(target, mu_out, sd_out)
    mu_in, sd_in = _gaussian(shadow, keep)
    return norm.logpdf(target, mu_in, sd_in) - norm.logpdf(target, mu_out, sd_out)


def _gaussian(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    count = mask.sum(axis=0)
    if (count == 0).any():
        raise ValueError("an example has no shadow model on this side; use at least 2 shadow models")
    mean = np.where(mask, values, 0.0).sum(axis=0) / count
    residual = np.where(mask, values - mean, 0.0)
    dof = max(int((count - 1).sum()), 1)
    return mean, float(np.sqrt((residual**2).sum() / dof)) + 1e-12


def rmia_score(
    target_x: np.ndarray,
    ref_x: np.ndarray,
    use_x: np.ndarray,
    target_z: np.ndarray,
    ref_z: np.ndarray,
    use_z: np.ndarray,
    gamma: float,
) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks").

    Inputs are sequence log-likelihoods: ``target_x[i]`` = log Pr(x_i | θ), ``ref_x[j, i]``
    = log Pr(x_i | θ_j) for reference model j (used where ``use_x[j, i]``: all models
    online, OUT models offline), and the same for population samples z. Pr(x) is the
    mean of Pr(x | θ_j) over the used reference models, LR(x) = Pr(x | θ) / Pr(x), and
    score(x) = Pr_z[ LR(x) / LR(z) ≥ γ ]: the fraction of population samples x dominates.
    """
    lr_x = target_x - _log_mean_exp(ref_x, use_x)
    lr_z = target_z - _log_mean_exp(ref_z, use_z)
    return (lr_x[:, None] - lr_z[None, :] >= math.log(gamma)).mean(axis=1)


def _log_mean_exp(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log of the mean of exp(values) over the masked rows of each column, without underflow."""
    return logsumexp(values, axis=0, b=mask.astype(np.float64)) - np.log(mask.sum(axis=0))
