"""MLflow logging for one run: params, tags, per-round metrics, artifacts, and the run's status.

Every run also has a local folder (``tracking.output_dir/<scenario>/<run id>``) holding
the same artifacts, so results can be read without MLflow. ``summary.json`` is written
last and atomically: a folder without it is a run that did not finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .scenario import Scenario

TRACKED_PACKAGES = ("fedsec-bench", "torch", "transformers", "peft", "opacus", "tenseal", "mlflow")


class Tracker:
    """Opens a run on entry; on exit marks it FINISHED, or FAILED with the traceback logged."""

    def __init__(self, scenario: Scenario, parent_run_id: str | None = None, kind: str = "run"):
        self.scenario = scenario
        self.config = scenario.tracking
        self.parent_run_id = parent_run_id
        self.kind = kind
        """"run" for one scenario, "sweep" for the parent of a sweep's children."""
        self.client = None
        self.run_id: str | None = None

    def __enter__(self) -> Tracker:
        if self.config.enabled:
            self._start_mlflow_run()
        folder_id = self.run_id or uuid.uuid4().hex
        self.run_dir = Path(self.config.output_dir) / self.scenario.name / folder_id
        self.artifact_dir = self.run_dir / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "scenario.yaml").write_text(self.scenario.to_yaml())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            (self.run_dir / "error.txt").write_text("".join(traceback.format_exception(exc_type, exc, tb)))
        if self.client is not None:
            self.client.log_artifacts(self.run_id, str(self.run_dir))
            self.client.set_terminated(self.run_id, "FAILED" if exc is not None else "FINISHED")

    def _start_mlflow_run(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.config.uri)
        experiment = self.client.get_experiment_by_name(self.config.experiment)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(self.config.experiment)
        )
        tags = run_tags(self.scenario) | {"fedsec.kind": self.kind}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # MLflow's own nesting: the UI folds children under it
        run = self.client.create_run(experiment_id, run_name=self.config.run_name or self.scenario.name, tags=tags)
        self.run_id = run.info.run_id
        try:
            self._log_params(flatten(self.scenario.model_dump(mode="json")))
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    def log_table(self, frame, artifact_file: str) -> None:
        """An MLflow table artifact (shown as a table in the UI's artifact view)."""
        if self.client is not None:
            self.client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def write_summary(self, summary: dict) -> Path:
        """Atomically write summary.json: it exists only for runs that finished."""
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested scenario -> {"federation.rounds": "3", "attacks.0.name": "..."}: the MLflow params,
    named like ``--set`` paths (MLflow allows no brackets in names)."""
    out: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}.{i}"))
    else:
        out[prefix] = json.dumps(tree) if isinstance(tree, list) else str(tree)
    return out


def run_tags(scenario: Scenario) -> dict[str, str]:
    tags = {
        "fedsec.scenario": scenario.name,
        "fedsec.scenario_hash": scenario.digest(),
        "fedsec.mode": scenario.tuning.mode,
        "fedsec.defenses": ",".join(d.name for d in scenario.defenses) or "none",
        "fedsec.attacks": ",".join(a.name for a in scenario.attacks) or "none",
    }
    for package in TRACKED_PACKAGES:
        try:
            tags[f"fedsec.version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
