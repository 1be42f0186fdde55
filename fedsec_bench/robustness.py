"""The robustness verdict of a defense x attack sweep: each defense judged by its worst case.

A defense that holds against the attacks it was tuned on says little; ByzFL (Allouah et al.)
judges each aggregation rule by its *worst* final utility over every attack tried, and so does
this table. Per cell (one defense, one attack, seeds averaged) it gives the final utility
(``utility.eval_loss``, lower is better) and the backdoor's success (``poison.backdoor_asr``,
lower is better, where a backdoor ran), beside two numbers that are easy to confuse: ``f``, the
number of Byzantine clients the rule was *declared* to tolerate (``federation.aggregator.f``),
and ``malicious``, how many clients *really* attacked in the last attacked round (the
simulator's ``poison.malicious_clients``, known only outside the protocol).

A *defense* is everything that defends: the ``defenses`` stack, the aggregator and their options;
an *attack* is the ``attacks`` stack with its options. Pure pandas on
:func:`fedsec_bench.compare.compare_runs`' per-run frame (constant columns kept, so ``f`` is there
even when every rule declared the same).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .comparison_plots import configuration_label, pyplot, save
from .comparison_table import drop_constant, parameter_columns

UTILITY = "utility.eval_loss"
BACKDOOR = "poison.backdoor_asr"
FIGURES = ((UTILITY, "final eval loss (lower is better)"), (BACKDOOR, "backdoor attack success (lower is better)"),
           ("poison.label_flip_asr", "label-flip attack success (lower is better)"))
"""The verdict's figures, each worse when higher; a cell lacks the ASR when no backdoor ran in it."""

DECLARED_F = "federation.aggregator.f"
MALICIOUS = "poison.malicious_clients"
CLEAN = "none"


def _is_defense(column: str) -> bool:
    return column in ("defenses", "aggregator") or column.startswith(("defenses.", "federation.aggregator."))


def _is_attack(column: str) -> bool:
    return column == "attacks" or column.startswith("attacks.")


def distinct_labels(runs: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Each run's label from its plugin names among ``columns`` (``defenses``/``aggregator``, ``attacks``),
    with the options appended only where runs of the same names differ in them (``krum`` and ``krum
    pre=[nnm]``, ``fang target=krum`` and ``fang target=trimmed_mean``): short enough to read on a
    heatmap's axis, never ambiguous."""
    names = [c for c in columns if c in ("defenses", "aggregator", "attacks")]
    options = [c for c in columns if c not in names]
    if not names:
        return runs.apply(configuration_label, axis=1, columns=options)
    labels = runs.apply(configuration_label, axis=1, columns=names)
    for _, group in runs.groupby(labels, sort=False):
        varying = [c for c in options if group[c].nunique(dropna=False) > 1]
        if varying:
            labels[group.index] = group.apply(configuration_label, axis=1, columns=[*names, *varying])
    return labels


def cells(runs: pd.DataFrame) -> pd.DataFrame | None:
    """One row per (defense, attack): ``defense``, ``attack`` (:func:`distinct_labels` of the columns that
    vary), ``f``, ``n`` (runs, i.e. seeds), ``malicious`` and the figures' means; None unless the runs
    vary both the defense and the attack."""
    varying = [c for c in parameter_columns(drop_constant(runs)) if c != "status"]
    defense_columns = [c for c in varying if _is_defense(c)]
    attack_columns = [c for c in varying if _is_attack(c)]
    if not defense_columns or not attack_columns or UTILITY not in runs:
        return None
    labelled = runs.assign(
        defense=distinct_labels(runs, defense_columns),
        attack=distinct_labels(runs, attack_columns),
        f=runs[DECLARED_F].fillna("") if DECLARED_F in runs else "",
        malicious=runs[MALICIOUS].fillna(0.0) if MALICIOUS in runs else 0.0,
    )
    figures = [name for name, _ in FIGURES if name in runs and runs[name].notna().any()]
    grouped = labelled.groupby(["defense", "attack"], sort=False, dropna=False)
    table = grouped[["malicious", *figures]].mean()
    table.insert(0, "n", grouped.size())
    table.insert(0, "f", grouped["f"].first())
    return table.reset_index()


def worst_case(cells: pd.DataFrame) -> pd.DataFrame:
    """Per defense: ``f``, the clean run's utility (attack ``none``, when tried), then for each figure its
    worst value over the attacks (the clean run excluded) and the attack that reached it, and the most
    clients that really attacked in any of its cells."""
    rows = []
    for defense, group in cells.groupby("defense", sort=False):
        attacked = group[group["attack"] != CLEAN]
        clean = group.loc[group["attack"] == CLEAN, UTILITY]
        row = {"defense": defense, "f": group["f"].iloc[0], "malicious": attacked["malicious"].max(),
               f"{UTILITY} clean": clean.iloc[0] if len(clean) else np.nan}
        for name in (name for name, _ in FIGURES if name in cells):
            values = attacked[name].dropna()
            row[f"{name} worst"] = values.max() if len(values) else np.nan
            row[f"{name} worst attack"] = attacked.loc[values.idxmax(), "attack"] if len(values) else ""
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"{UTILITY} worst", kind="stable", ignore_index=True)


def to_markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, floatfmt=".3g", missingval="") + "\n"


def plot_heatmaps(cells: pd.DataFrame, path: Path) -> Path:
    """Defense x attack, a panel per verdict figure present, each cell its mean (over seeds)."""
    panels = [(name, title) for name, title in FIGURES if name in cells and cells[name].notna().any()]
    grids = [cells.pivot_table(index="defense", columns="attack", values=name, aggfunc="mean", sort=False)
             for name, _ in panels]
    rows, columns = grids[0].shape
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (0.9 * columns + 3), 0.45 * rows + 2.5),
                             squeeze=False)
    for ax, grid, (name, title) in zip(axes[0], grids, panels):
        values = grid.to_numpy(dtype=float)
        image = ax.imshow(values, cmap="viridis_r" if name == UTILITY else "magma", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=7)
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2g}", ha="center", va="center", color="white", fontsize=6)
        ax.set_xlabel("attacks")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    axes[0][0].set_ylabel("defense")
    return save(fig, path)


def verdict(runs: pd.DataFrame) -> pd.DataFrame | None:
    """:func:`worst_case` of the runs' :func:`cells`; None unless they vary both the defense and the attack."""
    table = cells(runs)
    return None if table is None else worst_case(table)


def write_verdict(runs: pd.DataFrame, folder: Path) -> list[Path]:
    """``robustness_cells.csv``, ``robustness_verdict.csv`` / ``.md`` and ``robustness_heatmap.png`` into
    ``folder`` when the runs vary both the defense and the attack; nothing otherwise."""
    table = cells(runs)
    if table is None:
        return []
    worst = worst_case(table)
    written = [folder / "robustness_cells.csv", folder / "robustness_verdict.csv", folder / "robustness_verdict.md"]
    table.to_csv(written[0], index=False)
    worst.to_csv(written[1], index=False)
    written[2].write_text(to_markdown(worst))
    return [*written, plot_heatmaps(table, folder / "robustness_heatmap.png")]
