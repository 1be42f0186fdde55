"""Plots of a comparison: privacy-utility frontiers and overlaid curves (the defense x attack heatmaps are
:mod:`fedsec_bench.robustness`'s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .comparison_table import parameter_columns

UTILITY_AXES = (("utility.perplexity", "lower"), ("utility.token_accuracy", "higher"), ("utility.rougeL", "higher"))
"""The frontier's x axis: the first of these the runs logged, with the direction that is better."""

FRONTIERS = {
    "membership": (("mia.auc", "user_mia.auc"), "membership-inference AUC (0.5 = chance; lower is better)"),
    "inversion": (("inversion.rouge1",), "inversion ROUGE-1 (lower is better)"),
    "epsilon": (("privacy.epsilon", "privacy.user_epsilon", "privacy.local_epsilon"), "ε (lower is better)"),
    "canary": (("canary.exposure",), "canary exposure, bits (lower is better)"),
    "probe": (("probe.readable_fraction",), "readable fraction of probed updates (lower is better)"),
}
"""One frontier per privacy family the runs logged: (its figures, the y axis label)."""

NAME_COLUMNS = ("scenario", "mode", "defenses", "attacks", "aggregator")
CURVES = ("utility.eval_loss", "utility.perplexity")
MAX_LEGEND = 20
"""Overlaid curves get a legend up to this many runs."""


def configuration_label(row: pd.Series, columns: list[str]) -> str:
    """``norm_clip max_norm=0.5 update_probe``: a row's parameters, names bare and options as key=value."""
    parts = []
    for column in columns:
        value = row[column]
        if pd.notna(value):
            parts.append(str(value) if column in NAME_COLUMNS else f"{option_name(column)}={value}")
    return " ".join(parts)


def option_name(column: str) -> str:
    """A column's name without the plugin it belongs to (``defenses.norm_clip.max_norm`` -> ``max_norm``,
    ``federation.aggregator.pre.0.s`` -> ``pre.0.s``); another field's last part."""
    for prefix in ("federation.aggregator.", "defenses.", "attacks."):
        if column.startswith(prefix):
            rest = column.removeprefix(prefix)
            return rest if prefix.startswith("federation") else rest.partition(".")[2] or rest
    return column.rsplit(".", 1)[-1]


def _labels(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    return frame.apply(configuration_label, axis=1, columns=columns) if columns else pd.Series("all", frame.index)


def plot_frontiers(aggregated: pd.DataFrame, folder: Path) -> list[Path]:
    """``privacy_utility_frontier_<family>.png`` per privacy family present: one point per configuration
    (mean over its seeds, 95 % CI as error bars), utility on x. ε = ∞ (no noise) cannot be drawn."""
    utility = next(((m, d) for m, d in UTILITY_AXES if f"{m}.mean" in aggregated), None)
    if utility is None:
        return []
    labels = _labels(aggregated, [c for c in parameter_columns(aggregated) if c != "status"])
    written = []
    for name, (figures, ylabel) in FRONTIERS.items():
        present = [f for f in figures if f"{f}.mean" in aggregated and np.isfinite(aggregated[f"{f}.mean"]).any()]
        if present:
            written.append(_frontier(aggregated, labels, utility, present, ylabel, folder / f"privacy_utility_frontier_{name}.png"))
    return written


def _frontier(aggregated, labels, utility, figures, ylabel, path: Path) -> Path:
    x_name, better = utility
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for figure in figures:
        points = aggregated[np.isfinite(aggregated[f"{figure}.mean"]) & aggregated[f"{x_name}.mean"].notna()]
        ax.errorbar(points[f"{x_name}.mean"], points[f"{figure}.mean"], xerr=points[f"{x_name}.ci95"].fillna(0),
                    yerr=points[f"{figure}.ci95"].fillna(0), fmt="o", capsize=3, label=figure)
        for (_, row), label in zip(points.iterrows(), labels[points.index]):
            ax.annotate(f"{label} (n={row['n']})", (row[f"{x_name}.mean"], row[f"{figure}.mean"]), fontsize=7)
    ax.set_xlabel(f"{x_name} ({better} is better)")
    ax.set_ylabel(ylabel)
    ax.set_title("privacy-utility frontier (mean, 95% CI over seeds)")
    if len(figures) > 1:
        ax.legend(fontsize=7)
    return save(fig, path)


def plot_curves_overlaid(client, runs: pd.DataFrame, path: Path) -> Path | None:
    """Eval loss and perplexity per round, one line per run (rounds on integer ticks)."""
    from matplotlib.ticker import MaxNLocator

    if runs.empty:
        return None
    labels = _labels(runs, [c for c in parameter_columns(runs) if c != "status"])
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.5 * len(CURVES), 4), squeeze=False)
    drawn = False
    for ax, metric in zip(axes[0], CURVES):
        for run_id, label in zip(runs["run_id"], labels):
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
            if history:
                ax.plot(*zip(*history), marker="o", markersize=3, label=label)
                drawn = True
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not drawn:
        plt.close(fig)
        return None
    if len(runs) <= MAX_LEGEND:
        axes[0][0].legend(fontsize=7)
    else:  # a legend of hundreds of runs would hide the curves; the runs table names them
        fig.suptitle(f"{len(runs)} runs (see comparison_runs.csv)", fontsize=9)
    return save(fig, path)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
