"""Robust aggregation rules: each against a loop-by-loop implementation of its paper's
definition and against numpy, on hand-made cases, at load time, and end to end under a
sign-flip attack."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch

import fedsec_bench
from fedsec_bench.defenses import robust_rules as rr
from fedsec_bench.defenses import robust_statistics as rs
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import Message
from fedsec_bench.plan import load_scenario

# --------------------------------------------------------------------------- loop-by-loop references


def sq_dist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def ref_krum_scores(X, f, min_neighbours=0):
    n = len(X)
    scores = []
    for i in range(n):
        d = sorted(sq_dist(X[i], X[j]) for j in range(n) if j != i)
        scores.append(sum(d[: max(n - f - 2, min_neighbours)]))
    return scores


def ref_multikrum(X, f, m):
    scores = ref_krum_scores(X, f)
    chosen = sorted(range(len(X)), key=lambda i: (scores[i], i))[:m]
    return [sum(X[i][c] for i in chosen) / m for c in range(len(X[0]))], set(chosen)


def ref_median_1d(values):
    v, n = sorted(values), len(values)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ref_trimmed_1d(values, b):
    v = sorted(values)[b : len(values) - b]
    return sum(v) / len(v)


def ref_bulyan(X, f):
    n = len(X)
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        sub = [X[i] for i in remaining]
        scores = ref_krum_scores(sub, f, min_neighbours=1 if len(sub) > 1 else 0)
        best = min(range(len(sub)), key=lambda i: (scores[i], i))
        chosen.append(remaining.pop(best))
    out = []
    for c in range(len(X[0])):
        column = [X[i][c] for i in chosen]
        med = ref_median_1d(column)
        closest = sorted(column, key=lambda v: abs(v - med))[:beta]
        out.append(sum(closest) / beta)
    return out, set(chosen)


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def ref_norm_bound(X, M):
    scaled = [[x * min(1.0, M / norm(row)) for x in row] for row in X]
    return [sum(col) / len(X) for col in zip(*scaled)]


def ref_centered_clip(X, v, tau, iterations):
    n = len(X)
    for _ in range(iterations):
        step = [0.0] * len(v)
        for row in X:
            diff = [x - y for x, y in zip(row, v)]
            factor = min(1.0, tau / norm(diff))
            step = [s + d * factor / n for s, d in zip(step, diff)]
        v = [a + b for a, b in zip(v, step)]
    return v


def ref_geomedian(X, alpha, nu, max_iter, ftol):
    total = sum(alpha)
    alpha = [a / total for a in alpha]

    def objective(v):
        return sum(a * norm([x - y for x, y in zip(row, v)]) for a, row in zip(alpha, X))

    v = [sum(a * row[c] for a, row in zip(alpha, X)) for c in range(len(X[0]))]
    g = objective(v)
    for _ in range(max_iter):
        beta = [a / max(nu, norm([x - y for x, y in zip(row, v)])) for a, row in zip(alpha, X)]
        v = [sum(b * row[c] for b, row in zip(beta, X)) / sum(beta) for c in range(len(X[0]))]
        previous, g = g, objective(v)
        if abs(previous - g) < ftol * g:
            break
    return v


@pytest.fixture(params=[0, 1, 2])
def updates(request):
    """Random updates in float64: 11 clients (odd n) by 7 values, a few of them far off."""
    gen = torch.Generator().manual_seed(request.param)
    X = torch.randn(11, 7, generator=gen, dtype=torch.float64)
    X[:2] += 5.0 * torch.randn(2, 7, generator=gen, dtype=torch.float64)
    return X


def close(actual, expected, tol=1e-6):
    assert torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol), (actual, expected)


def chosen(share):
    return set(torch.nonzero(share > 0).flatten().tolist())


# --------------------------------------------------------------------------- each rule against its definition


@pytest.mark.parametrize("f, m", [(1, 1), (2, 1), (2, 4), (3, 8)])
def test_multikrum_matches_definition(updates, f, m):
    expected, expected_chosen = ref_multikrum(updates.tolist(), f, m)
    got = rs.multikrum(updates, f, m)
    assert chosen(got.share) == expected_chosen
    close(got.aggregate, expected)
    if m == 1:
        assert torch.equal(rs.krum(updates, f).aggregate, updates[expected_chosen.pop()])


@pytest.mark.parametrize("n", [10, 11])
def test_median_matches_definition_odd_and_even(updates, n):
    X = updates[:n]
    expected = [ref_median_1d(col) for col in zip(*X.tolist())]
    assert rs.median(X).aggregate.tolist() == expected  # exact: an order statistic (or the mean of two)


@pytest.mark.parametrize("b", [0, 1, 3, 5])
def test_trimmed_mean_matches_definition(updates, b):
    expected = [ref_trimmed_1d(col, b) for col in zip(*updates.tolist())]
    close(rs.trimmed_mean(updates, b).aggregate, expected, tol=1e-12)


def test_order_statistics_agree_with_a_full_sort_for_every_n_and_b():
    """Against a full sort, n = 1..33 and every b: exact on values with ties and ±∞, and each
    client's share is its fraction of the kept values when there are no ties."""
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 34):
        ties = torch.randint(-3, 4, (n, 40), generator=gen).double()
        ties[torch.rand(n, 40, generator=gen) < 0.05] = math.inf
        ties[torch.rand(n, 40, generator=gen) < 0.05] = -math.inf
        distinct = torch.rand(n, 40, generator=gen, dtype=torch.float64)
        values, owner = distinct.sort(dim=0)
        for b in range((n + 1) // 2):
            expected = ties.sort(dim=0).values[b : n - b].mean(0)
            got = rs.trimmed_mean(ties, b).aggregate
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"n={n}, b={b}")
            kept = owner[b : n - b]
            got = rs.trimmed_mean(distinct, b)
            close(got.aggregate, values[b : n - b].mean(0).tolist(), tol=1e-12)
            share = torch.bincount(kept.flatten(), minlength=n).double() / kept.numel()
            assert torch.allclose(got.share, share), (n, b)


