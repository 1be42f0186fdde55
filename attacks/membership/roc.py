"""ROC figures of a membership attack: AUC, TPR at a low FPR, the curve, and its plot.

Scores follow the package convention (higher = member); ``labels`` is 1 for members.
The curve and its area are scikit-learn's. TPR at low FPR is the figure Carlini et al.
2022 argue for: an attack that confidently identifies a few members is a privacy
failure even when its AUC is near 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: Pr[s_member > s_non] + ½ Pr[tie]."""
    return float(metrics.roc_auc_score(np.asarray(labels).astype(bool), scores))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, threshold) for the rule "member iff score ≥ threshold", from (0, 0) to (1, 1).

    One point per distinct score, highest threshold first; the first point (threshold
    +inf) predicts no member at all. Every point is kept (no ``drop_intermediate``): a
    point on a straight stretch of the curve can still be the best TPR at some FPR, and
    the audit needs the counts at every threshold.
    """
    return metrics.roc_curve(np.asarray(labels).astype(bool), scores, drop_intermediate=False)


def counts_by_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(true positives, false positives, members, non-members) at every ROC threshold."""
    labels = np.asarray(labels).astype(bool)
    fpr, tpr, _ = roc_curve(scores, labels)
    n1, n0 = int(labels.sum()), int((~labels).sum())
    return np.rint(tpr * n1).astype(int), np.rint(fpr * n0).astype(int), n1, n0


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, max_fpr: float) -> float:
    """The highest TPR among thresholds whose FPR is at most ``max_fpr`` (no interpolation).

    With n non-members the smallest non-zero FPR is 1/n: below it this is the TPR at
    zero false positives, which is why the sample count is logged beside it.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    """Linear and log–log ROC panels (the log–log one shows the low-FPR regime)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, (fpr, tpr) in curves.items():
        for ax in axes:
            ax.plot(fpr, tpr, label=name)
    floor = min((1 / max(len(f) - 1, 1) for f, _ in curves.values()), default=1e-3) / 2
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        if scale == "log":
            ax.set_xlim(floor, 1)
            ax.set_ylim(floor, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
