"""The comparison table as pure pandas: column order, constant columns, seeds aggregated, exports.

A per-run frame (one row per run, as :func:`fedsec_bench.compare.compare_runs` builds it) holds
three kinds of columns, told apart the way MLflow tells them apart: the *identity* columns
(``run_id``, ``run_name``), the *parameters*, kept as the strings MLflow logs them as (``defenses``,
``attacks``, their options, ``seed``, a sweep's other axes), and the *figures*, floats (every metric's
final value). Everything here works on that frame alone, so it can be tested on a hand-built one.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import numpy as np
import pandas as pd
from scipy import stats

IDENTITY = ("run_name", "run_id")
"""Never dropped, never grouped on; last in the per-run table."""

PLUGIN_OPTIONS = ("defenses.", "attacks.", "federation.aggregator.")
"""Prefixes of plugin-option columns (``defenses.norm_clip.max_norm``): missing in a run means the plugin is
not in its stack, which the ``defenses``/``attacks``/``aggregator`` column already says."""

PARAMETER_ORDER = ("scenario", "mode", "defenses", "defenses.*", "attacks", "attacks.*", "aggregator",
                   "federation.aggregator.*", "*", "seed", "status")
"""Display order of parameter columns; ``*``: any other scenario field (a sweep's other axes)."""

FAMILIES = (
    ("utility", ("utility.*", "train.*")),
    ("privacy", ("privacy.*", "mia.*", "user_mia.*", "user_audit.*", "inversion.*", "canary.*", "probe.*",
                 "imprint.*", "inconsistency.*", "dp_fedavg.*", "dp_ftrl.*")),
    ("security", ("poison.*", "safety.*", "robust.*", "free_rider.*", "*backdoor*", "consistency.*")),
    ("cost", ("cost.*", "compression.*", "he.*", "secagg.*", "transport.*", "*seconds*", "*bytes*")),
)
"""Figure families in display order, each a tuple of name patterns (first family that matches wins);
figures in none of them (``data.*``, ``round.*``, ``fault.*``, ``norm_clip.*``, ...) come after."""

CONFIDENCE = 0.95


def is_figure(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column)


def parameter_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame if c not in IDENTITY and not is_figure(frame[c])]


def figure_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame if c not in IDENTITY and is_figure(frame[c])]


def family(name: str) -> str | None:
    """The family a figure belongs to (:data:`FAMILIES`), None for the rest."""
    return next((label for label, patterns in FAMILIES if any(fnmatchcase(name, p) for p in patterns)), None)


def _parameter_rank(name: str) -> int:
    for rank, pattern in enumerate(PARAMETER_ORDER):
        if name == pattern or (pattern.endswith(".*") and name.startswith(pattern[:-1])):
            return rank
    return PARAMETER_ORDER.index("*")


def _figure_rank(name: str) -> int:
    labels = [label for label, _ in FAMILIES]
    found = family(name)
    return labels.index(found) if found else len(labels)


def order_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Parameters (defenses and attacks with their options first), then utility, privacy, security, cost
    and the other figures, each group in name order; the identity columns last."""
    parameters = sorted(parameter_columns(frame), key=lambda c: (_parameter_rank(c), c))
    figures = sorted(figure_columns(frame), key=lambda c: (_figure_rank(c), c))
    return frame[parameters + figures + [c for c in IDENTITY if c in frame]]


def is_constant(frame: pd.DataFrame, name: str) -> bool:
    """Whether a column tells the runs apart. NaN-aware: a figure some runs lack is not constant (NaN
    counts as a value), one NaN in every run is. A plugin option counts only where the plugin is there:
    ``noise_multiplier`` 1.0 in every run with ``dp_fedavg`` says nothing the ``defenses`` column does not;
    but where the plugin is there, an option given in one run and left at its default in another (not
    logged) tells them apart. The aggregator's options are compared among runs of the same aggregator."""
    column = frame[name]
    if name.startswith("federation.aggregator.") and "aggregator" in frame:
        return all(group.nunique(dropna=False) <= 1 for _, group in column.groupby(frame["aggregator"], dropna=False))
    if name.startswith(("defenses.", "attacks.")):
        kind, plugin = name.split(".")[:2]
        present = frame[kind].fillna("").str.split(",").map(lambda names: plugin in names) if kind in frame else None
        if present is not None and present.any():
            return column[present].nunique(dropna=False) <= 1
        return column.dropna().nunique() <= 1
    return column.nunique(dropna=False) <= 1


def drop_constant(frame: pd.DataFrame) -> pd.DataFrame:
    """Without the columns that are the same in every run (identity columns always stay)."""
    return frame[[c for c in frame if c in IDENTITY or not is_constant(frame, c)]]


def aggregate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: runs equal in every parameter but ``seed`` become one row.

    Columns: the parameters, ``n`` (runs in the group), then per figure ``<figure>.mean`` and
    ``<figure>.ci95``, the half-width of the 95 % Student-t interval of the mean
    (t(0.975, k-1) · s / sqrt(k) over the k runs that logged the figure; NaN when k < 2).
    Groups keep the order of their first run.
    """
    keys = [c for c in parameter_columns(frame) if c != "seed"]
    figures = figure_columns(frame)
    grouped = frame.groupby(keys, dropna=False, sort=False) if keys else frame.groupby(np.zeros(len(frame)))
    summary = grouped[figures].agg(["mean", "std", "count"])
    rows = grouped.size().rename("n").to_frame()
    for name in figures:
        mean, std, count = (summary[(name, stat)] for stat in ("mean", "std", "count"))
        rows[f"{name}.mean"] = mean
        rows[f"{name}.ci95"] = stats.t.ppf((1 + CONFIDENCE) / 2, count - 1) * std / np.sqrt(count)
    return rows.reset_index() if keys else rows.reset_index(drop=True)


def mean_ci_cell(mean: float, ci: float) -> str:
    """``mean ± ci`` for people; the mean alone for a single run, empty where no run logged the figure."""
    if pd.isna(mean):
        return ""
    return f"{mean:.4g}" if pd.isna(ci) else f"{mean:.4g} ± {ci:.2g}"


def readable(aggregated: pd.DataFrame) -> pd.DataFrame:
    """The aggregated table as people read it: one ``mean ± ci`` column per figure."""
    figures = [c.removesuffix(".mean") for c in aggregated if c.endswith(".mean")]
    out = aggregated[[c for c in aggregated if not c.endswith((".mean", ".ci95"))]].copy()
    for name in figures:
        out[name] = [mean_ci_cell(m, c) for m, c in zip(aggregated[f"{name}.mean"], aggregated[f"{name}.ci95"])]
    return out


def to_markdown(aggregated: pd.DataFrame) -> str:
    return readable(aggregated).to_markdown(index=False, missingval="") + "\n"


def to_latex(aggregated: pd.DataFrame) -> str:
    """A booktabs tabular (``\\usepackage{booktabs}``), names and values escaped, ± as ``$\\pm$``."""
    text = readable(aggregated).fillna("").to_latex(index=False, escape=True)
    return text.replace("±", r"$\pm$")
