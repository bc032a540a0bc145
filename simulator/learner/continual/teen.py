"""TEEN (Wang et al., NeurIPS 2023): training-free calibration of new classes' prototypes,
``continual.teen: {alpha, tau}``.

For a new class's prototype ``p_n`` and the old prototypes ``p_b``:
``w_b = softmax_b(tau * cos(p_n, p_b))``, ``D = sum_b w_b p_b``, ``p_n <- (1 - alpha) p_n + alpha D``.

Where: on the client, on the prototypes it uploads, for the classes of its current task that are
not among the old classes (learned before the task); the old prototypes are the ones the client
knows when the task starts (the global ones, fixed for the task). The client is the one place that
holds both the fresh prototype and the old ones for every strategy, and continual mechanisms live
on the client (strategies stay merge rules); the server then merges calibrated prototypes, and
every client's inference uses them. Because the calibration is affine in ``p_n`` for fixed weights,
a count-weighted merge of calibrated client prototypes equals calibrating the pooled prototype up
to the difference in the softmax weights between clients (which vanishes when the clients'
prototypes of a class agree).

Deviations from the official code (``wangkiw/TEEN`` ``soft_calibration``): TEEN normalises the
prototypes and ``D`` (a cosine classifier); protofed's prototypes are Euclidean class means, so
``D`` is the weighted mean of the unnormalised old prototypes and keeps their scale. TEEN
calibrates towards the base session's prototypes only; here every old class counts. Defaults: tau
16, alpha 0.5 (the CIFAR script uses 0.1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backbones import ProtoModel
from ..prototypes import PrototypeSet
from .base import ContinualPlugin, TaskData


def calibrate_prototypes(new: np.ndarray, old: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """TEEN's calibration of each row of ``new`` towards the rows of ``old`` (float64 inside)."""
    n = np.asarray(new, dtype=np.float64)
    o = np.asarray(old, dtype=np.float64)
    nn_ = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    on = o / np.maximum(np.linalg.norm(o, axis=1, keepdims=True), 1e-12)
    logits = tau * nn_ @ on.T
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)
    return ((1.0 - alpha) * n + alpha * (w @ o)).astype(np.float32)


class TEEN(ContinualPlugin):
    name = "teen"

    def __init__(self, alpha: float = 0.5, tau: float = 16.0) -> None:
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.old: PrototypeSet | None = None

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        self.old = data.old_prototypes()

    def calibrate(self, protos: PrototypeSet) -> PrototypeSet:
        if self.old is None or len(self.old) == 0 or len(protos) == 0 or self.alpha == 0:
            return protos
        is_new = ~np.isin(protos.classes, self.old.classes)
        if not is_new.any():
            return protos
        vectors = protos.vectors.copy()
        vectors[is_new] = calibrate_prototypes(vectors[is_new], self.old.vectors, self.alpha, self.tau)
        return PrototypeSet(protos.classes, vectors, protos.counts)

    def state_dict(self) -> dict[str, Any]:
        if self.old is None:
            return {"old": None}
        return {"old": (self.old.classes, self.old.vectors, self.old.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        old = state.get("old")
        self.old = None if old is None else PrototypeSet(*old)
