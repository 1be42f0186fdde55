"""Turn a run's metric history into the artifacts people read: a CSV, a PNG of the curves, a table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    """One row per round (round 0 is the model before training), one column per metric."""
    return pd.DataFrame(history).set_index("round").sort_index()


LOSSES = ("train.loss", "utility.eval_loss")
"""Drawn on one axis: the same unit (nats per token), and their gap is what a reader looks for."""
REDUNDANT = {"utility.perplexity": "utility.eval_loss"}
"""Left out when the figure it is a function of is drawn (perplexity = exp(eval loss))."""
PANELS_PER_ROW = 4


def curve_panels(frame: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """(family, figures on one axis) for each panel of ``curves.png``, families in the comparison's order
    (utility, privacy, security, cost, then the rest): the losses share an axis, every other figure has
    its own. A series with fewer than two points, or the same value in every round, is left out."""
    from .comparison_table import FAMILIES, family

    moving = [c for c in frame.columns if frame[c].notna().sum() > 1 and frame[c].nunique() > 1]
    moving = [c for c in moving if REDUNDANT.get(c) not in moving]
    losses = [c for c in LOSSES if c in moving]
    panels = [("utility", losses)] if losses else []
    order = [label for label, _ in FAMILIES] + [None]
    rest = sorted((c for c in moving if c not in losses), key=lambda c: (order.index(family(c)), c))
    return panels + [(family(c) or "other", [c]) for c in rest]


def plot_curves(frame: pd.DataFrame, path: Path, title: str) -> None:
    """The run's figures per round, a row of panels per family (each row starts a new line), whole-round ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(frame)
    if not panels:
        return
    rows = [[p for p in panels if p[0] == name] for name in dict.fromkeys(name for name, _ in panels)]
    lines = [row[i : i + PANELS_PER_ROW] for row in rows for i in range(0, len(row), PANELS_PER_ROW)]
    cols = max(len(line) for line in lines)
    fig, axes = plt.subplots(len(lines), cols, figsize=(3.6 * cols, 2.7 * len(lines)), squeeze=False)
    for line, line_axes in zip(lines, axes):
        for (name, figures), ax in zip(line, line_axes):
            for figure in figures:
                series = frame[figure].dropna()
                ax.plot(series.index, series.values, marker="o", markersize=3, label=figure)
            ax.set_title(f"{name}: {figures[0]}" if len(figures) == 1 else f"{name}: loss (nats per token)", fontsize=9)
            if len(figures) > 1:
                ax.legend(fontsize=7)
            ax.set_xlabel("round", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
        for ax in line_axes[len(line):]:
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's value in the last round that logged it (a metric evaluated every k rounds keeps its
    latest). A value that went NaN stays NaN: an earlier finite one would be a stale figure passed off as final."""
    final: dict[str, float] = {}
    for record in history:
        final.update({name: float(value) for name, value in record.items() if name != "round"})
    return final


def summary_table(final: dict[str, float]) -> str:
    """The final figures, one line per metric in name order (pandas' plain-text layout)."""
    frame = pd.Series(final, name="value").sort_index().rename_axis("metric").to_frame()
    return frame.to_string(float_format="{:.6g}".format)  # the metric names as the index: left-aligned
