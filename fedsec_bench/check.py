"""Regression check of privacy, security and utility figures against stored baselines.

A baseline file (``results/baselines/<name>.json``) names a scenario, optional
overrides, and the figures that matter, each with a direction and a tolerance::

    {"scenario": "scenarios/ci/clipped_probe.yaml", "overrides": [],
     "metrics": {"probe.update_norm_max": {"value": 0.5, "direction": "lower_is_better",
                                           "tolerance": {"absolute": 0.01}}}}

A figure *regresses* when it moves the wrong way by more than its tolerance. With
fixed seeds a scenario gives the same figures run to run on one machine; the
tolerance absorbs what differs between machines and library versions.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ScenarioError
from .scenario import field_path

DEFAULT_BASELINES = Path("results/baselines")


class Tolerance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    absolute: float | None = Field(None, ge=0)
    relative: float | None = Field(None, ge=0, description="A fraction of |baseline value|.")

    @model_validator(mode="after")
    def _one(self) -> Tolerance:
        if (self.absolute is None) == (self.relative is None):
            raise ValueError("give exactly one of absolute or relative")
        return self

    def allowance(self, value: float) -> float:
        return self.absolute if self.absolute is not None else self.relative * abs(value)


class Figure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float | None = Field(None, description="null until `fedsec check --update` records it.")
    direction: Literal["lower_is_better", "higher_is_better"]
    tolerance: Tolerance


class Baseline(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scenario: str
    overrides: list[str] = []
    metrics: dict[str, Figure] = Field(..., min_length=1)


@dataclass
class Row:
    baseline: str
    metric: str
    expected: float | None
    now: float
    allowed: float | None
    verdict: str
    """ok, improved, REGRESSED, or NO BASELINE (value not recorded yet)."""

    @property
    def failed(self) -> bool:
        return self.verdict in ("REGRESSED", "NO BASELINE")


def load_baseline(path: Path) -> Baseline:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such baseline file") from None
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON ({exc})") from None
    try:
        return Baseline.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(
            [f"{path}: {field_path(tuple(e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
        ) from None


def judge(name: str, figure: Figure, now: float) -> Row:
    """Compare one figure with its baseline in the figure's direction."""
    if figure.value is None:
        return Row("", name, None, now, None, "NO BASELINE")
    slack = figure.tolerance.allowance(figure.value)
    sign = 1 if figure.direction == "lower_is_better" else -1
    allowed = figure.value + sign * slack
    if math.isnan(now) or sign * (now - allowed) > 0:
        verdict = "REGRESSED"
    elif sign * (now - (figure.value - sign * slack)) < 0:
        verdict = "improved"
    else:
        verdict = "ok"
    return Row("", name, figure.value, now, allowed, verdict)


def find_baselines(folder: Path) -> Path:
    """The baselines folder as given, else the first one found under the working directory's parents:
    ``fedsec check`` works from anywhere inside the repository."""
    if folder.is_absolute() or folder.exists():
        return folder
    return next((parent / folder for parent in Path.cwd().parents if (parent / folder).is_dir()), folder)


def scenario_of(baseline: Baseline, path: Path) -> Path:
    """The baseline's scenario: a path relative to the baseline file's folder or to one of its parents
    (``scenarios/ci/x.yaml`` in ``results/baselines/x.json`` is the repository's), else a bundled name."""
    from .cli import resolve_scenario_path

    scenario = Path(baseline.scenario)
    if not scenario.is_absolute():
        for folder in (path.parent, *path.resolve().parent.parents):
            if (folder / scenario).exists():
                return folder / scenario
    return resolve_scenario_path(baseline.scenario)


def run_baseline(baseline: Baseline, path: Path) -> dict[str, float]:
    """Run the baseline's scenario without MLflow, in a scratch folder; return its final figures."""
    from .plan import load_plan
    from .runner import run

    plan = load_plan(scenario_of(baseline, path), baseline.overrides)
    with tempfile.TemporaryDirectory() as scratch:
        tracking = plan.scenario.tracking
        plan.scenario.tracking = tracking.model_copy(update={"enabled": False, "output_dir": scratch})
        return run(plan).final


def check_baseline(path: Path, update: bool = False) -> list[Row]:
    """Run one baseline's scenario and judge every figure; with ``update``, record the new values."""
    baseline = load_baseline(path)
    final = run_baseline(baseline, path)
    rows = []
    for name, figure in baseline.metrics.items():
        row = judge(name, figure, final.get(name, math.nan))
        row.baseline = path.stem
        rows.append(row)
    if update:
        for name, figure in baseline.metrics.items():
            figure.value = final.get(name)
        path.write_text(json.dumps(baseline.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
    return rows


def select_baselines(folder: Path, scenarios: list[str]) -> list[Path]:
    """Every baseline in ``folder``, or those whose scenario (path or name) was asked for."""
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise ScenarioError(f"{folder}: no baseline files (*.json); create one, see docs/regression-check.md")
    if not scenarios:
        return paths
    wanted = {Path(s).stem for s in scenarios}
    chosen = [p for p in paths if p.stem in wanted or Path(load_baseline(p).scenario).stem in wanted]
    missing = wanted - {p.stem for p in chosen} - {Path(load_baseline(p).scenario).stem for p in chosen}
    if missing:
        raise ScenarioError(f"no baseline in {folder} for: {', '.join(sorted(missing))}")
    return chosen


def format_rows(rows: list[Row]) -> str:
    """One line per figure, pandas' plain-text layout; "—" where no baseline value is recorded."""
    frame = pd.DataFrame(rows).astype({"expected": float, "allowed": float})  # None (not recorded) shows as "—"
    frame = frame.rename(columns={"expected": "baseline value"})
    return frame.to_string(index=False, na_rep="—", float_format="{:.6g}".format)
