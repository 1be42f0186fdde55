"""Run one scenario end to end: the Python API behind ``fedsec run``."""

from __future__ import annotations

import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .data import build_federated_data
from .errors import ScenarioError
from .executors import make_executor
from .federation import Federation
from .plan import Plan, load_plan, resolve
from .reporting import final_metrics, history_frame, plot_curves
from .runtime import build_runtime, resolve_device
from .scenario import Scenario
from .tracking import Tracker

RoundCallback = Callable[[int, dict[str, float]], None]


@dataclass
class Result:
    scenario: Scenario
    metrics: pd.DataFrame
    """One row per round (0 = before training), one column per metric."""
    final: dict[str, float]
    run_id: str | None
    run_dir: Path


def run(
    scenario: Plan | Scenario | str | Path | dict,
    overrides: list[str] | None = None,
    on_round: RoundCallback | None = None,
    parent_run_id: str | None = None,
) -> Result:
    """Train, attack and defend as the scenario says; log to MLflow; return the figures.

    Scenario errors (a ScenarioError) are raised before any run is recorded.
    ``parent_run_id`` nests the run under a sweep's parent run.
    """
    if isinstance(scenario, Plan):
        plan = scenario
    elif isinstance(scenario, Scenario):
        plan = resolve(scenario)
    else:
        plan = load_plan(scenario, overrides)
    scenario = plan.scenario
    if scenario.matrix:
        raise ScenarioError(
            f"matrix: {scenario.name} is a sweep of {_combinations(scenario)} combinations; "
            "run it with `fedsec sweep`, or drop the matrix section"
        )
    device = resolve_device(scenario.device)
    data = build_federated_data(scenario)
    plan.check_data(data)
    with Tracker(scenario, parent_run_id=parent_run_id) as tracker:
        runtime = build_runtime(scenario, data, device, tracker.artifact_dir)
        hooks = plan.hook_chain(runtime)
        with closing(make_executor(runtime, hooks)) as executor:
            federation = Federation(runtime, hooks, executor)
            history = [{"round": 0, **runtime.data.counts, **federation.evaluate()}]
            tracker.log_metrics(history[0], step=0)
            for rnd in range(1, scenario.federation.rounds + 1):
                metrics = federation.run_round(rnd)
                tracker.log_metrics(metrics, step=rnd)
                history.append({"round": rnd, **metrics})
                if on_round:
                    on_round(rnd, metrics)
        at_end = hooks.training_end(runtime)
        tracker.log_metrics(at_end, step=scenario.federation.rounds)
        history[-1].update(at_end)
        frame = history_frame(history)
        final = final_metrics(frame)
        violations = audit_violations(final)
        for violation in violations:
            warnings.warn(f"privacy audit: {violation}", stacklevel=2)
        tracker.set_tag("fedsec.audit_violation", str(bool(violations)).lower())
        frame.to_csv(tracker.artifact_dir / "metrics.csv")
        plot_curves(frame, tracker.artifact_dir / "curves.png", scenario.name)
        tracker.write_summary(
            {"scenario": scenario.name, "scenario_hash": scenario.digest(), "run_id": tracker.run_id,
             "rounds": scenario.federation.rounds, "final": final, "audit_violations": violations}
        )
    return Result(scenario, frame, final, tracker.run_id, tracker.run_dir)


AUDITS = ("mia.eps_lower_bound", "mia.server.eps_lower_bound")
GUARANTEES = ("privacy.epsilon", "privacy.user_epsilon")


def audit_violations(final: dict[str, float]) -> list[str]:
    """Empirical ε lower bounds above a claimed ε: the DP implementation or its accounting is wrong.

    A user-level guarantee bounds record-level leakage too (a record belongs to one user),
    so every audit is held to every guarantee in force.
    """
    return [
        f"{audit}={final[audit]:.4g} exceeds {claim}={final[claim]:.4g}"
        for audit in AUDITS if audit in final
        for claim in GUARANTEES if claim in final and final[audit] > final[claim]
    ]


def _combinations(scenario: Scenario) -> int:
    count = 1
    for options in scenario.matrix.values():
        count *= len(options)
    return count
