"""Exemplar replay memory: a few training sample indices per class, kept by each client."""

from __future__ import annotations

import numpy as np


def update_memory(
    memory: dict[int, np.ndarray],
    indices: np.ndarray,
    labels: np.ndarray,
    per_class: int,
    rng: np.random.Generator,
) -> dict[int, np.ndarray]:
    """Add up to ``per_class`` randomly chosen sample indices of each class in ``labels`` that the
    memory does not hold yet (class-incremental: a class belongs to one task)."""
    if per_class <= 0:
        return memory
    out = dict(memory)
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    for c in np.unique(labels):
        if int(c) in out:
            continue
        pool = indices[labels == c]
        take = min(per_class, len(pool))
        out[int(c)] = np.sort(rng.choice(pool, size=take, replace=False))
    return out


def memory_indices(memory: dict[int, np.ndarray]) -> np.ndarray:
    if not memory:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([memory[c] for c in sorted(memory)]).astype(np.int64)
