"""Privacy accounting with Google's ``dp-accounting`` (maintained; nothing hand-written here).

Every round a client trains, it releases one Gaussian mechanism with noise multiplier ``z`` (see
:mod:`.mechanism`) over every sample it trains on (its task data and its replay memory). A
sample's loss over the run is therefore the ``T``-fold composition of ``GaussianDpEvent(z)``,
where ``T`` is the number of rounds in which its client released; ``T`` is at most the number
of server rounds (tasks x rounds per task), which bounds every client before the run starts.

Client sampling (``clients.participation``) is NOT credited as privacy amplification: the
simulator samples a fixed number of clients with a seeded generator the server knows, which is
not the Poisson sampling the amplification theorems assume. Clients that are sampled less
simply spend less; the summary reports what each one spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .mechanism import NoiseScales, noise_scales


class AccountantMissing(ImportError):
    pass


def _dp():
    try:
        import dp_accounting
    except ImportError:
        raise AccountantMissing(
            "differential privacy needs Google's dp-accounting: pip install 'protofed[privacy]'"
        ) from None
    return dp_accounting


def _accountant(kind: str):
    # The PLD accountant is tighter for Gaussian composition but took ~2 s per evaluation here
    # (and exhausts memory for tiny multipliers during calibration); RDP takes < 1 ms.
    _dp()
    if kind == "pld":
        from dp_accounting import pld

        return pld.PLDAccountant()
    from dp_accounting import rdp

    return rdp.RdpAccountant()


def _event(noise_multiplier: float, releases: int):
    dp = _dp()
    return dp.SelfComposedDpEvent(dp.GaussianDpEvent(noise_multiplier), int(releases))


@lru_cache(maxsize=4096)
def epsilon_spent(noise_multiplier: float, releases: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` after ``releases`` Gaussian releases with multiplier ``z``."""
    if releases <= 0:
        return 0.0
    acc = _accountant(kind)
    acc.compose(_event(noise_multiplier, releases))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=256)
def calibrate_noise(epsilon: float, delta: float, releases: int, kind: str = "rdp") -> float:
    """The smallest noise multiplier whose ``releases``-fold composition stays within
    ``(epsilon, delta)`` (dp-accounting's own calibration search)."""
    dp = _dp()
    try:
        return float(
            dp.calibrate_dp_mechanism(
                lambda: _accountant(kind),
                lambda z: _event(z, releases),
                epsilon,
                delta,
                dp.LowerEndpointAndGuess(1e-2, 1.0),
                tol=1e-4,
            )
        )
    except (ValueError, OverflowError) as exc:
        raise BudgetExceeded(f"no noise multiplier of at least 0.01 meets epsilon {epsilon:g} at delta {delta:g} over {releases} releases ({exc})") from None


class BudgetExceeded(ValueError):
    pass


@dataclass(frozen=True)
class DpPlan:
    """The noise of one release and the bound on the run's loss, fixed before the run."""

    noise_multiplier: float
    max_releases: int
    epsilon_bound: float
    delta: float
    clip: float
    scales: NoiseScales
    accountant: str


def make_plan(privacy, max_releases: int) -> DpPlan:
    """Calibrate (``epsilon`` alone) or check (``noise_multiplier``, with ``epsilon`` as a
    budget) the noise for a run of at most ``max_releases`` releases per client. Raises
    :class:`BudgetExceeded` when the requested noise would spend more than the budget."""
    kind = "rdp"
    if privacy.noise_multiplier is not None:
        z = float(privacy.noise_multiplier)
    else:
        z = calibrate_noise(float(privacy.epsilon), privacy.delta, max_releases, kind)
    bound = epsilon_spent(z, max_releases, privacy.delta, kind)
    if privacy.epsilon is not None and privacy.noise_multiplier is not None and bound > privacy.epsilon * (1 + 1e-9):
        need = calibrate_noise(float(privacy.epsilon), privacy.delta, max_releases, kind)
        raise BudgetExceeded(
            f"noise_multiplier {z:g} over up to {max_releases} releases per client spends epsilon {bound:.3f} "
            f"at delta {privacy.delta:g}, more than the requested epsilon {privacy.epsilon:g}; "
            f"a noise_multiplier of at least {need:.3f} (or fewer rounds) stays within it"
        )
    return DpPlan(z, int(max_releases), bound, privacy.delta, privacy.clip,
                  noise_scales(z, privacy.clip, privacy.count_share), kind)
