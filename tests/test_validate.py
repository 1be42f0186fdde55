"""One validation: ``fedsec validate`` and ``fedsec run`` make the same checks before a run is recorded and
report every problem at once, by stage; the MLflow params are the scenario as the run resolved it."""

from __future__ import annotations

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

import fedsec_bench
from fedsec_bench.cli import main
from fedsec_bench.runner import STAGES, Refused
from fedsec_bench.scenario import Scenario
from fedsec_bench.tracking import not_applicable, run_params


def fedsec(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def written(tmp_path, raw) -> str:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def independent_problems(tiny, tmp_path):
    """Two bad plugin options and a missing data file: neither needs the other to be checked."""
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": -1.0}]
    tiny["attacks"] = [{"name": "update_probe", "no_such_option": 1}]
    tiny["data"] = {"source": "files", "path": str(tmp_path / "missing.jsonl"), "canaries": {"count": 0}}
    return tiny


def test_validate_reports_every_independent_problem_at_once_by_stage(tiny, tmp_path, capsys):
    code, err = fedsec(capsys, "validate", written(tmp_path, independent_problems(tiny, tmp_path)))
    assert code == 2
    lines = err.splitlines()
    plugins, data = lines.index("plugins:"), lines.index("data:")
    assert lines[plugins + 1].startswith("  error: attacks[0].no_such_option: unknown option of update_probe")
    assert lines[plugins + 2].startswith("  error: defenses[0].max_norm: ")
    assert lines[data + 1].startswith(f"  error: data.path: {tmp_path / 'missing.jsonl'} does not exist; name a ")
    # what needs the data or the plugins cannot be checked, and says so; the rest was checked and passed
    assert "not checked: data checks, model checks (each needs plugins and data to pass first)" in lines
    assert "not checked: model (each needs data to pass first)" in lines
    assert lines[-1] == "ok: schema, matrix, outputs, device"
    assert not (tmp_path / "runs").exists()


def test_run_refuses_with_exactly_the_report_validate_gives(tiny, tmp_path, capsys):
    path = written(tmp_path, independent_problems(tiny, tmp_path))
    validated, ran = fedsec(capsys, "validate", path), fedsec(capsys, "run", path)
    assert ran == validated and ran[0] == 2
    with pytest.raises(Refused) as caught:  # the Python API: the same problems, flat, in stage order
        fedsec_bench.run(path)
    assert [f"  error: {p}" for p in caught.value.problems] == [line for line in ran[1].splitlines() if "error:" in line]
    assert not (tmp_path / "runs").exists()


def test_the_schemas_field_errors_come_together_and_nothing_after_it_is_checked(tiny, tmp_path, capsys):
    tiny["federation"]["rounds"] = 0
    tiny["federation"]["lr"] = -1
    code, err = fedsec(capsys, "validate", written(tmp_path, tiny))
    assert code == 2
    assert err.splitlines() == [
        "schema:", "  error: federation.rounds: must be ≥ 1", "  error: federation.lr: must be > 0.0",
        f"not checked: {', '.join(s for s in STAGES if s != 'schema')} (each needs schema to pass first)",
    ]


def test_a_matrix_is_refused_outside_sweep_together_with_a_missing_data_file(tiny, tmp_path, capsys):
    tiny["matrix"] = {"seed": [0, 1]}
    tiny["data"] = {"source": "files", "path": str(tmp_path / "missing.jsonl"), "canaries": {"count": 0}}
    code, err = fedsec(capsys, "validate", written(tmp_path, tiny))
    assert code == 2
    assert "matrix:\n  error: matrix: tiny is a sweep of 2 combinations; run it with `fedsec sweep`" in err
    assert "data:\n  error: data.path: " in err


def test_a_plugins_data_check_is_reported_with_the_models_problem(tiny, tmp_path, capsys, monkeypatch):
    """check_data runs on the data, the model is built on it: both fail, each for its own reason."""
    from fedsec_bench.defenses.norm_clip import NormClip

    def refuse(cls, options, scenario, data):
        raise ValueError(f"max_norm: refused on {data.num_clients} clients' data")

    monkeypatch.setattr(NormClip, "check_data", classmethod(refuse))
    tiny["defenses"] = [{"name": "norm_clip"}]
    tiny["model"]["vocab"] = 100  # below the tokenizer's real size
    code, err = fedsec(capsys, "validate", written(tmp_path, tiny))
    assert code == 2
    lines = err.splitlines()
    assert lines[lines.index("data checks:") + 1] == "  error: defenses[0] (norm_clip): max_norm: refused on 4 clients' data"
    assert lines[lines.index("model:") + 1].startswith("  error: model.vocab: 100 is below the tokenizer's")
    assert "not checked: model checks (each needs model to pass first)" in lines


def test_validate_says_ok_with_what_it_built(tiny, tmp_path, capsys):
    tiny["device"] = "auto"
    code = main(["validate", written(tmp_path, tiny)])
    out = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert code == 0 and out.startswith("tiny: ok (lora, 2 rounds")
    assert "  model: " in out and f"on {device}" in out


# --------------------------------------------------------------------------- params as the user sees them


def logged_params(tiny, tmp_path, *overrides) -> dict[str, str]:
    tiny["tracking"] = {"enabled": True, "uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "params",
                        "output_dir": str(tmp_path / "runs")}
    result = fedsec_bench.run(tiny, ["federation.rounds=1", "device=auto", *overrides])
    return MlflowClient(tracking_uri=tiny["tracking"]["uri"]).get_run(result.run_id).data.params


def built_tokenizer_size(raw, *overrides) -> int:
    from fedsec_bench.data import build_federated_data
    from fedsec_bench.models import make_tokenizer

    scenario = fedsec_bench.load_scenario(raw, list(overrides))
    return len(make_tokenizer(scenario.model, build_federated_data(scenario).public_texts()))


def test_params_log_the_device_used_and_the_vocabulary_built_and_leave_out_what_the_mode_does_not_read(tiny, tmp_path):
    # a target the small public split cannot fill: the vocabulary built is smaller than asked
    target = ["model.tokenizer.vocab_size=4000", "tuning.mode=full"]
    params = logged_params(tiny, tmp_path, *target)
    built = built_tokenizer_size(tiny, *target)
    assert built < 4000
    assert params["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert params["model.tokenizer.vocab_size"] == str(built) and params["model.vocab"] == str(built)
    assert params["tuning.mode"] == "full"
    assert not [k for k in params if k.startswith(("tuning.lora.", "tuning.prompt."))]
    for absent in ("data.path", "model.quantization", "model.name_or_path", "model.kv_heads", "federation.momentum",
                   "model.pretrain.lr", "eval.max_new_tokens", "data.instruction_field", "tracking.description"):
        assert absent not in params, absent
    assert params["data.canaries.count"] == "2" and params["data.public_examples"] == "256"  # resolved defaults
    assert params["eval.max_examples"] == str(max(8, 2 * 2 * 4 // 4))  # auto: a quarter of a round's sequences
    assert all(v != "None" for v in params.values())


def test_lora_params_name_the_layers_peft_adapted_and_no_prompt_fields(tiny, tmp_path):
    params = logged_params(tiny, tmp_path)
    assert params["tuning.lora.r"] == "4" and params["tuning.lora.target_modules"] == '["c_attn"]'  # GPT-2's default
    assert not [k for k in params if k.startswith("tuning.prompt.")]


def scenario(raw, *overrides) -> Scenario:
    return fedsec_bench.load_scenario(raw, list(overrides))


def test_what_applies_follows_the_mode_the_source_and_the_format(tiny):
    prompt = not_applicable(scenario(tiny, "tuning.mode=prompt"))
    assert "tuning.lora" in prompt and "tuning.prompt" not in prompt
    loaded = not_applicable(scenario({**tiny, "model": {"name_or_path": "some/model"}}))
    assert {"model.arch", "model.layers", "model.vocab"} <= set(loaded) and "model.quantization" not in loaded
    files = {**tiny, "data": {"source": "files", "path": "x.jsonl", "format": "instruction"},
             "federation": {**tiny["federation"], "optimizer": "sgd"}}
    files = not_applicable(scenario(files))
    assert {"data.topics", "data.text_field", "data.long_texts", "data.messages_field", "data.split"} <= set(files)
    assert not {"data.path", "data.instruction_field", "federation.momentum", "eval.max_new_tokens"} & set(files)
    params = run_params(scenario(tiny, "data.partition.method=quantity_skew"))
    assert "data.partition.alpha" in params and "data.label_field" not in params
