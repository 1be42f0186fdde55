"""Federated data: deterministic synthetic corpus, canaries, partitions, local files and `datasets`."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsec_bench import ScenarioError, load_scenario
from fedsec_bench.data import build_federated_data
from fedsec_bench.data.partition import partition
from fedsec_bench.scenario import PartitionConfig


def data_for(raw, *overrides):
    return build_federated_data(load_scenario(raw, list(overrides)))


def test_synthetic_corpus_is_deterministic_in_the_seed(tiny):
    a, b, c = data_for(tiny), data_for(tiny), data_for(tiny, "seed=1")
    assert [a.client_examples(i) for i in range(4)] == [b.client_examples(i) for i in range(4)]
    assert a.heldout == b.heldout and a.canaries == b.canaries
    assert a.client_examples(0) != c.client_examples(0)


def test_canaries_are_planted_with_their_repetition_counts(tiny):
    tiny["data"]["canaries"] = {"count": 4, "repetitions": [1, 5], "clients": [2, 3]}
    data = data_for(tiny)
    assert [(c.client_id, c.repetitions) for c in data.canaries] == [(2, 1), (3, 5), (2, 1), (3, 5)]
    for canary in data.canaries:
        holder = data.client_examples(canary.client_id)
        assert holder.count(canary.example) == canary.repetitions
        others = [t for cid in range(4) if cid != canary.client_id for t in data.client_examples(cid)]
        assert canary.example not in others
        assert canary.secret not in " ".join(e.response for e in data.heldout + data.public)
    assert {c.kind for c in data.canaries} == {"card", "phone", "email", "name"}
    assert data.num_examples(3) == len(data.client_examples(3))


def test_members_heldout_and_public_splits_are_disjoint(tiny):
    tiny["data"].update(examples_per_client=200, heldout_examples=500, public_examples=500)
    data = data_for(tiny)
    assert len(data.heldout) == 500 and len(data.public) == 500
    assert not set(data.heldout) & set(data.pool)
    assert not set(data.public) & (set(data.pool) | set(data.heldout))


def noise_count(text: str) -> int:
    """Random tokens appended after a template sentence (which ends with " .")."""
    return len(text.split(" . ", 1)[1].split()) if " . " in text else 0


def test_mixed_difficulty_appends_noise_to_the_same_sentences(tiny):
    """The sentences are drawn before any noise, so uniform (the default) is what it always was and
    mixed is the same sentences, half of them with 1 to MAX_NOISE_TOKENS random tokens."""
    from fedsec_bench.data.synthetic import MAX_NOISE_TOKENS
    from fedsec_bench.scenario import DataConfig

    assert f"1-{MAX_NOISE_TOKENS} " in DataConfig.model_fields["difficulty"].description  # the reference says so

    tiny["data"].update(examples_per_client=100)
    uniform, mixed = data_for(tiny), data_for(tiny, "data.difficulty=mixed")
    assert data_for(tiny, "data.difficulty=uniform").pool == uniform.pool
    assert all(m.response.startswith(u.response) for u, m in zip(uniform.pool, mixed.pool, strict=True))
    counts = [noise_count(e.response) for e in mixed.pool]
    assert {noise_count(e.response) for e in uniform.pool} == {0}
    assert set(counts) == set(range(MAX_NOISE_TOKENS + 1))
    assert 0.4 < counts.count(0) / len(counts) < 0.6
    assert mixed.pool == data_for(tiny, "data.difficulty=mixed").pool  # deterministic in the seed


def test_mixed_difficulty_is_the_same_for_members_and_non_members(tiny):
    """Membership inference needs held-out texts from the members' distribution: difficulty included."""
    tiny["data"].update(difficulty="mixed", examples_per_client=500, heldout_examples=2000)
    data = data_for(tiny)
    members = np.array([noise_count(e.response) for e in data.pool])
    heldout = np.array([noise_count(e.response) for e in data.heldout])
    assert not set(data.heldout) & set(data.pool)
    assert abs((members == 0).mean() - (heldout == 0).mean()) < 0.05
    assert stats.ks_2samp(members, heldout).pvalue > 0.01


def test_canary_clients_must_exist(tiny):
    tiny["data"]["canaries"] = {"count": 1, "clients": [9]}
    with pytest.raises(ScenarioError, match=r"data.canaries.clients: \[9\] are not client ids"):
        data_for(tiny)


def test_iid_partition_covers_every_example_once():
    parts = partition(103, 10, PartitionConfig(method="iid"), np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


def label_entropy(parts, labels):
    out = []
    for p in parts:
        counts = np.bincount(np.asarray(labels)[p], minlength=8)
        q = counts[counts > 0] / counts.sum()
        out.append(-(q * np.log(q)).sum())
    return float(np.mean(out))


def test_dirichlet_skews_labels_more_as_alpha_shrinks():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 8, size=4000)
    entropies = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = partition(4000, 20, PartitionConfig(method="dirichlet", alpha=alpha), np.random.default_rng(1), labels)
        assert sorted(np.concatenate(parts).tolist()) == list(range(4000))
        assert min(len(p) for p in parts) >= 2
        entropies[alpha] = label_entropy(parts, labels)
    assert entropies[0.1] < entropies[1.0] < entropies[100.0] <= np.log(8)


