"""An empirical lower bound on epsilon from repeated releases (a privacy audit).

Jagielski, Ullman & Oprea 2020 ("Auditing differentially private machine learning: how private
is private SGD?"): run the mechanism many times on a dataset with a canary sample (``D``) and
without it (``D'``), apply a fixed test "was the canary in?" to each release, and bound the test's
true- and false-positive rates with Clopper-Pearson intervals. Any (epsilon, delta)-DP mechanism
satisfies ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta`` for every
test, so with probability at least ``1 - alpha``

    eps >= max( ln((TPR_lo - delta) / FPR_hi), ln((1 - delta - FPR_hi) / (1 - TPR_lo)) )

where ``TPR_lo`` and ``FPR_hi`` are one-sided Clopper-Pearson bounds at ``alpha / 2`` each. A
lower bound above the claimed epsilon proves the claim false.

The test here: the releases are split in two halves. On the first half the auditor estimates the
direction that separates the two sets of releases (difference of their means, each coordinate
divided by its variance: the likelihood-ratio direction for Gaussian noise) and the threshold
on the projection that gives the best bound; the bound is then computed on the second half only,
so choosing the test does not inflate it. Nothing about the mechanism's internals is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided ``1 - alpha`` Clopper-Pearson bounds ``(lower, upper)`` on a binomial rate."""
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1.0 - alpha, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(tp: int, n_in: int, fp: int, n_out: int, delta: float, alpha: float = 0.05) -> float:
    """The epsilon lower bound of a test with ``tp`` of ``n_in`` canary releases flagged and ``fp``
    of ``n_out`` canary-free releases flagged (confidence ``1 - alpha``; 0 when nothing is shown)."""
    tpr_lo, _ = clopper_pearson(tp, n_in, alpha / 2)
    _, fpr_hi = clopper_pearson(fp, n_out, alpha / 2)
    bounds = [0.0]
    if tpr_lo - delta > 0 and fpr_hi > 0:
        bounds.append(np.log((tpr_lo - delta) / fpr_hi))
    if 1.0 - delta - fpr_hi > 0 and 1.0 - tpr_lo > 0:
        bounds.append(np.log((1.0 - delta - fpr_hi) / (1.0 - tpr_lo)))
    return float(max(bounds))


@dataclass(frozen=True)
class AuditResult:
    epsilon_lower_bound: float  # on the held-out half, at confidence 1 - alpha
    tp: int
    fp: int
    trials: int  # held-out releases per side
    threshold: float


def _best_threshold(s_in: np.ndarray, s_out: np.ndarray, delta: float, alpha: float) -> float:
    """The threshold whose (first-half) bound is largest; the rates of every candidate threshold
    are scored with the same Clopper-Pearson bounds, vectorised."""
    from scipy.stats import beta

    cands = np.unique(np.concatenate([s_in, s_out]))
    tp = (s_in[None, :] >= cands[:, None]).sum(1)
    fp = (s_out[None, :] >= cands[:, None]).sum(1)
    n_in, n_out = len(s_in), len(s_out)
    with np.errstate(all="ignore"):
        tpr_lo = np.where(tp == 0, 0.0, beta.ppf(alpha / 2, tp, n_in - tp + 1))
        fpr_hi = np.where(fp == n_out, 1.0, beta.ppf(1 - alpha / 2, fp + 1, n_out - fp))
        a = np.log(np.maximum(tpr_lo - delta, 1e-300) / np.maximum(fpr_hi, 1e-300))
        b = np.log(np.maximum(1 - delta - fpr_hi, 1e-300) / np.maximum(1 - tpr_lo, 1e-300))
    return float(cands[int(np.argmax(np.maximum(a, b)))])


def audit(release_in: Callable[[np.random.Generator], np.ndarray], release_out: Callable[[np.random.Generator], np.ndarray],
          trials: int, delta: float, *, alpha: float = 0.05, seed: int = 0) -> AuditResult:
    """Draw ``2 x trials`` releases with the canary (``release_in``) and as many without it
    (``release_out``), choose the test on the first half, bound epsilon on the second."""
    gen = np.random.default_rng(seed)
    rin = np.stack([np.ravel(release_in(gen)) for _ in range(2 * trials)])
    rout = np.stack([np.ravel(release_out(gen)) for _ in range(2 * trials)])
    fit_in, test_in, fit_out, test_out = rin[:trials], rin[trials:], rout[:trials], rout[trials:]
    var = np.concatenate([fit_in - fit_in.mean(0), fit_out - fit_out.mean(0)]).var(0) + 1e-12
    w = (fit_in.mean(0) - fit_out.mean(0)) / var
    t = _best_threshold(fit_in @ w, fit_out @ w, delta, alpha)
    tp, fp = int((test_in @ w >= t).sum()), int((test_out @ w >= t).sum())
    return AuditResult(epsilon_from_rates(tp, trials, fp, trials, delta, alpha), tp, fp, trials, t)
