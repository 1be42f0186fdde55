"""Sweeps (against a real MLflow server), comparison tables and plots, and the regression check."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

import fedsec_bench
from fedsec_bench.check import Figure, judge, load_baseline
from fedsec_bench.cli import main
from fedsec_bench.sweep import expand

ROOT = Path(__file__).parent.parent
BASELINE = ROOT / "results" / "baselines" / "clipped_probe.json"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- sweeps


def test_matrix_expands_to_every_combination_with_readable_labels(tiny):
    tiny["matrix"] = {"seed": [0, 1, 2], "defenses": [[], [{"name": "norm_clip", "max_norm": 0.5}]]}
    base, children = expand(tiny)
    assert len(children) == 6
    assert [c.label for c in children[:2]] == ["seed=0 defenses=none", "seed=0 defenses=norm_clip"]
    assert {(c.plan.scenario.seed, len(c.plan.scenario.defenses)) for c in children} == {(s, d) for s in (0, 1, 2) for d in (0, 1)}
    assert all(c.plan.scenario.matrix is None for c in children)
    assert children[1].plan.scenario.tracking.run_name == "tiny [seed=0 defenses=norm_clip]"


def test_alternatives_that_differ_only_in_options_are_labelled_by_them(tiny):
    tiny["matrix"] = {"defenses": [[{"name": "norm_clip", "max_norm": 0.5}], [{"name": "norm_clip", "max_norm": 5.0}], []]}
    _, children = expand(tiny)
    assert [c.label for c in children] == ["defenses=norm_clip(max_norm=0.5)", "defenses=norm_clip(max_norm=5.0)",
                                           "defenses=none"]
    assert len({c.plan.scenario.tracking.run_name for c in children}) == 3


def test_a_bad_alternative_is_refused_before_anything_runs(tiny):
    tiny["matrix"] = {"federation.rounds": [2, 0]}
    with pytest.raises(fedsec_bench.ScenarioError) as info:
        expand(tiny)
    assert info.value.problems == ["matrix combination [federation.rounds=0]: federation.rounds: must be ≥ 1"]


def test_run_refuses_a_matrix_and_dry_run_lists_it(tiny, tmp_path, capsys):
    tiny["matrix"] = {"seed": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny))
    code, _, err = cli(capsys, "run", str(path))
    assert code == 2 and "is a sweep of 2 combinations; run it with `fedsec sweep`" in err
    code, out, _ = cli(capsys, "sweep", str(path), "--dry-run")
    assert code == 0 and out.splitlines() == ["tiny: 2 combinations", "    1. seed=0", "    2. seed=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a loopback port, as a team would run it; stopped after the test."""
    port = free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen(
        [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "store")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if requests.get(f"{url}/health", timeout=5).ok:
                    break
            except requests.RequestException:  # not up yet, or too busy to answer
                pass
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within 120 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sweep_against_a_live_server_survives_a_failing_child(tiny, tmp_path, capsys, register, mlflow_server):
    tiny["tracking"] = {"uri": mlflow_server, "experiment": "sweep-test", "output_dir": str(tmp_path / "runs")}
    tiny["federation"]["rounds"] = 1
    tiny["matrix"] = {"attacks": [[{"name": "update_probe"}], [{"name": "crash"}]],
                      "defenses": [[], [{"name": "norm_clip", "max_norm": 0.05}]]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny))
    code, out, err = cli(capsys, "sweep", str(path), "--jobs", "2")
    assert code == 1  # a child failed: the sweep says so, and the others still ran
    assert "2 finished, 2 failed: attacks=crash defenses=none, attacks=crash defenses=norm_clip" in out
    assert "[4/4 done, 2 failed]" in err  # each child's end is counted as it comes

    # read everything back over the REST API the MLflow UI uses
    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "sweep-test"}).json()
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    [parent] = [r for r, t in zip(runs, tags) if t.get("fedsec.kind") == "sweep"]
    parent_id = parent["info"]["run_id"]
    children = [(r, t) for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
    assert sorted(r["info"]["status"] for r, _ in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    finished = [r for r, _ in children if r["info"]["status"] == "FINISHED"]
    for run in finished:
        history = requests.get(f"{api}/metrics/get-history",
                               params={"run_id": run["info"]["run_id"], "metric_key": "utility.eval_loss"}).json()
        assert [m["step"] for m in history["metrics"]] == [0, 1]
    clipped = {m["key"]: m["value"] for r in finished if "norm_clip" in r["info"]["run_name"] for m in r["data"]["metrics"]}
    assert clipped["probe.update_norm_max"] <= 0.05 + 1e-6
    artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": parent_id}).json()
    names = {Path(f["path"]).name for f in artifacts["files"]}
    assert {"comparison.csv", "comparison.md", "curves_overlaid.png"} <= names


# --------------------------------------------------------------------------- comparison


def test_compare_builds_one_table_and_plots_for_an_experiment(tiny, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny["tracking"] = {"uri": uri, "experiment": "cmp", "output_dir": str(tmp_path / "runs")}
    tiny["attacks"] = [{"name": "update_probe"}]
    fedsec_bench.run(tiny)
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": 0.05}]
    fedsec_bench.run(tiny)
    code, out, _ = cli(capsys, "compare", "--experiment", "cmp", "--uri", uri, "--out", str(tmp_path / "cmp"))
    assert code == 0
    table = __import__("pandas").read_csv(tmp_path / "cmp" / "comparison.csv")
    assert list(table["defenses"]) == ["none", "norm_clip"] and list(table["n"]) == [1, 1]
    assert {"utility.perplexity.mean", "probe.update_norm_max.mean"} <= set(table.columns)
    assert not {"mode", "attacks", "cost.bytes_up.mean"} & set(table.columns)  # the same in both runs
    assert table["probe.update_norm_max.mean"].iloc[1] < table["probe.update_norm_max.mean"].iloc[0]
    header = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][:2] == ["defenses", "n"]
    assert not list((tmp_path / "cmp").glob("privacy_utility_frontier_*.png"))  # update_probe logs no privacy axis here
    assert (tmp_path / "cmp" / "curves_overlaid.png").stat().st_size > 0
    assert "norm_clip" in out


def test_compare_with_nothing_to_compare_is_a_clear_error(tmp_path, capsys):
    code, _, err = cli(capsys, "compare", "--experiment", "nope", "--uri", f"sqlite:///{tmp_path}/m.db")
    assert code == 2 and "no MLflow experiment named 'nope'" in err


# --------------------------------------------------------------------------- regression check


@pytest.mark.parametrize(
    ("direction", "now", "verdict"),
    [("lower_is_better", 1.05, "ok"), ("lower_is_better", 1.2, "REGRESSED"), ("lower_is_better", 0.8, "improved"),
     ("higher_is_better", 0.95, "ok"), ("higher_is_better", 0.8, "REGRESSED"), ("higher_is_better", 1.2, "improved"),
     ("lower_is_better", float("nan"), "REGRESSED")],
)
def test_a_figure_is_judged_in_its_direction(direction, now, verdict):
    figure = Figure(value=1.0, direction=direction, tolerance={"relative": 0.1})
    assert judge("m", figure, now).verdict == verdict


def weakened_copy(tmp_path, overrides, name="clipped_probe") -> Path:
    """A copy of a project baseline whose scenario runs with ``overrides`` (a deliberately weakened defense)."""
    folder = tmp_path / "baselines"
    folder.mkdir()
    raw = json.loads((BASELINE.parent / f"{name}.json").read_text())
    raw["scenario"] = str(ROOT / raw["scenario"])
    raw["overrides"] = overrides
    (folder / f"{name}.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize(
    ("name", "weakening", "metric"),
    [("clipped_probe", "defenses[0].max_norm=100", "probe.update_norm_max"),  # clipping effectively off
     ("dp_ci", "defenses[1].noise_multiplier=0", "privacy.user_epsilon")],  # DP-FedAvg without noise
)
def test_weakening_a_defense_fails_the_check_naming_the_metric(tmp_path, capsys, name, weakening, metric):
    folder = weakened_copy(tmp_path, [weakening], name)
    code, out, _ = cli(capsys, "check", "--baselines", str(folder))
    assert code == 1
    assert f"1 regressed: {name}:{metric}" in out
    row = next(line for line in out.splitlines() if line.split()[:2] == [name, metric])
    assert row.endswith("REGRESSED")


def test_update_records_the_new_figures(tmp_path, capsys):
    folder = weakened_copy(tmp_path, ["defenses[0].max_norm=100"])
    assert cli(capsys, "check", "--baselines", str(folder), "--update")[0] == 0
    assert cli(capsys, "check", "--baselines", str(folder))[0] == 0
    recorded = load_baseline(folder / "clipped_probe.json").metrics["probe.update_norm_max"]
    assert recorded.value > 0.2 and recorded.tolerance.absolute == 0.001


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"),
     ('{"scenario": "x.yaml", "metrics": {"m": {"value": 1, "tolerance": {"absolute": 1}}}}', "metrics.m.direction: Field required"),
     ('{"scenario": "x.yaml", "metrics": {"m": {"value": 1, "direction": "lower_is_better", "tolerance": {"absolute": 1, "relative": 1}}}}',
      "metrics.m.tolerance: give exactly one of absolute or relative"),
     ('{"scenario": "x.yaml", "metrics": {"m": {"direction": "down", "tolerance": {"absolute": 1}}}}', "metrics.m.direction: Input should be")],
)
def test_bad_baseline_files_are_clear_errors(tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(content)
    code, _, err = cli(capsys, "check", "--baselines", str(tmp_path))
    assert code == 2 and message in err and "bad.json" in err


def test_pytest_fixture_gates_a_test_suite(fedsec_check, tmp_path, monkeypatch):
    weakened = weakened_copy(tmp_path, ["defenses[0].max_norm=100"]) / "clipped_probe.json"
    monkeypatch.chdir(tmp_path)  # the baseline's scenario path is found from the baseline file, not the cwd
    rows = fedsec_check(BASELINE)
    assert {r.metric for r in rows} == set(load_baseline(BASELINE).metrics)
    assert not any(r.failed for r in rows)
    with pytest.raises(pytest.fail.Exception, match=r"figures regressed: probe.update_norm_max \(regressed\)"):
        fedsec_check(weakened)


def test_check_runs_from_any_folder_inside_the_repository(capsys, monkeypatch):
    """The default --baselines (results/baselines) is found above the working directory, and each
    baseline's scenario path relative to the repository that holds the baseline file."""
    monkeypatch.chdir(ROOT / "docs")
    code, out, _ = cli(capsys, "check", "clipped_probe")
    assert code == 0 and f"{len(load_baseline(BASELINE).metrics)} ok, 0 regressed" in out
