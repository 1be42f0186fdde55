"""The round loop, its hook points, MLflow tracking, crash handling and determinism."""

from __future__ import annotations

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

import fedsec_bench
from fedsec_bench.data import text_example
from plugin_fixtures import Recorder


def with_tracking(raw, tmp_path):
    raw["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tests",
                       "output_dir": str(tmp_path / "runs")}
    return raw


def test_hooks_run_in_protocol_order(tiny, register):
    Recorder.calls.clear()
    tiny["attacks"] = [{"name": "recorder"}]
    result = fedsec_bench.run(tiny)
    rounds = [[c for c in Recorder.calls if len(c) > 1 and c[1] == r] for r in (1, 2)]
    for rnd, calls in zip((1, 2), rounds):
        clients = sorted({c[2] for c in calls if c[0] == "client_data"})
        assert len(clients) == 2
        expected = [(hook, rnd, cid) for cid in clients
                    for hook in ("client_data", "local_training", "client_update", "transport")]
        expected += [("collusion", rnd), ("server_observation", rnd, tuple(clients)), ("aggregation", rnd),
                     ("post_aggregation", rnd), ("score_round", rnd)]
        assert calls == expected
    assert Recorder.calls[-1] == ("training_end",)
    assert result.metrics["recorder.round"].tolist()[1:] == [1.0, 2.0]
    assert result.final["recorder.done"] == 1.0


def test_observers_see_exactly_what_the_transport_carries(tiny, register):
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": 0.05}]
    tiny["attacks"] = [{"name": "update_probe"}]
    clipped = fedsec_bench.run(tiny).metrics
    assert clipped["probe.readable_fraction"].iloc[-1] == 1.0
    assert (clipped["probe.update_norm_max"].dropna() <= 0.05 + 1e-6).all()
    assert clipped["norm_clip.clipped_fraction"].iloc[-1] == 1.0  # the true updates were larger

    tiny["defenses"] = [{"name": "opaque_transport"}]
    opaque = fedsec_bench.run(tiny).metrics
    assert opaque["probe.readable_fraction"].iloc[-1] == 0.0
    assert opaque["cost.bytes_up"].iloc[-1] == 16


def test_only_one_defense_may_take_over_aggregation(tiny, register):
    tiny["defenses"] = [{"name": "opaque_transport"}, {"name": "opaque_transport"}]
    with pytest.raises(fedsec_bench.ScenarioError, match="only one defense may take over aggregation"):
        fedsec_bench.run(tiny)


