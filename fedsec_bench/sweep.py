"""Sweeps: expand a scenario's ``matrix:`` and run every combination as a child of one MLflow run.

Children run in worker processes on this machine (spawned, so each has its own torch
state) or as Ray tasks (``--executor ray``: on a local Ray instance or a cluster, each
reserving the base scenario's ``federation.ray`` CPUs and GPUs). One child failing is
recorded (its own run is marked FAILED) and the others go on. Every combination is
validated before the first one starts, so a bad alternative costs nothing.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import deque
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from .errors import ScenarioError, excerpt
from .plan import Plan, resolve
from .scenario import (Scenario, apply_override, capped, field_keys, plain_copy, read_yaml, set_field,
                       validate_scenario)


@dataclass
class Child:
    label: str
    """Which alternatives this child takes, e.g. ``seed=1 defenses=norm_clip``."""
    plan: Plan


@dataclass
class ChildOutcome:
    label: str
    status: str
    run_id: str | None
    error: str | None = None


MAX_COMBINATIONS = 1000
"""Children one sweep may have: each is a whole run, and all are validated before the first starts."""
MAX_LABEL = 200
"""Characters of a child's label (it is part of its MLflow run name)."""


def expand(raw: dict, overrides: list[str] | None = None) -> tuple[Scenario, list[Child]]:
    """The base scenario and one validated child per combination of the matrix."""
    raw = plain_copy(raw, "the scenario")
    for item in overrides or []:
        apply_override(raw, item)
    base = resolve(validate_scenario(raw)).scenario
    matrix = raw.pop("matrix", None) or {}
    count = math.prod(len(options) for options in matrix.values())
    if count > MAX_COMBINATIONS:
        sizes = " x ".join(str(len(options)) for options in matrix.values())
        raise ScenarioError(f"matrix: {sizes} = {count:,} combinations, over the {MAX_COMBINATIONS:,} one sweep may "
                            "run; give fewer alternatives, or split it into several sweeps")
    keys = {path: field_keys(path, f"matrix.{path}") for path in matrix}
    names = {path: alternative_labels(options) for path, options in matrix.items()}
    children, problems = [], []
    for combo in itertools.product(*(range(len(options)) for options in matrix.values())):
        child_raw = json.loads(json.dumps(raw))
        choice = {path: matrix[path][i] for path, i in zip(matrix, combo)}
        label = excerpt(" ".join(f"{path}={names[path][i]}" for path, i in zip(matrix, combo)), MAX_LABEL)
        try:
            for path, value in choice.items():
                set_field(child_raw, keys[path], json.loads(json.dumps(value)), f"matrix.{path}")
            child_raw.setdefault("tracking", {})["run_name"] = f"{base.name} [{label or base.name}]"
            children.append(Child(label or base.name, resolve(validate_scenario(child_raw))))
        except ScenarioError as exc:
            problems += [f"matrix combination [{label}]: {p}" for p in exc.problems]
    if problems:
        raise ScenarioError(capped(problems))
    return base, children


def alternative_labels(options: list) -> list[str]:
    """A readable label per alternative of one matrix axis: plugins by name, with the options they were
    given only where the names alone would label two alternatives alike (``dp_fedavg(noise_multiplier=2)``)."""
    short = [_short(value, with_options=False) for value in options]
    if len(set(short)) == len(short):
        return short
    return [_short(value, with_options=True) for value in options]


def _short(value, with_options: bool) -> str:
    if isinstance(value, list) and all(_is_plugin(v) for v in value):
        return "+".join(_plugin_label(v, with_options) for v in value) or "none"
    if _is_plugin(value):
        return _plugin_label(value, with_options)
    return excerpt(json.dumps(value) if isinstance(value, (list, dict)) else str(value), 60)


def _is_plugin(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str)


def _plugin_label(spec: dict, with_options: bool) -> str:
    options = ",".join(f"{k}={_short(v, with_options)}" for k, v in spec.items() if k != "name")
    return excerpt(spec["name"], 40) + (f"({options})" if with_options and options else "")


def run_sweep(path: str | Path, overrides: list[str] | None, jobs: int | None, on_child=None, executor: str = "processes"):
    """Run every child under a parent MLflow run; returns (parent run id, outcomes, the children's per-run
    frame of :func:`~fedsec_bench.compare.compare_runs`, None without tracking).

    ``jobs``: children at once (processes: default 1; ray: default all, as the cluster's CPUs allow).
    """
    from .compare import compare_runs, log_comparison
    from .comparison_table import drop_constant
    from .tracking import Tracker

    base, children = expand(read_yaml(path), overrides)
    run_all = _on_ray if executor == "ray" else _in_processes
    with Tracker(base, kind="sweep") as parent:
        outcomes = []
        for outcome in run_all(base, children, parent.run_id, jobs):
            outcomes.append(outcome)
            if on_child:
                on_child(outcome)
        order = {c.label: i for i, c in enumerate(children)}
        outcomes.sort(key=lambda o: order[o.label])
        parent.log_metrics({"sweep.children": len(outcomes),
                            "sweep.failed": sum(o.status == "FAILED" for o in outcomes)}, step=0)
        ids = [o.run_id for o in outcomes if o.run_id]
        runs = compare_runs(base.tracking.uri, run_ids=ids) if base.tracking.enabled and ids else None
        if runs is not None:
            log_comparison(runs, base.tracking.uri, parent.artifact_dir)
            parent.log_table(drop_constant(runs), "comparison.json")
        parent.write_summary({"scenario": base.name, "children": [o.__dict__ for o in outcomes]})
    return parent.run_id, outcomes, runs


def _in_processes(base: Scenario, children: list[Child], parent_run_id: str | None, jobs: int | None):
    """Yield each child's outcome as it finishes, from a pool of spawned processes."""
    with ProcessPoolExecutor(max_workers=jobs or 1, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_run_child, child, parent_run_id): child for child in children}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker itself died: the child never reported back
                yield ChildOutcome(futures[future].label, "FAILED", None, f"worker died: {exc}")


def _on_ray(base: Scenario, children: list[Child], parent_run_id: str | None, jobs: int | None):
    """Yield each child's outcome as it finishes, from Ray tasks (a task whose worker dies is retried once)."""
    import ray

    from .ray_executor import connect, describe_error

    config = base.federation.ray
    started = connect(config)
    task = ray.remote(_run_child).options(
        num_cpus=config.num_cpus_per_client, num_gpus=config.num_gpus_per_client, max_retries=1
    )
    waiting, running = deque(children), {}
    try:
        while waiting or running:
            while waiting and len(running) < (jobs or len(children)):
                child = waiting.popleft()
                running[task.remote(child, parent_run_id)] = child
            [ref], _ = ray.wait(list(running), num_returns=1)
            child = running.pop(ref)
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as exc:
                yield ChildOutcome(child.label, "FAILED", None, f"worker died: {describe_error(exc)}")
    finally:
        if started:
            ray.shutdown()


def _run_child(child: Child, parent_run_id: str | None) -> ChildOutcome:
    """Runs in a worker process. A crash is caught here: the child's own run is already FAILED."""
    from .runner import run

    try:
        result = run(child.plan, parent_run_id=parent_run_id)
    except Exception as exc:
        return ChildOutcome(child.label, "FAILED", None, f"{type(exc).__name__}: {exc}")
    return ChildOutcome(child.label, "FINISHED", result.run_id)
