"""MLflow logging for one run: params, tags, per-round metrics, artifacts, and the run's status.

Every run also has a local folder (``tracking.output_dir/<scenario>/<run id>``) holding
the same artifacts, so results can be read without MLflow. ``summary.json`` is written
last and atomically; its ``status`` (FINISHED, KILLED or FAILED) says how the run ended,
and a folder without one is a run still going or one whose process died.
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
from typing import Any

from . import checkpoint, liveness, store
from .interruption import Interrupted, uninterruptible
from .reporting import history_frame, plot_curves
from .scenario import Scenario

TRACKED_PACKAGES = ("fedsec-bench", "torch", "transformers", "peft", "opacus", "tenseal", "mlflow")


class Tracker:
    """The record of one run: an MLflow run (when tracking is enabled) and the local run folder.

    On exit the run is marked by how it ended: FINISHED; KILLED when a signal stopped it
    (:class:`~fedsec_bench.interruption.Interrupted`); FAILED on any other exception, with
    the traceback in ``error.txt``. Either way the metrics so far are in ``metrics.csv`` (and
    ``curves.png``, except after a signal, whose sender is waiting for the process to end), and a run that did not finish gets a ``summary.json`` that says so and
    where it stopped, so no folder looks finished when it is not.
    """

    def __init__(self, scenario: Scenario, parent_run_id: str | None = None, kind: str = "run",
                 resume_id: str | None = None, resolved: dict[str, Any] | None = None):
        self.scenario = scenario
        self.resolved = resolved or {}
        """What the run resolved that the scenario leaves open (:func:`resolved_values`), logged in its params."""
        self.config = scenario.tracking
        self.parent_run_id = parent_run_id
        self.kind = kind
        """"run" for one scenario, "sweep" for the parent of a sweep's children."""
        self.resume_id = resume_id
        """The run to reopen (``fedsec run --resume``): its MLflow run id, or its folder's name when untracked."""
        self.client = None
        self.run_id: str | None = None
        self.history: list[dict[str, float]] = []
        """One record per logged round ({"round": r, metric: value, ...}), as logged."""

    def __enter__(self) -> Tracker:
        if self.config.enabled:
            self._reopen_mlflow_run() if self.resume_id else self._start_mlflow_run()
        self.run_dir = run_folder(self.scenario, self.resume_id or self.run_id or uuid.uuid4().hex)
        self.artifact_dir = self.run_dir / "artifacts"
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "scenario.yaml").write_text(self.scenario.to_yaml())
        (self.run_dir / "summary.json").unlink(missing_ok=True)  # a resumed run is unfinished again
        return self

    @uninterruptible
    def __exit__(self, exc_type, exc, tb) -> None:
        self.status = status = run_status(exc)
        self.resumable = any((self.run_dir / checkpoint.FOLDER).glob("round-*.pt"))
        if self.history:
            self._write_history(plot=status != "KILLED")  # a signal's sender waits: matplotlib takes seconds
        if status == "FAILED":
            (self.run_dir / "error.txt").write_text("".join(traceback.format_exception(exc_type, exc, tb)))
        if status != "FINISHED":
            self.write_summary({
                "scenario": self.scenario.name, "run_id": self.run_id, "status": status,
                "rounds": self.scenario.federation.rounds, "completed_rounds": self.completed_rounds,
                "error": _one_line(exc), "resumable": self.resumable,
            })
        if self.client is not None:
            self.log_run_files()
            self.client.set_terminated(self.run_id, status)

    def log_run_files(self) -> None:
        """The run folder's files as MLflow artifacts, at the artifact root as the UI shows them: the
        tables and plots, the resolved scenario, the summary and any error. Checkpoints stay local:
        ``--resume`` reads them from the run folder, and a copy in the store would double its size."""
        self.client.log_artifacts(self.run_id, str(self.artifact_dir))
        for name in ("scenario.yaml", "summary.json", "error.txt"):
            if (self.run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))

    @property
    def completed_rounds(self) -> int:
        return int(self.history[-1]["round"]) if self.history else 0

    @uninterruptible
    def _start_mlflow_run(self) -> None:
        from mlflow.tracking import MlflowClient

        store.prepare_store(self.config.uri)
        self.client = MlflowClient(tracking_uri=self.config.uri)
        experiment_id = store.get_or_create_experiment(self.client, self.config.experiment, self.config.uri)
        tags = run_tags(self.scenario) | liveness.run_process_tags() | {"fedsec.kind": self.kind}
        if self.config.description:
            tags["mlflow.note.content"] = self.config.description  # the UI's run description
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # MLflow's own nesting: the UI folds children under it
        run = self.client.create_run(experiment_id, run_name=self.config.run_name or self.scenario.name, tags=tags)
        self.run_id = run.info.run_id
        try:
            self._log_params(run_params(self.scenario, self.resolved))
        except BaseException:
            self.client.set_terminated(self.run_id, "FAILED")
            raise

    @uninterruptible
    def _reopen_mlflow_run(self) -> None:
        """Mark the interrupted run RUNNING again, owned by this process; its params are already logged."""
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.config.uri)
        self.run_id = self.resume_id
        self.client.update_run(self.run_id, status="RUNNING")
        for key, value in (liveness.run_process_tags() | {"fedsec.stale": "false"}).items():
            self.client.set_tag(self.run_id, key, value)

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    @uninterruptible
    def log_round(self, rnd: int, metrics: dict[str, float]) -> None:
        """One round's figures: logged at step ``rnd``, kept in the history, and the run's heartbeat renewed
        (how ``fedsec runs --stale`` tells a live run from one whose process died)."""
        self.log_metrics(metrics, step=rnd)
        self.history.append({"round": rnd, **metrics})
        if self.client is not None:
            for key, value in liveness.heartbeat_tag().items():
                self.client.set_tag(self.run_id, key, value)

    def log_final(self, metrics: dict[str, float]) -> None:
        """Figures computed once on the final model: logged at the last round's step, added to its record."""
        self.log_metrics(metrics, step=self.completed_rounds)
        self.history[-1].update(metrics)

    @uninterruptible
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    @uninterruptible
    def set_tag(self, key: str, value: str) -> None:
        if self.client is not None:
            self.client.set_tag(self.run_id, key, value)

    @uninterruptible
    def log_table(self, frame, artifact_file: str) -> None:
        """An MLflow table artifact (shown as a table in the UI's artifact view)."""
        if self.client is not None:
            self.client.log_table(self.run_id, data=frame, artifact_file=artifact_file)

    def _write_history(self, plot: bool) -> None:
        frame = history_frame(self.history)
        frame.to_csv(self.artifact_dir / "metrics.csv")
        if plot:
            plot_curves(frame, self.artifact_dir / "curves.png", self.scenario.name)

    @uninterruptible
    def write_summary(self, summary: dict) -> Path:
        """Atomically write summary.json; its ``status`` says whether the run finished."""
        path = self.run_dir / "summary.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path


