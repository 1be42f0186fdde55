"""Split a pool of examples among clients: iid, Dirichlet label skew, quantity skew, or by user.

Only index arrays are built, one per client, so a federation of thousands of clients
costs a few integers per example, never a copy of the data or the model.
"""

from __future__ import annotations

import numpy as np

from ..scenario import PartitionConfig


def partition(
    num_items: int, num_clients: int, config: PartitionConfig, rng: np.random.Generator, labels: list | None = None
) -> list[np.ndarray]:
    needed = num_clients * config.min_examples
    if num_items < needed:
        raise ValueError(
            f"data.partition.min_examples: {num_items} examples cannot give {num_clients} clients "
            f"{config.min_examples} each; "
            "lower federation.num_clients or data.partition.min_examples, or add data"
        )
    if config.method == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(num_items), num_clients)]
    if config.method == "natural":
        raise ValueError("natural partitioning groups records by user: call natural_parts")
    if config.method == "quantity_skew":
        return _quantity_skew(num_items, num_clients, config, rng)
    if labels is None:
        raise ValueError("data.label_field: dirichlet partitioning needs a label per example; name a column of them")
    return _dirichlet(np.asarray(labels), num_clients, config, rng)


def _quantity_skew(num_items: int, num_clients: int, config: PartitionConfig, rng: np.random.Generator):
    """Client sizes are min_examples plus a Dirichlet(alpha) share of the rest."""
    spare = num_items - num_clients * config.min_examples
    sizes = config.min_examples + rng.multinomial(spare, rng.dirichlet([config.alpha] * num_clients))
    bounds = np.cumsum(sizes)[:-1]
    return [np.sort(part) for part in np.split(rng.permutation(num_items), bounds)]


def _dirichlet(labels: np.ndarray, num_clients: int, config: PartitionConfig, rng: np.random.Generator):
    """Per label, shares over clients ~ Dirichlet(alpha) (Hsu et al. 2019); redrawn until every client
    has min_examples, as is usual, and refused after a bounded number of tries."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet([config.alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= config.min_examples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"data.partition.alpha: dirichlet({config.alpha}) left a client with fewer than {config.min_examples} examples in "
        "100 draws; raise data.partition.alpha, lower data.partition.min_examples, or add data"
    )


def natural_parts(
    users: list[str], num_clients: int, config: PartitionConfig, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[str], int]:
    """One client per user (flwr-datasets' NaturalIdPartitioner): (parts, the chosen users, users left out).

    Users with fewer than ``min_examples`` records are left out. Of the rest, ``num_clients``
    are kept: the largest (ties in first-seen order) or, with ``select: random``, a seeded
    sample; each client's records stay in data order.
    """
    rows: dict[str, list[int]] = {}
    for row, user in enumerate(users):
        rows.setdefault(user, []).append(row)
    eligible = [u for u, r in rows.items() if len(r) >= config.min_examples]
    if len(eligible) < num_clients:
        raise ValueError(
            f"data.partition: natural partitioning found {len(eligible)} users with ≥ {config.min_examples} client "
            f"records (of {len(rows)} users); set federation.num_clients ≤ {len(eligible)} or lower "
            "data.partition.min_examples"
        )
    if config.select == "largest":
        chosen = sorted(eligible, key=lambda u: -len(rows[u]))[:num_clients]
    else:
        chosen = [eligible[i] for i in np.sort(rng.choice(len(eligible), size=num_clients, replace=False))]
    return [np.asarray(rows[u], dtype=np.int64) for u in chosen], chosen, len(rows) - num_clients
