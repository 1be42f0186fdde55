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


@pytest.fixture
def register(tmp_path_factory, monkeypatch):
    """Install tests/plugin_fixtures.py's plugins as a separate distribution with entry points,
    exactly as a third-party package would, and refresh the registry."""
    from plugin_fixtures import ENTRY_POINTS

    from fedsec_bench.registry import ENTRY_POINT_GROUP, refresh

    site = tmp_path_factory.mktemp("site")
    dist = site / "fedsec_test_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fedsec-test-plugins\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {target}" for name, target in ENTRY_POINTS.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    refresh()
    yield
    refresh()


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """A tiny GPT-2 pretrained on the public split (model.pretrain), saved with its tokenizer.

    LoRA and prompt tuning adapt a model that already knows the language; on a random
    base they have nothing to adapt. Tests of those modes load this folder through
    ``model.name_or_path``, the same from_pretrained path as a user's checkpoint.
    """
    import torch

    from fedsec_bench import load_scenario
    from fedsec_bench.data import build_federated_data
    from fedsec_bench.models import make_model, make_tokenizer
    from fedsec_bench.pretraining import pretrain

    raw = copy.deepcopy(TINY)
    scenario = load_scenario(raw, ["model.pretrain.steps=150", "data.public_examples=512"])
    data = build_federated_data(scenario)
    tokenizer = make_tokenizer(scenario.model, data.public_texts())
    model = make_model(scenario.model, tokenizer, scenario.seed)
    pretrain(model, tokenizer, data.public, scenario, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def pytest_configure(config):
    """Tiny models run fastest on one thread; more only contend (and oversubscribe spawned workers)."""
    import torch

    torch.set_num_threads(1)
