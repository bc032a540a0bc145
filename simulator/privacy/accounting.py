"""Privacy accounting with Google's ``dp-accounting`` (maintained; nothing hand-written here).

Every round a client trains, it releases one Gaussian mechanism with noise multiplier ``z`` (see
:mod:`.mechanism`) over every sample it trains on (its task data; replay memory is refused
under DP, see :func:`.run.release_problems`). A
sample's loss over the run is therefore the ``T``-fold composition of ``GaussianDpEvent(z)``,
where ``T`` is the number of rounds in which its client released; ``T`` is at most the number
of server rounds (tasks x rounds per task), which bounds every client before the run starts.

Under DP-SGD (strategies that upload model weights, :mod:`.dp_sgd`) every local step is one
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`` over the client's local training set; a
client's steps over the whole run (``local_epochs x int(1/q)`` per round it trains, every
round of every task) are composed with its prototype releases into ONE event per client
(``ComposedDpEvent``), so the epsilon reported bounds both what its weights and what its
prototypes say about any of its samples (same neighbouring relation: add/remove one sample).

Client sampling (``clients.participation``) is NOT credited as privacy amplification: the
simulator samples a fixed number of clients with a seeded generator the server knows, which is
not the Poisson sampling the amplification theorems assume. Clients that are sampled less
simply spend less; the summary reports what each one spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .dp_sgd import SgdPlan, steps_per_epoch
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


class _QuietSeries:
    """dp-accounting logs a warning for every fractional RDP order whose series for the
    Poisson-subsampled Gaussian does not converge (small orders, large sampling rates); it then
    leaves that order out, and the epsilon from the remaining orders is still a valid bound.
    The warnings say nothing a user can act on, so they are silenced while we compose."""

    def __enter__(self):
        from absl import logging as absl_logging

        self._level = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)

    def __exit__(self, *exc):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(self._level)


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


def _run_event(noise_multiplier: float, releases: int, sgd_noise: float | None, sample_rate: float, sgd_steps: int):
    """One client's run: ``releases`` Gaussian prototype releases and ``sgd_steps`` DP-SGD
    steps (Poisson-sampled Gaussian), composed."""
    dp = _dp()
    parts = []
    if releases > 0:
        parts.append(_event(noise_multiplier, releases))
    if sgd_steps > 0 and sgd_noise is not None:
        parts.append(dp.SelfComposedDpEvent(
            dp.PoissonSampledDpEvent(float(sample_rate), dp.GaussianDpEvent(float(sgd_noise))), int(sgd_steps)))
    return dp.ComposedDpEvent(parts)


@lru_cache(maxsize=4096)
def run_epsilon_spent(noise_multiplier: float, releases: int, sgd_noise: float | None, sample_rate: float,
                      sgd_steps: int, delta: float, kind: str = "rdp") -> float:
    """Epsilon at ``delta`` of one client's prototype releases and DP-SGD steps together."""
    if releases <= 0 and (sgd_steps <= 0 or sgd_noise is None):
        return 0.0
    acc = _accountant(kind)
    with _QuietSeries():
        acc.compose(_run_event(noise_multiplier, releases, sgd_noise, sample_rate, sgd_steps))
        return float(acc.get_epsilon(delta))


@lru_cache(maxsize=256)
def calibrate_run(epsilon: float, delta: float, releases: int, sample_rate: float, sgd_steps: int,
                  sgd_noise: float | None, kind: str = "rdp") -> float:
    """The smallest prototype noise multiplier ``z`` that keeps a run of ``releases`` releases
    and ``sgd_steps`` DP-SGD steps within ``(epsilon, delta)``; DP-SGD uses ``sgd_noise`` when
    given, else the same ``z`` (one multiplier calibrated for both)."""
    dp = _dp()
    fixed = "" if sgd_noise is None else f" with sgd_noise_multiplier {sgd_noise:g}"
    if sgd_noise is not None and run_epsilon_spent(1.0, 0, sgd_noise, sample_rate, sgd_steps, delta, kind) > epsilon:
        raise BudgetExceeded(
            f"{sgd_steps} DP-SGD steps at sample rate {sample_rate:g}{fixed} alone spend more than epsilon "
            f"{epsilon:g} at delta {delta:g}: use more DP-SGD noise, fewer rounds or local epochs, or a smaller sample_rate"
        )
    try:
        with _QuietSeries():
            z = dp.calibrate_dp_mechanism(
                lambda: _accountant(kind),
                lambda z: _run_event(z, releases, z if sgd_noise is None else sgd_noise, sample_rate, sgd_steps),
                epsilon,
                delta,
                dp.LowerEndpointAndGuess(1e-2, 1.0),
                tol=1e-4,
            )
        return float(z)
    except (ValueError, OverflowError, dp.mechanism_calibration.NoBracketIntervalFoundError) as exc:
        raise BudgetExceeded(
            f"no noise multiplier of at least 0.01 meets epsilon {epsilon:g} at delta {delta:g} over {releases} "
            f"releases and {sgd_steps} DP-SGD steps at sample rate {sample_rate:g}{fixed} ({exc})"
        ) from None


