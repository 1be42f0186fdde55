"""The scenario schema: every error names its field and the fix; overrides; safe YAML only."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.scenario import Scenario

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


# --------------------------------------------------------------------------- hostile YAML and sizes

BILLION_LAUGHS = "".join(
    [f"name: tiny\nmodel:\n  arch: gpt2\n  dtype: [&a [{', '.join(['lol'] * 9)}], "]
    + [f"&{b} [{', '.join([f'*{a}'] * 9)}], " for a, b in zip("abcdefgh", "bcdefghi")]
) + "*i]\n"


def test_an_alias_bomb_is_refused_fast_in_bounded_memory_naming_its_field(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    assert len(BILLION_LAUGHS) < 600  # billions of strings once expanded
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    took, (_, peak) = time.perf_counter() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert took < 1 and peak < 20 * 2**20
    [problem] = info.value.problems
    assert problem.startswith("model.dtype: expands to more than 1,000,000 values") and str(path) in problem


def test_aliases_and_merge_keys_within_the_bounds_still_work(tmp_path, tiny):
    text = yaml.safe_dump(tiny, sort_keys=False) + (
        "defenses: [&clip {name: norm_clip, max_norm: 2.0}]\n"
        "attacks: [{name: update_probe}]\n"
        "matrix: {defenses: [[*clip], [{<<: *clip, max_norm: 4.0}]]}\n"
    )
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    scenario = load_scenario(path)
    assert scenario.matrix["defenses"] == [[{"name": "norm_clip", "max_norm": 2.0}],
                                           [{"name": "norm_clip", "max_norm": 4.0}]]


@pytest.mark.parametrize("text, problem", [
    ("a: &a [*a]\n", "a[0]: an alias refers to a value that contains it"),
    ("a: " + "[" * 40 + "]" * 40 + "\n", "a[0][0][0][0][0][0]…: nested more than 32 levels deep"),
    ("a: 1\na: 2\n", "not valid YAML: while reading a mapping; found 'a' a second time"),
    ("seed: " + "9" * 200 + "\n", "not valid YAML: an integer of 200 characters"),
    ("a: !!set {1, 2}\n", "not valid YAML: a set (tag:yaml.org,2002:set) has no place in a scenario"),
])
def test_recursion_depth_duplicates_and_odd_types_are_refused_at_load(tmp_path, text, problem):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert problem in info.value.problems[0] and "\n" not in info.value.problems[0]


def test_a_date_like_value_stays_the_string_it_looks_like(tiny):
    assert load_scenario(tiny, ["tracking.run_name=2024-01-01"]).tracking.run_name == "2024-01-01"


def test_a_python_mapping_with_a_cycle_is_refused_like_a_recursive_alias(tiny):
    tiny["attacks"] = [{"name": "update_probe"}]
    tiny["attacks"][0]["again"] = tiny["attacks"]
    with pytest.raises(ScenarioError, match=r"attacks\[0\]\.again: an alias refers to a value that contains it"):
        load_scenario(tiny)


def test_an_offending_value_is_quoted_as_a_bounded_excerpt(tiny):
    [problem] = problems(tiny, ["model.dtype=" + "f" * 100_000])
    assert problem.startswith("model.dtype: got 'ffff") and "..." in problem and len(problem) < 200


@pytest.mark.parametrize("override, problem", [
    ("name.x=1", "--set name.x: name is 'tiny', not a section with fields; set name itself"),
    ("federation.rounds.x=1", "--set federation.rounds.x: federation.rounds is 2, not a section"),
    ("a..b=1", "--set a..b: an empty part in the field path"),
    ("=1", "--set =1: no field path before '='"),
    ("data.canaries.repetitions.9=1", "--set data.canaries.repetitions.9: index 9 out of range "
     "(data.canaries.repetitions has 2 items, 0 to 1)"),
    ("data.canaries.repetitions.first=1", "--set data.canaries.repetitions.first: data.canaries.repetitions is a "
     "list; name an item by its position"),
])
def test_every_malformed_override_is_a_scenario_error_naming_its_path(tiny, override, problem):
    [line] = problems(tiny, [override])
    assert line.startswith(problem)


def test_every_size_bound_is_stated_in_its_fields_description():
    from fedsec_bench.reference import rows

    for row in rows(Scenario):
        path, *_, description = [cell.strip(" `") for cell in row.strip("|").split("|")]
        for bound in _upper_bounds(path):
            assert f"{bound:,}" in description or f"{bound}" in description, path


def _upper_bounds(path: str) -> list[int]:
    from fedsec_bench.reference import section_model

    model: type = Scenario
    *sections, name = path.split(".")
    for section in sections:
        model = section_model(model.model_fields[section].annotation)
    return [meta.le for meta in model.model_fields[name].metadata if getattr(meta, "le", None) is not None]


def test_the_synthetic_topic_bound_is_the_corpus_own():
    from fedsec_bench.data.synthetic import TOPICS
    from fedsec_bench.scenario import SYNTHETIC_TOPICS

    assert SYNTHETIC_TOPICS == len(TOPICS)


@pytest.mark.parametrize("overrides, problem", [
    (["model.tokenizer.vocab_size=1000000000"], "model.tokenizer.vocab_size: must be ≤ 1,048,576"),
    (["model.hidden=65536", "model.layers=100", "model.heads=64"], "model: the model these sizes build has about"),
    (["federation.num_clients=100000", "data.examples_per_client=100"], "data: the synthetic corpus would draw"),
    (["data.canaries.count=100000", "data.canaries.repetitions=[100]"], "data.canaries: 10,000,000 canary copies"),
    (["seed=-1"], "seed: must be ≥ 0"),
])
def test_sizes_past_their_bound_are_refused_naming_the_bound(tiny, overrides, problem):
    assert problems(tiny, overrides)[0].startswith(problem)
