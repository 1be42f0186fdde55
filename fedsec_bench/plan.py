"""A scenario resolved once into the plugins it runs: the one way from a scenario to a run.

:func:`resolve` looks every entry's plugin up by name, parses its options, asks each plugin's
own ``check``, and holds the plugins' declared capabilities against each other (see the
attributes of :class:`~fedsec_bench.plugins.Plugin`), so a third-party defense gets the same
refusals as a built-in one. Every problem comes back at once, one :class:`ScenarioError`
line each naming the field path: an entry whose options do not parse is reported with the
other entries' own checks (only the conflicts between entries wait until every entry parses).
The runner (through :func:`fedsec_bench.runner.preflight`, which ``fedsec validate`` shares), the
Ray workers (through the instances it makes) and ``fedsec check`` all start from the
:class:`Plan`; no plugin reads another's raw spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .errors import ScenarioError
from .lora_aggregation import ExactLoraAggregation
from .models import check_model_support
from .plugins import HookChain, Options, Plugin
from .registry import PluginUnavailable, get_plugin
from .scenario import PluginSpec, Scenario, field_path, parse_scenario, suggest

if TYPE_CHECKING:
    import torch

    from .data import FederatedData
    from .runtime import Runtime


@dataclass(frozen=True)
class PlannedPlugin:
    where: str
    """The entry's field path, as errors name it: ``attacks[0]``, ``federation.aggregator``."""
    plugin: type[Plugin]
    options: Options

    @property
    def label(self) -> str:
        return f"{self.where} ({self.plugin.name})"

    def has_hook(self, hook: str) -> bool:
        return hook in self.plugin.hooks()


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    plugins: tuple[PlannedPlugin, ...]
    """Every attack, every defense, the aggregator, then what the scenario's own fields plan
    (:func:`core_plugins`): the hook order."""

    def hook_chain(self, runtime: Runtime) -> HookChain:
        return HookChain([p.plugin(p.options, runtime) for p in self.plugins])

    def check_data(self, data: FederatedData) -> None:
        """Each plugin's ``check_data`` on the data as built (its clients' real sizes): run, sweep and
        ``fedsec validate`` refuse the same scenarios, before any run is recorded."""
        self._refuse(lambda plugin, options: plugin.check_data(options, self.scenario, data))

    def check_model(self, model: torch.nn.Module) -> None:
        """Each plugin's ``check_model`` on the model as loaded and tuned, before any run is recorded."""
        self._refuse(lambda plugin, options: plugin.check_model(options, self.scenario, model))

    def _refuse(self, check) -> None:
        """Run ``check`` for every planned plugin; every refusal at once, each named by its place in the scenario."""
        problems = []
        for p in self.plugins:
            try:
                check(p.plugin, p.options)
            except ValueError as exc:
                problems.append(f"{p.label}: {exc}")
        if problems:
            raise ScenarioError(problems)


def load_plan(source: str | Path | dict, overrides: list[str] | None = None) -> Plan:
    return resolve(parse_scenario(source, overrides))


