"""The federation's data: a pool of examples split among clients, a held-out split, a public split, canaries.

Splits are disjoint by content, not only by row: every copy of a record lands in one
split (or, with ``data.duplicates: drop``, one copy is kept), so a held-out "non-member"
is never secretly a member and the tokenizer, trained on the public split, never sees a
client's record. What was dropped, cut or removed is counted in :attr:`FederatedData.counts`
and logged with the run (``data.*``).

User-level attacks need fresh records of a member user, records the federation never trained
on: with ``data.user_samples`` (partition natural, whole users held out) each client's
:attr:`FederatedData.user_samples` holds records of its user taken out of its part, and
:attr:`FederatedData.heldout_users` groups the held-out split by user.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ScenarioError
from ..scenario import DataConfig, Scenario
from .examples import Example
from .partition import natural_parts, partition
from .sources import read_records, to_examples
from .synthetic import Canary, make_canaries, synthetic_examples
from .templates import PromptRenderer

FRESH_TRIES = 100
"""Draws of the synthetic corpus before giving up on finding enough records unseen elsewhere."""
SATURATED = 0.01
"""A large draw (of :data:`SATURATION_DRAW` or more) whose share of new records is below this means the
corpus is used up: few topics have few distinct sentences, and 99 more draws would find next to nothing."""
SATURATION_DRAW = 100


@dataclass
class FederatedData:
    """Everything the simulation knows about data; a client's examples are assembled on demand."""

    pool: list[Example]
    parts: list[np.ndarray]
    heldout: list[Example]
    """Non-members from the clients' distribution: utility evaluation and membership attacks."""
    public: list[Example]
    """Neither members nor held out: what the tokenizer and any pretraining may see."""
    canaries: list[Canary]
    counts: dict[str, float] = field(default_factory=dict)
    """Figures about the data itself (data.duplicate_records, data.truncated_examples...), logged at round 0."""
    users: list[str] | None = None
    """partition natural: the user behind each client."""
    user_samples: list[list[Example]] = field(default_factory=list)
    """data.user_samples: per client, records of its user that are in no client's training (the fresh
    samples a user-level attacker holds); empty without it."""
    heldout_users: list[list[Example]] = field(default_factory=list)
    """data.heldout_by_user: the held-out split grouped by user, each user's distinct records, users in
    data order; empty without it."""

    @property
    def num_clients(self) -> int:
        return len(self.parts)

    def client_examples(self, client_id: int) -> list[Example]:
        examples = [self.pool[i] for i in self.parts[client_id]]
        for canary in self.canaries:
            if canary.client_id == client_id:
                examples.extend([canary.example] * canary.repetitions)
        return examples

    def num_examples(self, client_id: int) -> int:
        planted = sum(c.repetitions for c in self.canaries if c.client_id == client_id)
        return len(self.parts[client_id]) + planted

    def public_texts(self) -> list[str]:
        """The public split as a tokenizer trained on it reads it: prompts in the built-in template (a
        trained tokenizer has no chat template of its own), then the response."""
        renderer = PromptRenderer(None)
        return [renderer.full_text(e) for e in self.public]

    def members(self) -> list[Example]:
        """Every client's examples, once each."""
        return list(dict.fromkeys(e for cid in range(self.num_clients) for e in self.client_examples(cid)))


def build_federated_data(scenario: Scenario) -> FederatedData:
    """Deterministic in ``scenario.seed``: the same scenario always yields the same split."""
    cfg, fed = scenario.data, scenario.federation
    rng = random.Random(scenario.seed)
    np_rng = np.random.default_rng(scenario.seed)
    try:
        if cfg.source == "synthetic":
            data = _synthetic(cfg, fed.num_clients, scenario.public_examples, rng, np_rng)
        else:
            data = _from_records(cfg, fed.num_clients, scenario.public_examples, np_rng)
        if cfg.max_examples_per_client is not None:
            data.counts["data.capped_examples"] = float(sum(max(0, len(p) - cfg.max_examples_per_client) for p in data.parts))
            data.parts = [_cap(p, cfg.max_examples_per_client, np_rng) for p in data.parts]
        data.canaries = _plant(scenario, data, rng)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    return data


def _synthetic(
    cfg: DataConfig, num_clients: int, public_examples: int, rng: random.Random, np_rng: np.random.Generator
) -> FederatedData:
    def draw(count: int):
        return synthetic_examples(rng, count, cfg.topics, cfg.difficulty, cfg.format)

    pool, labels = draw(num_clients * cfg.examples_per_client)
    heldout = fresh(draw, cfg.heldout_examples, exclude=set(pool), what="data.heldout_examples")
    public = fresh(draw, public_examples, exclude=set(pool) | set(heldout), what="data.public_examples")
    parts = partition(len(pool), num_clients, cfg.partition, np_rng, labels)
    return FederatedData(pool, parts, heldout, public, canaries=[])


