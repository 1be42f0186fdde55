"""The round loop's own figures when messages are lost: train.loss counts the clients whose update
arrived, and a round in which none arrived says so and leaves the model where it was."""

from __future__ import annotations

import pytest

from fedsec_bench import run
from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.registry import loaded_plugins


class LossyOptions(Options):
    lost: list[int] | None = None
    """Clients whose message never arrives; None: every client's."""


class Lossy(Plugin):
    """Loses the messages of some clients on the way, and keeps each client's true training loss."""

    name = "lossy"
    kind = "attack"
    OptionsModel = LossyOptions
    losses: dict[int, dict[int, float]] = {}

    def transport(self, client, message):
        return None if self.options.lost is None or client.client_id in self.options.lost else message

    def score_round(self, round, truth, metrics):
        self.losses[round.round] = {r.client_id: r.train_loss for r in truth.reports}


@pytest.fixture
def lossy(monkeypatch):
    monkeypatch.setitem(loaded_plugins(), Lossy.name, Lossy)
    monkeypatch.setattr(Lossy, "losses", {})


def test_train_loss_is_the_mean_over_the_clients_whose_update_arrived(tiny, lossy):
    tiny["federation"].update(clients_per_round=3, rounds=1)
    tiny["attacks"] = [{"name": "lossy", "lost": [0, 1]}]
    row = run(tiny).metrics.loc[1]
    losses = Lossy.losses[1]
    arrived = [loss for cid, loss in losses.items() if cid not in (0, 1)]
    assert len(losses) == 3 and 0 < len(arrived) < 3, "the premise: some of the sampled clients were lost"
    assert row["round.clients"] == len(arrived) and row["fault.dropped_clients"] == 3 - len(arrived)
    assert row["train.loss"] == pytest.approx(sum(arrived) / len(arrived), rel=1e-12)


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "he_aggregation", "secure_aggregation"])
def test_a_round_in_which_no_update_arrived_is_logged_as_such_and_the_model_stays(tiny, lossy, aggregation):
    tiny["attacks"] = [{"name": "lossy"}]
    if aggregation in ("he_aggregation", "secure_aggregation"):
        tiny["defenses"] = [{"name": aggregation}]
    else:
        tiny["federation"]["aggregator"] = aggregation
    metrics = run(tiny).metrics
    assert "train.loss" not in metrics.columns  # no round had a loss to report: never logged, not a NaN
    for rnd in (1, 2):
        row = metrics.loc[rnd]
        assert row["round.clients"] == 0 and row["fault.dropped_clients"] == 2
        assert row["utility.eval_loss"] == metrics.loc[0, "utility.eval_loss"]  # exactly the initial model
