"""Parties that cannot peek: a server-side plugin gets only what the transport delivered and the round's
public facts; the simulator's truth reaches the scorer alone; secure-aggregation masks cannot be
recomputed by any plugin, even one that knows the scenario seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsec_bench import run
from fedsec_bench.aggregation import fedavg
from fedsec_bench.defenses.he_aggregation import PLAINTEXT_NOTE, EncryptedUpdate
from fedsec_bench.defenses.secure_aggregation import (
    MaskedUpdate,
    SecureAggregation,
    SecureAggregationOptions,
    decode,
    encode,
    prg,
)
from fedsec_bench.ground_truth import MALICIOUS_KEY, ClientReport, RoundTruth
from fedsec_bench.messages import Message, RoundContext
from fedsec_bench.plugins import Plugin
from fedsec_bench.registry import loaded_plugins
from fedsec_bench.runtime import Runtime
from fedsec_bench.updates import flatten

BITS = 32  # secure_aggregation's default fractional_bits
CKKS_TOLERANCE = 2.0**-20  # as in test_he_aggregation
SIMULATOR_ONLY = (PLAINTEXT_NOTE, MALICIOUS_KEY)
"""Keys under which the simulator's truth is filed: no server-side hook may come across them."""


# --------------------------------------------------------------------------- the attack


def seed_derived_masks(scenario_seed: int, rnd: int, i: int, participants: list[int], size: int) -> np.ndarray:
    """The masks client i added when they came from the scenario seed (the former ClientSecrets): Philox
    streams keyed by [seed, 2, round, i] (self) and [seed, 1, round, min, max] (pairs)."""
    def stream(key):
        return np.random.Philox(np.random.SeedSequence(key)).random_raw(size)

    mask = stream([scenario_seed, 2, rnd, i])
    for j in participants:
        if j < i:
            mask -= stream([scenario_seed, 1, rnd, j, i])
        elif j > i:
            mask += stream([scenario_seed, 1, rnd, i, j])
    return mask


def unmask_from_seed(message: Message, scenario_seed: int, rnd: int, participants: list[int]) -> np.ndarray:
    """What a server-side plugin recovers of one client's update by recomputing its masks from the seed."""
    y = message.payload.values
    return decode(y - seed_derived_masks(scenario_seed, rnd, message.client_id, participants, y.size), BITS) / message.num_examples


def unmask_with_own_keys(message: Message, impostor: SecureAggregation, rnd: int, participants: list[int]) -> np.ndarray:
    """The same with the keys of a secure_aggregation instance the plugin builds itself, as the run built its own."""
    y, i = message.payload.values, message.client_id
    mask = prg(impostor.keys.self_seed(rnd, i), y.size)
    for j in participants:
        if j != i:
            stream = prg(impostor.keys.pair_seed(rnd, i, j), y.size)
            mask = mask + stream if j > i else mask - stream
    return decode(y - mask, BITS) / message.num_examples


def test_the_reproduced_attack_unmasks_seed_derived_masks_exactly():
    """The premise: against masks derived from the scenario seed, the attack reads the update (to fixed point)."""
    rng = np.random.default_rng(0)
    update, n, participants = rng.normal(size=500) * 0.01, 7, [0, 2, 5]
    masked = encode(update * n, BITS) + seed_derived_masks(11, 3, 2, participants, update.size)
    message = Message(2, n, MaskedUpdate(masked), masked.nbytes)
    assert np.abs(unmask_from_seed(message, 11, 3, participants) - update).max() <= 2.0 ** -(BITS + 1) / n


# --------------------------------------------------------------------------- the parties under test


class Witness(Plugin):
    """Client side, out of band: what each client handed its transport, i.e. the plain update a hiding
    transport then encrypts or masks (attacks' transports run before the defenses')."""

    name = "witness"
    kind = "attack"
    sent: dict[tuple[int, int], Message] = {}

    def transport(self, client, message):
        self.sent[(client.round, client.client_id)] = dataclasses.replace(message, payload=dict(message.payload))
        return message


