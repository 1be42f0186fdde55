"""The `fedsec` command as a user types it: exit codes, messages, progress and summary."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fedsec_bench.cli import main


@pytest.fixture
def fedsec(capsys, monkeypatch):
    """Run the CLI in this process (imports are paid once), as `fedsec ARGS...` in folder cwd."""

    def invoke(*args, cwd):
        monkeypatch.chdir(cwd)
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return invoke


def write(tmp_path, raw, name="scenario.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_shows_progress_and_a_summary_and_logs_to_mlflow(fedsec, tiny, tmp_path):
    tiny["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "output_dir": "runs"}
    out = fedsec("run", str(write(tmp_path, tiny)), "--set", "federation.rounds=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2/2" in out.stderr and "eval_loss=" in out.stderr  # the progress bar, with latest metrics
    assert "utility.perplexity" in out.stdout and "mlflow run:" in out.stdout
    assert (tmp_path / "mlflow.db").is_file()


def test_run_shows_pretraining_progress_and_the_python_api_does_not(fedsec, tiny, tmp_path, capsys):
    tiny["model"]["pretrain"] = {"steps": 3}
    tiny["tracking"] = {"enabled": False, "output_dir": "runs"}
    out = fedsec("run", str(write(tmp_path, tiny)), "--set", "federation.rounds=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "pretraining:" in out.stderr and "/3 [" in out.stderr  # a bar of the 3 pretraining steps
    import fedsec_bench

    fedsec_bench.run(tiny)
    assert "pretraining" not in capsys.readouterr().err


def test_quiet_run_prints_nothing_on_success(fedsec, tiny, tmp_path):
    out = fedsec("run", str(write(tmp_path, tiny)), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and "round" not in out.stderr


def test_bad_field_exits_2_with_the_field_and_no_traceback(fedsec, tiny, tmp_path):
    tiny["federation"]["rounds"] = 0
    out = fedsec("run", str(write(tmp_path, tiny)), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [  # the stage, its problem, and what could not be checked without it
        "schema:", "  error: federation.rounds: must be ≥ 1",
        "not checked: matrix, plugins, outputs, device, data, data checks, model, model checks (each needs schema "
        "to pass first)",
    ]
    assert not (tmp_path / "runs").exists()


def test_bad_override_exits_2(fedsec, tiny, tmp_path):
    out = fedsec("validate", str(write(tmp_path, tiny)), "--set", "federation.rounds", cwd=tmp_path)
    assert out.returncode == 2 and "expected PATH=VALUE" in out.stderr


def test_validate_checks_without_running(fedsec, tiny, tmp_path):
    out = fedsec("validate", str(write(tmp_path, tiny)), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("tiny: ok (lora, 2 rounds")
    assert not (tmp_path / "runs").exists()


def test_missing_scenario_exits_2(fedsec, tmp_path):
    out = fedsec("validate", "nope.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "nope.yaml: no such scenario file" in out.stderr


def test_list_shows_plugins_and_bundled_scenarios(fedsec, tmp_path):
    out = fedsec("list", cwd=tmp_path)
    assert out.returncode == 0
    for word in ("attacks:", "update_probe", "defenses:", "norm_clip", "aggregators:", "fedavg", "quickstart"):
        assert word in out.stdout
    assert "The first scenario to run" in out.stdout  # each scenario with the first line of its header comment


def test_installed_console_script_runs_a_bundled_scenario_by_name(tmp_path):
    out = subprocess.run(
        [shutil.which("fedsec", path=str(Path(sys.executable).parent)), "run", "quickstart", "--quiet", "--set", "federation.rounds=1",
         "--set", "tracking.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    [summary] = (tmp_path / "fedsec-runs" / "quickstart").glob("*/summary.json")
    assert summary.is_file()


def test_runs_stale_finds_and_marks_a_run_whose_process_died(fedsec, tmp_path):
    from mlflow.tracking import MlflowClient

    from fedsec_bench import liveness, store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store.prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = store.get_or_create_experiment(client, "fedsec", uri)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = client.create_run(experiment, tags=liveness.run_process_tags() | {"fedsec.pid": gone.stdout.strip()})
    alive = client.create_run(experiment, tags=liveness.run_process_tags())  # this very process

    listed = fedsec("runs", "--stale", "--uri", uri, cwd=tmp_path)
    assert listed.returncode == 0 and dead.info.run_id in listed.stdout and alive.info.run_id not in listed.stdout
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"  # listing changes nothing
    marked = fedsec("runs", "--stale", "--mark", "--uri", uri, cwd=tmp_path)
    assert marked.returncode == 0 and "1 marked KILLED" in marked.stdout
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"


def test_runs_stale_on_a_missing_store_exits_2_and_creates_nothing(fedsec, tmp_path):
    out = fedsec("runs", "--stale", "--uri", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert out.returncode == 2 and "--uri: no tracking store" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bug_is_one_line_and_debug_shows_its_traceback(fedsec, tiny, tmp_path, register):
    tiny["attacks"] = [{"name": "crash"}]
    path = write(tmp_path, tiny)
    out = fedsec("run", str(path), "--quiet", cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: RuntimeError: boom in score_round") and "--debug" in out.stderr
    with pytest.raises(RuntimeError, match="boom in score_round"):
        fedsec("run", str(path), "--quiet", "--debug", cwd=tmp_path)
