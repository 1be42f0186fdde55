"""executor: ray on a 2-CPU local Ray instance: same figures as local, faults ridden out, sweeps as tasks."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedsec_bench import load_scenario, run
from fedsec_bench.errors import ScenarioError

ray = pytest.importorskip("ray")  # a dependency of the test extra; the skip only helps a partial install

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance of 2 CPUs for the module. Workers inherit this environment, so
    PYTHONPATH lets them import tests/plugin_fixtures.py (the driver has it from pytest)."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


def on_ray(scenario: dict) -> dict:
    scenario = copy.deepcopy(scenario)
    scenario["federation"] |= {"executor": "ray", "ray": {"max_concurrency": 2}}
    return scenario


def protocol_figures(result, randomised: tuple[str, ...] = ()) -> pd.DataFrame:
    """Every logged figure except timings (wall-clock seconds differ between any two runs) and the
    ``randomised`` ones."""
    frame = result.metrics
    return frame[[c for c in frame.columns if not (c.endswith("_s") or c == "cost.round_seconds" or c in randomised)]]


# Client-side hooks of every kind, each with state that must cross to the workers or back:
# poisoning marks (client metrics), DP-SGD's ledger (the scorer's truth), DP-FedAvg's adaptive clip
# norm (driver state at the round's start) and unclipped bits (sent beside the update), CKKS keys
# (the clients' secret context) and its error measurement (client notes), the clients' X25519 keys,
# a malicious server's crafted states and the digests clients compare.
COMBINATIONS = {
    "dp_sgd+sign_flip+trimmed_mean": {
        "attacks": [{"name": "sign_flip", "clients": [1]}],
        "defenses": [{"name": "dp_sgd", "noise_multiplier": 0.5}],
        "federation": {"aggregator": {"name": "trimmed_mean", "trim": 1}, "clients_per_round": 3},
    },
    "dp_fedavg adaptive": {
        "defenses": [{"name": "dp_fedavg", "clip_norm": 0.05, "noise_multiplier": 0.3, "adaptive_clipping": True,
                      "count_noise": 0.5}],
        "federation": {"sampling": "poisson", "clients_per_round": 3},
    },
    "dp_fedavg adaptive+secure_aggregation with dropouts": {  # fresh keys each run: the masks cancel all the same
        "defenses": [{"name": "dp_fedavg", "clip_norm": 0.05, "noise_multiplier": 0.3, "adaptive_clipping": True,
                      "count_noise": 0.5}, {"name": "secure_aggregation", "dropout_rate": 0.3}],
        "federation": {"sampling": "poisson", "clients_per_round": 3},
    },
    "model_inconsistency+model_consistency+secure_aggregation": {  # crafted states and peer digests reach workers
        "attacks": [{"name": "model_inconsistency", "rounds": [2]}, {"name": "update_probe"}],
        "defenses": [{"name": "model_consistency"}, {"name": "secure_aggregation"}],
        "federation": {"clients_per_round": 3},
    },
    "model_inconsistency+secure_aggregation": {
        "attacks": [{"name": "model_inconsistency"}],
        "defenses": [{"name": "secure_aggregation"}],
        "federation": {"clients_per_round": 3},
    },
    "backdoor+he_aggregation on instruction data": {  # workers render and mask prompts exactly as the driver
        "data": {"format": "instruction", "seq_len": 64},
        "attacks": [{"name": "backdoor", "clients": [0, 1], "trigger": "zq", "target": "yes"}],
        "defenses": [{"name": "he_aggregation"}],
        "federation": {"clients_per_round": 3},
        # CKKS draws fresh randomness at each encryption and key generation: the decrypted aggregate
        # carries new noise (~1e-9) in every run, and compressed ciphertexts and keys vary in size
        "rtol": 1e-6,
        "randomised": ("cost.bytes_up", "cost.bytes_up_total", "cost.he_public_context_bytes", "he.max_abs_error",
                       "he.expansion_ratio"),
    },
}


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_ray_gives_the_same_figures_as_local(tiny, ray_instance, combination):
    tiny = copy.deepcopy(tiny)
    extra = COMBINATIONS[combination]
    tiny["attacks"], tiny["defenses"] = extra.get("attacks", []), extra["defenses"]
    tiny["federation"] |= extra["federation"] | {"rounds": 3}
    tiny["data"] |= extra.get("data", {})
    local = run(tiny)
    distributed = run(on_ray(tiny))
    rtol, randomised = extra.get("rtol", 0.0), extra.get("randomised", ())
    pd.testing.assert_frame_equal(protocol_figures(distributed, randomised), protocol_figures(local, randomised),
                                  check_exact=not rtol, rtol=rtol or 1e-5)
    assert local.metrics["round.clients"].iloc[1:].sum() > 0


def test_a_worker_that_dies_is_retried_and_the_figures_do_not_change(tiny, ray_instance, register, tmp_path):
    local = run(tiny)
    markers = tmp_path / "markers"
    markers.mkdir()
    tiny["attacks"] = [{"name": "flaky_client", "client": first_sampled(tiny), "failure": "exit",
                        "marker_dir": str(markers)}]
    retried = run(on_ray(tiny))
    assert len(list(markers.iterdir())) >= 2  # it died once, then trained on a restarted worker
    assert retried.metrics["fault.failed_clients"].iloc[1:].sum() == 0
    pd.testing.assert_frame_equal(protocol_figures(retried), protocol_figures(local))


def test_a_client_failing_twice_is_left_out_and_the_run_goes_on(tiny, ray_instance, register, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    client = first_sampled(tiny)
    tiny["attacks"] = [{"name": "flaky_client", "client": client, "failures": 2, "marker_dir": str(markers)}]
    with pytest.warns(UserWarning, match=rf"round 1: client {client} failed 2 times .*RuntimeError: flaky client"):
        result = run(on_ray(tiny))
    round1 = result.metrics.loc[1]
    assert round1["fault.failed_clients"] == 1 and round1["fault.dropped_clients"] == 1
    assert round1["round.clients"] == tiny["federation"]["clients_per_round"] - 1
    assert result.metrics.loc[2, "fault.failed_clients"] == 0
    assert json.loads((result.run_dir / "summary.json").read_text())["rounds"] == 2  # the run finished


def test_a_round_where_every_client_fails_stops_the_run(tiny, ray_instance, register, tmp_path):
    """A client-side bug fails every client: that must not pass for a run of empty rounds."""
    markers = tmp_path / "markers"
    markers.mkdir()
    tiny["federation"] |= {"num_clients": 1, "clients_per_round": 1}
    tiny["attacks"] = [{"name": "flaky_client", "client": 0, "failures": 10, "marker_dir": str(markers)}]
    with pytest.raises(RuntimeError, match="round 1: every sampled client failed"):
        run(on_ray(tiny))
    summaries = Path(tiny["tracking"]["output_dir"]).glob("*/*/summary.json")
    assert [json.loads(path.read_text())["status"] for path in summaries] in ([], ["FAILED"])  # never FINISHED


def test_sweep_children_run_as_ray_tasks(tiny, ray_instance, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from fedsec_bench import sweep
    from fedsec_bench.cli import main

    monkeypatch.setattr(sweep, "_in_processes", None)  # only the Ray path can run the children
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tiny["tracking"] = {"uri": uri, "output_dir": str(tmp_path / "runs")}
    tiny["federation"]["rounds"] = 1
    tiny["matrix"] = {"seed": [0, 1]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny))
    assert main(["sweep", str(path), "--executor", "ray"]) == 0
    assert "2 finished, 0 failed" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedsec").experiment_id])
    [parent] = [r for r in runs if r.data.tags["fedsec.kind"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and "utility.eval_loss" in r.data.metrics for r in children)


def test_ray_options_are_checked_when_the_scenario_loads(tiny, monkeypatch):
    tiny["federation"] |= {"executor": "ray", "ray": {"num_cpus_per_clinet": 1}}
    with pytest.raises(ScenarioError, match=r"federation\.ray\.num_cpus_per_clinet.*num_cpus_per_client"):
        load_scenario(tiny)
    tiny["federation"]["ray"] = {}
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "ray" else object())
    with pytest.raises(ScenarioError, match=r"federation\.executor: .*pip install 'fedsec-bench\[ray\]'"):
        load_scenario(tiny)


def first_sampled(scenario: dict) -> int:
    """A client sampled in round 1, by the round loop's own sampling for this seed."""
    from fedsec_bench.federation import sample_clients
    from fedsec_bench.runtime import derive_seed

    loaded = load_scenario(scenario)
    return sample_clients(loaded.federation, derive_seed(loaded.seed, 1))[0]
