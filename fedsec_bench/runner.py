"""Run one scenario end to end: the Python API behind ``fedsec run``."""

from __future__ import annotations

import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from . import checkpoint
from .checkpoint import Checkpoint
from .data import build_federated_data
from .divergence import diverged, nonfinite
from .errors import Diverged, ScenarioError
from .executors import make_executor
from .federation import Federation
from .interruption import Interrupted, stop_on_signals
from .plan import Plan, load_plan, resolve
from .plugins import HookChain
from .reporting import final_metrics, history_frame
from .runtime import Runtime, build_runtime, resolve_device
from .scenario import Scenario
from .store import check_output_dir, check_store
from .tracking import Tracker, run_folder

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
    resume: str | None = None,
) -> Result:
    """Train, attack and defend as the scenario says; log to MLflow; return the figures.

    Every problem the scenario can have (a ScenarioError) is raised before any run is recorded.
    ``parent_run_id`` nests the run under a sweep's parent run. ``resume`` continues the run with
    that id (its MLflow run id, or its folder's name when untracked) from its latest checkpoint,
    into the same run. SIGINT or SIGTERM end the run KILLED and raise
    :class:`~fedsec_bench.interruption.Interrupted`; a diverged run ends FAILED with
    :class:`~fedsec_bench.errors.Diverged`.
    """
    plan = as_plan(scenario, overrides)
    scenario = plan.scenario
    with stop_on_signals():
        runtime, restart = prepare(plan, resume)
        tracker = Tracker(scenario, parent_run_id=parent_run_id, resume_id=resume)
        try:
            with tracker:
                runtime.artifact_dir = tracker.artifact_dir
                final = train(plan, runtime, tracker, restart, on_round)
        except (Interrupted, Diverged) as stop:
            stop.record = tracker  # where the run's record is, for the message that reports the stop
            raise
    return Result(scenario, history_frame(tracker.history), final, tracker.run_id, tracker.run_dir)


def as_plan(scenario: Plan | Scenario | str | Path | dict, overrides: list[str] | None = None) -> Plan:
    if isinstance(scenario, Plan):
        plan = scenario
    elif isinstance(scenario, Scenario):
        plan = resolve(scenario)
    else:
        plan = load_plan(scenario, overrides)
    if plan.scenario.matrix:
        raise ScenarioError(
            f"matrix: {plan.scenario.name} is a sweep of {_combinations(plan.scenario)} combinations; "
            "run it with `fedsec sweep`, or drop the matrix section"
        )
    return plan


def prepare(plan: Plan, resume: str | None = None, pretrained: bool = True) -> tuple[Runtime, Checkpoint | None]:
    """Everything that can fail on the scenario's account, before a run is recorded: where results go,
    the data and the plugins' checks on it, the model (loaded or built, tuned, and pretrained unless
    ``pretrained`` is False) and the checkpoint to resume from."""
    scenario = plan.scenario
    device = resolve_device(scenario.device)
    check_output_dir(scenario.tracking.output_dir)
    if scenario.tracking.enabled:
        check_store(scenario.tracking.uri)
    restart = resumable(scenario, resume) if resume else None
    data = build_federated_data(scenario)
    plan.check_data(data)
    runtime = build_runtime(scenario, data, device, pretrained=pretrained)
    plan.check_model(runtime.model)
    return runtime, restart


def resumable(scenario: Scenario, run_id: str) -> Checkpoint:
    """The latest checkpoint of the run, refused unless it was written for this very scenario."""
    restart = checkpoint.latest(run_folder(scenario, run_id))
    if restart.scenario_hash != checkpoint.scenario_hash(scenario):
        raise ScenarioError(
            f"--resume {run_id}: the scenario differs from the one the run was started with (only tracking.* may "
            f"change); resume with the run's own {run_folder(scenario, run_id) / 'scenario.yaml'}"
        )
    if restart.round >= scenario.federation.rounds:
        raise ScenarioError(f"--resume {run_id}: the run already completed its {restart.round} rounds")
    return restart


