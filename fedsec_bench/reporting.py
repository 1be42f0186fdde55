"""Turn a run's metric history into the artifacts people read: a CSV, a PNG of the curves, a table."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def history_frame(history: list[dict[str, float]]) -> pd.DataFrame:
    """One row per round (round 0 is the model before training), one column per metric."""
    return pd.DataFrame(history).set_index("round").sort_index()


def plot_curves(frame: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [c for c in frame.columns if frame[c].notna().sum() > 1]
    if not columns:
        return
    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, columns):
        series = frame[name].dropna()
        ax.plot(series.index, series.values, marker="o", markersize=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
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
