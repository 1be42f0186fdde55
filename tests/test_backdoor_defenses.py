"""Backdoor defenses FLAME, FoolsGold and FLTrust: each against a loop-by-loop implementation of
its paper's definition, the cases their papers are built on (sybils, a reversed update), the
load-time refusals, and the published claim that FLAME (and norm clipping, and FLTrust) cut a
scaled backdoor's success under FedAvg while keeping clean utility."""

from __future__ import annotations

import io
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.cluster import HDBSCAN
from test_poisoning import backdoor_scenario, full_mode_runtime

import fedsec_bench
from fedsec_bench.defenses import flame as fl
from fedsec_bench.defenses import fltrust as ft
from fedsec_bench.defenses import foolsgold as fg
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import Message, RoundContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.updates import flatten

# --------------------------------------------------------------------------- loop-by-loop references


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(v):
    return math.sqrt(dot(v, v))


def cos(a, b):
    return dot(a, b) / (norm(a) * norm(b)) if norm(a) and norm(b) else 0.0


def ref_median(values):
    v, n = sorted(values), len(values)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ref_flame(X):
    """FLAME's Algorithm 1, steps 1-4: (aggregate, kept clients, S_t). HDBSCAN itself is scikit-learn's."""
    n = len(X)
    distances = np.array([[0.0 if i == j else 1 - cos(X[i], X[j]) for j in range(n)] for i in range(n)])
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                     allow_single_cluster=True, copy=True).fit(distances).labels_
    biggest = max(set(labels) - {-1}, key=lambda label: list(labels).count(label))
    kept = [i for i in range(n) if labels[i] == biggest]
    s_t = ref_median([norm(x) for x in X])
    clipped = [[v * min(1.0, s_t / norm(X[i])) for v in X[i]] for i in kept]
    return [sum(col) / len(kept) for col in zip(*clipped)], set(kept), s_t


def ref_foolsgold_weights(H, kappa):
    """FoolsGold's Algorithm 1, steps 2-5, on the histories H (a list of vectors)."""
    m = len(H)
    cs = [[cos(H[i], H[j]) for j in range(m)] for i in range(m)]
    v = [max(cs[i][j] for j in range(m) if j != i) if m > 1 else -math.inf for i in range(m)]
    for i in range(m):
        for j in range(m):
            if i != j and v[j] > v[i]:
                cs[i][j] *= v[i] / v[j]
    alpha = []
    for i in range(m):
        a = 1 - max([cs[i][j] for j in range(m) if j != i], default=-math.inf)
        alpha.append(min(1.0, max(0.0, a)))
    top = max(alpha)
    alpha = [a / top if top > 0 else a for a in alpha]
    out = []
    for a in alpha:
        a = 0.99 if a == 1 else a
        logit = kappa * (math.log(a / (1 - a)) + 0.5) if a > 0 else -math.inf
        out.append(min(1.0, max(0.0, logit)))
    return out


def ref_fltrust(X, g0):
    """FLTrust's Algorithm 2: Σ TS_i ḡ_i / Σ TS_i, TS_i = ReLU(cos(g_i, g_0)), ḡ_i = g_i ||g_0|| / ||g_i||."""
    trust = [max(0.0, cos(x, g0)) for x in X]
    total = sum(trust)
    if total == 0:
        return [0.0] * len(g0), trust
    rescaled = [[v * norm(g0) / norm(x) for v in x] for x in X]
    return [sum(t * r[c] for t, r in zip(trust, rescaled)) / total for c in range(len(g0))], trust


def close(actual, expected, tol=1e-9):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float), rtol=tol, atol=tol)


def plugin(cls, **options):
    return cls(cls.OptionsModel(**options), SimpleNamespace(seed_for=lambda *keys: hash(keys) % 2**32))


def round_of(rnd, messages, d):
    return RoundContext(rnd, None, [m.client_id for m in messages], {"w": torch.zeros(d, dtype=torch.float64)})


def messages_of(X, ids=None):
    ids = range(len(X)) if ids is None else ids
    return [Message.of_update(cid, 8, {"w": x}) for cid, x in zip(ids, X)]


# --------------------------------------------------------------------------- FLAME