def test_a_nan_is_trimmed_as_a_largest_value():
    X = torch.tensor([[1.0], [2.0], [math.nan], [3.0], [4.0]])
    assert rs.trimmed_mean(X, 1).aggregate.item() == 3.0 and rs.trimmed_mean(X, 1).share[2] == 0
    assert rs.median(X[:3]).aggregate.item() == 2.0


def test_a_huge_value_does_not_cost_the_trimmed_mean_its_precision():
    """The kept sum is taken over values clamped to the cut values, so a dropped value near
    float32's limit leaves the kept ones' mean as precise as a direct mean of them."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(9, 1000, generator=gen)
    X[4] = 3e38
    X[7, ::2] = -3e38
    expected = X.double().sort(dim=0).values[2:7].mean(0)
    torch.testing.assert_close(rs.trimmed_mean(X, 2).aggregate.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, b", [(9, 2), (6, 2)])  # a trimmed mean; the median of an even count
def test_order_statistics_with_nan_and_infinities_match_a_full_sort(n, b):
    """NaN counts as +∞ and the infinities stay infinite in a column that holds a NaN; the
    shares are those of the same updates with the NaN written as +∞."""
    gen = torch.Generator().manual_seed(n)
    X = torch.randint(-3, 4, (n, 300), generator=gen).double()
    X[torch.rand(n, 300, generator=gen) < 0.05] = math.inf
    X[torch.rand(n, 300, generator=gen) < 0.05] = -math.inf
    X[0, 7] = math.nan
    got = rs.trimmed_mean(X, b)
    as_infinity = torch.where(X.isnan(), math.inf, X)
    expected = as_infinity.sort(dim=0).values[b : n - b].mean(0)
    torch.testing.assert_close(got.aggregate, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.share, rs.trimmed_mean(as_infinity, b).share)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_trimmed_mean_is_the_float32_one_rounded(dtype):
    """Half-precision updates are summed, and the cut values subtracted, in float32: the
    result is the float32 trimmed mean rounded once."""
    X = torch.randn(7, 5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = X.float().sort(dim=0).values[1:6].mean(0).to(dtype)
    assert torch.equal(rs.trimmed_mean(X, 1).aggregate, expected)


def test_krum_keeps_its_choice_among_honest_clients_beside_a_huge_attacker():
    """float32 updates, two attackers a million times larger: the honest clients' distances
    to each other stay exact enough that Krum chooses as it does in float64."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(10, 100_000, generator=gen)
    X[:8] *= torch.linspace(0.5, 2.0, 8)[:, None]  # honest clients at distinct spreads
    X[8:] = 1e6 * torch.randn(2, 100_000, generator=gen)
    exact = torch.cdist(X.double(), X.double()) ** 2
    torch.testing.assert_close(rs.pairwise_sq_distances(X)[:8, :8].double(), exact[:8, :8], rtol=1e-4, atol=1e-3)
    assert torch.equal(rs.krum(X, 2).share, rs.krum(X.double(), 2).share.float())


