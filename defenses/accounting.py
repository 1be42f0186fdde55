"""The privacy ledger of the DP defenses: sampled Gaussian mechanisms composed by an Opacus accountant.

Both DP defenses run the Poisson-subsampled Gaussian mechanism (sampling rate q, noise
multiplier z) again and again: ``dp_sgd`` once per local step, on one client's records,
so it keeps a ledger per client (:class:`ClientLedgers`, as ``local_dp`` does, once per
round on each client's update); ``dp_fedavg`` once per round, on the users, so it keeps
one for the federation. A ledger composes those runs with Opacus: RDP (Mironov, Talwar,
Zhang 2019, converted to ε(δ) by Balle et al. 2020, Theorem 21) or PRV (Gopi, Lee,
Wutschitz 2021).

RDP is evaluated at the orders the ``dp-accounting`` library's RDP accountant uses by
default: Opacus' default grid stops at order 63, and at high noise the best order lies
beyond it, where Opacus' own grid overstates ε (ninefold at z = 10, q = 0.01, 10 runs, δ = 10⁻⁵).
With the same orders the two libraries agree (tests/test_dp_fedavg.py checks it within 1%).
"""

from __future__ import annotations

import functools
import math
import warnings

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedsec_bench.ground_truth import ClientReport, RoundTruth

ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def epsilon_options(accountant: str) -> dict:
    """The arguments of an Opacus accountant's ``get_epsilon`` beyond δ: the RDP orders (see above)."""
    return {"alphas": ORDERS} if accountant == "rdp" else {}


class Ledger:
    """Every run of the sampled Gaussian mechanism so far, composed by one Opacus accountant."""

    def __init__(self, accountant: str = "rdp"):
        self.accountant = create_accountant(accountant)

    def compose(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Add ``steps`` runs at noise std z·sensitivity on a Poisson sample at rate q."""
        for _ in range(steps):
            self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """ε of (ε, δ)-DP for everything composed so far: 0 before any run, ∞ if a run had no noise."""
        if not self.accountant.history:
            return 0.0
        if any(z == 0 for z, _, _ in self.accountant.history):
            return math.inf
        with warnings.catch_warnings():  # "optimal order is the largest alpha" only says the grid bounds ε from above
            warnings.simplefilter("ignore")
            return float(self.accountant.get_epsilon(delta=delta, **epsilon_options(self.accountant.mechanism())))


def report_runs(metrics: dict[str, float], prefix: str, noise_multiplier: float, sample_rate: float,
                steps: int) -> None:
    """Record, in a client's ``client.metrics``, the runs of the sampled Gaussian mechanism it made this
    round, for :meth:`ClientLedgers.record` on the driver (a client hook may run on a Ray worker)."""
    metrics |= {f"{prefix}.noise_multiplier": noise_multiplier, f"{prefix}.sample_rate": sample_rate,
                f"{prefix}.steps": steps}


def reported_runs(metrics: dict[str, float], prefix: str) -> tuple[float, float, int]:
    """(noise multiplier, sample rate, steps) that :func:`report_runs` recorded."""
    return metrics[f"{prefix}.noise_multiplier"], metrics[f"{prefix}.sample_rate"], int(metrics[f"{prefix}.steps"])


class ClientLedgers(dict[int, Ledger]):
    """Client id -> that client's own :class:`Ledger`, for a mechanism each client runs on its own data.

    The guarantee is each client's own, so no protocol party needs the ledgers: they live with
    the plugin on the driver, composed by its scorer from the round's truth (:meth:`record`),
    which the clients fed with :func:`report_runs` under the plugin's ``prefix``. A plugin sends
    a Ray worker's copy :meth:`empty` ones (its ``__getstate__``); its checkpoint keeps them.
    """

    def __init__(self, prefix: str, accountant: str = "rdp"):
        super().__init__()
        self.prefix = prefix
        self.accountant = accountant

    def record(self, truth: RoundTruth) -> list[ClientReport]:
        """Compose the runs each client reported this round into its ledger: every client that trained
        released, whether its message arrived or not. Returns the reports that had runs."""
        reports = [r for r in truth.reports if f"{self.prefix}.steps" in r.metrics]
        for report in reports:
            noise_multiplier, sample_rate, steps = reported_runs(report.metrics, self.prefix)
            self.setdefault(report.client_id, Ledger(self.accountant)).compose(noise_multiplier, sample_rate, steps)
        return reports

    def max_epsilon(self, delta: float) -> float:
        """The largest ε over the clients so far (0 before any run): the guarantee every client has."""
        return max((ledger.epsilon(delta) for ledger in self.values()), default=0.0)

    def empty(self) -> ClientLedgers:
        """No ledgers, the same prefix and accountant: what a Ray worker's copy of the plugin carries."""
        return ClientLedgers(self.prefix, self.accountant)


@functools.lru_cache(maxsize=256)
def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """σ for which ``steps`` runs at rate q spend at most target_epsilon in a :class:`Ledger` (Opacus' search)."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, **epsilon_options(accountant),
            )
        )
    except ValueError:
        raise ValueError(
            f"target_epsilon={target_epsilon} is unreachable in {steps} steps at sample rate {sample_rate:.3g} "
            f"with delta={delta:.3g} (even σ=1e6 spends more); raise target_epsilon or delta, or run fewer steps"
        ) from None