class Spy(Plugin):
    """The curious server: in every server-side hook, collects what its arguments let it reach, and
    tries the issue's unmasking attack. (It has no ``aggregation`` hook: the plan lets one plugin beside
    the aggregator aggregate, and that hook gets the very ``round`` and ``messages`` of ``server_observation``.)"""

    name = "spy"
    kind = "attack"
    views: list[dict] = []
    recovered: dict[tuple[int, int], list[np.ndarray]] = {}
    scored: list[RoundTruth] = []

    def dispatch(self, round, client_id, state):
        self.look("dispatch", round, state)
        return state

    def collusion(self, round, messages):
        self.look("collusion", round, messages)
        return messages

    def server_observation(self, round, messages):
        self.look("server_observation", round, messages)
        impostor = SecureAggregation(SecureAggregationOptions(), round.runtime)
        for m in messages:
            if isinstance(m.payload, MaskedUpdate):
                self.recovered[(round.round, m.client_id)] = [
                    unmask_from_seed(m, round.runtime.scenario.seed, round.round, round.sampled),
                    unmask_with_own_keys(m, impostor, round.round, round.sampled),
                ]

    def post_aggregation(self, round, aggregate):
        self.look("post_aggregation", round, aggregate)
        return aggregate

    def score_round(self, round, truth, metrics):
        self.scored.append(truth)

    def look(self, hook: str, round: RoundContext, argument) -> None:
        """What ``round`` and the hook's other argument reach: the messages, or the aggregate (which the
        server learns by design, so it is kept apart from the vectors searched for an update)."""
        aggregate = argument if hook == "post_aggregation" else None
        objects = list(reachable([round] if aggregate is not None else [round, argument]))
        model = round.runtime.trainable.snapshot()  # the model the runtime holds right now
        vectors = [vector(o, round.global_state) for o in objects] + [flatten(model) - flatten(round.global_state)]
        self.views.append({
            "hook": hook, "round": round.round, "fields": {f.name for f in dataclasses.fields(round)},
            "truth": [o for o in objects if isinstance(o, (ClientReport, RoundTruth))
                      or (isinstance(o, str) and o in SIMULATOR_ONLY)],
            "vectors": [v for v in vectors if v is not None],
            "payloads": [type(m.payload) for m in argument] if hook in ("collusion", "server_observation") else [],
            "aggregate": None if aggregate is None else flatten(aggregate),
        })


def reachable(roots):
    """Every object reachable from ``roots`` through containers and attributes, except the runtime."""
    seen, stack = set(), list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, Runtime):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif not isinstance(obj, (torch.Tensor, np.ndarray, bytes, str)) and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())


def vector(obj, like) -> torch.Tensor | None:
    """``obj`` read as an update, if it can be: a state of the model's parameters, or a vector of the
    update's length (a masked vector read as fixed point)."""
    size = sum(t.numel() for t in like.values())
    if isinstance(obj, dict) and obj.keys() == like.keys():
        return flatten(obj).double()
    if isinstance(obj, np.ndarray) and obj.size == size:
        return torch.from_numpy(decode(obj, BITS) if obj.dtype == np.uint64 else obj.astype(np.float64))
    if isinstance(obj, torch.Tensor) and obj.numel() == size:
        return obj.reshape(-1).double()
    return None


def distance(v, update: torch.Tensor) -> float:
    """‖v − update‖ / ‖update‖: 0 when v is the update, 1 for a zero guess, more for a random one."""
    v = torch.as_tensor(v, dtype=torch.float64)
    return float((v - update).norm() / update.norm())


@pytest.fixture
def parties(monkeypatch):
    for cls in (Witness, Spy):
        monkeypatch.setitem(loaded_plugins(), cls.name, cls)
    monkeypatch.setattr(Witness, "sent", {})
    monkeypatch.setattr(Spy, "views", [])
    monkeypatch.setattr(Spy, "recovered", {})
    monkeypatch.setattr(Spy, "scored", [])


