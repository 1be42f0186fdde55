"""Compare runs: one table (a row per run, columns for defenses, attacks and every figure) and plots.

Reads everything back from MLflow through its client API (the same REST path the UI
uses when the tracking URI is a server), so runs made anywhere can be compared.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


PRIVACY_AXES = ("mia.auc", "inversion.rouge1", "canary.exposure", "privacy.epsilon", "probe.readable_fraction")
UTILITY_AXIS = "utility.perplexity"
CURVES = ("utility.eval_loss", "utility.perplexity")


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
    """One row per run: identity, defenses and attacks, then the final value of every metric."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    rows = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        tags = run.data.tags
        rows.append({
            "run_id": run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "mode": tags.get("fedsec.mode"),
            "defenses": tags.get("fedsec.defenses"),
            "attacks": tags.get("fedsec.attacks"),
            "aggregator": run.data.params.get("federation.aggregator.name"),
            "seed": run.data.params.get("seed"),
            **dict(sorted(run.data.metrics.items())),
        })
    return pd.DataFrame(rows)


def log_comparison(frame: pd.DataFrame, uri: str, folder: Path) -> list[Path]:
    """Write comparison.csv/.md and the plots into ``folder`` (a run's artifact folder); return the files."""
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "comparison.csv", folder / "comparison.md"]
    frame.to_csv(written[0], index=False)
    written[1].write_text(frame.to_markdown(index=False, floatfmt=".6g", missingval="") + "\n")
    frontier = plot_frontier(frame, folder / "privacy_utility_frontier.png")
    curves = plot_curves_overlaid(MlflowClient(tracking_uri=uri), frame, folder / "curves_overlaid.png")
    return written + [p for p in (frontier, curves) if p]


def plot_frontier(frame: pd.DataFrame, path: Path) -> Path | None:
    """Privacy figure against utility, one point per run, labelled by its defense stack."""
    axis = next((m for m in PRIVACY_AXES if m in frame and frame[m].notna().any()), None)
    if axis is None or UTILITY_AXIS not in frame:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for _, row in frame.dropna(subset=[axis, UTILITY_AXIS]).iterrows():
        ax.scatter(row[UTILITY_AXIS], row[axis])
        ax.annotate(f"{row['defenses']} ({row['run_name']})", (row[UTILITY_AXIS], row[axis]), fontsize=7)
    ax.set_xlabel(f"{UTILITY_AXIS} (lower is better)")
    ax.set_ylabel(axis)
    ax.set_title("privacy-utility frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves_overlaid(client, frame: pd.DataFrame, path: Path) -> Path | None:
    metrics = [m for m in CURVES if m in frame]
    if not metrics or frame.empty:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for _, row in frame.iterrows():
            history = sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], metric))
            if history:
                ax.plot(*zip(*history), marker="o", markersize=3, label=row["run_name"])
        ax.set_title(metric)
        ax.set_xlabel("round")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
