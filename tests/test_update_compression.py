"""gradient_pruning and quantization: pruning zeroes exactly the ⌊p·d⌋ smallest-magnitude coordinates,
quantization moves each coordinate by at most half a step with codes of b bits, the wire cost is the
encoding's (computed by hand here), and heavy pruning breaks DAGER's exact recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fedsec_bench
from fedsec_bench.defenses.update_compression import (
    GradientPruning, GradientPruningOptions, Quantization, QuantizationOptions, quantize,
)
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import ClientContext, Message, RoundContext
from fedsec_bench.plan import load_scenario


def send(plugin, update, side=None) -> Message:
    """The message a client's transport puts on the wire, through ``plugin``."""
    return plugin.transport(ClientContext(0, 1, 0, runtime=None), Message.of_update(0, 4, update, side))


def pruning(fraction: float) -> GradientPruning:
    return GradientPruning(GradientPruningOptions(fraction=fraction), runtime=None)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.77])
def test_pruning_zeroes_exactly_the_floor_pd_smallest_coordinates(fraction):
    gen = torch.Generator().manual_seed(0)
    update = {"w": torch.randn(7, 5, generator=gen), "b": torch.randn(13, generator=gen)}
    flat = np.concatenate([update["w"].numpy().ravel(), update["b"].numpy().ravel()])
    zeroed = math.floor(fraction * flat.size)  # ⌊p·d⌋ of the float product
    smallest = set(np.argsort(np.abs(flat))[:zeroed].tolist())  # distinct magnitudes: no ties
    sent = send(pruning(fraction), update).payload
    got = np.concatenate([sent["w"].numpy().ravel(), sent["b"].numpy().ravel()])
    assert set(np.flatnonzero(got == 0).tolist()) == smallest
    kept = [i for i in range(flat.size) if i not in smallest]
    assert np.array_equal(got[kept], flat[kept])  # bit for bit
    assert sent["w"].dtype == update["w"].dtype and sent["w"].shape == update["w"].shape


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
def test_quantization_error_is_at_most_half_a_step_and_codes_fit_b_bits(bits):
    tensor = torch.randn(5000, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    codes, _, _ = quantize(tensor, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    step = (tensor.max() - tensor.min()).item() / (2**bits - 1)
    decoded = send(Quantization(QuantizationOptions(bits=bits), runtime=None), {"t": tensor}).payload["t"]
    # half a step, plus float32 rounding of min + code·step (a few ulps of the range)
    assert (decoded - tensor).abs().max().item() <= step / 2 + 1e-6 * (tensor.abs().max().item())
    assert len(torch.unique(decoded)) <= 2**bits


def test_a_constant_tensor_quantizes_exactly():
    decoded = send(Quantization(QuantizationOptions(bits=2), runtime=None), {"t": torch.full((9,), -0.25)}).payload
    assert torch.equal(decoded["t"], torch.full((9,), -0.25))


SMALL = {"w": torch.arange(1.0, 13.0).reshape(3, 4), "b": -torch.arange(1.0, 5.0)}
"""d = 16 float32 coordinates of distinct magnitudes: 64 bytes dense."""


def test_wire_costs_by_hand():
    side = {"dp_fedavg.unclipped": 1.0}  # side values travel beside the payload: 8 bytes each
    # p = 0.5: 8 kept float32 (32 bytes); 8 int32 indices are 32 bytes, a 16-bit bitmap 2: the bitmap
    assert send(pruning(0.5), SMALL, side).num_bytes == 32 + 2 + 8
    # p = 0.99 of d = 64: ⌊63.36⌋ = 63 zeroed, 1 kept (4 bytes); one index is 4 bytes, the bitmap 8: the index
    assert send(pruning(0.99), {"v": torch.arange(64.0)}).num_bytes == 4 + 4
    # 4 bits: w's 12 values in 6 bytes, b's 4 in 2, each with a float32 min and step (8 bytes)
    assert send(Quantization(QuantizationOptions(bits=4), runtime=None), SMALL, side).num_bytes == (6 + 8) + (2 + 8) + 8


def test_figures_compare_what_arrived_with_the_dense_size():
    """The server knows an update's dense size from the global state: 64 bytes, plus 8 per side value."""
    messages = [send(pruning(0.5), SMALL), send(pruning(0.5), SMALL, {"x": 1.0})]  # 34 and 42 bytes received
    round = RoundContext(1, None, [0, 1], {n: torch.zeros_like(t) for n, t in SMALL.items()}, delivered=[0, 1])
    figures = pruning(0.5).server_observation(round, messages)
    assert figures["compression.bytes_saved"] == pytest.approx(((64 - 34) + (72 - 42)) / 2)
    assert figures["compression.ratio"] == pytest.approx((34 / 64 + 42 / 72) / 2)


# --- against the gradient inversion attack ----------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tests/test_gradient_inversion.py's model: GPT-2, 2 layers of width 64, no dropout."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=400, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


def fedsgd_inversion(model_dir, tmp_path, defenses) -> dict:
    """One FedSGD round (one SGD step on a batch of 2 per client), attacked by DAGER's span check."""
    raw = {
        "name": "pruned_inversion", "seed": 0,
        "model": {"name_or_path": model_dir, "tokenizer": {"kind": "bpe", "vocab_size": 400}},
        "tuning": {"mode": "full"},
        "data": {"examples_per_client": 8, "heldout_examples": 16, "seq_len": 32, "canaries": {"count": 0}},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 1, "local_steps": 1,
                       "batch_size": 2, "lr": 0.1, "optimizer": "sgd"},
        "attacks": [{"name": "gradient_inversion", "method": "span_check"}],
        "defenses": defenses,
        "tracking": {"enabled": False, "output_dir": str(tmp_path)},
        "device": "cpu",
    }
    return fedsec_bench.run(raw).metrics.loc[1]


def test_heavy_pruning_breaks_the_span_checks_exact_recovery(model_dir, tmp_path):
    """DAGER is exact because a batch's gradient of a linear layer is a sum of few rank-one terms, whose
    row span holds exactly the batch's inputs; zeroing 90% of the coordinates destroys that structure."""
    plain = fedsgd_inversion(model_dir, tmp_path / "plain", [])
    pruned = fedsgd_inversion(model_dir, tmp_path / "pruned", [{"name": "gradient_pruning", "fraction": 0.9}])
    assert plain["inversion.exact_match"] == 1.0
    assert pruned["inversion.exact_match"] < 1.0 and pruned["inversion.rouge1"] < plain["inversion.rouge1"]
    assert pruned["compression.ratio"] < 0.2  # 10% of float32 values and a bitmap, by what the server received
    assert pruned["cost.bytes_up"] < plain["cost.bytes_up"]


# --- options and order -------------------------------------------------------------


@pytest.mark.parametrize("name, option, value", [
    ("gradient_pruning", "fraction", 0.0), ("gradient_pruning", "fraction", 1.0),
    ("quantization", "bits", 0), ("quantization", "bits", 17),
])
def test_bad_options_are_refused_naming_the_field(tiny, name, option, value):
    tiny["defenses"] = [{"name": name, option: value}]
    with pytest.raises(ScenarioError, match=rf"defenses\[0\]\.{option}"):
        load_scenario(tiny)


@pytest.mark.parametrize("name", ["gradient_pruning", "quantization"])
def test_compression_must_come_before_a_hiding_transport(tiny, name):
    tiny["defenses"] = [{"name": name}, {"name": "secure_aggregation"}]
    load_scenario(tiny)
    tiny["defenses"] = [{"name": "secure_aggregation"}, {"name": name}]
    with pytest.raises(ScenarioError, match=f"list {name} before secure_aggregation"):
        load_scenario(tiny)
