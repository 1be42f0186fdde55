"""Rényi-DP accounting of Poisson-subsampled Gaussian mechanisms composed over rounds.

Mironov 2017 ("Rényi Differential Privacy") and Mironov, Talwar, Zhang 2019 ("Rényi
Differential Privacy of the Sampled Gaussian Mechanism"): the RDP curve of one
mechanism run at sampling rate q with noise multiplier z is computed at a grid of
orders α, curves of successive runs add up, and ε(δ) is the best order's conversion
(Balle et al. 2020, Theorem 21). The per-order RDP comes from Opacus' analysis; the
grid is the one the ``dp-accounting`` library's RDP accountant uses by default, so
the two agree (tests/test_dp_fedavg.py checks it within 1%).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


class RdpLedger:
    """The composed RDP curve of every mechanism run so far."""

    def __init__(self):
        self.rdp = np.zeros(len(ORDERS))
        self.runs = 0

    def compose(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Add ``steps`` runs of the Gaussian mechanism (noise std z·sensitivity) on a Poisson q-sample."""
        self.runs += steps
        self.rdp = self.rdp + steps * subsampled_gaussian_rdp(sample_rate, noise_multiplier)

    def epsilon(self, delta: float) -> float:
        """ε of (ε, δ)-DP for everything composed so far: 0 before any run, ∞ without noise."""
        if self.runs == 0:
            return 0.0
        if np.isinf(self.rdp).all():
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the largest alpha" only says the grid bounds ε from above
            warnings.simplefilter("ignore")
            return float(get_privacy_spent(orders=list(ORDERS), rdp=self.rdp, delta=delta)[0])


@functools.lru_cache(maxsize=64)
def subsampled_gaussian_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP at every order of one run; a round repeats the same (q, z), so it is computed once."""
    if noise_multiplier == 0:
        return np.full(len(ORDERS), math.inf)
    rdp = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(ORDERS)))
    rdp.flags.writeable = False
    return rdp
