"""Runs that survive: interruption, resume from a checkpoint, divergence, problems found before a run opens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import fedsec_bench
from fedsec_bench.errors import Diverged
from fedsec_bench.interruption import Interrupted


def tracked(raw, tmp_path):
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests",
                       "output_dir": str(tmp_path / "runs")}
    return raw


def interrupt_after(k: int):
    """An on_round callback that stops the run after round k, as SIGTERM arriving then would."""
    def on_round(rnd, metrics):
        if rnd == k:
            raise Interrupted(signal.SIGTERM)
    return on_round


def only_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return client, run


def not_cost(frame):
    """Every figure but wall-clock times, which no two runs share."""
    return frame[[c for c in frame.columns if not c.endswith(("_s", "seconds"))]]


STATEFUL = {
    # plugins whose state carries across rounds: adaptive clip norm and user ledger, record-level
    # ledgers, attack bookkeeping over participants, a robust rule under a colluding attack
    "dp_fedavg+membership+canaries": {
        "defenses": [{"name": "dp_fedavg", "noise_multiplier": 0.5, "clip_norm": 0.5, "adaptive_clipping": True, "count_noise": 1.0}],
        "attacks": [{"name": "membership_inference"}, {"name": "canary_exposure"}],
        "federation": {"sampling": "poisson"},
    },
    "dp_sgd": {"defenses": [{"name": "dp_sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0}]},
    "alie+median": {"attacks": [{"name": "alie", "clients": [1]}], "federation": {"aggregator": "median"}},
    "secure_aggregation": {"defenses": [{"name": "secure_aggregation"}]},
}


@pytest.mark.parametrize("extra", STATEFUL.values(), ids=STATEFUL.keys())
def test_a_resumed_run_gives_the_figures_of_an_uninterrupted_one(tiny, tmp_path, extra):
    tiny["federation"].update(rounds=4, num_clients=4, clients_per_round=3)
    for key, value in extra.items():
        tiny[key] = {**tiny[key], **value} if isinstance(value, dict) else value
    whole = fedsec_bench.run(tiny)

    tracked(tiny, tmp_path)
    with pytest.raises(Interrupted):
        fedsec_bench.run(tiny, on_round=interrupt_after(2))
    client, run = only_run(tiny["tracking"]["uri"])
    assert run.info.status == "KILLED"
    resumed = fedsec_bench.run(tiny, resume=run.info.run_id)

    assert resumed.run_id == run.info.run_id  # into the same MLflow run
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert list(resumed.metrics.index) == [0, 1, 2, 3, 4]
    assert not_cost(resumed.metrics).equals(not_cost(whole.metrics))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "utility.eval_loss")]
    assert steps == [0, 1, 2, 3, 4]  # every round logged once (checkpoint_every: 1)


def test_an_interrupted_run_is_killed_with_its_figures_so_far(tiny, tmp_path):
    tracked(tiny, tmp_path)
    tiny["federation"]["rounds"] = 3
    with pytest.raises(Interrupted) as stopped:
        fedsec_bench.run(tiny, on_round=interrupt_after(1))
    client, run = only_run(tiny["tracking"]["uri"])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1]
    folder = stopped.value.record.run_dir
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["completed_rounds"] == 1 and summary["resumable"]
    assert "final" not in summary  # nothing that reads as the run's final figures
    assert (folder / "artifacts" / "metrics.csv").read_text().count("\n") == 3  # header, rounds 0 and 1
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["round-00001.pt"]


def test_sigterm_ends_a_cli_run_killed_with_exit_143(tiny, tmp_path):
    tracked(tiny, tmp_path)
    tiny["federation"].update(rounds=200, local_steps=1)
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(tiny))
    proc = subprocess.Popen([sys.executable, "-m", "fedsec_bench", "run", str(path), "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("*/checkpoints/round-*.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "--resume" in err
    _, run = only_run(tiny["tracking"]["uri"])
    assert run.info.status == "KILLED"
    [summary] = checkpoints.glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "KILLED"


def test_a_signal_during_a_store_write_waits_for_the_write_to_end():
    from fedsec_bench.interruption import stop_on_signals, uninterruptible

    done = []

    @uninterruptible
    def write():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler has run by now, and held the signal
        done.append("written")

    with pytest.raises(Interrupted) as stopped, stop_on_signals():
        write()
        done.append("after")  # never reached: the held signal is raised as the write returns
    assert done == ["written"] and stopped.value.exit_code == 143


def test_resume_refuses_another_scenario_before_opening_anything(tiny, tmp_path):
    tracked(tiny, tmp_path)
    tiny["federation"]["rounds"] = 3
    with pytest.raises(Interrupted):
        fedsec_bench.run(tiny, on_round=interrupt_after(1))
    _, run = only_run(tiny["tracking"]["uri"])
    lr = tiny["federation"]["lr"]
    tiny["federation"]["lr"] = 0.5
    with pytest.raises(fedsec_bench.ScenarioError, match="--resume .* the scenario differs"):
        fedsec_bench.run(tiny, resume=run.info.run_id)
    with pytest.raises(fedsec_bench.ScenarioError, match="--resume: no run folder"):
        fedsec_bench.run(tiny, resume="0123456789abcdef")
    tiny["federation"]["lr"] = lr
    tiny["tracking"]["checkpoint_every"] = 0  # tracking options may change on resume
    with pytest.raises(Interrupted) as stopped:
        fedsec_bench.run(tiny, on_round=interrupt_after(1))
    with pytest.raises(fedsec_bench.ScenarioError, match="has no checkpoint"):
        fedsec_bench.run(tiny, resume=stopped.value.record.run_id)


def diverging(raw):
    raw["tuning"] = {"mode": "full"}
    raw["federation"].update(rounds=3, lr=1e6, optimizer="sgd", server_lr=1e6)
    return raw


def test_a_diverged_run_stops_failed_and_reports_no_stale_figure(tiny, tmp_path):
    tracked(diverging(tiny), tmp_path)
    with pytest.raises(Diverged, match=r"round \d: .*(nan|inf|non-finite).*federation.on_nonfinite"):
        fedsec_bench.run(tiny)
    _, run = only_run(tiny["tracking"]["uri"])
    assert run.info.status == "FAILED"
    [summary] = (tmp_path / "runs" / "tiny").glob("*/summary.json")
    assert json.loads(summary.read_text())["status"] == "FAILED"


def test_on_nonfinite_continue_logs_and_tags_the_run(tiny, tmp_path):
    tracked(diverging(tiny), tmp_path)
    tiny["federation"]["on_nonfinite"] = "continue"
    result = fedsec_bench.run(tiny)
    _, run = only_run(tiny["tracking"]["uri"])
    assert run.info.status == "FINISHED" and run.data.tags["fedsec.nonfinite"] == "true"
    assert result.final["utility.eval_loss"] != result.final["utility.eval_loss"]  # NaN, not round 0's value


def test_an_unwritable_output_dir_is_refused_before_a_run_is_recorded(tiny, tmp_path):
    tracked(tiny, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tiny["tracking"]["output_dir"] = str(blocker / "runs")
    with pytest.raises(fedsec_bench.ScenarioError, match="tracking.output_dir"):
        fedsec_bench.run(tiny)
    assert not (tmp_path / "mlflow.db").exists()


def test_an_unreachable_tracking_store_is_refused_before_a_run_is_recorded(tiny, tmp_path):
    tracked(tiny, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    tiny["tracking"]["uri"] = f"sqlite:///{blocker}/mlflow.db"  # a database inside a regular file
    with pytest.raises(fedsec_bench.ScenarioError, match="tracking.uri"):
        fedsec_bench.run(tiny)
    assert not Path(tiny["tracking"]["output_dir"]).exists()
