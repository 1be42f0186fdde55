"""Compare runs: a table a paper can use (a row per configuration, seeds aggregated) and plots.

Reads everything back from MLflow through its client API (the same REST path the UI
uses when the tracking URI is a server), so runs made anywhere can be compared. The table
logic itself is pure pandas (:mod:`fedsec_bench.comparison_table`), the plots
:mod:`fedsec_bench.comparison_plots`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .comparison_plots import plot_curves_overlaid, plot_frontiers
from .comparison_table import PLUGIN_OPTIONS, aggregate_seeds, drop_constant, order_columns, to_latex, to_markdown
from .robustness import write_verdict

SCENARIO_FIELDS_SHOWN_ELSEWHERE = ("name", "seed", "tuning.mode", "matrix", "defenses", "attacks", "federation.aggregator.name")
"""Params already in a column of their own (``scenario``, ``seed``, ``mode``, ``defenses``/``attacks``: an
empty stack is logged as the param ``defenses`` = ``[]``, ``aggregator``) or empty in a run (``matrix``)."""


def find_run_ids(uri: str, parent: str | None = None, experiment: str | None = None) -> list[str]:
    """Finished and failed runs of a sweep (by parent run id) or of a whole experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if parent:
        run = client.get_run(parent)
        query, experiments = f"tags.mlflow.parentRunId = '{parent}'", [run.info.experiment_id]
    else:
        found = client.get_experiment_by_name(experiment or "fedsec")
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {uri}")
        query, experiments = "tags.`fedsec.kind` = 'run'", [found.experiment_id]
    runs = client.search_runs(experiments, filter_string=query, max_results=5000, order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def compare_runs(uri: str, run_ids: list[str]) -> pd.DataFrame:
    """One row per run: its parameters (strings, as logged), the final value of every metric (floats),
    ``run_name`` and ``run_id``; columns in :func:`~fedsec_bench.comparison_table.order_columns`' order.

    Which parameters: ``defenses`` and ``attacks`` (the ``fedsec.defenses``/``fedsec.attacks`` tags:
    the stacks by name, in order), every option of each plugin as ``defenses.<name>.<option>`` (from the
    ``defenses.<i>.<option>`` params, renamed after the plugin so that one column means one setting
    whatever the stack's order; a plugin twice in one stack keeps its logged path), the aggregator and
    its options, ``scenario``, ``mode``, ``seed``, ``status``; and any other scenario field (``tracking.*``
    aside) that differs between the runs, such as a sweep's other axes. Columns the same in every run
    the scenario fields outside the plugins appear only when they vary (each run's ``scenario.yaml`` has all).
    Columns the same in every run stay; tables drop them (:func:`~fedsec_bench.comparison_table.drop_constant`).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = [client.get_run(run_id) for run_id in run_ids]
    frame = pd.concat([pd.DataFrame([_parameters(r) for r in runs]), _varying(pd.DataFrame([_other_fields(r) for r in runs])),
                       pd.DataFrame([r.data.metrics for r in runs], dtype=float)], axis=1)
    return order_columns(frame)


def _parameters(run) -> dict[str, str | None]:
    params, tags = run.data.params, run.data.tags
    return {
        "run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
        "scenario": tags.get("fedsec.scenario"), "mode": tags.get("fedsec.mode"),
        "defenses": tags.get("fedsec.defenses"), "attacks": tags.get("fedsec.attacks"),
        "aggregator": params.get("federation.aggregator.name"), "seed": params.get("seed"),
        **_plugin_options(params, "defenses"), **_plugin_options(params, "attacks"),
        **{k: v for k, v in params.items() if k.startswith("federation.aggregator.") and k != "federation.aggregator.name"},
    }


def _plugin_options(params: dict[str, str], kind: str) -> dict[str, str]:
    """``defenses.0.max_norm`` -> ``defenses.norm_clip.max_norm``, for each plugin of the stack."""
    options: dict[str, str] = {}
    index = 0
    while (name := params.get(f"{kind}.{index}.name")) is not None:
        prefix = f"{kind}.{index}."
        for key, value in params.items():
            if key.startswith(prefix) and key != f"{prefix}name":
                option = key.removeprefix(prefix)
                column = f"{kind}.{name}.{option}"
                options[key if column in options else column] = value
        index += 1
    return options


def _other_fields(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items()
            if not k.startswith((*PLUGIN_OPTIONS, "tracking.")) and k not in SCENARIO_FIELDS_SHOWN_ELSEWHERE}


def _varying(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[:, frame.nunique(dropna=False) > 1]


def log_comparison(runs: pd.DataFrame, uri: str, folder: Path, keep_constant: bool = False) -> list[Path]:
    """Write the tables and plots of ``runs`` (:func:`compare_runs`' per-run table) into ``folder``; return them.

    The tables leave out the columns the same in every run unless ``keep_constant``.
    ``comparison.csv`` (a row per configuration: ``n`` and ``<figure>.mean``/``<figure>.ci95``),
    ``comparison.md`` and ``comparison.tex`` (the same, ``mean ± ci``), ``comparison_runs.csv`` (a row per
    run), a ``privacy_utility_frontier_<family>.png`` per privacy family present,
    ``curves_overlaid.png``, and when the runs vary both the defense (stack or aggregator) and the attack,
    the robustness verdict (:func:`fedsec_bench.robustness.write_verdict`: the worst case per defense and
    a defense x attack heatmap).
    """
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    frame = runs if keep_constant else drop_constant(runs)
    aggregated = aggregate_seeds(frame)
    tables = {"comparison.csv": lambda p: aggregated.to_csv(p, index=False),
              "comparison.md": lambda p: p.write_text(to_markdown(aggregated)),
              "comparison.tex": lambda p: p.write_text(to_latex(aggregated)),
              "comparison_runs.csv": lambda p: frame.to_csv(p, index=False)}
    for name, write in tables.items():
        write(folder / name)
    plots = [*plot_frontiers(aggregated, folder), plot_curves_overlaid(MlflowClient(tracking_uri=uri), frame,
                                                                         folder / "curves_overlaid.png")]
    return [folder / name for name in tables] + [p for p in plots if p] + write_verdict(runs, folder)