def fresh(draw, count: int, exclude: set[Example], what: str) -> list[Example]:
    """``count`` distinct examples outside ``exclude``: a held-out "non-member" is never secretly a member.

    Gives up (a ValueError naming ``what``) after :data:`FRESH_TRIES` draws, or as soon as a large draw
    brings almost nothing new: each draw costs as much as the records still missing, so with one
    topic and a million records asked, a hundred draws would take hours."""
    out: dict[Example, None] = {}
    for _ in range(FRESH_TRIES):
        wanted = count - len(out)
        before = len(out)
        batch, _ = draw(wanted)
        out.update((e, None) for e in batch if e not in exclude)
        if len(out) >= count:
            return list(out)[:count]
        if wanted >= SATURATION_DRAW and len(out) - before < SATURATED * wanted:
            break
    raise ValueError(
        f"{what}: the synthetic corpus gave only {len(out)} of {count} records unseen in the other splits (it has "
        "few distinct records with few data.topics); raise data.topics, or lower "
        f"{what} or data.examples_per_client"
    )


def _from_records(cfg: DataConfig, num_clients: int, public_examples: int, np_rng: np.random.Generator) -> FederatedData:
    frame = read_records(cfg)
    users = None
    if cfg.partition.method == "natural":
        if cfg.partition.by not in frame.columns:
            raise ValueError(f"data.partition.by: no column {cfg.partition.by!r} in the data "
                             f"(columns: {', '.join(map(str, frame.columns))})")
        users = frame[cfg.partition.by].astype(str).tolist()
    examples = to_examples(frame, cfg)
    keep = [i for i, e in enumerate(examples) if e is not None]
    counts = {"data.records": float(len(frame)), "data.empty_records": float(len(frame) - len(keep))}
    if cfg.duplicates == "drop":
        first = {}
        for i in keep:
            first.setdefault(examples[i], i)
        counts["data.duplicate_records"] = float(len(keep) - len(first))
        keep = sorted(first.values())
    by_user = cfg.heldout_by_user
    units = _units(keep, [users[i] for i in keep] if by_user else [examples[i] for i in keep])
    heldout_rows, public_rows, pool_rows = _split_units(units, [cfg.heldout_examples, public_examples], np_rng, len(keep))
    if not pool_rows:
        raise ValueError(f"data.heldout_examples: the held-out and public splits took all {len(keep)} records, which "
                         f"are {len(units)} distinct {'users' if by_user else 'records'} (the copies of one stay "
                         "together); add distinct records, or lower data.heldout_examples and data.public_examples")
    pool = [examples[i] for i in pool_rows]
    in_pool = set(pool)
    heldout_rows = [i for i in heldout_rows if examples[i] not in in_pool]
    heldout = [examples[i] for i in heldout_rows]
    seen = in_pool | set(heldout)
    public = [examples[i] for i in public_rows if examples[i] not in seen]
    counts["data.duplicate_records"] = counts.get("data.duplicate_records", 0.0) + float(
        len(heldout_rows) + len(public_rows) - len(heldout) - len(public)
    )
    if len(heldout) < 2:
        raise ValueError(f"data.heldout_examples: only {len(heldout)} held-out records are left once duplicates of "
                         "client records are removed; the data has too few distinct records")
    labels = None
    if cfg.partition.method == "dirichlet":
        if cfg.label_field not in frame.columns:
            raise ValueError(f"data.label_field: no column {cfg.label_field!r} for dirichlet partitioning")
        labels = frame[cfg.label_field].iloc[pool_rows].tolist()
    user_samples: list[list[Example]] = []
    if users is not None:
        parts, chosen, left_out = natural_parts([users[i] for i in pool_rows], num_clients, cfg.partition, np_rng)
        counts["data.users_left_out"] = float(left_out)
        if cfg.user_samples:
            parts, user_samples, short = _keep_user_samples(parts, pool, cfg.user_samples, cfg.partition.min_examples,
                                                            np_rng)
            counts["data.user_samples_short"] = float(short)
    else:
        parts, chosen = partition(len(pool), num_clients, cfg.partition, np_rng, labels), None
    held_out_units = _units(heldout_rows, [users[i] for i in heldout_rows]) if by_user else []
    heldout_users = [list(dict.fromkeys(examples[i] for i in unit)) for unit in held_out_units]
    return FederatedData(pool, parts, heldout, public, canaries=[], counts=counts, users=chosen,
                         user_samples=user_samples, heldout_users=heldout_users)


