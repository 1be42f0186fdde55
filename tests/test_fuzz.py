"""Properties: whatever a scenario file or ``--set`` holds, ``fedsec validate`` accepts it (exit 0) or refuses
it (exit 2) with ``error:`` lines, never a traceback or a bug report, in bounded time and memory; and a
generated short ``fedsec run`` finishes, is refused with nothing recorded, or fails cleanly, and never
leaves its MLflow run RUNNING.

Scenarios are generated from the schema itself: the tiny scenario of conftest.py (with a defense and
an attack, as quickstart has) is mutated at fields drawn from the Scenario model, with values of the
field's own type (small, so a valid scenario validates in a fraction of a second), values out of its
range and values of the wrong type, through the file or through ``--set``, plus malformed overrides.
``derandomize=True``: CI draws the same examples every time, so a failure reproduces.
"""

from __future__ import annotations

import contextlib
import copy
import io
import resource
import time
import types
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedsec_bench.cli import main
from fedsec_bench.registry import entry_points_by_name
from fedsec_bench.scenario import PluginSpec, Scenario

from conftest import TINY

BASE = copy.deepcopy(TINY)
BASE["defenses"] = [{"name": "norm_clip", "max_norm": 5.0}]
BASE["attacks"] = [{"name": "update_probe"}]


