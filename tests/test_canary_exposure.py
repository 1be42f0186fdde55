"""canary_exposure: the candidate spaces and the exposure math, then exposure growing with repetitions."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsec_bench import run
from fedsec_bench.attacks.canary_exposure import SPACES, exposure_exact, exposure_extrapolated
from fedsec_bench.data.synthetic import make_secret


@pytest.mark.parametrize("kind", sorted(SPACES))
def test_each_space_holds_the_secrets_make_secret_draws_and_samples_from_itself(kind):
    space, rng = SPACES[kind], random.Random(0)
    secrets = [make_secret(kind, rng) for _ in range(300)]
    sampled = space.sample(np.random.default_rng(0), 300)
    if space.size <= 200_000:
        everything = space.enumerate()
        assert len(set(everything)) == space.size  # no candidate rendered twice
        assert set(secrets) | set(sampled) <= set(everything)
    else:  # digit formats: a secret is the rendering of its own digits, one per slot
        digits = lambda s: tuple(c for c in s if c.isdigit())  # noqa: E731
        assert all(len(digits(s)) == len(space.slots) and space.render(digits(s)) == s for s in secrets + sampled)
        assert sorted(map(len, secrets)) == sorted(map(len, sampled))


def test_exact_exposure_is_log_space_minus_log_rank():
    rng = np.random.default_rng(0)
    px = rng.normal(50, 5, 1024)
    for index in (0, 17, 500):
        others = np.delete(px, index)
        rank = sorted(px).index(px[index]) + 1
        assert exposure_exact(px[index], others, 1024) == pytest.approx(10 - math.log2(rank))
    assert exposure_exact(px.min(), px[px > px.min()], 1024) == pytest.approx(10.0)  # most likely: log2 |R|


@pytest.mark.parametrize("fit", ["skewnorm", "normal"])
def test_extrapolated_exposure_agrees_with_exact_enumeration(fit):
    """Where Px follows the fitted family, a 2,000-sample fit recovers the exact exposure of a
    secret deep in the tail (rank 100 among 500,000, 12.3 bits) to within 1.5 bits: a factor < 3
    on a rank far beyond what the samples themselves resolve (log2 2000 ≈ 11 bits)."""
    rng = np.random.default_rng(1)
    shape = 2.0 if fit == "skewnorm" else 0.0
    px = stats.skewnorm.rvs(shape, loc=60, scale=6, size=500_000, random_state=rng)
    secret = np.sort(px)[99]
    exact = exposure_exact(secret, px[px != secret], px.size)
    sampled = rng.choice(px, 2000, replace=False)
    assert exposure_extrapolated(secret, sampled, px.size, fit) == pytest.approx(exact, abs=1.5)


def test_canaries_repeated_more_often_have_higher_exposure(tiny):
    tiny["tuning"] = {"mode": "full"}
    tiny["model"].update(layers=2, hidden=64)
    tiny["data"].update(seq_len=64, canaries={"count": 8, "kinds": ["name", "phone"], "repetitions": [1, 1, 16, 16]})
    tiny["federation"].update(num_clients=2, clients_per_round=2, rounds=4, local_steps=15, batch_size=8, lr=0.003)
    tiny["attacks"] = [{"name": "canary_exposure", "samples": 200}]
    result = run(tiny)
    table = pd.read_csv(result.run_dir / "artifacts" / "canary_exposure.csv")
    assert len(table) == 8 and set(table.method) == {"exact", "extrapolated (skewnorm)"}
    assert ((table.exposure >= 0) & (table.exposure <= table.log2_space + 1e-9)).all()
    final = result.final
    assert final["canary.exposure.rep_16"] > final["canary.exposure.rep_1"] + 2.0
    assert final["canary.extraction_rate.rep_16"] >= final["canary.extraction_rate.rep_1"]
