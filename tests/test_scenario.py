"""The scenario schema: every error names its field and the fix; overrides; safe YAML only."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedsec_bench import ScenarioError, load_scenario

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_bundled_scenarios_validate(path):
    assert load_scenario(path).name


def problems(raw: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(raw, overrides)
    return info.value.problems


def test_unknown_key_names_path_and_suggests(tiny):
    tiny["federation"]["roundz"] = 3
    assert problems(tiny) == ["federation.roundz: unknown field (did you mean 'rounds'?)"]


def test_unknown_top_level_section_suggests(tiny):
    tiny["defences"] = []
    assert problems(tiny) == ["defences: unknown field (did you mean 'defenses'?)"]


def test_bounds_are_stated_with_the_field_path(tiny):
    tiny["federation"]["rounds"] = 0
    tiny["model"]["layers"] = 0
    assert sorted(problems(tiny)) == ["federation.rounds: must be ≥ 1", "model.layers: must be ≥ 1"]


def test_cross_field_rule_is_explained(tiny):
    tiny["federation"]["clients_per_round"] = 9
    [problem] = problems(tiny)
    assert "clients_per_round (9) must be ≤ federation.num_clients (4)" in problem


def test_model_needs_exactly_one_source(tiny):
    tiny["model"]["name_or_path"] = "some/model"
    [problem] = problems(tiny)
    assert "exactly one of model.name_or_path" in problem


def test_literal_choices_are_listed(tiny):
    tiny["tuning"]["mode"] = "adapter"
    [problem] = problems(tiny)
    assert problem.startswith("tuning.mode: got 'adapter', expected") and "'lora'" in problem


def test_unknown_plugin_suggests_a_registered_one(tiny):
    tiny["defenses"] = [{"name": "norm_clipp"}]
    assert problems(tiny) == ["defenses[0].name: unknown defense 'norm_clipp' (did you mean 'norm_clip'?)"]


def test_plugin_options_are_validated_with_path(tiny):
    tiny["defenses"] = [{"name": "norm_clip", "max_nrom": 1.0}]
    assert problems(tiny) == ["defenses[0].max_nrom: unknown option of norm_clip (did you mean 'max_norm'?)"]
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": -1}]
    assert problems(tiny) == ["defenses[0].max_norm: Input should be greater than 0"]


def test_attack_name_in_defenses_is_refused(tiny):
    tiny["defenses"] = [{"name": "update_probe"}]
    [problem] = problems(tiny)
    assert problem.startswith("defenses[0].name: unknown defense 'update_probe'")


def test_plugin_mode_support_is_checked(tiny, register):
    tiny["defenses"] = [{"name": "full_only"}]
    [problem] = problems(tiny)
    assert problem == "defenses[0] (full_only): does not support tuning.mode=lora; it supports full"
    tiny["tuning"]["mode"] = "full"
    assert load_scenario(tiny).defenses[0].name == "full_only"


def test_aggregator_accepts_a_name_or_a_mapping(tiny):
    assert load_scenario(tiny, ["federation.aggregator=fedavg"]).federation.aggregator.name == "fedavg"
    assert problems(tiny, ["federation.aggregator=fedavgg"]) == [
        "federation.aggregator.name: unknown aggregator 'fedavgg' (did you mean 'fedavg'?)"
    ]


def test_overrides_parse_values_as_yaml_and_reach_lists(tiny):
    tiny["defenses"] = [{"name": "norm_clip", "max_norm": 1.0}]
    scenario = load_scenario(
        tiny,
        ["federation.rounds=7", "tracking.enabled=true", "defenses[0].max_norm=2.5",
         "data.canaries.repetitions=[1, 3]", "model.name_or_path=null"],
    )
    assert scenario.federation.rounds == 7
    assert scenario.tracking.enabled is True
    assert scenario.defenses[0].model_extra == {"max_norm": 2.5}
    assert scenario.data.canaries.repetitions == [1, 3]


def test_override_errors_name_the_override(tiny):
    assert problems(tiny, ["federation.rounds"]) == ["--set federation.rounds: expected PATH=VALUE, e.g. federation.rounds=5"]
    [problem] = problems(tiny, ["attacks.3.name=x"])
    assert "index 3 out of range" in problem
    assert problems(tiny, ["federation.rounds=-2"]) == ["federation.rounds: must be ≥ 1"]


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load_scenario(path)


def test_missing_file_and_non_mapping_are_clear(tmp_path):
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ScenarioError, match="a scenario is a mapping"):
        load_scenario(path)


def test_digest_changes_with_any_field(tiny):
    a = load_scenario(tiny)
    assert a.digest() == load_scenario(tiny).digest()
    assert a.digest() != load_scenario(tiny, ["seed=1"]).digest()