def test_rules_agree_across_column_chunks(monkeypatch):
    """Coordinates processed in column chunks (here of 997 values: 142 columns of 7 clients,
    the last chunk shorter) give the whole-matrix results: exactly for the order statistics
    and the shares, to rounding for the sums of squares."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(7, 5_000, generator=gen, dtype=torch.float64)
    start = 0.5 * X.mean(0)
    tau = float((X - start).norm(dim=1).median())  # clips some updates, not all
    rules = {
        "median": rs.median,
        "trimmed_mean": lambda X: rs.trimmed_mean(X, 2),
        "bulyan": lambda X: rs.bulyan(X, 1),
        "krum": lambda X: rs.multikrum(X, 1, 3),
        "centered_clip": lambda X: rs.centered_clip(X, start, tau, 2),
        "geomedian": lambda X: rs.geomedian(X, torch.arange(1.0, 8.0, dtype=X.dtype), 1e-6, 4, 0.0),
    }
    whole = {name: rule(X) for name, rule in rules.items()}
    monkeypatch.setattr(rs, "CHUNK_VALUES", 997)
    assert len(list(rs.column_chunks(X))) == 36
    torch.testing.assert_close(rs.pairwise_sq_distances(X), torch.cdist(X, X) ** 2, rtol=1e-9, atol=1e-6)
    for name, rule in rules.items():
        chunked, exact = rule(X), name in ("median", "trimmed_mean", "bulyan")
        tol = 0 if exact else 1e-12
        torch.testing.assert_close(chunked.aggregate, whole[name].aggregate, rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(chunked.share, whole[name].share, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("n", [7, 15, 23])
def test_bulyan_matches_definition_for_more_clients(n):
    """Every admissible f; in the last selections mutual nearest neighbours tie exactly,
    and the lower client index is selected, as in the definition's loop."""
    gen = torch.Generator().manual_seed(n)
    X = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    X[:2] += 5.0 * torch.randn(2, 7, generator=gen, dtype=torch.float64)
    for f in range((n - 3) // 4 + 1):
        expected, expected_chosen = ref_bulyan(X.tolist(), f)
        got = rs.bulyan(X, f)
        assert chosen(got.share) <= expected_chosen
        close(got.aggregate, expected, tol=1e-12)


@pytest.mark.parametrize("f", [0, 1, 2])
def test_bulyan_matches_definition(updates, f):
    expected, expected_chosen = ref_bulyan(updates.tolist(), f)
    got = rs.bulyan(updates, f)
    assert chosen(got.share) <= expected_chosen
    close(got.aggregate, expected, tol=1e-12)


def test_norm_bound_matches_definition(updates):
    close(rs.norm_bound(updates, 2.0).aggregate, ref_norm_bound(updates.tolist(), 2.0))


@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clip_matches_definition(updates, iterations):
    start = updates.mean(0) * 0.5
    expected = ref_centered_clip(updates.tolist(), start.tolist(), 1.5, iterations)
    close(rs.centered_clip(updates, start, 1.5, iterations).aggregate, expected)


@pytest.mark.parametrize("max_iter, ftol", [(1, 0.0), (4, 1e-6), (50, 0.0)])
def test_geomedian_matches_definition(updates, max_iter, ftol):
    alpha = torch.arange(1, 12, dtype=torch.float64)
    expected = ref_geomedian(updates.tolist(), alpha.tolist(), 1e-6, max_iter, ftol)
    close(rs.geomedian(updates, alpha, 1e-6, max_iter, ftol).aggregate, expected)


# --------------------------------------------------------------------------- hand-made cases


def test_krum_picks_the_centre_of_the_honest_cluster():
    X = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 0.1], [50.0, 50.0], [-40.0, 60.0]])
    # Scores with f=1 (n − f − 2 = 3 neighbours): (0.1, 0.1) has the nearest three.
    result = rs.krum(X, f=1)
    assert torch.equal(result.aggregate, X[3]) and result.share.tolist() == [0, 0, 0, 1, 0, 0]


def test_median_of_an_even_count_averages_the_two_middle_values():
    X = torch.tensor([[1.0, -4.0], [2.0, 10.0], [100.0, 0.0], [3.0, 2.0]])
    assert rs.median(X).aggregate.tolist() == [2.5, 1.0]


def test_trimmed_mean_and_bulyan_by_hand():
    column = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]])
    assert rs.trimmed_mean(column, 1).aggregate.item() == 2.0
    X = torch.tensor([[0.0], [0.1], [0.2], [0.3], [0.4], [0.5], [50.0]])  # n = 7 = 4f + 3 with f = 1
    result = rs.bulyan(X, f=1)
    assert result.share[6] == 0 and 0.0 < result.aggregate.item() < 0.5


