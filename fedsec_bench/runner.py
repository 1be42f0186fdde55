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
from .plan import Plan, resolve
from .plugins import HookChain
from .reporting import final_metrics, history_frame
from .runtime import Runtime, build_runtime, resolve_device
from .scenario import Scenario, parse_scenario
from .store import check_output_dir, check_store
from .tracking import Tracker, resolved_values, run_folder

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
    scenario: Prepared | Plan | Scenario | str | Path | dict,
    overrides: list[str] | None = None,
    on_round: RoundCallback | None = None,
    parent_run_id: str | None = None,
    resume: str | None = None,
) -> Result:
    """Train, attack and defend as the scenario says; log to MLflow; return the figures.

    Every problem the scenario can have is found by :func:`preflight` (all of them at once, a
    :class:`Refused`) before any run is recorded; a :class:`Prepared` scenario has passed it already.
    ``parent_run_id`` nests the run under a sweep's parent run. ``resume`` continues the run with
    that id (its MLflow run id, or its folder's name when untracked) from its latest checkpoint,
    into the same run. SIGINT or SIGTERM end the run KILLED and raise
    :class:`~fedsec_bench.interruption.Interrupted`; a diverged run ends FAILED with
    :class:`~fedsec_bench.errors.Diverged`.
    """
    with stop_on_signals():
        prepared = scenario if isinstance(scenario, Prepared) else preflight(scenario, overrides, resume)
        plan, runtime, scenario = prepared.plan, prepared.runtime, prepared.plan.scenario
        tracker = Tracker(scenario, parent_run_id=parent_run_id, resume_id=prepared.resume,
                          resolved=resolved_values(runtime))
        try:
            with tracker:
                runtime.artifact_dir = tracker.artifact_dir
                final = train(plan, runtime, tracker, prepared.restart, on_round)
        except (Interrupted, Diverged) as stop:
            stop.record = tracker  # where the run's record is, for the message that reports the stop
            raise
    return Result(scenario, history_frame(tracker.history), final, tracker.run_id, tracker.run_dir)


@dataclass
class Prepared:
    """A scenario that passed every check of :func:`preflight`, with what its run starts from."""

    plan: Plan
    runtime: Runtime
    """The data, the tokenizer and the tuned model (pretrained when :func:`preflight` was asked to)."""
    restart: Checkpoint | None
    resume: str | None
    """The run to continue (``--resume``), whose checkpoint ``restart`` is."""


STAGES = {
    "schema": (),
    "matrix": ("schema",),
    "plugins": ("schema",),
    "outputs": ("schema",),
    "device": ("schema",),
    "data": ("schema",),
    "data checks": ("plugins", "data"),
    "model": ("device", "data"),
    "model checks": ("plugins", "model"),
}
"""The checks a scenario passes before a run is recorded, in order, each with the stages whose results
it needs: the model is built on the data (its tokenizer trains on the public split), the plugins'
``check_data`` and ``check_model`` need the plugins planned. A stage is checked whenever what it needs
passed, so independent problems (two bad plugin options and a missing data file) come out together."""


class Refused(ScenarioError):
    """Every problem :func:`preflight` found, by stage, and the stages it could not check (whose needs
    failed). ``problems`` is the flat list in stage order, as for any ScenarioError."""

    def __init__(self, found: dict[str, list[str]], unchecked: dict[str, list[str]], passed: list[str]):
        self.found, self.unchecked, self.passed = found, unchecked, passed
        """Problems by stage; for each stage not checked, the failed stages it needs; the stages that passed."""
        super().__init__([problem for stage in STAGES for problem in found.get(stage, [])])

    def report(self) -> list[str]:
        """What ``fedsec run`` and ``fedsec validate`` print: each failed stage with its problems, then the
        stages not checked grouped by why, then those that passed."""
        lines = []
        for stage, problems in self.found.items():
            lines += [f"{stage}:", *(f"  error: {problem}" for problem in problems)]
        why: dict[tuple[str, ...], list[str]] = {}
        for stage, roots in self.unchecked.items():
            why.setdefault(tuple(roots), []).append(stage)
        for roots, stages in why.items():
            lines.append(f"not checked: {', '.join(stages)} (each needs {' and '.join(roots)} to pass first)")
        if self.passed:
            lines.append(f"ok: {', '.join(self.passed)}")
        return lines


