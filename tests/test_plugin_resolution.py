"""Plugins are resolved lazily by name, and combinations are judged by what each plugin declares."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedsec_bench import ScenarioError
from fedsec_bench.cli import main
from fedsec_bench.plan import load_plan, load_scenario

MISSING = (
    "needs_missing is unavailable: it needs fedsec_test_dependency_that_is_not_installed, which is not "
    "installed; pip install 'fedsec-test-plugins[missing-extra]'"
)


def problems(raw) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(raw)
    return caught.value.problems


def test_a_plugin_with_a_missing_dependency_is_listed_as_unavailable_with_its_install_line(register, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed, unavailable = out.split("unavailable here")
    assert "needs_missing" not in listed and "recorder" in listed and "norm_clip" in listed
    assert "it needs fedsec_test_dependency_that_is_not_installed" in unavailable
    assert "pip install 'fedsec-test-plugins[missing-extra]'" in unavailable


def test_a_scenario_using_an_unavailable_plugin_is_refused_with_exit_2(tiny, register, tmp_path, capsys):
    tiny["attacks"] = [{"name": "needs_missing"}]
    assert problems(tiny) == [f"attacks[0].name: {MISSING}"]
    path = tmp_path / "uses_missing.yaml"
    import yaml

    path.write_text(yaml.safe_dump(tiny))
    assert main(["validate", str(path)]) == 2
    assert f"  error: attacks[0].name: {MISSING}" in capsys.readouterr().err.splitlines()


def test_unrelated_scenarios_still_run_beside_an_unavailable_plugin(tiny, register):
    tiny["attacks"] = [{"name": "update_probe"}]
    assert load_plan(tiny).plugins[0].plugin.name == "update_probe"


def test_a_scenario_imports_only_the_plugins_it_names():
    """The quickstart must not import TenSEAL's defense or the inversion attack (optional extras)."""
    code = (
        "import sys; from fedsec_bench.plan import load_plan; load_plan('scenarios/quickstart.yaml'); "
        "print(sorted(m for m in sys.modules if m.startswith('fedsec_bench.') and "
        "('.attacks.' in m or '.defenses.' in m)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a printed list of module names
    assert "fedsec_bench.defenses.norm_clip" in loaded and "fedsec_bench.attacks.update_probe" in loaded
    assert not [m for m in loaded if "he_aggregation" in m or "gradient_inversion" in m or "robust" in m]


def test_a_third_party_transport_that_hides_updates_is_refused_beside_a_rule_that_reads_them(tiny, register):
    """opaque_transport (a test package's plugin) only declares sends_plain = False; no helper is called."""
    tiny["defenses"] = [{"name": "opaque_transport"}]
    tiny["federation"]["aggregator"] = "median"
    [problem] = problems(tiny)
    assert problem.startswith("federation.aggregator (median) needs each client's plain update")
    assert "defenses[0] (opaque_transport) hides the updates" in problem


def test_each_conflict_is_one_line(tiny):
    tiny["federation"].update(num_clients=8, clients_per_round=5, sampling="poisson", aggregator="krum")
    tiny["defenses"] = [{"name": "secure_aggregation"}, {"name": "dp_fedavg"}]
    tiny["attacks"] = [{"name": "alie", "clients": [0]}]
    got = problems(tiny)
    assert len(got) == 3, got
    alie, krum, order = got
    assert alie.startswith("attacks[0] (alie) needs each client's plain update") and "defenses[0] (secure_aggregation)" in alie
    assert krum.startswith("federation.aggregator (krum) needs each client's plain update")
    assert order.startswith("defenses[1] (dp_fedavg) rewrites each plain message in transport, but defenses[0]")
    assert order.endswith("list dp_fedavg before secure_aggregation")


def test_a_plugin_that_needs_the_mean_is_refused_beside_a_rule_that_is_not_one(tiny):
    tiny["federation"].update(num_clients=8, clients_per_round=5, sampling="poisson", aggregator="krum")
    tiny["defenses"] = [{"name": "dp_fedavg"}]
    [problem] = problems(tiny)
    assert problem.startswith("defenses[0] (dp_fedavg) needs the round's aggregate to be the weighted mean")
    assert "federation.aggregator (krum) aggregates otherwise" in problem
    tiny["defenses"].append({"name": "secure_aggregation"})  # it takes over, and its sum is that mean
    tiny["federation"]["aggregator"] = "fedavg"
    load_plan(tiny)


def test_the_same_combination_in_a_valid_order_resolves(tiny):
    tiny["federation"].update(num_clients=6, clients_per_round=4, sampling="poisson")
    tiny["defenses"] = [{"name": "dp_fedavg"}, {"name": "secure_aggregation"}]
    plan = load_plan(tiny)
    assert [p.where for p in plan.plugins] == ["defenses[0]", "defenses[1]", "federation.aggregator"]
    assert plan.plugins[0].options.clip_norm == 1.0  # options parsed once, typed
