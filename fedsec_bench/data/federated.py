"""The federation's data: a pool of examples split among clients, a held-out split, and canaries."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..errors import ScenarioError
from ..scenario import DataConfig, Scenario
from .partition import partition
from .sources import read_records
from .synthetic import Canary, make_canaries, sentences


@dataclass
class FederatedData:
    """Everything the simulation knows about data; a client's texts are assembled on demand."""

    pool: list[str]
    parts: list[np.ndarray]
    heldout: list[str]
    """Non-members from the clients' distribution: utility evaluation and membership attacks."""
    public: list[str]
    """Neither members nor held out: what the tokenizer and any pretraining may see."""
    canaries: list[Canary]

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def client_texts(self, client_id: int) -> list[str]:
        texts = [self.pool[i] for i in self.parts[client_id]]
        for canary in self.canaries:
            if canary.client_id == client_id:
                texts.extend([canary.text] * canary.repetitions)
        return texts

    def num_examples(self, client_id: int) -> int:
        planted = sum(c.repetitions for c in self.canaries if c.client_id == client_id)
        return len(self.parts[client_id]) + planted


def build_federated_data(scenario: Scenario) -> FederatedData:
    """Deterministic in ``scenario.seed``: the same scenario always yields the same split."""
    cfg, fed = scenario.data, scenario.federation
    rng = random.Random(scenario.seed)
    np_rng = np.random.default_rng(scenario.seed)
    try:
        if cfg.source == "synthetic":
            pool, labels = sentences(rng, fed.num_clients * cfg.examples_per_client, cfg.topics, cfg.difficulty)
            heldout = fresh_sentences(rng, cfg.heldout_examples, cfg, exclude=set(pool))
            public = fresh_sentences(rng, cfg.public_examples, cfg, exclude=set(pool) | set(heldout))
        else:
            frame = read_records(cfg)
            order = np_rng.permutation(len(frame))
            reserved = cfg.heldout_examples + cfg.public_examples
            if len(frame) <= reserved:
                raise ValueError(
                    f"data.heldout_examples + data.public_examples ({reserved}) leave no client data "
                    f"from {len(frame)} rows"
                )
            texts = frame[cfg.text_field].astype(str).tolist()
            heldout = [texts[i] for i in order[: cfg.heldout_examples]]
            public = [texts[i] for i in order[cfg.heldout_examples : reserved]]
            train = order[reserved:]
            pool = [texts[i] for i in train]
            labels = frame[cfg.label_field].iloc[train].tolist() if cfg.label_field in frame.columns else None
            if labels is None and cfg.partition.method == "dirichlet":
                raise ValueError(f"data.label_field: no column {cfg.label_field!r} for dirichlet partitioning")
        parts = partition(len(pool), fed.num_clients, cfg.partition, np_rng, labels)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    return FederatedData(pool, parts, heldout, public, _plant(scenario, rng))


def fresh_sentences(rng: random.Random, count: int, cfg: DataConfig, exclude: set[str]) -> list[str]:
    """Sentences outside ``exclude``: a held-out "non-member" is never secretly a member."""
    out: list[str] = []
    while len(out) < count:
        batch, _ = sentences(rng, count - len(out), cfg.topics, cfg.difficulty)
        out.extend(s for s in batch if s not in exclude)
    return out


def _plant(scenario: Scenario, rng: random.Random) -> list[Canary]:
    spec, num_clients = scenario.data.canaries, scenario.federation.num_clients
    if spec.clients == "random":
        holders = [rng.randrange(num_clients) for _ in range(spec.count)]
    else:
        bad = [c for c in spec.clients if not 0 <= c < num_clients]
        if bad:
            raise ScenarioError(f"data.canaries.clients: {bad} are not client ids (0..{num_clients - 1})")
        holders = [spec.clients[i % len(spec.clients)] for i in range(spec.count)]
    return make_canaries(rng, spec.count, list(spec.kinds), spec.repetitions, holders)
