"""An empirical lower bound on ε from a membership attack's ROC (Jagielski et al. 2020; Nasr et al. 2021).

If training is (ε, δ)-DP, every membership test satisfies, at every threshold,

    TPR ≤ e^ε · FPR + δ        and        1 − FPR ≤ e^ε · (1 − TPR) + δ,

so an observed (TPR, FPR) implies ε ≥ log((TPR − δ) / FPR) and ε ≥ log((1 − FPR − δ) / (1 − TPR)).
The rates are estimated from finitely many samples, so we take the pessimistic ends of
Clopper–Pearson intervals (TPR_lo, FPR_hi) before dividing:

    ε_lb = max over thresholds of max( log((TPR_lo − δ) / FPR_hi),  log((1 − FPR_hi − δ) / (1 − TPR_lo)) )

(0 when no threshold gives a positive bound). Two caveats, documented for users: the
threshold is chosen on the same samples (as in the papers, this makes the bound
slightly optimistic), and the samples come from one training run rather than one run
per trial (Steinke, Nasr & Jagielski 2023 analyse such one-run audits, with members
chosen at random as the split here does). Read ε_lb as an audit figure, not a certificate.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv

from .roc import counts_by_threshold


def clopper_pearson(successes, trials, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided binomial interval: the Beta quantiles of Clopper & Pearson (1934).

    lo = B⁻¹(α/2; k, n − k + 1) (0 when k = 0), hi = B⁻¹(1 − α/2; k + 1, n − k) (1 when k = n),
    with α = 1 − confidence.
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, betaincinv(k, n - k + 1, alpha / 2), 0.0)
        hi = np.where(k < n, betaincinv(k + 1, n - k, 1 - alpha / 2), 1.0)
    return lo, hi


def eps_lower_bound(scores: np.ndarray, labels: np.ndarray, delta: float, confidence: float = 0.95) -> float:
    """ε_lb of the module docstring over every threshold of the attack's ROC."""
    tp, fp, members, nonmembers = counts_by_threshold(scores, labels)
    tpr_lo, _ = clopper_pearson(tp, members, confidence)
    _, fpr_hi = clopper_pearson(fp, nonmembers, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log((tpr_lo - delta) / fpr_hi)
        mirrored = np.log((1 - fpr_hi - delta) / (1 - tpr_lo))
    bounds = np.nan_to_num(np.r_[direct, mirrored], nan=-np.inf)
    return float(max(0.0, bounds.max()))