@pytest.mark.parametrize("seed, n", [(0, 10), (1, 11), (2, 7)])
def test_flame_matches_definition(seed, n):
    """Honest updates around a common direction, three pointing elsewhere and larger: the
    majority cluster, the clipping to the median norm of all updates and the mean as the
    definition's loops compute them."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, 9, generator=gen, dtype=torch.float64)
    X = centre + 0.4 * torch.randn(n, 9, generator=gen, dtype=torch.float64)
    X[:3] = 4 * torch.randn(3, 9, generator=gen, dtype=torch.float64)
    X *= torch.linspace(0.5, 2.0, n, dtype=torch.float64)[:, None]  # distinct norms: some honest ones clipped too
    expected, kept, s_t = ref_flame(X.tolist())
    result, median = fl.flame(X)
    assert set(torch.nonzero(result.share).flatten().tolist()) == kept and not kept & {0, 1, 2}
    assert median == pytest.approx(s_t, rel=1e-12)
    close(result.aggregate, expected)


def test_flame_adds_noise_of_lambda_times_the_median_norm():
    """Step 5: σ = λ·S_t on every coordinate, the same draw for the same round and seed."""
    X = torch.randn(6, 40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    messages = messages_of(X)
    rnd = round_of(1, messages, X.shape[1])
    rule = plugin(fl.Flame, noise_lambda=0.01)
    clean = rule.aggregation(rnd, messages)
    noised = rule.post_aggregation(rnd, clean)["w"]
    s_t = ref_median([norm(x) for x in X.tolist()])
    assert (noised - clean["w"]).std().item() == pytest.approx(0.01 * s_t, rel=0.02)
    again = plugin(fl.Flame, noise_lambda=0.01)
    assert torch.equal(again.post_aggregation(rnd, again.aggregation(rnd, messages))["w"], noised)


# --------------------------------------------------------------------------- FoolsGold


def test_foolsgold_matches_definition_across_sampled_rounds():
    """Three rounds, different clients each round: histories summed by client id, weights over
    every known history, the round's clients aggregated as Σ α_i Δ_i / n."""
    gen = torch.Generator().manual_seed(0)
    rule, history = plugin(fg.FoolsGold, kappa=1.0), {}
    for rnd, ids in enumerate([[0, 1, 2, 3, 4], [2, 3, 5, 6], [0, 5, 6, 7, 1]], start=1):
        X = torch.randn(len(ids), 8, generator=gen, dtype=torch.float64)
        X[:2] += 2.0  # two of each round's clients alike: weights below 1 to compare
        for cid, x in zip(ids, X.tolist()):
            history[cid] = [a + b for a, b in zip(history.get(cid, [0.0] * 8), x)]
        known = list(history)
        alpha = dict(zip(known, ref_foolsgold_weights([history[c] for c in known], 1.0)))
        expected = [sum(alpha[c] * x[k] for c, x in zip(ids, X.tolist())) / len(ids) for k in range(8)]
        got = rule.aggregation(round_of(rnd, messages_of(X, ids), 8), messages_of(X, ids))["w"]
        close(got, expected, tol=1e-12)
        total = sum(alpha[c] for c in ids)
        close([rule.shares[c] for c in ids], [alpha[c] / total for c in ids], tol=1e-12)


@pytest.mark.parametrize("kappa", [0.5, 1.0, 2.0])
def test_foolsgold_weights_match_definition(kappa):
    H = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H[:3] += 3 * H[3]  # three alike, so pardoning and the logit both act
    close(fg.foolsgold_weights(H, kappa), ref_foolsgold_weights(H.tolist(), kappa), tol=1e-12)


def test_foolsgold_gives_identical_sybils_weight_zero_and_keeps_diverse_honest_clients():
    """The paper's premise: sybils sending the same update have cosine 1 with each other, so
    1 − max_j cs_ij = 0, while honest clients with their own data differ and keep weight."""
    gen = torch.Generator().manual_seed(2)
    honest = torch.randn(6, 500, generator=gen)
    sybil = torch.randn(500, generator=gen)
    X = torch.cat([sybil.expand(4, -1), honest])
    rule = plugin(fg.FoolsGold)
    for rnd in (1, 2):
        rule.aggregation(round_of(rnd, messages_of(X), 500), messages_of(X))
        alpha = fg.foolsgold_weights(torch.stack([rule.history[c] for c in range(10)]), 1.0)
        assert alpha[:4].max().item() < 1e-6, alpha
        assert alpha[4:].min().item() > 0.5, alpha
        assert all(rule.shares[c] < 1e-6 for c in range(4)) and all(rule.shares[c] > 0.1 for c in range(4, 10))


def test_foolsgold_history_survives_checkpoint_and_restore():
    gen = torch.Generator().manual_seed(3)
    rounds = [torch.randn(5, 30, generator=gen, dtype=torch.float64) for _ in range(3)]
    rounds[1][:2] = rounds[1][0]  # two sybils in round 2

    def step(rule, rnd):
        X = rounds[rnd - 1]
        return rule.aggregation(round_of(rnd, messages_of(X), 30), messages_of(X))["w"]

    uninterrupted = plugin(fg.FoolsGold)
    expected = [step(uninterrupted, r) for r in (1, 2, 3)]
    first = plugin(fg.FoolsGold)
    step(first, 1)
    buffer = io.BytesIO()
    torch.save(first.checkpoint(), buffer)
    buffer.seek(0)
    resumed = plugin(fg.FoolsGold)
    resumed.restore(torch.load(buffer, weights_only=False))
    assert torch.equal(step(resumed, 2), expected[1]) and torch.equal(step(resumed, 3), expected[2])


# --------------------------------------------------------------------------- FLTrust


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fltrust_matches_definition(seed):
    gen = torch.Generator().manual_seed(seed)
    g0 = torch.randn(7, generator=gen, dtype=torch.float64)
    X = g0 + 1.5 * torch.randn(9, 7, generator=gen, dtype=torch.float64)
    X[1:3] *= -1.0  # two pointing away from g0 (trust 0)
    X[0] *= 50.0  # a boosted one: rescaled to ||g0||
    expected, trust = ref_fltrust(X.tolist(), g0.tolist())
    result = ft.fltrust(X, g0)
    assert 0 in trust, "the premise: some client points away from g0"
    close(result.aggregate, expected, tol=1e-12)
    close(result.share, [t / sum(trust) for t in trust], tol=1e-12)


