"""Pre-aggregators (bucketing, NNM) and the rules robust_lr, dnc and signguard: each against a
loop-by-loop implementation of its paper's definition on random inputs, at load time, and end
to end on the tiny setting (composition under ALIE; robust_lr under a scaled backdoor)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import DBSCAN, MeanShift, estimate_bandwidth
from test_poisoning import backdoor_scenario
from test_robust_rules import chosen as kept
from test_robust_rules import close as shared_close
from test_robust_rules import updates  # noqa: F401 - the fixture, shared

import fedsec_bench
from fedsec_bench.defenses import robust_rules as rr
from fedsec_bench.defenses import robust_statistics as rs
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import Message
from fedsec_bench.plan import load_scenario

# --------------------------------------------------------------------------- loop-by-loop references


def sq_dist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def row_mean(rows):
    return [sum(col) / len(rows) for col in zip(*rows)]


def sign(v):
    return (v > 0) - (v < 0)


def ref_bucketing(X, order, s):
    """Karimireddy et al. Algorithm 1: the permuted updates cut into groups of s, each averaged."""
    buckets = [order[k : k + s] for k in range(0, len(order), s)]
    return [row_mean([X[i] for i in b]) for b in buckets], buckets


def ref_nnm(X, f):
    """Allouah et al. Algorithm 1: each x_i → mean of its n − f nearest neighbours, itself included."""
    n = len(X)
    neighbourhoods = [sorted(range(n), key=lambda j: (sq_dist(X[i], X[j]), j != i, j))[: n - f] for i in range(n)]
    return [row_mean([X[j] for j in nb]) for nb in neighbourhoods], neighbourhoods


def ref_krum_choice(X, f):
    n = len(X)
    scores = [sum(sorted(sq_dist(X[i], X[j]) for j in range(n) if j != i)[: n - f - 2]) for i in range(n)]
    return min(range(n), key=lambda i: (scores[i], i))


def ref_robust_lr(X, alpha, theta):
    """Ozdayi et al. eq. 2-3: lr_j = +1 if |Σ_i sign(Δ_ij)| ≥ θ else −1; times the weighted mean."""
    total = sum(alpha)
    out = []
    for j in range(len(X[0])):
        votes = sum(sign(row[j]) for row in X)
        lr = 1.0 if abs(votes) >= theta else -1.0
        out.append(lr * sum(a * row[j] for a, row in zip(alpha, X)) / total)
    return out


def ref_dnc(X, removed, subsets):
    """Shejwalkar & Houmansadr Algorithm 2 with numpy's SVD."""
    X = np.asarray(X)
    n = len(X)
    good = set(range(n))
    for r in subsets:
        sub = X[:, r]
        mu = sub.mean(0)
        v = np.linalg.svd(sub - mu, full_matrices=False)[2][0]
        scores = [float(np.dot(sub[i] - mu, v)) ** 2 for i in range(n)]
        good &= set(sorted(range(n), key=lambda i: (scores[i], i))[: n - removed])
    return row_mean([X[i].tolist() for i in sorted(good)]) if good else [0.0] * X.shape[1], good


def ref_signguard(X, low, high, coordinates, clustering):
    """Xu et al. Algorithm 1, as their reference code: norm ratios in [L, R], the largest cluster of the
    max-normalised (positive, zero, negative) fractions, their intersection clipped to the median norm."""
    n = len(X)
    norms = [sum(x * x for x in row) ** 0.5 for row in X]
    med = float(np.median(norms))
    by_norm = {i for i in range(n) if low <= norms[i] / med <= high}
    features = []
    for row in X:
        values = [row[c] for c in coordinates]
        features.append([sum(sign(v) == t for v in values) / len(values) for t in (1, 0, -1)])
    features = np.asarray(features)
    features = features / (features.max(0) + 1e-8)
    if clustering == "dbscan":
        labels = DBSCAN(eps=0.05, min_samples=2).fit(features).labels_
    else:
        bw = estimate_bandwidth(features, quantile=0.5)
        labels = MeanShift(bandwidth=bw, bin_seeding=True, cluster_all=False).fit(features).labels_
    clusters = [lab for lab in labels if lab >= 0]
    largest = max(set(clusters), key=lambda lab: (clusters.count(lab), -lab))
    kept = sorted(by_norm & {i for i in range(n) if labels[i] == largest})
    clipped = [[x * min(1.0, med / norms[i]) for x in X[i]] for i in kept]
    return row_mean(clipped), set(kept)


