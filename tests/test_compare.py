"""`fedsec compare`: column order, constant columns, seeds aggregated with a Student-t CI, exports, plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import fedsec_bench
from fedsec_bench import robustness
from fedsec_bench.cli import main
from fedsec_bench.comparison_plots import plot_frontiers
from fedsec_bench.comparison_table import aggregate_seeds, drop_constant, order_columns, to_latex, to_markdown


def runs_frame(**columns) -> pd.DataFrame:
    """A per-run table as compare_runs builds it: parameters as strings, figures as floats."""
    return pd.DataFrame(columns)


def test_columns_are_ordered_parameters_then_utility_privacy_security_cost_then_the_rest():
    frame = runs_frame(
        run_id=["a"], run_name=["r"], **{"data.truncated_examples": [0.0], "cost.bytes_up": [1.0],
        "poison.backdoor_asr": [0.1], "mia.auc": [0.5], "privacy.epsilon": [3.0], "utility.perplexity": [9.0],
        "train.loss": [2.0], "compression.ratio": [0.1], "robust.selected": [1.0], "seed": ["0"],
        "attacks.update_probe.layers": ["2"], "attacks": ["update_probe"], "federation.rounds": ["2"],
        "defenses.norm_clip.max_norm": ["0.5"], "defenses": ["norm_clip"]})
    assert list(order_columns(frame)) == [
        "defenses", "defenses.norm_clip.max_norm", "attacks", "attacks.update_probe.layers", "federation.rounds",
        "seed", "train.loss", "utility.perplexity", "mia.auc", "privacy.epsilon", "poison.backdoor_asr",
        "robust.selected", "compression.ratio", "cost.bytes_up", "data.truncated_examples", "run_name", "run_id"]


def test_constant_columns_are_dropped_nan_aware():
    frame = runs_frame(
        run_id=["a", "b", "c"], run_name=["x", "x", "x"], defenses=["none", "dp_fedavg", "dp_fedavg"],
        mode=["lora"] * 3,
        **{"defenses.dp_fedavg.distributed": [None, "False", "False"],  # the same wherever dp_fedavg is
           "defenses.dp_fedavg.noise_multiplier": [None, "0.5", "1.0"],
           "privacy.epsilon": [np.nan, 4.0, 4.0],  # missing in one run: not constant
           "utility.perplexity": [7.0, 7.0, 7.0], "mia.auc": [np.nan] * 3})
    assert list(drop_constant(frame)) == ["run_id", "run_name", "defenses", "defenses.dp_fedavg.noise_multiplier",
                                          "privacy.epsilon"]


def test_seeds_become_one_row_with_a_student_t_interval():
    values = [5.0, 6.0, 8.0]
    frame = runs_frame(run_id=list("abcd"), run_name=list("abcd"), defenses=["norm_clip"] * 3 + ["none"],
                       seed=["0", "1", "2", "0"], **{"utility.perplexity": values + [9.0]})
    table = aggregate_seeds(frame)
    assert list(table.columns) == ["defenses", "n", "utility.perplexity.mean", "utility.perplexity.ci95"]
    assert list(table["defenses"]) == ["norm_clip", "none"] and list(table["n"]) == [3, 1]
    mean = sum(values) / 3
    sample_std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half_width = stats.t.ppf(0.975, df=2) * sample_std / math.sqrt(3)  # 4.303 * s / sqrt(3)
    assert table["utility.perplexity.mean"].tolist()[0] == pytest.approx(mean)
    assert table["utility.perplexity.ci95"].tolist()[0] == pytest.approx(half_width)
    assert math.isnan(table["utility.perplexity.ci95"].tolist()[1])  # one seed: no interval
    lines = to_markdown(table).splitlines()
    assert f"{mean:.4g} ± {half_width:.2g}" in lines[2] and lines[3].rstrip(" |").endswith("| 9")
    latex = to_latex(table)
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    assert r"norm\_clip" in latex and r"$\pm$" in latex


def test_a_frontier_per_privacy_family_with_every_run_that_has_its_figure(tmp_path):
    frame = runs_frame(run_id=list("abc"), run_name=list("abc"), defenses=["none", "dp_fedavg", "he_aggregation"],
                       **{"utility.perplexity": [5.0, 7.0, 5.1], "mia.auc": [0.7, 0.55, 0.69],
                          "privacy.epsilon": [np.nan, 3.0, np.nan]})
    written = plot_frontiers(aggregate_seeds(frame), tmp_path)
    assert [p.name for p in written] == ["privacy_utility_frontier_membership.png", "privacy_utility_frontier_epsilon.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_an_option_given_in_one_run_and_defaulted_in_another_is_not_constant():
    """Options are logged as written: a plugin present in both runs, with the option set in one only,
    differs in it (here the aggregator's pre-aggregators and a defense's bound)."""
    frame = runs_frame(
        run_id=list("abc"), run_name=list("abc"), aggregator=["krum", "krum", "median"],
        defenses=["norm_clip", "norm_clip", "none"],
        **{"federation.aggregator.pre": [None, "['nnm']", None], "federation.aggregator.f": ["3", "3", None],
           "defenses.norm_clip.max_norm": [None, "0.5", None]})
    kept = set(drop_constant(frame))
    assert {"federation.aggregator.pre", "defenses.norm_clip.max_norm"} <= kept
    assert "federation.aggregator.f" not in kept  # 3 in every krum run; median has none


def robustness_runs() -> pd.DataFrame:
    """Two rules x (clean, sign flip, backdoor), two seeds of each cell; krum declares f = 1 against 3 attackers."""
    cells = [("fedavg", None, "none", 0.0, 2.0, np.nan), ("fedavg", None, "sign_flip", 3.0, 4.0, np.nan),
             ("fedavg", None, "backdoor,scaling", 1.0, 2.1, 0.9), ("krum", "1", "none", 0.0, 2.2, np.nan),
             ("krum", "1", "sign_flip", 3.0, 2.4, np.nan), ("krum", "1", "backdoor,scaling", 1.0, 2.6, 0.1)]
    rows = [{"aggregator": agg, "federation.aggregator.f": f, "attacks": attack, "seed": str(seed),
             "poison.malicious_clients": malicious if malicious else np.nan,
             "utility.eval_loss": loss + 0.1 * seed, "poison.backdoor_asr": asr, "run_name": "r", "run_id": "i"}
            for agg, f, attack, malicious, loss, asr in cells for seed in (0, 1)]
    return pd.DataFrame(rows)


def test_the_robustness_verdict_is_each_defense_s_worst_case_over_the_attacks(tmp_path):
    cells = robustness.cells(robustness_runs())
    assert len(cells) == 6 and set(cells["n"]) == {2}
    worst = robustness.worst_case(cells).set_index("defense")
    # ByzFL's protocol: the worst final utility over the attacks, the clean run apart
    assert worst.loc["krum", "utility.eval_loss worst"] == pytest.approx(2.65)
    assert worst.loc["krum", "utility.eval_loss worst attack"] == "backdoor,scaling"
    assert worst.loc["fedavg", "utility.eval_loss worst attack"] == "sign_flip"
    assert worst.loc["krum", "utility.eval_loss clean"] == pytest.approx(2.25)
    assert worst.loc["fedavg", "poison.backdoor_asr worst"] == pytest.approx(0.9)
    # the declared f and the clients that really attacked, side by side
    assert worst.loc["krum", "f"] == "1" and worst.loc["krum", "malicious"] == 3.0
    assert worst.loc["fedavg", "f"] == ""
    assert list(worst.index) == ["krum", "fedavg"]  # the most robust first
    written = robustness.write_verdict(robustness_runs(), tmp_path)
    assert [p.name for p in written] == ["robustness_cells.csv", "robustness_verdict.csv", "robustness_verdict.md",
                                         "robustness_heatmap.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_cell_labels_show_options_only_where_plugins_of_one_name_differ():
    runs = pd.DataFrame({
        "aggregator": ["krum", "krum", "median", "median"], "federation.aggregator.f": ["3", "3", None, None],
        "federation.aggregator.pre": [None, "['nnm']", None, None],
        "attacks": ["fang", "fang", "sign_flip", "none"], "attacks.fang.target": ["krum", "trimmed_mean", None, None],
        "attacks.sign_flip.clients": [None, None, "0.3", None]})
    defenses = robustness.distinct_labels(runs, ["aggregator", "federation.aggregator.f", "federation.aggregator.pre"])
    attacks = robustness.distinct_labels(runs, ["attacks", "attacks.fang.target", "attacks.sign_flip.clients"])
    assert list(defenses) == ["krum", "krum pre=['nnm']", "median", "median"]
    assert list(attacks) == ["fang target=krum", "fang target=trimmed_mean", "sign_flip", "none"]


def test_no_verdict_unless_both_the_defense_and_the_attack_vary(tmp_path):
    runs = robustness_runs()
    assert robustness.cells(runs[runs["aggregator"] == "krum"]) is None
    assert robustness.write_verdict(runs[runs["attacks"] == "none"], tmp_path) == []


def test_a_robustness_sweep_end_to_end_gives_the_verdict(tiny, tmp_path, capsys):
    """Two rules x two attacks of real runs, compared from MLflow: the verdict's cells are the runs' own
    final figures, and the malicious count is the number of clients that really attacked."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny["tracking"] = {"uri": uri, "experiment": "rob", "output_dir": str(tmp_path / "runs")}
    tiny["tuning"] = {"mode": "full"}
    tiny["data"]["canaries"] = {"count": 0}
    tiny["federation"].update(num_clients=5, clients_per_round=5, rounds=1, local_steps=1)
    finals = {}
    for aggregator in ("fedavg", {"name": "krum", "f": 1}):
        for attacks in ([], [{"name": "sign_flip", "clients": [0, 1]}]):
            scenario = {**tiny, "attacks": attacks, "federation": {**tiny["federation"], "aggregator": aggregator}}
            finals[str(aggregator), bool(attacks)] = fedsec_bench.run(scenario).final
    out = tmp_path / "cmp"
    assert main(["compare", "--experiment", "rob", "--uri", uri, "--out", str(out)]) == 0
    assert "worst case over the attacks" in capsys.readouterr().out
    cells = pd.read_csv(out / "robustness_cells.csv").set_index(["defense", "attack"])
    assert cells.loc[("krum", "sign_flip"), "utility.eval_loss"] == pytest.approx(
        finals["{'name': 'krum', 'f': 1}", True]["utility.eval_loss"])
    assert cells.loc[("krum", "sign_flip"), "malicious"] == 2
    assert cells.loc[("fedavg", "none"), "malicious"] == 0
    assert (out / "robustness_heatmap.png").stat().st_size > 0