def test_quantity_skew_varies_sizes_and_keeps_the_minimum():
    parts = partition(1000, 20, PartitionConfig(method="quantity_skew", alpha=0.3, min_examples=5),
                      np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 1000 and min(sizes) >= 5 and max(sizes) > 3 * np.median(sizes)


def test_too_little_data_for_the_clients_is_a_scenario_error(tiny):
    with pytest.raises(ScenarioError, match="cannot give 4 clients 20 each"):
        data_for(tiny, "data.partition.min_examples=20")


def test_a_thousand_clients_cost_only_their_index_arrays(tiny):
    tracemalloc.start()
    data = data_for(tiny, "federation.num_clients=1000", "data.examples_per_client=8")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data.num_clients == 1000 and len(data.client_examples(999)) >= 8
    assert peak < 20 * 2**20  # 8,000 short sentences and 1,000 index arrays, not per-client models


@pytest.fixture
def table():
    return pd.DataFrame({"text": [f"record {i} about topic {i % 3} ." for i in range(60)], "topic": [i % 3 for i in range(60)]})


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "csv", "parquet"])
def test_local_files_are_read_and_split(tiny, table, tmp_path, suffix):
    path = tmp_path / f"data.{suffix}"
    if suffix == "txt":
        path.write_text("\n".join(table.text) + "\n\n")
    elif suffix == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in table.to_dict("records")))
    elif suffix == "csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)
    tiny["data"] = {"source": "files", "path": str(path), "heldout_examples": 10, "public_examples": 10,
                    "canaries": {"count": 0}}
    data = data_for(tiny)
    members = [t for cid in range(4) for t in data.client_examples(cid)]
    assert len(members) == 40 and len(data.heldout) == 10 and len(data.public) == 10
    assert sorted(e.response for e in members + data.heldout + data.public) == sorted(table.text)


def test_dirichlet_on_files_uses_the_label_column(tiny, table, tmp_path):
    path = tmp_path / "data.csv"
    table.to_csv(path, index=False)
    tiny["data"] = {"source": "files", "path": str(path), "heldout_examples": 10, "public_examples": 10,
                    "partition": {"method": "dirichlet", "alpha": 0.5}, "canaries": {"count": 0}}
    assert sum(len(data_for(tiny).client_examples(c)) for c in range(4)) == 40
    with pytest.raises(ScenarioError, match="data.label_field: no column 'label'"):
        data_for(tiny, "data.label_field=label")


def test_file_errors_name_the_field(tiny, tmp_path):
    tiny["data"] = {"source": "files", "path": str(tmp_path / "missing.csv")}
    with pytest.raises(ScenarioError, match="data.path: .*missing.csv does not exist"):
        data_for(tiny)
    tiny["data"] = {"source": "files"}
    with pytest.raises(ScenarioError, match="data.path is required with data.source=files"):
        data_for(tiny)


def test_datasets_library_path_on_a_local_file(tiny, table, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in table.to_dict("records")))
    tiny["data"] = {"source": "datasets", "path": "json", "data_files": str(path), "heldout_examples": 10,
                    "public_examples": 10, "canaries": {"count": 0}}
    data = data_for(tiny)
    members = [t for c in range(4) for t in data.client_examples(c)]
    assert sorted(e.response for e in members + data.heldout + data.public) == sorted(table.text)


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", '{"text": "a"}\n{"text": \n'),
    (".csv", 'a,b\n1,2,3,4\n"x'),
    (".parquet", "PAR1 not parquet"),
    (".json", "{not json"),
])
def test_a_malformed_file_is_named_with_a_bounded_excerpt_of_the_readers_message(tiny, tmp_path, suffix, content):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    tiny["data"] = {"source": "files", "path": str(path), "canaries": {"count": 0}}
    with pytest.raises(ScenarioError) as info:
        data_for(tiny)
    [problem] = info.value.problems
    assert problem.startswith(f"data.path: {path} could not be read as {suffix[1:]} (")
    assert "\n" not in problem and len(problem) < 600


def test_a_used_up_synthetic_corpus_gives_up_after_a_few_draws_not_a_hundred():
    """One topic has some 50,000 distinct sentences: asking for 300,000 held-out ones took four minutes of
    draws before; a draw that brings almost nothing new ends it."""
    from fedsec_bench.data.federated import fresh

    draws, rng = [], random.Random(0)

    def draw(count):
        draws.append(count)
        return [f"s{rng.randrange(1000)}" for _ in range(count)], None  # a corpus of 1,000 distinct records

    with pytest.raises(ValueError, match="data.heldout_examples: the synthetic corpus gave only 1000 of 50000"):
        fresh(draw, 50_000, exclude=set(), what="data.heldout_examples")
    assert len(draws) == 2
    assert len(fresh(draw, 900, exclude={"s1"}, what="data.heldout_examples")) == 900
