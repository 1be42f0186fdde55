"""`fedsec compare`: column order, constant columns, seeds aggregated with a Student-t CI, exports, plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import fedsec_bench
from fedsec_bench.cli import main
from fedsec_bench.comparison_plots import plot_defense_attack_heatmap, plot_frontiers
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


def test_a_heatmap_only_when_runs_vary_both_defense_and_attack(tmp_path):
    frame = runs_frame(run_id=list("abcd"), run_name=list("abcd"), defenses=["none", "none", "krum", "krum"],
                       attacks=["none", "backdoor", "none", "backdoor"],
                       **{"poison.backdoor_asr": [np.nan, 0.9, np.nan, 0.2]})
    assert plot_defense_attack_heatmap(frame, tmp_path / "h.png").stat().st_size > 0
    assert plot_defense_attack_heatmap(frame[frame["defenses"] == "none"], tmp_path / "h2.png") is None


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