def test_shares_give_precision_and_recall_of_exclusion():
    shares = {0: 0.0, 1: 0.0, 2: 0.5, 3: 0.5}
    figures, rows = rr.selection_figures(shares, malicious={1, 3})
    assert figures["robust.selected"] == 2
    assert figures["robust.exclusion_precision"] == 0.5  # excluded {0, 1}: one truly malicious
    assert figures["robust.exclusion_recall"] == 0.5  # malicious {1, 3}: one excluded
    assert figures["robust.malicious_share"] == 0.5
    assert [r["excluded"] for r in rows] == [True, True, False, False]


# --------------------------------------------------------------------------- load-time refusals


@pytest.mark.parametrize(
    "aggregator, per_round, message",
    [
        ({"name": "bulyan", "f": 2}, 8, "bulyan needs n ≥ 4f+3: got n=8, f=2"),
        ({"name": "krum", "f": 3}, 8, "krum needs n ≥ 2f+3: got n=8, f=3"),
        ({"name": "multikrum", "f": 1, "m": 9}, 8, "multikrum needs m ≤ n: got n=8, m=9"),
        ({"name": "trimmed_mean", "trim": 4}, 8, "trimmed_mean needs n − 2b ≥ 1: got n=8, b=4"),
        ({"name": "trimmed_mean", "trim": 0.5}, 8, "trimmed_mean needs a fraction trim < 0.5"),
    ],
)
def test_impossible_parameters_are_refused_at_load_time(tiny, aggregator, per_round, message):
    tiny["federation"].update(num_clients=10, clients_per_round=per_round, aggregator=aggregator)
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(tiny)


def test_a_defense_that_hides_updates_is_refused_with_a_robust_rule(tiny, register):
    """Robust rules declare ``needs_plain_updates``; the load-time check holds it against a
    transport defense that sends no plain update (the test package's opaque_transport) and names both."""
    assert rr.RobustAggregator.needs_plain_updates and rr.Median.needs_plain_updates
    tiny["federation"]["aggregator"] = "median"
    tiny["defenses"] = [{"name": "opaque_transport"}]
    with pytest.raises(ScenarioError, match=r"(?s)federation\.aggregator \(median\).*plain update.*defenses\[0\] \(opaque_transport\)"):
        load_scenario(tiny)


def test_encrypted_updates_are_refused_with_the_reason(tiny):
    rule = rr.Median(rr.Median.OptionsModel(), runtime=None)
    round = type("Round", (), {"round": 1, "global_state": {"w": torch.zeros(2)}})()
    with pytest.raises(TypeError, match="median needs each client's plain update, but client 0 sent a bytes"):
        rule.aggregation(round, [Message(0, 1, b"ciphertext", 10)])


# --------------------------------------------------------------------------- must hold: 30% sign-flip clients


def sign_flip_scenario(tiny, aggregator, attacked: bool):
    """10 clients, all in every round (so n ≥ 4f + 3 holds for Bulyan with f = 1), 3 of them flipping."""
    tiny["tuning"] = {"mode": "full"}
    tiny["data"]["canaries"] = {"count": 0}
    tiny["federation"].update(num_clients=10, clients_per_round=10, rounds=2, local_steps=2, aggregator=aggregator)
    tiny["attacks"] = [{"name": "sign_flip", "clients": 0.3}] if attacked else []
    return tiny


def test_robust_rules_resist_thirty_percent_sign_flip(tiny):
    """Yin et al. 2018, Blanchard et al. 2017, El Mhamdi et al. 2018: with 30% reversed updates
    the mean is dragged back (0.7 − 0.3 of the honest step) while the robust rules keep
    (almost) only honest values."""
    def final(aggregator, attacked=True):
        scenario = sign_flip_scenario(copy.deepcopy(tiny), aggregator, attacked)
        return fedsec_bench.run(scenario).final

    clean = final("fedavg", attacked=False)["utility.eval_loss"]
    fedavg = final("fedavg")["utility.eval_loss"]
    robust = {
        "median": final("median"),
        "trimmed_mean": final({"name": "trimmed_mean", "trim": 0.3}),
        "krum": final({"name": "krum", "f": 3}),
        "bulyan": final({"name": "bulyan", "f": 1}),
    }
    damage = fedavg - clean
    report = {"clean": clean, "fedavg": fedavg, **{k: v["utility.eval_loss"] for k, v in robust.items()}}
    assert damage > 0.25, report
    for name, figures in robust.items():
        assert figures["utility.eval_loss"] - clean < 0.3 * damage, (name, report)
        assert figures["robust.exclusion_recall"] == 1.0, (name, figures)  # every flipper excluded or down-weighted


