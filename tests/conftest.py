"""Shared fixtures: a tiny scenario every test can shrink or extend, run in a temp folder."""

from __future__ import annotations

import copy

import pytest

TINY = {
    "name": "tiny",
    "seed": 0,
    "model": {"arch": "gpt2", "layers": 1, "hidden": 32, "heads": 2, "max_positions": 64,
              "tokenizer": {"kind": "bpe", "vocab_size": 300}},
    "tuning": {"mode": "lora", "lora": {"r": 4, "alpha": 8}},
    "data": {"examples_per_client": 16, "heldout_examples": 16, "seq_len": 32,
             "canaries": {"count": 2, "repetitions": [1, 2]}},
    "federation": {"num_clients": 4, "clients_per_round": 2, "rounds": 2, "local_steps": 2,
                   "batch_size": 4, "lr": 0.01},
    "tracking": {"enabled": False},
    "device": "cpu",
}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A fresh copy of a tiny scenario dict; runs write their folders under tmp_path."""
    monkeypatch.chdir(tmp_path)
    scenario = copy.deepcopy(TINY)
    scenario["tracking"]["output_dir"] = str(tmp_path / "runs")
    return scenario
