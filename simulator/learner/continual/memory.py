"""Which exemplars a client keeps: ``continual.memory_selection: random | herding``.

``herding`` is iCaRL's rule (Rebuffi et al., CVPR 2017; PyCIL ``_construct_exemplar``): with
L2-normalised features ``phi`` and their class mean ``mu``, the k-th exemplar is
``argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||`` over the samples not chosen yet, so that
the exemplars' mean tracks the class mean. Ties go to the earliest sample. The features come from
the model the client holds when it leaves the task (the same moment the random choice is made).
Memory per class is fixed (``memory_per_class``), so exemplar sets are never shrunk (iCaRL keeps
the first m when it shrinks; with a fixed m there is nothing to shrink).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..replay import update_memory


def herding_order(features: np.ndarray, m: int) -> np.ndarray:
    """Positions (into ``features``) of the first ``m`` herding exemplars, in the order chosen."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    mu = f.mean(0)
    chosen: list[int] = []
    running = np.zeros_like(mu)
    available = np.ones(len(f), dtype=bool)
    for k in range(1, min(m, len(f)) + 1):
        dist = np.linalg.norm(mu[None, :] - (running[None, :] + f) / k, axis=1)
        dist[~available] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        available[i] = False
        running += f[i]
    return np.asarray(chosen, dtype=np.int64)


def select_memory(
    method: str,
    memory: dict[int, np.ndarray],
    indices: np.ndarray,
    labels: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
    features_of: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Add up to ``per_class`` exemplars of each class of ``labels`` not in ``memory`` yet:
    a seeded random choice, or herding on ``features_of(sample indices)``."""
    if method == "random" or per_class <= 0:
        return update_memory(memory, indices, labels, per_class, rng)
    if method != "herding":
        raise ValueError(f"unknown memory_selection {method!r}")
    assert features_of is not None, "herding needs the features of the samples"
    out = dict(memory)
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    for c in np.unique(labels):
        if int(c) in out:
            continue
        pool = indices[labels == c]
        order = herding_order(features_of(pool), per_class)
        out[int(c)] = np.sort(pool[order])
    return out