class Checks:
    """The stages of :data:`STAGES` run one by one, their problems collected: a stage whose needs failed
    (or were not checked) is skipped and recorded with the failed stages it traces back to."""

    def __init__(self):
        self.found: dict[str, list[str]] = {}
        self.unchecked: dict[str, list[str]] = {}
        self.passed: list[str] = []

    def stage(self, name: str, check: Callable[[], object]) -> object:
        """``check()``'s result, or None when it raised a ScenarioError or its needs failed (the later
        stages tell which by the stage's name, not by its result)."""
        roots = [r for need in STAGES[name] for r in ([need] if need in self.found else self.unchecked.get(need, []))]
        if roots:
            self.unchecked[name] = list(dict.fromkeys(roots))
            return None
        try:
            result = check()
        except ScenarioError as exc:
            self.found[name] = exc.problems
            return None
        self.passed.append(name)
        return result

    @property
    def failed(self) -> bool:
        return bool(self.found)


def preflight(
    source: Plan | Scenario | str | Path | dict, overrides: list[str] | None = None, resume: str | None = None,
    pretrained: bool = True,
) -> Prepared:
    """Every check a run makes before it is recorded, as ``fedsec validate`` shows them: the schema, no
    matrix (that is ``fedsec sweep``'s), the plugins and their compatibility (:func:`~fedsec_bench.plan.resolve`),
    where results go and the checkpoint to resume from, the device, the data (its files read) with the
    plugins' ``check_data``, the model (loaded or built, tuned, and pretrained unless ``pretrained`` is
    False) with their ``check_model``. Raises :class:`Refused` with every problem found; a model is not
    pretrained for a scenario already refused."""
    checks = Checks()
    scenario = checks.stage("schema", lambda: as_scenario(source, overrides))
    checks.stage("matrix", lambda: refuse_matrix(scenario))
    plan = checks.stage("plugins", lambda: source if isinstance(source, Plan) else resolve(scenario))
    restart = checks.stage("outputs", lambda: check_outputs(scenario, resume))
    device = checks.stage("device", lambda: resolve_device(scenario.device))
    data = checks.stage("data", lambda: build_federated_data(scenario))
    checks.stage("data checks", lambda: plan.check_data(data))
    runtime = checks.stage("model", lambda: build_runtime(scenario, data, device,
                                                          pretrained=pretrained and not checks.failed))
    checks.stage("model checks", lambda: plan.check_model(runtime.model))
    if checks.failed:
        raise Refused(checks.found, checks.unchecked, checks.passed)
    return Prepared(plan, runtime, restart, resume)


def as_scenario(source: Plan | Scenario | str | Path | dict, overrides: list[str] | None) -> Scenario:
    if isinstance(source, Plan):
        return source.scenario
    return source if isinstance(source, Scenario) else parse_scenario(source, overrides)


def refuse_matrix(scenario: Scenario) -> None:
    if scenario.matrix:
        raise ScenarioError(
            f"matrix: {scenario.name} is a sweep of {_combinations(scenario)} combinations; "
            "run it with `fedsec sweep`, or drop the matrix section"
        )


def check_outputs(scenario: Scenario, resume: str | None) -> Checkpoint | None:
    """Where results go (the run folder, the MLflow store), and the checkpoint to resume from."""
    check_output_dir(scenario.tracking.output_dir)
    if scenario.tracking.enabled:
        check_store(scenario.tracking.uri)
    return resumable(scenario, resume) if resume else None


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
