"""TEEN (Wang et al., NeurIPS 2023): training-free calibration of new classes' prototypes,
``continual.teen: {alpha, tau}``, applied post hoc, at inference only.

For a prototype ``p_n`` of a class that is not a base class and the base classes' prototypes
``p_b``: ``w_b = softmax_b(tau * cos(p_n, p_b))``, ``D = normalise(sum_b w_b normalise(p_b))``,
``p_n <- ||p_n|| * ((1 - alpha) normalise(p_n) + alpha D)``.

Where: only in the prototypes a client's evaluation predicts with (the global prototypes it holds,
:meth:`ContinualStack.inference_prototypes`). What clients upload, what the server merges and what
later rounds train towards (FedProto's lambda * MSE targets, the prototypical loss) are the
uncalibrated class means: TEEN is a training-free correction of the classifier, not part of
training. The base classes are those of the stream's first task (TEEN's base session).

Compared line by line with ``wangkiw/TEEN`` models/teen/Network.py ``soft_calibration``
(normalised base and current prototypes; weights ``softmax(softmax_t * cur @ base.T)``;
``delta = normalise(weights @ base)``; ``(1 - shift_weight) * cur + shift_weight * delta``, not
renormalised; the classifier is a cosine one). Deviations:

* scale: the official result lies on (inside) the unit sphere and feeds a cosine classifier;
  protofed's prototype classifier is Euclidean nearest class mean, so the official vector is
  multiplied by ``||p_n||`` (its direction, all a cosine classifier sees, is the official one);
* when: the official code calibrates each session's classes once, right after that session's
  prototypes are computed, and keeps them; here every non-base class is calibrated at every
  evaluation from the prototypes held then. The two agree whenever the base prototypes have not
  changed since (true without replay: no client uploads a base class after the first task);
* prototypes are federated class means (merged by the strategy) rather than one learner's means.

Defaults: tau 16, alpha 0.5 (the official defaults; the CIFAR script uses alpha 0.1).
"""

from __future__ import annotations

import numpy as np

from ..prototypes import PrototypeSet
from ..second_order import l2_normalize
from .base import ContinualPlugin


def calibrate_prototypes(new: np.ndarray, base: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """TEEN's calibration of each row of ``new`` towards the rows of ``base`` (float64 inside),
    scaled by the row's norm (see the module docstring)."""
    n = np.asarray(new, dtype=np.float64)
    b = np.asarray(base, dtype=np.float64)
    norms = np.linalg.norm(n, axis=1, keepdims=True)
    nn_, bn = l2_normalize(n), l2_normalize(b)
    logits = tau * nn_ @ bn.T
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)
    delta = l2_normalize(w @ bn)
    return (norms * ((1.0 - alpha) * nn_ + alpha * delta)).astype(np.float32)


class TEEN(ContinualPlugin):
    name = "teen"

    def __init__(self, alpha: float = 0.5, tau: float = 16.0) -> None:
        self.alpha = float(alpha)
        self.tau = float(tau)

    def inference_prototypes(self, protos: PrototypeSet, base_classes: list[int]) -> PrototypeSet:
        """``protos`` with every non-base class calibrated towards the base classes' prototypes."""
        base = protos.select(base_classes)
        if len(base) == 0 or len(protos) == 0 or self.alpha == 0:
            return protos
        is_new = ~np.isin(protos.classes, np.asarray(base_classes, dtype=np.int64))
        if not is_new.any():
            return protos
        vectors = protos.vectors.copy()
        vectors[is_new] = calibrate_prototypes(vectors[is_new], base.vectors, self.alpha, self.tau)
        return PrototypeSet(protos.classes, vectors, protos.counts)