def test_a_run_is_logged_to_mlflow_with_params_tags_curves_and_artifacts(tiny, tmp_path):
    with_tracking(tiny, tmp_path)
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": 2.0}]
    result = fedsec_bench.run(tiny)
    client = MlflowClient(tracking_uri=tiny["tracking"]["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["federation.rounds"] == "2" and params["defenses.0.name"] == "norm_clip"
    assert params["defenses.0.max_norm"] == "2.0" and params["data.canaries.repetitions"] == "[1, 2]"
    tags = run.data.tags
    assert tags["fedsec.scenario_hash"] == result.scenario.digest()
    assert tags["fedsec.defenses"] == "norm_clip" and "fedsec.version.torch" in tags
    history = client.get_metric_history(result.run_id, "utility.eval_loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx(result.metrics["utility.eval_loss"].tolist())
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}  # at the root, as the UI lists them
    assert {"scenario.yaml", "summary.json", "metrics.csv", "curves.png"} <= artifacts
    assert "checkpoints" not in artifacts and "artifacts" not in artifacts


def test_the_scenario_files_header_comment_is_the_runs_description_in_mlflow(tiny, tmp_path):
    with_tracking(tiny, tmp_path)
    path = tmp_path / "described.yaml"
    path.write_text("# What this run shows.\n#   and how to read it\n" + yaml.safe_dump(tiny))
    result = fedsec_bench.run(path)
    run = MlflowClient(tracking_uri=tiny["tracking"]["uri"]).get_run(result.run_id)
    assert run.data.tags["mlflow.note.content"] == "What this run shows.\n  and how to read it"
    tiny["tracking"]["description"] = "given"  # the field, when set, wins over the comment
    path.write_text("# What this run shows.\n" + yaml.safe_dump(tiny))
    assert fedsec_bench.load_scenario(path).tracking.description == "given"


def test_summary_json_is_readable_without_mlflow(tiny):
    result = fedsec_bench.run(tiny)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["final"] == pytest.approx(result.final)
    assert summary["scenario_hash"] == result.scenario.digest()
    assert (result.run_dir / "artifacts" / "metrics.csv").is_file()
    assert list(result.metrics.index) == [0, 1, 2]
    assert {"utility.eval_loss", "utility.perplexity", "utility.token_accuracy", "train.loss",
            "cost.bytes_up", "cost.round_seconds"} <= set(result.metrics.columns)


def test_a_crash_marks_the_run_failed_with_its_traceback(tiny, tmp_path, register):
    with_tracking(tiny, tmp_path)
    tiny["attacks"] = [{"name": "crash"}]
    with pytest.raises(RuntimeError, match="boom in score_round"):
        fedsec_bench.run(tiny)
    client = MlflowClient(tracking_uri=tiny["tracking"]["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    [folder] = (tmp_path / "runs" / "tiny").iterdir()
    assert "boom in score_round" in (folder / "error.txt").read_text()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "FAILED" and "final" not in summary  # nothing that looks like a finished run
    assert "boom in score_round" in summary["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_bad_input_records_no_run(tiny, tmp_path):
    with_tracking(tiny, tmp_path)
    tiny["data"]["canaries"] = {"count": 1, "clients": [42]}
    with pytest.raises(fedsec_bench.ScenarioError):
        fedsec_bench.run(tiny)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_same_scenario_and_seed_give_the_same_metrics(tiny):
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": 1.0}]
    a, b = fedsec_bench.run(tiny), fedsec_bench.run(tiny)
    timing = [c for c in a.metrics.columns if c == "cost.round_seconds"]
    assert a.metrics.drop(columns=timing).equals(b.metrics.drop(columns=timing))
    tiny["seed"] = 1
    c = fedsec_bench.run(tiny)
    assert not a.metrics.drop(columns=timing).equals(c.metrics.drop(columns=timing))


def test_poisson_sampling_varies_the_number_of_clients(tiny):
    tiny["federation"].update(num_clients=20, clients_per_round=5, rounds=6, sampling="poisson", local_steps=1)
    tiny["data"]["examples_per_client"] = 4
    counts = fedsec_bench.run(tiny).metrics["round.clients"].dropna()
    assert counts.nunique() > 1 and 0 < counts.mean() < 12


def test_local_epochs_set_the_number_of_steps(tiny, register):
    Recorder.local_steps.clear()
    tiny["attacks"] = [{"name": "recorder"}]
    tiny["federation"].update(local_steps=None, local_epochs=2, batch_size=5)
    tiny["data"]["canaries"] = {"count": 0}
    fedsec_bench.run(tiny)
    assert Recorder.local_steps == [8] * 4  # 2 epochs of ceil(16 / 5) batches, 2 clients x 2 rounds


def test_local_training_reshuffles_every_epoch(tiny):
    from fedsec_bench.client import epochs
    from fedsec_bench.data.batching import Batcher
    from fedsec_bench.models import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(["a b c"], 260)
    loader = Batcher(tokenizer, 8, 2).loader([text_example(f"text {i}") for i in range(20)], seed=0)
    batches = epochs(loader)
    first = [next(batches)["input_ids"].tolist() for _ in range(10)]
    second = [next(batches)["input_ids"].tolist() for _ in range(10)]
    assert first != second  # a new order each epoch, not a replay of the first


def test_an_audit_above_the_claimed_epsilon_is_flagged():
    from fedsec_bench.runner import audit_violations

    assert audit_violations({"mia.eps_lower_bound": 0.4, "privacy.epsilon": 1.0}) == []
    assert audit_violations({"mia.eps_lower_bound": 2.0, "privacy.epsilon": 1.0, "privacy.user_epsilon": 3.0}) == [
        "mia.eps_lower_bound=2 exceeds privacy.epsilon=1"
    ]
    assert audit_violations({"mia.server.eps_lower_bound": 5.0, "privacy.user_epsilon": 3.0}) == [
        "mia.server.eps_lower_bound=5 exceeds privacy.user_epsilon=3"
    ]
    # the one-shot user-level estimate is held to user-level guarantees, never to a record-level ε
    # (a user is many records: its ε may rightly exceed a record's)
    assert audit_violations({"privacy.user_eps_estimate": 2.0, "privacy.epsilon": 1.0}) == []
    assert audit_violations({"privacy.user_eps_estimate": 2.0, "privacy.user_epsilon": 1.5}) == [
        "privacy.user_eps_estimate=2 exceeds privacy.user_epsilon=1.5"
    ]
    assert audit_violations({"privacy.user_eps_estimate": 2.0, "privacy.local_epsilon": 0.5}) == [
        "privacy.user_eps_estimate=2 exceeds privacy.local_epsilon=0.5"
    ]
