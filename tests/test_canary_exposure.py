"""canary_exposure: the candidate spaces and the exposure math, then exposure growing with repetitions, on
text and on instruction data, and custom canaries (planted, or already in a user's file)."""

from __future__ import annotations

import json
import math
import random
from itertools import product

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedsec_bench import run
from fedsec_bench.attacks.canary_exposure import SPACES, exposure_exact, exposure_extrapolated, format_space
from fedsec_bench.data.synthetic import make_secret, synthetic_examples
from fedsec_bench.scenario import CustomCanary


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


def test_a_format_space_holds_exactly_the_strings_its_format_allows():
    """'#' any digit, '@' any lowercase letter, anything else itself: "#@-#" is 10 · 26 · 10 strings."""
    space = format_space("#@-#")
    digits, letters = "0123456789", "abcdefghijklmnopqrstuvwxyz"
    expected = {a + b + "-" + c for a, b, c in product(digits, letters, digits)}
    everything = space.enumerate()
    assert space.size == len(everything) == len(set(everything)) == 2600 and set(everything) == expected
    assert set(space.sample(np.random.default_rng(0), 200)) <= expected
    for secret in everything[::97]:  # and the scenario's own check agrees that each fits the format
        CustomCanary(text="code {secret}", secret=secret, format="#@-#")
    assert format_space("####").size == 10_000 and format_space("pin").enumerate() == ["pin"]


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


def overfit(tiny: dict, local_steps: int) -> None:
    """The recipe above, on records that a BPE of 600 keeps within 64 tokens (instruction data)."""
    tiny["tuning"] = {"mode": "full"}
    tiny["model"].update(layers=2, hidden=64, tokenizer={"kind": "bpe", "vocab_size": 600})
    tiny["federation"].update(num_clients=2, clients_per_round=2, rounds=4, local_steps=local_steps, batch_size=8,
                              lr=0.003)


def test_on_instruction_data_a_repeated_answer_is_exposed_and_extracted_by_its_question(tiny):
    """Instruction canaries are questions answered by the secret. Inserted 16 times, the answer ranks
    far above one inserted once and above one never planted (repetitions 0: its exposure is a
    random candidate's), and greedy decoding right after the rendered question gives the secret."""
    overfit(tiny, local_steps=30)
    tiny["data"].update(format="instruction", seq_len=64,
                        canaries={"count": 6, "kinds": ["name", "phone"], "repetitions": [16, 1, 0]})
    tiny["attacks"] = [{"name": "canary_exposure", "samples": 200}]
    result = run(tiny)
    table = pd.read_csv(result.run_dir / "artifacts" / "canary_exposure.csv")
    assert set(table.method) == {"exact", "extrapolated (skewnorm)"} and table.trained.all()
    final = result.final
    assert final["canary.exposure.rep_16"] > final["canary.exposure.rep_1"] + 2.0
    assert final["canary.exposure.rep_16"] > final["canary.exposure.rep_0"] + 8.0
    assert final["canary.extraction_rate.rep_16"] == 1.0 and final["canary.extraction_rate.rep_0"] == 0.0


def test_custom_canaries_planted_or_already_in_a_file_are_measured_exactly(tiny, tmp_path):
    """A user's file of instruction records already holds a door code (repetitions 0: not planted,
    found in the client that holds it); a four-digit PIN is planted 8 times. Both are ranked among
    every string of their format: 10,000 PINs, and the 100 codes of "48##"."""
    from fedsec_bench.data import build_federated_data

    records, _ = synthetic_examples(random.Random(0), 60, 8, format="instruction")
    rows = [{"instruction": e.instruction, "output": e.response} for e in records]
    rows += [{"instruction": "what is the door code ?", "output": f"the door code is 4821 {end}"}
             for end in (".", ", said the guard .", "since monday .", "again .")]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    overfit(tiny, local_steps=15)
    pin = {"prompt": "what is my pin ?", "text": "my pin is {secret} .", "secret": "0937", "format": "####",
           "repetitions": 8, "client": 0}
    code = {"prompt": "what is the door code ?", "text": "the door code is {secret}", "secret": "4821",
            "format": "48##", "repetitions": 0}
    tiny["data"] = {"source": "files", "path": str(path), "format": "instruction", "heldout_examples": 8,
                    "public_examples": 16, "seq_len": 64, "canaries": {"custom": [pin, code]}}
    tiny["attacks"] = [{"name": "canary_exposure", "exact_max": 10_000}]
    result = run(tiny)
    table = pd.read_csv(result.run_dir / "artifacts" / "canary_exposure.csv").set_index("repetitions")
    assert (table.kind == "custom").all() and (table.method == "exact").all() and table.trained.all()
    assert table.log2_space.to_dict() == pytest.approx({8: math.log2(10_000), 0: math.log2(100)})
    assert ((table.exposure >= 0) & (table.exposure <= table.log2_space + 1e-9)).all()
    assert table.exposure[8] > 10.0  # the planted PIN ranks among the very first of 10,000
    data = build_federated_data(result.scenario)
    holder = next(c for c in range(2) if any("door code is 4821" in e.response for e in data.client_examples(c)))
    assert table.client[0] == holder and math.isfinite(result.final["canary.exposure.rep_0"])