def run_folder(scenario: Scenario, run_id: str) -> Path:
    """``tracking.output_dir/<scenario>/<run id>``: the local record of one run."""
    return Path(scenario.tracking.output_dir) / scenario.name / run_id


def run_status(exc: BaseException | None) -> str:
    """MLflow's status for a run that ended with ``exc``: a signal is KILLED, anything else FAILED."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"


def _one_line(exc: BaseException | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def run_params(scenario: Scenario, resolved: dict[str, Any] | None = None) -> dict[str, str]:
    """The MLflow params: the scenario's fields as this run used them, named like ``--set`` paths.

    Defaults the scenario leaves open are logged as resolved (``data.canaries.count``,
    ``data.public_examples``, ``eval.max_examples`` and ``eval.generation_examples``), and so is what only
    the run itself knows, ``resolved`` (:func:`resolved_values`: the device used, the vocabulary built);
    unset optional fields (null) and the fields :func:`not_applicable` names are left out, so a run's
    params read as what it did. Its ``scenario.yaml`` artifact keeps the scenario as written."""
    loss, answered = scenario.eval_examples()
    params = flatten(scenario.model_dump(mode="json", exclude_none=True)) | flatten({
        "data.canaries.count": scenario.data.canary_count, "data.public_examples": scenario.public_examples,
        "eval.max_examples": "all" if loss is None else loss, "eval.generation_examples": answered,
        **(resolved or {}),
    })
    omitted = tuple(not_applicable(scenario))
    return {key: value for key, value in params.items() if not any(key == o or key.startswith(f"{o}.") for o in omitted)}


ARCH_FIELDS = ("arch", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "max_positions", "dropout")
"""model fields that shape a model built from a config (model.arch)."""
CHECKPOINT_FIELDS = ("name_or_path", "trust_remote_code", "quantization")
"""model fields of a checkpoint loaded with from_pretrained (model.name_or_path)."""
FORMAT_FIELDS = {
    "text": ("text_field", "long_texts"),
    "instruction": ("instruction_field", "input_field", "output_field", "train_on_prompt"),
    "chat": ("messages_field", "train_on_prompt"),
}
"""data fields read by each data.format."""


def not_applicable(scenario: Scenario) -> list[str]:
    """The fields (or whole sections) this run does not read, as params paths: left out of its MLflow params.

    - model: the arch fields when a checkpoint is loaded, the checkpoint fields (quantization among
      them) when a model is built; kv_heads and intermediate unless llama; model.pretrain's lr and
      batch_size without pretraining steps.
    - tuning: tuning.lora unless mode lora, tuning.prompt unless mode prompt.
    - data: data.path with the synthetic corpus, its shape (examples_per_client, topics, difficulty)
      with files or datasets, data_files and split unless datasets; the fields of the other formats;
      label_field unless partition dirichlet, partition.alpha unless dirichlet or quantity_skew,
      partition.select unless natural; the canaries' options when none are planted.
    - eval: generation's fields without prompt/response data.
    - federation: momentum unless sgd, local_steps when local_epochs overrides it, ray unless executor ray.
    - tracking.description: it is the run's description (its note), already.
    """
    model, data, fed, mode = scenario.model, scenario.data, scenario.federation, scenario.tuning.mode
    method = data.partition.method
    out = [f"model.{f}" for f in (ARCH_FIELDS if model.name_or_path else CHECKPOINT_FIELDS)]
    out += [] if model.arch == "llama" else ["model.kv_heads", "model.intermediate"]
    out += [] if model.pretrain.steps else ["model.pretrain.lr", "model.pretrain.batch_size"]
    out += [f"tuning.{m}" for m in ("lora", "prompt") if m != mode]
    out += ["data.path"] if data.source == "synthetic" else ["data.examples_per_client", "data.topics", "data.difficulty"]
    out += [] if data.source == "datasets" else ["data.data_files", "data.split"]
    out += [f"data.{f}" for fmt, fields in FORMAT_FIELDS.items() if fmt != data.format for f in fields
            if f not in FORMAT_FIELDS[data.format]]
    out += [] if method == "dirichlet" else ["data.label_field"]
    out += [] if method in ("dirichlet", "quantity_skew") else ["data.partition.alpha"]
    out += [] if method == "natural" else ["data.partition.select"]
    out += [] if data.canary_count else ["data.canaries.repetitions", "data.canaries.kinds", "data.canaries.clients"]
    out += [] if data.is_prompted else ["eval.generation_examples", "eval.max_new_tokens"]
    out += [] if fed.optimizer == "sgd" else ["federation.momentum"]
    out += [] if fed.local_epochs is None else ["federation.local_steps"]
    out += [] if fed.executor == "ray" else ["federation.ray"]
    return out + ["tracking.description"]


def resolved_values(runtime) -> dict[str, Any]:
    """What a run resolved that its scenario leaves open, by params path: the device actually used
    (``device``: cpu or cuda, where the scenario may say auto), the vocabulary actually built
    (``model.tokenizer.vocab_size``: the tokenizer's real size, which a BPE trained on a small public
    split may leave below its target; ``model.vocab``: the built model's embedding rows), and the layers
    LoRA adapts (``tuning.lora.target_modules``: PEFT's default for the architecture when unset)."""
    values: dict[str, Any] = {
        "device": runtime.device.type, "model.tokenizer.vocab_size": len(runtime.tokenizer),
        "model.vocab": runtime.model.get_input_embeddings().num_embeddings,
    }
    peft = getattr(runtime.model, "peft_config", {}).get("default")
    if runtime.scenario.tuning.mode == "lora" and peft is not None:
        values["tuning.lora.target_modules"] = sorted(peft.target_modules)
    return values


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
