"""Blurry task boundaries (``tasks.blurry``): part of the next task's training data arrives early.

With ``tasks.blurry: f`` (``0 <= f < 1``), for every task ``t`` but the last and every class ``c``
of task ``t + 1``, ``floor(f * n_c)`` of the ``n_c`` training samples of ``c`` are drawn without
replacement (seeded per task and class) and moved from task ``t + 1`` to task ``t``: they are
learned one task early and are no longer part of task ``t + 1``. Each sample is moved at most
once (task ``t + 1`` gives away only its own classes' samples, whatever it received from task
``t + 2``), so the tasks' training sets stay disjoint and together hold every training sample.
Rounding down keeps at least one sample of every class in its own task (``f < 1``). The test
sets and the classes each task is evaluated on are not changed. A simplified form of Rainbow
Memory's Blurry-M (Bang et al. 2021) and of i-Blurry (Koh et al. 2022), which mix samples of
other tasks' classes into each task: here only the next task's classes arrive early, each by the
same share of its samples.
"""

from __future__ import annotations

import math

import numpy as np

from ..seeding import rng


def leaked_count(fraction: float, class_size: int) -> int:
    """How many of a class's ``class_size`` training samples move to the task before: ``floor(fraction x size)``."""
    return int(math.floor(fraction * class_size + 1e-9))


def blur_positions(y_train: np.ndarray, tasks: list[list[int]], positions: list[np.ndarray], fraction: float,
                   seed: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """``(positions, leaked)``: each task's training positions (sorted) after the move, and per
    task ``t`` the classes of task ``t + 1`` that gave it samples. ``fraction`` 0 returns the
    positions unchanged (the same arrays)."""
    leaked: list[list[int]] = [[] for _ in tasks]
    if fraction <= 0 or len(tasks) < 2:
        return positions, leaked
    out = list(positions)
    for t in range(len(tasks) - 1):
        nxt = positions[t + 1]  # task t+1's own samples (before it receives any from task t+2)
        moved: list[np.ndarray] = []
        for c in tasks[t + 1]:
            own = nxt[y_train[nxt] == c]
            k = leaked_count(fraction, len(own))
            if k == 0:
                continue
            pick = rng(seed, "blurry", t, int(c)).choice(len(own), size=k, replace=False)
            moved.append(own[np.sort(pick)])
            leaked[t].append(int(c))
        if moved:
            gone = np.concatenate(moved)
            out[t] = np.union1d(out[t], gone).astype(np.int64)
            out[t + 1] = np.setdiff1d(out[t + 1], gone).astype(np.int64)
    return out, leaked