def train(plan: Plan, runtime: Runtime, tracker: Tracker, restart: Checkpoint | None,
          on_round: RoundCallback | None) -> dict[str, float]:
    """The rounds, from the start or from a checkpoint, then the final figures and the run's summary."""
    scenario, config = plan.scenario, plan.scenario.federation
    hooks = plan.hook_chain(runtime)
    if restart:
        restore(restart, runtime, hooks, tracker)
    with closing(make_executor(runtime, hooks)) as executor:  # after restore: Ray workers copy the plugins' state
        federation = Federation(runtime, hooks, executor)
        if not restart:
            tracker.log_round(0, {**runtime.data.counts, **federation.evaluate()})
        for rnd in range(tracker.completed_rounds + 1, config.rounds + 1):
            metrics = federation.run_round(rnd)
            tracker.log_round(rnd, metrics)
            if found := nonfinite(metrics, runtime.trainable):
                if config.on_nonfinite == "stop":
                    raise diverged(rnd, found, config)
                tracker.set_tag("fedsec.nonfinite", "true")
            if scenario.tracking.checkpoint_every and (rnd % scenario.tracking.checkpoint_every == 0 or rnd == config.rounds):
                save_checkpoint(runtime, hooks, tracker)
            if on_round:
                on_round(rnd, metrics)
    tracker.log_final(hooks.training_end(runtime))
    final = final_metrics(tracker.history)
    violations = audit_violations(final)
    for violation in violations:
        warnings.warn(f"privacy audit: {violation}", stacklevel=3)
    tracker.set_tag("fedsec.audit_violation", str(bool(violations)).lower())
    tracker.write_summary(
        {"scenario": scenario.name, "scenario_hash": scenario.digest(), "run_id": tracker.run_id, "status": "FINISHED",
         "rounds": config.rounds, "completed_rounds": config.rounds, "final": final, "audit_violations": violations}
    )
    return final


def save_checkpoint(runtime: Runtime, hooks: HookChain, tracker: Tracker) -> None:
    state = Checkpoint(
        round=tracker.completed_rounds, scenario_hash=checkpoint.scenario_hash(runtime.scenario),
        global_state=runtime.trainable.snapshot(), plugins=hooks.checkpoint(), history=tracker.history,
        rng=checkpoint.rng_state(),
    )
    checkpoint.save(tracker.run_dir, state, keep=runtime.scenario.tracking.keep_checkpoints)


def restore(restart: Checkpoint, runtime: Runtime, hooks: HookChain, tracker: Tracker) -> None:
    """Put the run back where the checkpoint left it: model, plugins, RNG streams and history."""
    runtime.trainable.load(restart.global_state)
    hooks.restore(restart.plugins)
    checkpoint.set_rng_state(restart.rng)
    tracker.history = restart.history
    tracker.set_tag("fedsec.resumed_after_round", str(restart.round))


USER_GUARANTEES = ("privacy.user_epsilon", "privacy.local_epsilon")
AUDITS = {
    "mia.eps_lower_bound": ("privacy.epsilon", *USER_GUARANTEES),
    "mia.server.eps_lower_bound": ("privacy.epsilon", *USER_GUARANTEES),
    "privacy.user_eps_estimate": USER_GUARANTEES,
}
"""Each empirical ε and the accountants' ε it must stay below. A user-level guarantee bounds
record-level leakage too (a record belongs to one user); a record-level one says nothing of a user."""


def audit_violations(final: dict[str, float]) -> list[str]:
    """Empirical ε above a claimed ε: the DP implementation or its accounting is wrong (or, for the
    one-shot user-level estimate, which is not a bound, too few canaries to fit: read the count)."""
    return [
        f"{audit}={final[audit]:.4g} exceeds {claim}={final[claim]:.4g}"
        for audit, claims in AUDITS.items() if audit in final
        for claim in claims if claim in final and final[audit] > final[claim]
    ]


def _combinations(scenario: Scenario) -> int:
    count = 1
    for options in scenario.matrix.values():
        count *= len(options)
    return count