def spied_run(tiny, defense: str | None):
    """Two rounds of three clients, client 0 attacking (so a malicious mark exists), watched by the spy."""
    tiny["federation"].update(clients_per_round=3)
    tiny["attacks"] = [{"name": "sign_flip", "clients": [0]}, {"name": "witness"}, {"name": "spy"},
                       {"name": "update_probe"}]
    tiny["defenses"] = [{"name": defense}] if defense else []
    return run(tiny)


def true_updates(rnd: int) -> dict[int, torch.Tensor]:
    return {cid: flatten(m.payload).double() for (r, cid), m in Witness.sent.items() if r == rnd}


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("defense", [None, "he_aggregation", "secure_aggregation"])
def test_no_server_side_hook_can_reach_the_simulators_truth(tiny, parties, defense):
    """Whatever the transport, a server-side hook gets the round's public facts and the messages: no report,
    no truth, no plaintext note, no malicious mark. The scorer gets all of them."""
    spied_run(tiny, defense)
    assert {v["hook"] for v in Spy.views} == {"dispatch", "collusion", "server_observation", "post_aggregation"}
    for view in Spy.views:
        assert view["fields"] == {"round", "runtime", "sampled", "global_state", "delivered", "dispatched",
                                  "isolated"}, view["hook"]
        assert view["truth"] == [], view["hook"]
    for truth in Spy.scored:  # the scorer is where the truth goes
        assert truth.trained() and truth.malicious_clients() <= {0}
        if defense == "he_aggregation":
            assert set(truth.notes(PLAINTEXT_NOTE)) == set(truth.trained())
    assert any(truth.malicious_clients() == {0} for truth in Spy.scored)  # client 0 was sampled at least once


@pytest.mark.parametrize("defense", ["he_aggregation", "secure_aggregation"])
def test_under_a_hiding_transport_no_individual_update_is_reachable_but_the_aggregate_is_fedavg(tiny, parties, defense):
    """Everything the spy's arguments reach, read as an update (the global state, the model the runtime
    holds, masked vectors as fixed point), is far from every client's true update; under plain FedAvg the
    same search finds each of them exactly (the search works). The aggregate is still plain FedAvg's."""
    final = spied_run(tiny, defense).final
    assert final["probe.readable_fraction"] == 0.0
    for view in Spy.views:
        updates = true_updates(view["round"])
        assert len(updates) == 3
        expected = {"he_aggregation": EncryptedUpdate, "secure_aggregation": MaskedUpdate}[defense]
        assert set(view["payloads"]) <= {expected}
        closest = min(distance(v, u) for v in view["vectors"] for u in updates.values())
        assert closest > 0.5, (view["hook"], closest)
        if view["aggregate"] is not None:
            sent = [m for (r, _), m in Witness.sent.items() if r == view["round"]]
            mean = flatten(fedavg(sent, like=sent[0].payload))
            n = sum(m.num_examples for m in sent)
            bound = CKKS_TOLERANCE if defense == "he_aggregation" else 3 * 2.0 ** -(BITS + 1) / n + 1e-8
            assert (view["aggregate"] - mean).abs().max().item() < bound


def test_under_plain_fedavg_the_same_search_finds_every_update(tiny, parties):
    spied_run(tiny, None)
    observed = [v for v in Spy.views if v["hook"] == "server_observation"]
    for view in observed:
        for update in true_updates(view["round"]).values():
            assert min(distance(v, update) for v in view["vectors"]) < 1e-6


def test_a_server_side_plugin_cannot_unmask_an_update_even_knowing_the_scenario_seed(tiny, parties):
    """The issue's attack (masks recomputed from the scenario seed) and a fresh secure_aggregation instance's
    own keys both leave each recovered vector as far from the true update as random words are."""
    spied_run(tiny, "secure_aggregation")
    assert len(Spy.recovered) == 6  # 3 clients, 2 rounds
    for (rnd, cid), attempts in Spy.recovered.items():
        update = true_updates(rnd)[cid]
        for recovered in attempts:
            assert distance(recovered, update) > 1e6  # uniform words mod 2^64, read as fixed point