def test_fltrust_gives_a_reversed_update_trust_zero():
    gen = torch.Generator().manual_seed(4)
    g0 = torch.randn(50, generator=gen, dtype=torch.float64)
    X = torch.stack([-g0, g0 + 0.3 * torch.randn(50, generator=gen, dtype=torch.float64), 0.5 * g0])
    result = ft.fltrust(X, g0)
    assert result.share[0] == 0 and result.share[1:].min() > 0
    none = ft.fltrust(-X[1:], g0)  # every score 0: nothing to aggregate
    assert torch.equal(none.aggregate, torch.zeros(50, dtype=torch.float64)) and none.share.sum() == 0


def test_fltrust_server_update_descends_on_the_root_data_and_leaves_the_global_model(tiny, tmp_path):
    """g_0 is a client's training on the root dataset: it lowers the root loss; afterwards the
    model holds the global state again (the round loop steps from it)."""
    runtime = full_mode_runtime(tiny, tmp_path)
    rule = ft.FLTrust(ft.FLTrust.OptionsModel(root_examples=8), runtime)
    state = runtime.trainable.snapshot()
    root = runtime.batcher.loader(runtime.data.public[:8], batch_size=8)

    def root_loss():
        runtime.model.eval()
        with torch.no_grad():
            return sum(runtime.model(**batch).loss.item() for batch in root)

    before = root_loss()
    g0 = rule.root_update(RoundContext(1, runtime, [], state))
    assert flatten(runtime.trainable.snapshot()).equal(flatten(state))
    runtime.trainable.step(state, g0, scale=1.0)
    assert root_loss() < before


# --------------------------------------------------------------------------- load-time refusals


@pytest.mark.parametrize(
    "aggregator, per_round, message",
    [
        ({"name": "flame", "noise_lambda": -0.1}, 4, "noise_lambda"),
        ({"name": "flame"}, 1, "flame clusters the updates: it needs n ≥ 2, got n=1"),
        ({"name": "foolsgold", "kappa": 0}, 4, "kappa"),
        ({"name": "foolsgold", "pre": ["bucketing"]}, 4, "pre: foolsgold cannot take pre-aggregators"),
        ({"name": "fltrust", "root_examples": 0}, 4, "root_examples"),
        ({"name": "fltrust", "root_examples": 500}, 4,
         "root_examples: fltrust's root dataset takes 500 examples of the public split, "
         "but data.public_examples is 256"),
    ],
)
def test_impossible_options_are_refused_at_load_time(tiny, aggregator, per_round, message):
    tiny["federation"].update(num_clients=4, clients_per_round=per_round, aggregator=aggregator)
    with pytest.raises(ScenarioError, match=re.escape(message)):
        load_scenario(tiny)


# --------------------------------------------------------------------------- must hold: a scaled backdoor


def test_flame_norm_clipping_and_fltrust_cut_a_scaled_backdoor_and_keep_clean_utility(tiny):
    """Nguyen et al. 2022 (FLAME), Sun et al. 2019 (norm bounding), Cao et al. 2021 (FLTrust):
    Bagdasaryan et al.'s boosted model replacement, which takes over the FedAvg model, is cut
    to a small fraction of its success; and without the attack each defense keeps clean
    training: its final eval loss is at most FedAvg's plus a tenth of what FedAvg's clean
    training took off the initial loss."""
    def run(aggregator, attacked):
        s = backdoor_scenario(tiny, aggregator)
        s["attacks"] = s["attacks"] if attacked else []
        return fedsec_bench.run(s).metrics

    defenses = {"flame": "flame", "norm_bound": {"name": "norm_bound", "max_norm": 1.0}, "fltrust": "fltrust"}
    fedavg, fedavg_clean = run("fedavg", True), run("fedavg", False)
    attacked = {name: run(agg, True) for name, agg in defenses.items()}
    clean = {name: run(agg, False) for name, agg in defenses.items()}
    asr = {"fedavg": fedavg["poison.backdoor_asr"][2], **{k: m["poison.backdoor_asr"][2] for k, m in attacked.items()}}
    loss = {"fedavg": fedavg_clean["utility.eval_loss"][2], **{k: m["utility.eval_loss"][2] for k, m in clean.items()}}
    progress = fedavg_clean["utility.eval_loss"][0] - loss["fedavg"]
    report = {"asr": asr, "clean_loss": loss, "fedavg_progress": progress}
    print(report)
    assert asr["fedavg"] >= 0.75 and progress > 0, report  # the premise: the attack works, clean training learns
    for name in defenses:
        assert asr[name] <= asr["fedavg"] / 4, (name, report)
        assert loss[name] <= loss["fedavg"] + 0.1 * progress, (name, report)
    assert attacked["flame"]["robust.exclusion_recall"][2] == 1.0, report  # the boosted update left out of the cluster