# --------------------------------------------------------------------------- against straightforward numpy


def np_pairwise(X):
    n = len(X)
    D = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            D[i, j] = D[j, i] = np.sum((X[i] - X[j]) ** 2)
    return D


def np_krum_select(D, f, m, min_neighbours=0):
    n = len(D)
    k = max(n - f - 2, min_neighbours)
    scores = [np.sort(np.delete(D[i], i))[:k].sum() for i in range(n)]
    return np.argsort(scores, kind="stable")[:m]


def np_bulyan(X, f):
    n = len(X)
    D, remaining, chosen = np_pairwise(X), list(range(n)), []
    for _ in range(n - 2 * f):
        sub = D[np.ix_(remaining, remaining)]
        chosen.append(remaining.pop(int(np_krum_select(sub, f, 1, 1 if len(remaining) > 1 else 0)[0])))
    S = X[chosen]
    closest = np.argsort(np.abs(S - np.median(S, axis=0)), axis=0)[: n - 4 * f]
    return np.take_along_axis(S, closest, axis=0).mean(0)


def np_geomedian(X, alpha, nu, max_iter, ftol):
    alpha = alpha / alpha.sum()
    v = alpha @ X
    distance = np.linalg.norm(X - v, axis=1)
    g = alpha @ distance
    for _ in range(max_iter):
        beta = alpha / np.maximum(nu, distance)
        v = beta @ X / beta.sum()
        distance = np.linalg.norm(X - v, axis=1)
        previous, g = g, alpha @ distance
        if abs(previous - g) < ftol * g:
            break
    return v


def np_centered_clip(X, v, tau, iterations):
    for _ in range(iterations):
        diff = X - v
        v = v + (diff * np.minimum(1.0, tau / np.linalg.norm(diff, axis=1))[:, None]).mean(0)
    return v


NUMPY_CASES = {
    # rule: (torch implementation, straightforward numpy implementation of the same definition)
    "krum": (lambda X: rs.krum(X, 4), lambda X: X[np_krum_select(np_pairwise(X), 4, 1)].mean(0)),
    "multikrum": (lambda X: rs.multikrum(X, 4, 8), lambda X: X[np_krum_select(np_pairwise(X), 4, 8)].mean(0)),
    "median": (rs.median, lambda X: np.median(X, axis=0)),
    "trimmed_mean": (lambda X: rs.trimmed_mean(X, 4), lambda X: np.sort(X, axis=0)[4:-4].mean(0)),
    "bulyan": (lambda X: rs.bulyan(X, 4), lambda X: np_bulyan(X, 4)),
    "norm_bound": (lambda X: rs.norm_bound(X, 1.0),
                   lambda X: (X * np.minimum(1.0, 1.0 / np.linalg.norm(X, axis=1))[:, None]).mean(0)),
    "centered_clip": (lambda X: rs.centered_clip(X, torch.zeros_like(X[0]), 1.0, 3),
                      lambda X: np_centered_clip(X, np.zeros(X.shape[1], X.dtype), 1.0, 3)),
    "geomedian": (lambda X: rs.geomedian(X, torch.ones(len(X), dtype=X.dtype, device=X.device), 1e-6, 4, 0.0),
                  lambda X: np_geomedian(X, np.ones(len(X), X.dtype), 1e-6, 4, 0.0)),
}


@pytest.mark.parametrize("n", [20, 51])
@pytest.mark.parametrize("rule", list(NUMPY_CASES))
def test_rules_match_numpy(rule, n):
    """Each rule against numpy's median / sort / norms on n clients × 3000 values: exactly
    in float64 for the median, to rounding for the means and sums; to float32 rounding in
    float32. Ten clients are shifted off so that Krum and Bulyan have a choice to make."""
    ours, reference = NUMPY_CASES[rule]
    X = torch.randn(n, 3000, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    X[:10] += 0.3 * torch.arange(1, 11, dtype=X.dtype)[:, None]
    tol = 0 if rule == "median" else 1e-12
    expected = reference(X.numpy())
    np.testing.assert_allclose(ours(X).aggregate.numpy(), expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(ours(X.float()).aggregate.numpy(), expected, rtol=1e-4, atol=1e-5)