def _keep_user_samples(
    parts: list[np.ndarray], pool: list[Example], count: int, min_examples: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[list[Example]], int]:
    """Take a seeded choice of up to ``count`` records out of each client's part: its user's fresh samples.

    Only records that occur once among all the clients' records are eligible, so no copy of a
    held sample is trained on, by this client or another. A client keeps at least
    ``min_examples`` records to train on, so a small one gives fewer than ``count``.
    Returns (the parts left to train on, each client's samples, how many clients gave fewer).
    """
    occurrences = Counter(pool[i] for part in parts for i in part)
    kept, samples, short = [], [], 0
    for part in parts:
        unique = np.asarray([i for i in part if occurrences[pool[i]] == 1], dtype=np.int64)
        take = min(count, len(unique), len(part) - min_examples)
        held = np.sort(rng.choice(unique, size=take, replace=False))
        kept.append(np.setdiff1d(part, held))
        samples.append([pool[i] for i in held])
        short += take < count
    return kept, samples, short


def _units(rows: list[int], keys: list) -> list[list[int]]:
    """Rows grouped by key (the same record, or the same user), in first-seen order: a split takes whole units."""
    groups: dict = {}
    for row, key in zip(rows, keys):
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def _split_units(units: list[list[int]], sizes: list[int], rng: np.random.Generator, total: int):
    """Shuffle the units and fill each reserved split up to its size with whole units; the rest is the pool."""
    if total <= sum(sizes):
        raise ValueError(
            f"data.heldout_examples: with data.public_examples they take {sum(sizes)} records and leave no client "
            f"data from {total}; lower them, or add data"
        )
    order = rng.permutation(len(units))
    splits: list[list[int]] = [[] for _ in sizes]
    pool: list[int] = []
    current = 0
    for u in order:
        while current < len(sizes) and len(splits[current]) >= sizes[current]:
            current += 1
        (splits[current] if current < len(sizes) else pool).extend(units[u])
    return (*[sorted(s) for s in splits], sorted(pool))


def _cap(part: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return part if len(part) <= cap else np.sort(rng.choice(part, size=cap, replace=False))


def _plant(scenario: Scenario, data: FederatedData, rng: random.Random) -> list[Canary]:
    cfg, num_clients = scenario.data, data.num_clients
    spec = cfg.canaries
    count = cfg.canary_count
    if spec.clients == "random":
        holders = [rng.randrange(num_clients) for _ in range(count)]
    else:
        bad = [c for c in spec.clients if not 0 <= c < num_clients]
        if bad:
            raise ValueError(f"data.canaries.clients: {bad} are not client ids (0..{num_clients - 1})")
        holders = [spec.clients[i % len(spec.clients)] for i in range(count)]
    canaries = make_canaries(rng, count, list(spec.kinds), spec.repetitions, holders, prompted=cfg.is_prompted)
    return canaries + [_custom(i, count + i, custom, data, cfg, rng) for i, custom in enumerate(spec.custom)]


def _custom(position: int, index: int, spec, data: FederatedData, cfg: DataConfig, rng: random.Random) -> Canary:
    where = f"data.canaries.custom[{position}]"
    if cfg.is_prompted and spec.prompt is None:
        raise ValueError(f"{where}.prompt: with data.format {cfg.format} a canary is the answer to a question; set prompt")
    if not cfg.is_prompted and spec.prompt is not None:
        raise ValueError(f"{where}.prompt: data.format text has no prompts; put the whole sentence in text")
    prefix, _, suffix = spec.text.partition("{secret}")
    canary = Canary(index, "custom", prefix, spec.secret, spec.repetitions, -1, question=spec.prompt or "",
                    suffix=suffix, format=spec.format)
    if spec.repetitions == 0:
        return replace(canary, client_id=_holder_in_data(canary, data, where))
    if spec.client is not None and not 0 <= spec.client < data.num_clients:
        raise ValueError(f"{where}.client: {spec.client} is not a client id (0..{data.num_clients - 1})")
    return replace(canary, client_id=spec.client if spec.client is not None else rng.randrange(data.num_clients))


def _holder_in_data(canary: Canary, data: FederatedData, where: str) -> int:
    """The first client with a record whose response contains the canary's text (a secret the data holds)."""
    text = canary.example.response
    for client in range(data.num_clients):
        if any(text in data.pool[i].response for i in data.parts[client]):
            return client
    raise ValueError(f"{where}: repetitions 0 measures a secret the data already holds, but no client's record "
                     f"contains {text!r}; fix text and secret, or set repetitions ≥ 1 to plant it")
