"""Plugins that exist only for tests, registered through a real entry point by the ``register`` fixture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch

from fedsec_bench.plugins import Options, Plugin
from fedsec_bench.updates import zeros_like


class Recorder(Plugin):
    """Records every hook call, in order, on the class (tests read Recorder.calls)."""

    name = "recorder"
    kind = "attack"
    calls: list[tuple] = []
    local_steps: list[int] = []

    def client_data(self, client, texts):
        self.calls.append(("client_data", client.round, client.client_id))
        return texts

    def local_training(self, client, training):
        self.calls.append(("local_training", client.round, client.client_id))
        return training

    def client_update(self, client, update):
        self.calls.append(("client_update", client.round, client.client_id))
        return update

    def transport(self, client, message):
        self.calls.append(("transport", client.round, client.client_id))
        return message

    def collusion(self, round, messages):
        self.calls.append(("collusion", round.round))
        return messages

    def server_observation(self, round, messages):
        self.calls.append(("server_observation", round.round, tuple(m.client_id for m in messages)))

    def aggregation(self, round, messages):
        self.calls.append(("aggregation", round.round))

    def post_aggregation(self, round, aggregate):
        self.calls.append(("post_aggregation", round.round))
        return aggregate

    def score_round(self, round, truth, metrics):
        self.calls.append(("score_round", round.round))
        self.local_steps.extend(r.local_steps for r in truth.reports)
        return {"recorder.round": float(round.round)}

    def training_end(self, runtime):
        self.calls.append(("training_end",))
        return {"recorder.done": 1.0}


class OpaqueTransport(Plugin):
    """Replaces each update by bytes the server cannot read, and aggregates by zeroing: a stand-in
    for encryption that proves observers get exactly what the transport carries."""

    name = "opaque_transport"
    kind = "defense"
    sends_plain = False

    def transport(self, client, message):
        return message.carrying(b"\x00" * 16, 16)

    def aggregation(self, round, messages):
        return zeros_like(round.global_state)


class FullOnlyOptions(Options):
    level: int = 1


class FullOnly(Plugin):
    """Claims only the full mode, to test the load-time mode check."""

    name = "full_only"
    kind = "defense"
    modes = frozenset({"full"})
    OptionsModel = FullOnlyOptions


class Crash(Plugin):
    """Raises in round 1, to test that a crash marks the run FAILED."""

    name = "crash"
    kind = "attack"

    def score_round(self, round, truth, metrics):
        raise RuntimeError("boom in score_round")


class FlakyClientOptions(Options):
    client: int = 0
    failure: Literal["raise", "exit"] = "raise"
    failures: int = 1
    marker_dir: str


class FlakyClient(Plugin):
    """One client's local training fails on its first ``failures`` attempts: it raises, or its
    worker process dies (executor: ray). Attempts are counted in files, since a Ray worker's
    changes to the plugin do not come back."""

    name = "flaky_client"
    kind = "attack"
    OptionsModel = FlakyClientOptions

    def local_training(self, client, training):
        if client.client_id != self.options.client:
            return training
        markers = Path(self.options.marker_dir)
        attempt = len(list(markers.glob("attempt-*")))
        (markers / f"attempt-{attempt}").touch()
        if attempt < self.options.failures:
            if self.options.failure == "exit":
                os._exit(1)
            raise RuntimeError(f"flaky client {client.client_id}, attempt {attempt}")
        return training


ENTRY_POINTS = {
    cls.name: f"plugin_fixtures:{cls.__name__}" for cls in (Recorder, OpaqueTransport, FullOnly, Crash, FlakyClient)
} | {"needs_missing": "plugin_fixtures_missing:NeedsMissing [missing-extra]"}
"""``needs_missing`` stands for a plugin whose optional dependency is not installed."""
