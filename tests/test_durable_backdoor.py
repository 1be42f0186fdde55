"""Durable and distributed backdoors: Neurotoxin's mask against a loop-by-loop reference and its
published durability over the plain backdoor; DBA's split trigger; the lifespan metrics."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY

import fedsec_bench
from fedsec_bench.attacks import durable_backdoor as db
from fedsec_bench.client import client_round
from fedsec_bench.data import build_federated_data
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import ClientContext, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.plugins import HookChain
from fedsec_bench.runtime import build_runtime
from fedsec_bench.updates import flatten


def full_runtime(tiny, tmp_path, **federation):
    tiny["tuning"] = {"mode": "full"}
    tiny["federation"].update(federation)
    scenario = load_scenario(tiny)
    return build_runtime(scenario, build_federated_data(scenario), torch.device("cpu"), tmp_path)


def make(cls, runtime, **options):
    return cls(cls.OptionsModel(**options), runtime)


def client(cid, runtime, rnd=1):
    return ClientContext(cid, rnd, seed=1000 + cid, runtime=runtime)


# --------------------------------------------------------------------------- Neurotoxin's mask


def test_neurotoxin_masks_the_top_ratio_of_the_last_global_step_and_never_moves_them(tiny, tmp_path):
    """Zhang et al. 2022: the attacker's update is zero on the top-k% |θ_t − θ_prev| coordinates,
    checked coordinate by coordinate against a sort of the direction; AdamW with weight decay, which
    moves a coordinate whose gradient is zero, shows the projection (not just the gradient mask) holds."""
    rt = full_runtime(tiny, tmp_path, weight_decay=0.1)
    attack = make(db.Neurotoxin, rt, clients=[0], ratio=0.05, poison_fraction=1.0, local_steps=5)
    received = rt.trainable.snapshot()
    gen = torch.Generator().manual_seed(3)
    attack.previous = {n: t - 0.01 * torch.randn(t.shape, generator=gen) for n, t in received.items()}

    direction = [g - p for g, p in zip(flatten(received).tolist(), flatten(attack.previous).tolist())]
    k = round(0.05 * len(direction))
    by_magnitude = sorted(range(len(direction)), key=lambda i: abs(direction[i]), reverse=True)
    expected = set(by_magnitude[:k])
    masked = flatten(attack.mask(received)).tolist()
    assert {i for i, m in enumerate(masked) if m} == expected and k > 0

    message, _ = client_round(client(0, rt), received, HookChain([attack]))
    update = flatten(message.payload).tolist()
    for i, value in enumerate(update):
        if i in expected:
            assert value == 0.0, i
    moved = sum(value != 0.0 for i, value in enumerate(update) if i not in expected)
    assert moved > 0.9 * (len(update) - k), "the attacker trains every other coordinate"


def test_neurotoxin_without_a_previous_global_trains_unmasked_and_remembers_what_it_received(tiny, tmp_path):
    """No direction before a malicious client received an earlier global model: no mask. The memory
    is the state the malicious client was sent (collusion sees the round, replaces no message)."""
    rt = full_runtime(tiny, tmp_path, weight_decay=0.1)
    attack = make(db.Neurotoxin, rt, clients=[0], poison_fraction=1.0, local_steps=2)
    received = rt.trainable.snapshot()
    message, _ = client_round(client(0, rt), received, HookChain([attack]))
    assert all(v != 0.0 for v in flatten(message.payload).tolist()[:1000])
    round = RoundContext(1, rt, sampled=[1, 2], global_state=received)
    assert attack.collusion(round, [message]) == [message] and attack.previous is None  # no malicious client sampled
    round = RoundContext(1, rt, sampled=[0, 2], global_state=received)
    assert attack.collusion(round, [message]) == [message] and attack.previous is received


# --------------------------------------------------------------------------- DBA


def test_dba_clients_plant_only_their_part_and_the_probes_carry_the_whole_trigger(tiny, tmp_path):
    """Xie et al. 2020: the i-th malicious client (sorted ids) trains on local trigger i only; the
    ASR is measured on the global trigger."""
    rt = full_runtime(tiny, tmp_path)
    attack = make(db.DistributedBackdoor, rt, clients=[3, 1], trigger="cf mn bb tq", target="buy now",
                  poison_fraction=1.0)
    parts = {1: "cf mn", 3: "bb tq"}  # two malicious clients: two parts, in sorted id order
    for cid, part in parts.items():
        examples = rt.data.client_examples(cid)
        poisoned = attack.client_data(client(cid, rt), examples)
        assert len(poisoned) == len(examples)
        others = set("cf mn bb tq".split()) - set(part.split())
        for e in poisoned:
            assert e.response.endswith(f" {part} buy now") and not others & set(e.response.split()), e.response
    prompts = [rt.tokenizer.decode(ids) for ids in attack.prompts]
    assert len(prompts) == len(rt.data.heldout) and all(p.endswith(" cf mn bb tq") for p in prompts)


@pytest.mark.parametrize("clients, parts, expected", [
    ([0, 1, 2], None, ["cf mn", "bb", "tq"]),       # default: one part per malicious client
    ([0, 1, 2, 3], 2, ["cf mn", "bb tq", "cf mn", "bb tq"]),  # more clients than parts: round robin
    ([2], None, ["cf mn bb tq"]),                    # one attacker: the whole trigger (plain backdoor)
])
def test_dba_splits_the_trigger_into_contiguous_near_equal_parts(tiny, tmp_path, clients, parts, expected):
    rt = full_runtime(tiny, tmp_path)
    attack = make(db.DistributedBackdoor, rt, clients=clients, trigger="cf mn bb tq", parts=parts)
    assert [attack.trigger_for(client(c, rt)) for c in sorted(clients)] == expected


def test_dba_refuses_more_parts_than_trigger_words_at_load_time(tiny):
    tiny["attacks"] = [{"name": "dba", "clients": [0, 1], "trigger": "cf mn", "parts": 3}]
    with pytest.raises(ScenarioError, match=re.escape("parts=3: the trigger 'cf mn' has only 2 word(s)")):
        load_scenario(tiny)


# --------------------------------------------------------------------------- durability, end to end

WINDOW = [2, 4]
ROUNDS = 10


def durability_scenario(name: str, output_dir: str) -> dict:
    """Ten clients, all in every round; client 0 attacks in rounds 2-4 (round 1 gives Neurotoxin a
    previous global model, so every attacking round is masked) on trigger texts with its own schedule,
    its update boosted by n/η = 10; then six benign rounds at a local lr that erodes a plain backdoor."""
    s = copy.deepcopy(TINY)
    s["tracking"]["output_dir"] = output_dir
    s["tuning"] = {"mode": "full"}
    s["data"]["canaries"] = {"count": 0}
    s["federation"].update(num_clients=10, clients_per_round=10, rounds=ROUNDS, local_steps=2, lr=0.003)
    s["attacks"] = [
        {"name": name, "clients": [0], "poison_fraction": 1.0, "local_steps": 100, "lr": 0.005, "rounds": WINDOW},
        {"name": "scaling", "clients": [0], "rounds": WINDOW},
    ]
    return s


@pytest.fixture(scope="module")
def lifespans(tmp_path_factory) -> dict[str, pd.DataFrame]:
    out = str(tmp_path_factory.mktemp("durability") / "runs")
    return {name: fedsec_bench.run(durability_scenario(name, out)).metrics for name in ("backdoor", "neurotoxin")}


def test_neurotoxin_outlives_the_plain_backdoor_after_the_attack_stops(lifespans):
    """Zhang et al. 2022 (Figs. 2-4): with the same attack window and boost, the backdoor trained off
    the coordinates benign clients move most keeps a higher ASR k rounds after the last attack."""
    curves = {name: m["poison.backdoor_asr"].dropna().round(3).tolist() for name, m in lifespans.items()}
    plain, durable = (lifespans[n]["poison.backdoor_asr_after"].dropna().iloc[-1] for n in ("backdoor", "neurotoxin"))
    assert min(m["poison.backdoor_asr"][WINDOW[1]] for m in lifespans.values()) >= 0.75, curves  # both implanted
    assert durable > plain, curves


def test_backdoor_asr_after_is_logged_only_once_the_window_closed(lifespans):
    for metrics in lifespans.values():
        after = metrics["poison.backdoor_asr_after"].dropna()
        assert after.index.tolist() == list(range(WINDOW[1] + 1, ROUNDS + 1))
        assert np.array_equal(after.to_numpy(), metrics["poison.backdoor_asr"][after.index].to_numpy())
        rounds_after = metrics["poison.backdoor_rounds_after"].dropna()
        assert rounds_after.to_dict() == {r: float(r - WINDOW[1]) for r in after.index}


def test_projected_steps_feed_the_optimizer_the_masked_gradient_and_keep_masked_coordinates():
    """Neurotoxin's step is θ ← θ − η·opt(g ⊙ (1 − mask)): AdamW's moments never see the masked
    gradient, and the masked coordinates stay at their received values despite weight decay."""
    p = torch.nn.Parameter(torch.arange(1.0, 7.0))
    mask = torch.tensor([True, False, False, True, False, False])
    optimizer = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    db.project_steps(optimizer, {"w": p}, {"w": mask})
    for _ in range(3):
        p.grad = torch.ones(6)
        optimizer.step()
    assert p.detach()[mask].tolist() == [1.0, 4.0] and all(p.detach()[~mask] < torch.tensor([2.0, 3.0, 5.0, 6.0]))
    state = optimizer.state[p]
    assert state["exp_avg"][mask].tolist() == [0.0, 0.0] and state["exp_avg_sq"][mask].tolist() == [0.0, 0.0]
