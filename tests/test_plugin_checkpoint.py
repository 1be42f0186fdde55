"""Plugin checkpoints for resuming a run: every built-in plugin's state, after two rounds, survives
torch.save and torch.load and comes back whole in a fresh instance built for the same scenario."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY

from fedsec_bench.data import build_federated_data
from fedsec_bench.executors import LocalExecutor
from fedsec_bench.federation import Federation
from fedsec_bench.plan import load_plan
from fedsec_bench.registry import entry_points_by_name
from fedsec_bench.runtime import build_runtime

ATTACKER = {"clients": [0]}
BY_USER = {  # the bundled per-user file, split one client per user, with fresh samples kept per user
    "source": "files", "path": str(Path(__file__).parents[1] / "scenarios" / "data" / "instructions_by_user.jsonl"),
    "format": "instruction", "partition": {"method": "natural", "by": "user", "min_examples": 4},
    "heldout_by_user": True, "heldout_examples": 64, "public_examples": 32, "user_samples": 2,
}
TINY_DATA = TINY["data"]
ENTRIES = {
    # plugin: (where the scenario lists it, its options, other scenario fields)
    "fedavg": ("federation", {}, {}),
    "krum": ("federation", {"f": 0}, {}),
    "multikrum": ("federation", {"f": 0}, {}),
    "median": ("federation", {}, {}),
    "trimmed_mean": ("federation", {"trim": 0}, {}),
    "bulyan": ("federation", {"f": 0}, {}),
    "norm_bound": ("federation", {"noise_std": 0.01}, {}),
    "centered_clip": ("federation", {}, {}),
    "geomedian": ("federation", {}, {}),
    "norm_clip": ("defenses", {"max_norm": 0.1}, {}),
    "he_aggregation": ("defenses", {}, {}),
    "secure_aggregation": ("defenses", {}, {}),
    "dp_sgd": ("defenses", {"noise_multiplier": 1.0}, {}),
    "dp_fedavg": ("defenses", {"noise_multiplier": 0.3, "adaptive_clipping": True, "count_noise": 0.5},
                  {"federation": {"sampling": "poisson"}}),
    "update_probe": ("attacks", {}, {}),
    "gradient_inversion": ("attacks", {"method": "token_leak"}, {}),
    "membership_inference": ("attacks", {}, {}),
    "canary_exposure": ("attacks", {}, {}),
    "sign_flip": ("attacks", ATTACKER, {}),
    "gaussian": ("attacks", ATTACKER, {}),
    "scaling": ("attacks", ATTACKER, {}),
    "alie": ("attacks", ATTACKER, {}),
    "ipm": ("attacks", ATTACKER, {}),
    "backdoor": ("attacks", ATTACKER, {}),
    "label_flip": ("attacks", {**ATTACKER, "mapping": {"the": "a"}}, {}),
    "fedex_lora": ("tuning", {}, {"tuning": {"lora": {"aggregation": "exact"}}}),
    "model_inconsistency": ("attacks", {}, {}),
    "imprint": ("attacks", {}, {"tuning": {"mode": "full"}}),
    "active_membership": ("attacks", {}, {}),
    "model_consistency": ("defenses", {}, {}),
    "dp_ftrl": ("defenses", {"noise_multiplier": 0.5, "restart_every": 2}, {}),
    "local_dp": ("defenses", {"clipping_norm": 0.01}, {}),
    "gradient_pruning": ("defenses", {"fraction": 0.5}, {}),
    "quantization": ("defenses", {"bits": 8}, {}),
    "user_inference": ("attacks", {"threat": "server", "samples_per_user": [1, 2]}, {"data": BY_USER}),
    "user_audit": ("attacks", {"count": 2}, {}),
    "min_max": ("attacks", ATTACKER, {}),
    "min_sum": ("attacks", ATTACKER, {}),
    "fang": ("attacks", ATTACKER, {}),
    "mimic": ("attacks", {**ATTACKER, "warmup": 2}, {}),
    "free_rider": ("attacks", {**ATTACKER, "mode": "stale"}, {}),
    "neurotoxin": ("attacks", ATTACKER, {}),
    "dba": ("attacks", {"clients": [0, 1]}, {}),
    "safety_poisoning": ("attacks", ATTACKER, {"data": {**TINY_DATA, "format": "instruction", "seq_len": 64,
                                                         "canaries": {"count": 0}}}),
    "flame": ("federation", {}, {}),
    "foolsgold": ("federation", {}, {}),
    "fltrust": ("federation", {}, {}),
    "robust_lr": ("federation", {"threshold": 2}, {}),
    "dnc": ("federation", {"f": 1}, {}),
    "signguard": ("federation", {}, {}),
}
CROSS_ROUND = {
    # state that must have moved in two rounds, as the checkpoint holds it
    "dp_fedavg": lambda s: s["clip_norm"] != 1.0 and s["ledger"].steps == 2,
    "dp_sgd": lambda s: len(s["budgets"]) >= 3,  # kept, though a Ray worker's copy gets none
    "membership_inference": lambda s: len(s["participants"]) >= 3,
    "canary_exposure": lambda s: len(s["participants"]) >= 3,
    "centered_clip": lambda s: s["previous"] is not None,
    "krum": lambda s: len(s["rows"]) == 6,
    "gradient_inversion": lambda s: len(s["rows"]) == 6,
    # no secret on disk: a resumed run's clients make new keys (the masks cancel, the CKKS error is noise)
    "he_aggregation": lambda s: s == {},
    "secure_aggregation": lambda s: s == {},
    # two rounds complete the first tree of two leaves: its root (level 1) is the whole cover
    "dp_ftrl": lambda s: s["accountant"].max_sensitivity2 >= 2 and len(s["cover"]) == 1 and s["cover"][0].level == 1,
    "local_dp": lambda s: sum(ledger.steps for ledger in s["ledgers"].values()) == 6,  # 3 clients × 2 rounds
    "user_inference": lambda s: len(s["participants"]) >= 3 and len(s["observations"]) >= 1,
    "user_audit": lambda s: sum(s["participations"].values()) >= 1 and "initial" in s,
    "mimic": lambda s: s["tracked"] >= 1 and s["target"] is not None,  # the warm-up's power iteration and its pick
    "free_rider": lambda s: len(s["received"]) >= 1,
    "neurotoxin": lambda s: s["previous"] is not None,
    "foolsgold": lambda s: len(s["history"]) >= 3,  # every client seen so far, summed over rounds
    "flame": lambda s: s["noise_std"] > 0,
}


def built_in_names() -> set[str]:
    return {name for name, ep in entry_points_by_name().items() if ep.dist.name == "fedsec-bench"}


def test_every_built_in_plugin_is_covered():
    assert set(ENTRIES) - {"fedex_lora"} == built_in_names()


def scenario_with(tiny, name: str) -> dict:
    where, options, extra = ENTRIES[name]
    tiny["federation"].update(clients_per_round=3, **extra.get("federation", {}))
    tiny["data"] = extra.get("data", tiny["data"])
    if where == "federation":
        tiny["federation"]["aggregator"] = {"name": name, **options}
    elif where != "tuning":
        tiny[where] = [{"name": name, **options}]
    tiny["tuning"]["lora"] |= extra.get("tuning", {}).get("lora", {})
    tiny["tuning"]["mode"] = extra.get("tuning", {}).get("mode", tiny["tuning"]["mode"])
    return tiny


def same(a, b) -> bool:
    """Deep equality of checkpointed state: tensors and arrays elementwise, objects by their pickled state."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if a is None or isinstance(a, (str, bytes, int, float, set, frozenset, re.Pattern)):
        return a == b
    return same(a.__getstate__() if hasattr(a, "__getstate__") else vars(a),
                b.__getstate__() if hasattr(b, "__getstate__") else vars(b))


@pytest.mark.parametrize("name", ENTRIES)
def test_a_checkpoint_survives_torch_save_and_restores_into_a_fresh_instance(tiny, tmp_path, name):
    plan = load_plan(scenario_with(tiny, name))
    [planned] = [p for p in plan.plugins if p.plugin.name == name]
    index = plan.plugins.index(planned)

    def runtime():
        return build_runtime(plan.scenario, build_federated_data(plan.scenario), torch.device("cpu"), tmp_path)

    rt = runtime()
    hooks = plan.hook_chain(rt)
    federation = Federation(rt, hooks, LocalExecutor(hooks))
    for rnd in (1, 2):
        federation.run_round(rnd)
    states = hooks.checkpoint()
    buffer = io.BytesIO()
    torch.save(states, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)

    fresh = plan.hook_chain(runtime())  # as a resumed run builds it: a new runtime, then the plugins
    before = fresh.plugins[index].checkpoint()
    fresh.restore(loaded)
    assert same(fresh.plugins[index].checkpoint(), states[index])
    assert CROSS_ROUND.get(name, lambda s: True)(states[index])
    if name == "fedex_lora":  # the folded residuals live in the frozen weights, which the fresh model lacked
        assert not same(before, states[index])