def close(actual, expected, tol=1e-12):
    shared_close(actual, expected, tol)


# --------------------------------------------------------------------------- pre-aggregators against their definitions


@pytest.mark.parametrize("s", [1, 2, 3, 11])
def test_bucketing_matches_definition(updates, s):
    """The permutation is the generator's randperm; ⌈n/s⌉ bucket means, the last bucket shorter."""
    order = torch.randperm(11, generator=torch.Generator().manual_seed(7)).tolist()
    expected, buckets = ref_bucketing(updates.tolist(), order, s)
    got = rs.bucketing(updates, s, torch.Generator().manual_seed(7))
    assert got.rows.shape[0] == -(-11 // s)
    close(got.rows, expected)
    for k, members in enumerate(buckets):
        assert kept(got.weights[k]) == set(members)


@pytest.mark.parametrize("f", [0, 1, 3, 10])
def test_nnm_matches_definition(updates, f):
    expected, neighbourhoods = ref_nnm(updates.tolist(), f)
    got = rs.nnm(updates, f)
    close(got.rows, expected)
    assert [kept(w) for w in got.weights] == [set(nb) for nb in neighbourhoods]


def test_nnm_keeps_a_vector_among_its_neighbours_beside_an_exact_duplicate():
    X = torch.tensor([[0.0], [0.0], [5.0]])
    assert kept(rs.nnm(X, 2).weights[1]) == {1}


def round_of(X, rnd=1):
    messages = [Message.of_update(i, 10 + i, {"w": x.clone()}) for i, x in enumerate(X)]
    return type("Round", (), {"round": rnd, "global_state": {"w": torch.zeros_like(X[0])}})(), messages


def test_krum_after_nnm_gives_its_choice_back_to_the_clients_it_mixed(updates):
    """Krum on the mixed vectors picks one of them; its share is split over the n − f neighbours
    that vector averaged (1/(n − f) each), and the aggregate is that mixed vector."""
    f = 2
    mixed, neighbourhoods = ref_nnm(updates.tolist(), f)
    choice = ref_krum_choice(mixed, f)
    rule = rr.Krum(rr.FOptions(f=f, pre=["nnm"]), runtime=None)
    aggregate = rule.aggregation(*round_of(updates))["w"]
    close(aggregate, mixed[choice])
    expected = {j: (1 / (11 - f) if j in neighbourhoods[choice] else 0.0) for j in range(11)}
    assert rule.shares == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("s, n, shares", [(4, 4, [1 / 4] * 4), (2, 4, [1 / 4] * 4), (3, 9, [0.0] * 6 + [1 / 3] * 3)])
def test_median_after_bucketing_splits_each_buckets_share_among_its_members(s, n, shares):
    """Rows i·(1, −2), so that whatever the permutation the buckets are ordered alike in both
    coordinates: one bucket, or two (the median of two is their mean), give every client 1/n; of
    three buckets the median is the middle one, whose three members share it equally."""
    X = torch.arange(float(n), dtype=torch.float64)[:, None] * torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    runtime = type("Runtime", (), {"seed_for": lambda self, *keys: sum(keys)})()
    rule = rr.Median(rr.RuleOptions(pre=[{"name": "bucketing", "s": s}]), runtime)
    aggregate = rule.aggregation(*round_of(X))["w"]
    assert sorted(rule.shares.values()) == pytest.approx(shares)
    if n // s < 3:
        close(aggregate, X.mean(0).tolist())


def test_pre_aggregators_chain_in_order(updates):
    """bucketing then nnm: nnm's rows are bucket means mixed, and the weights compose."""
    runtime = type("Runtime", (), {"seed_for": lambda self, *keys: 5})()
    rule = rr.Median(rr.RuleOptions(pre=[{"name": "bucketing", "s": 2}, {"name": "nnm", "f": 1}]), runtime)
    buckets = rs.bucketing(updates, 2, torch.Generator().manual_seed(5))
    expected, _ = ref_nnm(buckets.rows.tolist(), 1)
    got = rule.pre_aggregate(updates)
    close(got.rows, expected)
    torch.testing.assert_close(got.weights @ updates, got.rows, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got.weights.sum(1), torch.ones(6, dtype=updates.dtype))


# --------------------------------------------------------------------------- the rules against their definitions


@pytest.mark.parametrize("theta", [1, 3, 6, 11])
def test_robust_lr_matches_definition(updates, theta):
    alpha = torch.arange(1, 12, dtype=torch.float64)
    expected = ref_robust_lr(updates.tolist(), alpha.tolist(), theta)
    got = rs.robust_lr(updates, alpha, theta)
    close(got.aggregate, expected)
    assert torch.equal(got.share, torch.full((11,), 1 / 11, dtype=torch.float64))  # everyone kept


@pytest.mark.parametrize("removed, niters, b", [(1, 1, 7), (2, 3, 4), (3, 5, 3), (6, 5, 2)])
def test_dnc_matches_definition(updates, removed, niters, b):
    gen = torch.Generator().manual_seed(removed)
    subsets = [torch.randperm(7, generator=gen)[:b] for _ in range(niters)]
    expected, good = ref_dnc(updates.numpy(), removed, [r.numpy() for r in subsets])
    got = rs.dnc(updates, removed, subsets)
    assert kept(got.share) == good
    close(got.aggregate, expected)


def test_dnc_drops_the_outlier_along_the_top_direction():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(9, 50, generator=gen, dtype=torch.float64)
    X[4] += 20.0
    assert 4 not in kept(rs.dnc(X, 1, [torch.arange(50)]).share)


@pytest.mark.parametrize("clustering", ["meanshift", "dbscan"])
def test_signguard_matches_definition(clustering):
    """12 clients by 200 values: 8 honest (mostly positive), a sign flipper, a huge and a tiny update,
    and one update with many zeros; every filter has something to do."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        X = torch.randn(12, 200, generator=gen, dtype=torch.float64) + 0.5
        X[8] *= -1
        X[9] *= 10.0
        X[10] *= 0.01
        X[11, ::2] = 0.0
        coordinates = torch.randperm(200, generator=gen)[:60]
        expected, good = ref_signguard(X.tolist(), 0.1, 3.0, coordinates.tolist(), clustering)
        got = rs.signguard(X, 0.1, 3.0, coordinates, clustering)
        assert kept(got.share) == good, (seed, clustering)
        close(got.aggregate, expected)
        assert not good & {8, 9, 10}


# --------------------------------------------------------------------------- load-time refusals


@pytest.mark.parametrize(
    "aggregator, message",
    [
        ({"name": "krum", "f": 1, "pre": [{"name": "bucketing", "s": 2}]},
         "krum needs n ≥ 2f+3: got n=4, f=1 (after pre: bucketing) (n = federation.clients_per_round)"),
        ({"name": "median", "pre": ["nnm"]}, "pre: nnm needs f when the rule has none of its own"),
        ({"name": "median", "pre": [{"name": "nnm", "f": 8}]}, "nnm needs f < n: got n=8, f=8"),
        ({"name": "krum", "pre": ["mixing"]}, "unknown pre-aggregator 'mixing': the known ones are bucketing, nnm"),
        ({"name": "geomedian", "pre": [{"name": "nnm", "f": 1}]}, "pre: geomedian cannot take pre-aggregators"),
        ({"name": "robust_lr", "threshold": 2, "pre": [{"name": "nnm", "f": 1}]}, "pre: robust_lr cannot take"),
        ({"name": "robust_lr", "threshold": 9}, "robust_lr needs threshold θ ≤ n"),
        ({"name": "robust_lr", "threshold": 0}, "federation.aggregator.threshold: Input should be greater than or equal to 1"),
        ({"name": "robust_lr"}, "federation.aggregator.threshold: Field required"),
        ({"name": "dnc", "f": 8}, "dnc needs n − ⌊c·f⌋ ≥ 1: got n=8, c=1.0, f=8"),
        ({"name": "signguard", "low": 1.5}, "signguard needs low < 1 < high"),
    ],
)
def test_impossible_parameters_are_refused_at_load_time(tiny, aggregator, message):
    tiny["federation"].update(num_clients=10, clients_per_round=8, aggregator=aggregator)
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(tiny)


# --------------------------------------------------------------------------- end to end on the tiny setting


def alie_run(tiny, aggregator):
    """10 clients, all in every round, 3 of them sending ALIE's mean − z·std (Baruch et al. 2019)."""
    s = copy.deepcopy(tiny)
    s["tuning"] = {"mode": "full"}
    s["data"]["canaries"] = {"count": 0}
    s["federation"].update(num_clients=10, clients_per_round=10, rounds=2, local_steps=2, aggregator=aggregator)
    s["attacks"] = [{"name": "alie", "clients": 0.3}]
    result = fedsec_bench.run(s)
    return result, pd.read_csv(result.run_dir / "artifacts" / "robust_selection.csv")


def test_composed_rules_run_and_report_about_real_clients(tiny):
    """krum after nnm (Allouah et al.), and median after bucketing (Karimireddy et al.), under ALIE:
    the selection table lists the 10 real clients each round, their shares sum to 1, and the
    three attackers are the ones marked malicious. Allouah et al.'s claim: krum with NNM ends no
    worse than krum alone (ALIE's vector sits in the honest cloud's centre, so Krum alone picks it)."""
    krum, _ = alie_run(tiny, {"name": "krum", "f": 3})
    runs = {
        "krum+nnm": alie_run(tiny, {"name": "krum", "f": 3, "pre": ["nnm"]}),
        "median+bucketing": alie_run(tiny, {"name": "median", "pre": [{"name": "bucketing", "s": 2}]}),
    }
    for name, (result, table) in runs.items():
        for _, rows in table.groupby("round"):
            assert sorted(rows.client_id) == list(range(10)), name
            assert rows.share.sum() == pytest.approx(1.0), name
            assert rows.malicious.sum() == 3, name
        assert 1 <= result.final["robust.selected"] <= 10, name
    report = {"krum": krum.final["utility.eval_loss"], "krum+nnm": runs["krum+nnm"][0].final["utility.eval_loss"]}
    assert report["krum+nnm"] <= report["krum"], report
    assert runs["krum+nnm"][0].final["robust.malicious_share"] < krum.final["robust.malicious_share"], report


def test_robust_lr_takes_the_scaled_backdoor_below_fedavgs_asr(tiny):
    """Ozdayi et al. 2021: one boosted backdoor client cannot win the sign vote on its coordinates,
    where the server's learning rate turns against it; under FedAvg the backdoor lands."""
    def asr(aggregator):
        return fedsec_bench.run(backdoor_scenario(tiny, aggregator)).metrics["poison.backdoor_asr"].iloc[-1]

    fedavg, robust = asr("fedavg"), asr({"name": "robust_lr", "threshold": 4})
    assert fedavg >= 0.75 and robust < fedavg / 2, {"fedavg": fedavg, "robust_lr": robust}
