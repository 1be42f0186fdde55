"""local_dp, checked against the Gaussian mechanism's theory: the noise has the classic calibration's
std for sensitivity 2C, the update sent is clipped to C before it is noised, each client's ε composes
as an RDP ledger of plain Gaussians says, and the noise is added before secure aggregation masks it."""

from __future__ import annotations

import math

import pytest
import torch

from fedsec_bench import run
from fedsec_bench.defenses.accounting import Ledger
from fedsec_bench.defenses.local_dp import LocalDP, LocalDPOptions
from fedsec_bench.errors import ScenarioError
from fedsec_bench.messages import ClientContext
from fedsec_bench.plan import load_scenario
from fedsec_bench.updates import l2_norm

C, EPSILON, DELTA = 0.5, 0.8, 1e-5


def classic_sigma(clipping_norm: float, epsilon: float, delta: float) -> float:
    """Dwork & Roth, Theorem A.1, at the replace-one sensitivity of a clipped update, Δ = 2C."""
    return 2 * clipping_norm * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def released(update: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """What one client sends: its update through local_dp's client_update."""
    plugin = LocalDP(LocalDPOptions(clipping_norm=C, epsilon=EPSILON, delta=DELTA), runtime=None)
    return plugin.client_update(ClientContext(0, 1, seed, runtime=None), update)


def test_the_noise_std_is_the_classic_calibration_at_sensitivity_2c():
    zero = {"w": torch.zeros(400, 500), "b": torch.zeros(100_000)}  # nothing to clip: the release is the noise
    noise = torch.cat([t.reshape(-1) for t in released(zero).values()])
    sigma = classic_sigma(C, EPSILON, DELTA)
    # the sample std of n = 300k normals is within sigma * 3/sqrt(2n) (0.4%) at three standard errors
    assert noise.std().item() == pytest.approx(sigma, rel=3 / math.sqrt(2 * noise.numel()))
    assert abs(noise.mean().item()) < 3 * sigma / math.sqrt(noise.numel())


@pytest.mark.parametrize("scale", [0.1, 100.0])
def test_the_update_is_clipped_to_c_before_the_noise(scale):
    """The same seed draws the same noise, so a release minus the release of a zero update is the clipped
    update: norm min(‖Δ‖, C), direction unchanged."""
    update = {"w": scale * torch.randn(30, 20, generator=torch.Generator().manual_seed(1))}
    noise = released({"w": torch.zeros(30, 20)})
    sent = released(update)
    clipped = sent["w"] - noise["w"]
    norm = l2_norm(update)
    assert l2_norm({"w": clipped}) == pytest.approx(min(norm, C), rel=1e-4)
    torch.testing.assert_close(clipped / l2_norm({"w": clipped}), update["w"] / norm, rtol=1e-3, atol=1e-4)


def scenario(tiny, *defenses, **federation):
    tiny["federation"] |= federation
    tiny["defenses"] = list(defenses)
    return tiny


LOCAL_DP = {"name": "local_dp", "clipping_norm": C, "epsilon": EPSILON, "delta": DELTA}


def test_each_clients_epsilon_composes_as_a_ledger_of_plain_gaussians(tiny):
    """Every client takes part in every round (2 of 2), so after r rounds each has made r releases: its ε is
    that of r Gaussians of noise multiplier σ/Δ composed by RDP, and one round's ε is the calibration's."""
    metrics = run(scenario(tiny, LOCAL_DP, num_clients=2, clients_per_round=2, rounds=3)).metrics
    noise_multiplier = classic_sigma(C, EPSILON, DELTA) / (2 * C)
    ledger = Ledger("rdp")
    for rnd in (1, 2, 3):
        ledger.compose(noise_multiplier, sample_rate=1.0)
        row = metrics.loc[rnd]
        assert row["privacy.local_epsilon"] == pytest.approx(ledger.epsilon(DELTA), rel=1e-9)
        assert row["privacy.local_delta"] == DELTA
        # the round's ε is the closed form's inverse: σ = Δ·sqrt(2 ln(1.25/δ))/ε
        closed_form = math.sqrt(2 * math.log(1.25 / DELTA)) / noise_multiplier
        assert row["privacy.local_epsilon_round"] == pytest.approx(closed_form)
    composed = metrics.loc[[1, 2, 3], "privacy.local_epsilon"]
    assert composed.is_monotonic_increasing and composed.is_unique


def test_secure_aggregation_masks_the_noised_update(tiny):
    """client_update runs before every transport: listed before or after secure_aggregation, the clients
    noise their updates and the masked sum is the sum of the noised updates (masks cancel; only the
    fixed-point rounding, ~2^-33, differs), so the model and the accounting are those of local DP alone."""
    small = {**LOCAL_DP, "clipping_norm": 0.01}
    alone = run(scenario(dict(tiny), small)).metrics
    masked = run(scenario(dict(tiny), {"name": "secure_aggregation"}, small)).metrics
    undefended = run(scenario(dict(tiny))).metrics
    for rnd in (1, 2):
        assert masked.loc[rnd, "utility.eval_loss"] == pytest.approx(alone.loc[rnd, "utility.eval_loss"], abs=1e-6)
        assert masked.loc[rnd, "privacy.local_epsilon"] == alone.loc[rnd, "privacy.local_epsilon"]
        assert masked.loc[rnd, "cost.bytes_up"] == 2 * alone.loc[rnd, "cost.bytes_up"]  # uint64 masks of float32s
    assert alone.loc[2, "utility.eval_loss"] != pytest.approx(undefended.loc[2, "utility.eval_loss"], abs=1e-6)


@pytest.mark.parametrize("option, value", [("epsilon", 1.0), ("epsilon", 0.0), ("delta", 1.0), ("clipping_norm", 0.0)])
def test_bad_options_are_refused_naming_the_field(tiny, option, value):
    with pytest.raises(ScenarioError, match=rf"defenses\[0\]\.{option}"):
        load_scenario(scenario(tiny, {**LOCAL_DP, option: value}))