def leaves(model: type[BaseModel] = Scenario, prefix: str = "") -> list[tuple[str, typing.Any, typing.Any]]:
    """(path, annotation, field info) of every field, walking nested sections."""
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = [a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type)
                  and issubclass(a, BaseModel) and a is not PluginSpec]
        if nested and typing.get_origin(annotation) is not list:
            out += leaves(nested[0], f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", annotation, info))
    return out


LEAVES = leaves()
PLUGINS = sorted(entry_points_by_name()) + ["nope", ""]
HOSTILE = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([10**9, 10**12, -1, 0, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.booleans(), st.none(),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def bounds(info) -> tuple[int, int]:
    low, high = 0, None
    for meta in info.metadata:
        low = getattr(meta, "ge", None) if getattr(meta, "ge", None) is not None else low
        low = getattr(meta, "gt", None) + 1 if getattr(meta, "gt", None) is not None else low
        high = getattr(meta, "le", None) if getattr(meta, "le", None) is not None else high
    return low, high


def fitting(annotation, info) -> st.SearchStrategy:
    """Small values of the field's own type: what a user means to write."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([fitting(a, info) for a in args])
    if origin is typing.Annotated:
        return fitting(args[0], info)
    if origin is list:
        if args and args[0] is PluginSpec:
            return st.lists(st.fixed_dictionaries({"name": st.sampled_from(PLUGINS)},
                                                  optional={"max_norm": HOSTILE, "clients": HOSTILE}), max_size=3)
        return st.lists(fitting(args[0], info) if args else HOSTILE, max_size=3)
    if annotation is int:
        low, _ = bounds(info)
        return st.integers(low, low + 48)
    if annotation is float:
        return st.floats(0.0, 2.0)
    if annotation is bool:
        return st.booleans()
    if annotation is str:
        return st.sampled_from(["", "text", "a.b", "x" * 300, "2024-01-01", "{secret}"])
    if annotation is type(None):
        return st.none()
    if annotation is PluginSpec:
        return st.one_of(st.sampled_from(PLUGINS), st.fixed_dictionaries({"name": st.sampled_from(PLUGINS)}))
    return HOSTILE


@st.composite
def mutations(draw) -> tuple[dict, list[str]]:
    """A scenario dict and --set overrides: fields drawn from the schema, set to fitting or hostile values."""
    raw = copy.deepcopy(BASE)
    sets = []
    for _ in range(draw(st.integers(1, 4))):
        path, annotation, info = draw(st.sampled_from(LEAVES))
        value = draw(st.one_of(fitting(annotation, info), HOSTILE))
        if draw(st.booleans()):
            sets.append(f"{path}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()}")
        else:
            node = raw
            for key in path.split(".")[:-1]:
                node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
            node[path.split(".")[-1]] = value
    sets += draw(st.lists(st.one_of(
        st.builds("{}={}".format, st.sampled_from(["name.x", "a..b", "", "attacks.9.name", "attacks[0].max_norm",
                                                   "defenses.0.max_norm", "data.canaries.repetitions.x", "seed.0"]),
                  st.sampled_from(["1", "[", "*a", "&a [*a]", "!!binary x", "{a: 1}", "", "9" * 200])),
        st.text(max_size=20),
    ), max_size=2))
    return raw, sets


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=mutations())
def test_validate_accepts_or_refuses_any_generated_scenario(case, tmp_path_factory):
    raw, sets = case
    folder = tmp_path_factory.mktemp("fuzz")
    raw = copy.deepcopy(raw)
    raw["tracking"] = {"enabled": False, "output_dir": str(folder / "runs")}
    path: Path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = ["validate", str(path)] + [a for s in sets for a in ("--set", s)]
    out, err = io.StringIO(), io.StringIO()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's own refusal (an override starting with '-'): exit 2 and usage
            code = exc.code
    took = time.perf_counter() - started
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    out, err = out.getvalue(), err.getvalue()
    assert code in (0, 2), f"{args}\n{err}"
    assert "Traceback" not in out + err
    assert code == 0 or "error: " in err
    assert took < 10, f"{args}: {took:.1f} s"
    assert grown_mb < 1024, f"{args}: memory grew by {grown_mb:.0f} MB"


RUN_PLUGINS = {
    "defenses": ["{name: norm_clip}", "{name: dp_fedavg}", "{name: dp_sgd, noise_multiplier: 1.0}",
                 "{name: secure_aggregation}"],
    "attacks": ["{name: %s}" % n for n in ("update_probe", "sign_flip", "alie", "membership_inference",
                                             "canary_exposure", "gradient_inversion")],
}


@st.composite
def runnable(draw) -> list[str]:
    """--set overrides of a short run: plugin combinations, modes, aggregators and sizes, some of which
    conflict (the plan must refuse those) and some of which diverge (the run must end FAILED, not FINISHED)."""
    sets = [f"federation.rounds={draw(st.integers(1, 2))}", "federation.local_steps=1"]
    sets.append(f"tuning.mode={draw(st.sampled_from(['lora', 'full', 'prompt']))}")
    sets.append(f"federation.aggregator={draw(st.sampled_from(['fedavg', 'median', 'krum']))}")
    sets.append(f"federation.sampling={draw(st.sampled_from(['uniform', 'poisson']))}")
    sets.append(f"federation.lr={draw(st.sampled_from([0.01, 1e9]))}")
    for kind, names in RUN_PLUGINS.items():
        chosen = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
        sets.append(f"{kind}=[{', '.join(chosen)}]")
    return sets


@settings(max_examples=16, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sets=runnable())
def test_a_generated_run_finishes_fails_cleanly_or_is_refused_and_never_stays_running(sets, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("fuzz-run")
    raw = copy.deepcopy(BASE)
    uri = f"sqlite:///{folder}/mlflow.db"
    raw["tracking"] = {"enabled": True, "uri": uri, "experiment": "fuzz", "output_dir": str(folder / "runs")}
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["run", str(path), "--quiet"] + [a for s in sets for a in ("--set", s)])
    err = err.getvalue()
    assert "Traceback" not in err and "This is a bug" not in err, f"{sets}\n{err}"
    assert code in (0, 1, 2), f"{sets}\n{err}"
    if code == 2:  # refused: nothing recorded
        assert not (folder / "runs").exists() and not (folder / "mlflow.db").exists(), sets
        return
    if code == 1:
        assert "training diverged" in err, f"{sets}\n{err}"
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("fuzz").experiment_id])
    assert run.info.status == ("FINISHED" if code == 0 else "FAILED"), sets