@dataclass(frozen=True)
class DpPlan:
    """The noise of one release (and of DP-SGD) and the bound on the run's loss, fixed before
    the run."""

    noise_multiplier: float
    max_releases: int
    epsilon_bound: float
    delta: float
    clip: float
    scales: NoiseScales
    accountant: str
    sgd: SgdPlan | None = None  # DP-SGD of weight-sharing strategies (None: prototypes only)
    max_sgd_steps: int = 0

    def epsilon(self, releases: int, sgd_steps: int) -> float:
        """Epsilon of a client that released ``releases`` times and took ``sgd_steps`` DP-SGD steps."""
        if self.sgd is None:
            return epsilon_spent(self.noise_multiplier, int(releases), self.delta, self.accountant)
        return run_epsilon_spent(self.noise_multiplier, int(releases), self.sgd.noise_multiplier,
                                 self.sgd.sample_rate, int(sgd_steps), self.delta, self.accountant)


def make_plan(privacy, max_releases: int, sgd_epochs: int | None = None, releases: int | None = None) -> DpPlan:
    """Calibrate (``epsilon`` alone) or check (``noise_multiplier``, with ``epsilon`` as a
    budget) the noise for a run of at most ``max_releases`` releases per client. With
    ``sgd_epochs`` (local epochs per round; weight-sharing strategies) every one of those rounds
    also takes ``sgd_epochs x int(1/q)`` DP-SGD steps, composed into the same budget; ``releases``
    (default ``max_releases``) is how many of those rounds also release prototypes (0 when the
    clients upload none, as FedAvg's). Raises
    :class:`BudgetExceeded` when the requested noise would spend more than the budget."""
    kind = "rdp"
    if sgd_epochs is None:
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
    q = float(privacy.sample_rate)
    steps = int(max_releases) * int(sgd_epochs) * steps_per_epoch(q)  # max_releases = rounds here
    if releases is not None:  # prototype releases of a run whose clients upload none (FedAvg): 0
        max_releases = int(releases)
    fixed = privacy.sgd_noise_multiplier
    if privacy.noise_multiplier is not None:
        z = float(privacy.noise_multiplier)
    else:
        z = calibrate_run(float(privacy.epsilon), privacy.delta, max_releases, q, steps, fixed, kind)
    sigma = float(fixed) if fixed is not None else z
    bound = run_epsilon_spent(z, max_releases, sigma, q, steps, privacy.delta, kind)
    if privacy.epsilon is not None and privacy.noise_multiplier is not None and bound > privacy.epsilon * (1 + 1e-9):
        raise BudgetExceeded(
            f"noise_multiplier {z:g} (prototype releases) and {sigma:g} (DP-SGD) over up to {max_releases} releases "
            f"and {steps} DP-SGD steps (sample rate {q:g}) per client spend epsilon {bound:.3f} at delta "
            f"{privacy.delta:g}, more than the requested epsilon {privacy.epsilon:g}; use more noise, fewer rounds, "
            f"fewer local epochs or a smaller sample_rate"
        )
    sgd = SgdPlan(sigma, float(privacy.grad_clip), q, int(sgd_epochs))
    return DpPlan(z, int(max_releases), bound, privacy.delta, privacy.clip,
                  noise_scales(z, privacy.clip, privacy.count_share), kind, sgd, steps)
