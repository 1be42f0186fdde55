"""curves.png: what a run's per-round figure shows, panel by panel."""

from __future__ import annotations

import math

import pandas as pd

from fedsec_bench.reporting import curve_panels, plot_curves


def history() -> pd.DataFrame:
    rounds = range(5)
    return pd.DataFrame({
        "utility.eval_loss": [5.0, 4.0, 3.5, 3.2, 3.0],
        "utility.perplexity": [math.exp(v) for v in (5.0, 4.0, 3.5, 3.2, 3.0)],
        "train.loss": [None, 4.2, 3.4, 3.0, 2.7],
        "cost.round_seconds": [None, 1.2, 1.1, 1.3, 1.2],
        "cost.bytes_up": [None, 900.0, 900.0, 900.0, 900.0],  # the same every round: nothing to read
        "poison.backdoor_asr": [0.0, 0.2, 0.5, 0.7, 0.9],
        "mia.auc": [None, None, None, None, 0.7],  # final only: a point, not a curve
        "privacy.user_epsilon": [None, 0.5, 0.8, 1.0, 1.2],
        "round.clients": [3.0, 2.0, 3.0, 3.0, 2.0],
    }, index=pd.Index(rounds, name="round"))


def test_losses_share_an_axis_families_come_in_order_and_flat_series_are_left_out():
    assert curve_panels(history()) == [
        ("utility", ["train.loss", "utility.eval_loss"]),
        ("privacy", ["privacy.user_epsilon"]),
        ("security", ["poison.backdoor_asr"]),
        ("cost", ["cost.round_seconds"]),
        ("other", ["round.clients"]),
    ]


def test_perplexity_is_drawn_when_it_is_the_only_loss_figure():
    frame = history()[["utility.perplexity", "poison.backdoor_asr"]]
    assert curve_panels(frame) == [("utility", ["utility.perplexity"]), ("security", ["poison.backdoor_asr"])]


def test_the_figure_is_written_and_nothing_is_written_without_a_curve(tmp_path):
    plot_curves(history(), tmp_path / "curves.png", "tiny")
    assert (tmp_path / "curves.png").stat().st_size > 0
    plot_curves(history()[["mia.auc", "cost.bytes_up"]], tmp_path / "none.png", "tiny")
    assert not (tmp_path / "none.png").exists()