def test_compare_two_defenses_times_two_seeds_end_to_end(tiny, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny["tracking"] = {"uri": uri, "experiment": "cmp", "output_dir": str(tmp_path / "runs")}
    tiny["federation"]["rounds"] = 1
    tiny["attacks"] = [{"name": "update_probe"}]
    for defenses in ([{"name": "norm_clip", "max_norm": 0.05}], [{"name": "norm_clip", "max_norm": 5.0}]):
        for seed in (0, 1):
            fedsec_bench.run({**tiny, "seed": seed, "defenses": defenses})
    out = tmp_path / "cmp"
    assert main(["compare", "--experiment", "cmp", "--uri", uri, "--out", str(out)]) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 2 and list(table["n"]) == [2, 2]
    assert list(table.columns[:2]) == ["defenses.norm_clip.max_norm", "n"]  # the one varying parameter, then n
    figures = [c.removesuffix(".mean") for c in table.columns if c.endswith(".mean")]
    assert figures.index("utility.perplexity") < figures.index("probe.update_norm_max") < figures.index("cost.round_seconds")
    assert "attacks" not in table and "mode" not in table  # the same in every run
    tight, loose = table["probe.update_norm_max.mean"]
    assert tight <= 0.05 + 1e-6 < loose
    assert table["probe.update_norm_max.ci95"].notna().all()
    runs = pd.read_csv(out / "comparison_runs.csv")
    assert len(runs) == 4 and list(runs["seed"]) == [0, 1, 0, 1]
    assert {"comparison.md", "comparison.tex", "curves_overlaid.png"} <= {
        p.name for p in out.iterdir()}
    assert "±" in (out / "comparison.md").read_text()
    capsys.readouterr()
    assert main(["compare", "--experiment", "cmp", "--uri", uri, "--out", str(out), "--all"]) == 0
    assert {"attacks", "mode"} <= set(pd.read_csv(out / "comparison.csv").columns)
