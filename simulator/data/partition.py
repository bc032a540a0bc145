"""Split one task's training samples among clients (iid, Dirichlet label skew, pathological).

Every function works on *positions* ``0..len(labels)-1`` of the task's training samples and
returns, per client, a sorted int64 array of positions; every position goes to exactly one
client. Randomness comes only from the generator passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FieldError

SCHEME_DESCRIPTIONS: dict[str, str] = {
    "iid": "uniform random split, equal sizes",
    "dirichlet": "label skew: per class, client shares ~ Dirichlet(alpha); min_size per client (repaired)",
    "pathological": "each client holds classes_per_client classes, each class split evenly among its holders",
}

MAX_DIRICHLET_DRAWS = 20


def _groups(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """Positions per client (ascending) from an owner array."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    cuts = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
    return list(np.split(order, cuts))


def partition_task(
    labels: np.ndarray, num_clients: int, cfg: Any, rng: np.random.Generator, task: int
) -> list[np.ndarray]:
    """Split the positions of one task's training samples among ``num_clients`` clients.

    ``cfg`` is a partition config from :mod:`simulator.scenario` (``cfg.scheme`` selects it).
    Raises :class:`FieldError` (naming the task) for requests the data cannot satisfy.
    """
    labels = np.asarray(labels)
    scheme = cfg.scheme
    if scheme == "iid":
        owner = _iid(len(labels), num_clients, rng, task)
    elif scheme == "dirichlet":
        owner = _dirichlet(labels, num_clients, float(cfg.alpha), int(cfg.min_size), rng, task)
    elif scheme == "pathological":
        owner = _pathological(labels, num_clients, int(cfg.classes_per_client), rng, task)
    else:
        raise FieldError("clients.partition.scheme", f"unknown partition scheme {scheme!r}")
    return _groups(owner, num_clients)


# --------------------------------------------------------------------------- iid
def _iid(n: int, num_clients: int, rng: np.random.Generator, task: int) -> np.ndarray:
    if num_clients > n:
        raise FieldError(
            "clients.num_clients",
            f"task {task} has only {n} training samples for {num_clients} clients; "
            "an iid split gives every client at least one (use fewer clients or more data)",
        )
    owner = np.empty(n, dtype=np.int64)
    for client, chunk in enumerate(np.array_split(rng.permutation(n), num_clients)):
        owner[chunk] = client
    return owner


# --------------------------------------------------------------------------- dirichlet
def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator, task: int
) -> np.ndarray:
    n = len(labels)
    if num_clients * min_size > n:
        raise FieldError(
            "clients.partition.min_size",
            f"task {task} has {n} training samples, fewer than num_clients x min_size = "
            f"{num_clients} x {min_size} = {num_clients * min_size}; lower min_size or clients.num_clients",
        )
    class_positions = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    owner = np.empty(n, dtype=np.int64)
    for _ in range(MAX_DIRICHLET_DRAWS):
        for pos in class_positions:
            p = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # guard against degenerate draws
                p = np.zeros(num_clients)
                p[rng.integers(num_clients)] = 1.0
            cuts = np.minimum((np.cumsum(p)[:-1] * len(pos)).astype(np.int64), len(pos))
            for client, chunk in enumerate(np.split(rng.permutation(pos), cuts)):
                owner[chunk] = client
        if np.bincount(owner, minlength=num_clients).min() >= min_size:
            return owner
    return repair_min_size(owner, labels, num_clients, min_size)


def repair_min_size(owner: np.ndarray, labels: np.ndarray, num_clients: int, min_size: int) -> np.ndarray:
    """Move samples from the largest clients to those below ``min_size`` (deterministic).

    The donors are levelled down from the top ("water filling"): the largest level ``L >=
    min_size`` is found such that clients above ``L`` can cover the total deficit; donors keep at
    least ``L`` samples, ties broken by client id. A donor gives samples of its most frequent
    classes first (largest positions first); receivers, in client-id order, take what they lack.
    Requires ``num_clients * min_size <= len(owner)``; never drops or duplicates a sample.
    """
    owner = np.array(owner, dtype=np.int64, copy=True)
    sizes = np.bincount(owner, minlength=num_clients)
    need = np.maximum(min_size - sizes, 0)
    deficit = int(need.sum())
    if deficit == 0:
        return owner
    if num_clients * min_size > len(owner):
        raise ValueError("min_size cannot be met: not enough samples")

    def excess(level: int) -> int:
        return int(np.maximum(sizes - level, 0).sum())

    lo, hi = min_size, int(sizes.max())  # excess(lo) >= deficit, excess(hi) == 0 < deficit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if excess(mid) >= deficit:
            lo = mid
        else:
            hi = mid
    level = lo
    give = np.maximum(sizes - (level + 1), 0)
    remainder = deficit - int(give.sum())
    at_top = np.flatnonzero(sizes >= level + 1)  # ascending client id
    give[at_top[:remainder]] += 1

    pool: list[np.ndarray] = []
    for donor in np.flatnonzero(give):
        pos = np.flatnonzero(owner == donor)
        classes, inverse, counts = np.unique(labels[pos], return_inverse=True, return_counts=True)
        # most frequent class first (ties: smaller class id), then larger positions first
        rank_of_class = np.empty(len(classes), dtype=np.int64)
        rank_of_class[np.lexsort((classes, -counts))] = np.arange(len(classes))
        order = np.lexsort((-pos, rank_of_class[inverse]))
        pool.append(pos[order[: give[donor]]])
    moved = np.concatenate(pool)
    start = 0
    for receiver in np.flatnonzero(need):
        owner[moved[start : start + need[receiver]]] = receiver
        start += need[receiver]
    return owner


# --------------------------------------------------------------------------- pathological
def _pathological(
    labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator, task: int
) -> np.ndarray:
    classes = np.unique(labels)
    c = len(classes)
    kk = min(k, c)
    if num_clients * kk < c:
        need = -(-c // num_clients)
        raise FieldError(
            "clients.partition.classes_per_client",
            f"task {task} has {c} classes but {num_clients} clients x {kk} classes per client cover only "
            f"{num_clients * kk}; use classes_per_client >= {need} or more clients",
        )
    shuffled = classes[rng.permutation(c)]
    holders: dict[int, list[int]] = {i: [] for i in range(c)}
    for client in range(num_clients):
        for j in range(kk):
            holders[(client * kk + j) % c].append(client)
    owner = np.empty(len(labels), dtype=np.int64)
    for slot, cls in enumerate(shuffled):
        pos = rng.permutation(np.flatnonzero(labels == cls))
        hs = rng.permutation(np.asarray(holders[slot], dtype=np.int64))
        for client, chunk in zip(hs, np.array_split(pos, len(hs))):
            owner[chunk] = client
    return owner