def load_scenario(source: str | Path | dict, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario, its plugins included; every problem is a ScenarioError."""
    return load_plan(source, overrides).scenario


def resolve(scenario: Scenario) -> Plan:
    planned, problems = [], []
    entries = [(f"{s}[{i}]", spec, s[:-1]) for s in ("attacks", "defenses") for i, spec in enumerate(getattr(scenario, s))]
    entries.append(("federation.aggregator", scenario.federation.aggregator, "aggregator"))
    for where, spec, kind in entries:
        try:
            planned.append(parse_entry(spec, kind, where))
        except ScenarioError as exc:
            problems += exc.problems
    parsed = not problems
    planned += core_plugins(scenario)
    problems += own_checks(planned, scenario)  # each plugin that parsed, on its own
    if parsed:  # conflicts are between every entry: they need all of them parsed
        problems += conflicts(planned)
    try:
        check_model_support(scenario.model)
    except ScenarioError as exc:
        problems += exc.problems
    if problems:
        raise ScenarioError(problems)
    return Plan(scenario, tuple(planned))


def core_plugins(scenario: Scenario) -> list[PlannedPlugin]:
    """Plugins a scenario field asks for rather than an entry: ``tuning.lora.aggregation: exact``. Planned
    like the others, so their capabilities are held against the listed plugins' the same way."""
    tuning = scenario.tuning
    if tuning.mode == "lora" and tuning.lora.aggregation == "exact":
        return [PlannedPlugin("tuning.lora.aggregation", ExactLoraAggregation, Options())]
    return []


def parse_entry(spec: PluginSpec, kind: str, where: str) -> PlannedPlugin:
    """Look up one entry's plugin and validate its options; errors name the field path."""
    try:
        cls = get_plugin(spec.name, kind)
    except (ValueError, PluginUnavailable) as exc:
        raise ScenarioError(f"{where}.name: {exc}") from None
    raw: dict[str, Any] = dict(spec.model_extra or {})
    try:
        return PlannedPlugin(where, cls, cls.OptionsModel.model_validate(raw))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            path = f".{field_path(err['loc'])}" if err["loc"] else ""  # empty for a check across options
            if err["type"] == "extra_forbidden":
                fields = list(cls.OptionsModel.model_fields)
                problems.append(f"{where}{path}: unknown option of {cls.name}{suggest(str(err['loc'][-1]), fields)}")
            else:
                problems.append(f"{where}{path}: {err['msg'].removeprefix('Value error, ')}")
        raise ScenarioError(problems) from None


def own_checks(planned: list[PlannedPlugin], scenario: Scenario) -> list[str]:
    """Each plugin on its own: the tuning mode it supports and its ``check``."""
    problems = []
    mode = scenario.tuning.mode
    for p in planned:
        if mode not in p.plugin.modes:
            problems.append(f"{p.label}: does not support tuning.mode={mode}; it supports {', '.join(sorted(p.plugin.modes))}")
        try:
            p.plugin.check(p.options, scenario)
        except ValueError as exc:
            problems.append(f"{p.label}: {exc}")
    return problems


def conflicts(planned: list[PlannedPlugin]) -> list[str]:
    """Plugins whose declared capabilities contradict each other: one line per conflict."""
    problems = []
    hiding = [p for p in planned if p.has_hook("transport") and not p.plugin.sends_plain]
    for p in planned:
        problems += [
            f"{p.label} needs each client's plain update (distances or coordinate-wise order), but {h.label} "
            "hides the updates (encrypted or masked) so that the server can only sum them; drop one of them, or "
            "use federation.aggregator: fedavg" for h in hiding if p.plugin.needs_plain_updates
        ]
    hidden_by = None  # the first transport, in hook order, that hid the updates
    for p in planned:
        if p in hiding:
            hidden_by = hidden_by or p
        elif p.has_hook("transport") and hidden_by:
            problems.append(
                f"{p.label} rewrites each plain message in transport, but {hidden_by.label}, listed before it, has "
                f"already hidden it; list {p.plugin.name} before {hidden_by.plugin.name}"
            )
    isolating = [p for p in planned if p.plugin.isolates_updates]
    for p in planned:
        if isolating and p not in isolating and p.has_hook("post_aggregation") and planned.index(p) < planned.index(isolating[0]):
            problems.append(
                f"{p.label} reads the aggregate in post_aggregation before {isolating[0].label} has isolated the "
                f"target's update from it; list {isolating[0].plugin.name} before {p.plugin.name}"
            )
    takeovers = [p for p in planned if p.has_hook("aggregation") and p.plugin.kind != "aggregator"]
    if len(takeovers) > 1:
        problems.append(f"only one defense may take over aggregation, got {', '.join(p.label for p in takeovers)}")
    aggregating = next(p for p in planned if p.has_hook("aggregation"))  # the aggregator, last, always has it
    problems += [
        f"{p.label} needs the round's aggregate to be the weighted mean of the updates, but {aggregating.label} "
        "aggregates otherwise; use federation.aggregator: fedavg"
        for p in planned if p.plugin.needs_mean_aggregate and not aggregating.plugin.aggregates_mean
    ]
    problems += [
        f"{p.label} moves the global model by more than the aggregate (from each client's own update), outside "
        f"what {g.label} guarantees for the aggregate; drop one of them"
        for p in planned if p.plugin.moves_model_outside_aggregate
        for g in planned if g.plugin.needs_model_from_aggregate_only
    ]
    problems += duplicates(planned)
    return problems


def duplicates(planned: list[PlannedPlugin]) -> list[str]:
    """Two entries of one plugin that share its ``exclusive_by`` option would log the same figures."""
    seen: dict[tuple[str, Any], PlannedPlugin] = {}
    problems = []
    for p in planned:
        if p.plugin.exclusive_by is None:
            continue
        value = getattr(p.options, p.plugin.exclusive_by)
        first = seen.setdefault((p.plugin.name, value), p)
        if first is not p:
            problems.append(
                f"{p.label}: {first.where} has the same {p.plugin.exclusive_by} ({value}) and would log the same "
                f"figures; merge them into one entry"
            )
    return problems
