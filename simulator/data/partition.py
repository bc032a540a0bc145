"""Split one task's training samples among clients (iid, Dirichlet label skew, pathological,
McMahan shards, quantity skew).

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
    "shards": "McMahan et al.: samples sorted by label, cut into num_clients x shards_per_client equal shards, "
    "shards_per_client random shards per client",
    "quantity": "quantity skew: client sizes ~ lognormal(sigma) or rank^-exponent (power law), labels iid within "
    "each client; min_size per client",
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
    elif scheme == "shards":
        owner = _shards(labels, num_clients, int(cfg.shards_per_client), rng, task)
    elif scheme == "quantity":
        sizes = quantity_sizes(
            len(labels), num_clients, cfg.distribution, float(cfg.sigma), float(cfg.exponent), int(cfg.min_size), rng, task
        )
        owner = np.empty(len(labels), dtype=np.int64)
        owner[rng.permutation(len(labels))] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)  # labels iid
    else:
        raise FieldError("clients.partition.scheme", f"unknown partition scheme {scheme!r}")
    return _groups(owner, num_clients)


# --------------------------------------------------------------------------- iid
def iid_split(n: int, num_clients: int, rng: np.random.Generator, task: int) -> tuple[np.ndarray, np.ndarray]:
    """``(perm, bounds)``: client ``k`` of an iid split holds positions ``perm[bounds[k]:bounds[k+1]]``
    (``np.array_split`` of one seeded permutation: the first ``n % num_clients`` clients one more)."""
    if num_clients > n:
        raise FieldError(
            "clients.num_clients",
            f"task {task} has only {n} training samples for {num_clients} clients; "
            "an iid split gives every client at least one (use fewer clients or more data)",
        )
    perm = rng.permutation(n).astype(np.int64, copy=False)
    base, extra = divmod(n, num_clients)
    sizes = np.full(num_clients, base, dtype=np.int64)
    sizes[:extra] += 1
    return perm, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def _iid(n: int, num_clients: int, rng: np.random.Generator, task: int) -> np.ndarray:
    perm, bounds = iid_split(n, num_clients, rng, task)
    owner = np.empty(n, dtype=np.int64)
    owner[perm] = np.repeat(np.arange(num_clients, dtype=np.int64), np.diff(bounds))
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
            # client i takes the i-th run of the permuted positions (runs split at ``cuts``): the
            # same assignment as a loop over np.split, without a Python step per client
            sizes = np.diff(np.concatenate([[0], cuts, [len(pos)]]))
            owner[rng.permutation(pos)] = np.repeat(np.arange(num_clients), sizes)
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


# --------------------------------------------------------------------------- shards
def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator, task: int) -> np.ndarray:
    """McMahan et al. (2017): sort by label, cut into equal shards, deal random shards to clients.

    Inside a class the order is shuffled first, so which samples of a class form a shard is
    random too. The ``num_clients * per_client`` shards differ in size by at most one sample.
    """
    n = len(labels)
    num_shards = num_clients * per_client
    if num_shards > n:
        raise FieldError(
            "clients.partition.shards_per_client",
            f"task {task} has {n} training samples, fewer than num_clients x shards_per_client = "
            f"{num_clients} x {per_client} = {num_shards} shards; lower shards_per_client or clients.num_clients",
        )
    by_label = np.lexsort((rng.random(n), labels))  # grouped by label, random order inside a class
    shard_owner = rng.permutation(num_shards) // per_client  # shard s goes to client shard_owner[s]
    owner = np.empty(n, dtype=np.int64)
    for shard, chunk in enumerate(np.array_split(by_label, num_shards)):
        owner[chunk] = shard_owner[shard]
    return owner


# --------------------------------------------------------------------------- quantity skew
def quantity_sizes(
    n: int,
    num_clients: int,
    distribution: str,
    sigma: float,
    exponent: float,
    min_size: int,
    rng: np.random.Generator,
    task: int = 0,
) -> np.ndarray:
    """Client sizes (int64, summing to ``n``, each ``>= min_size``) with a skewed shape.

    Weights: ``lognormal`` draws ``w_k = exp(sigma * z_k)``, ``z_k ~ N(0, 1)``; ``power_law``
    gives the clients the ranks ``1..K`` in a seeded random order and ``w_k = rank_k^-exponent``.
    Sizes are ``max(min_size, t * w_k)`` with the one ``t`` that makes them sum to ``n`` (clients
    lifted to ``min_size`` keep it, the others stay exactly proportional to their weights), then
    rounded by largest remainder (ties: smaller client id), which keeps the sum and the floor.
    """
    if num_clients * min_size > n:
        raise FieldError(
            "clients.partition.min_size",
            f"task {task} has {n} training samples, fewer than num_clients x min_size = "
            f"{num_clients} x {min_size} = {num_clients * min_size}; lower min_size or clients.num_clients",
        )
    if distribution == "lognormal":
        log_w = sigma * rng.standard_normal(num_clients)
    elif distribution == "power_law":
        ranks = rng.permutation(num_clients) + 1
        log_w = -exponent * np.log(ranks.astype(np.float64))
    else:
        raise FieldError("clients.partition.distribution", f"unknown distribution {distribution!r}; allowed: lognormal, power_law")
    w = np.exp(log_w - log_w.max())  # largest weight 1: no overflow, tiny ones may underflow to 0

    # water filling: clients whose proportional share falls below min_size are lifted to it
    floored = np.zeros(num_clients, dtype=bool)
    while True:
        active = ~floored
        t = (n - min_size * int(floored.sum())) / float(w[active].sum())
        low = active & (t * w < min_size)
        if not low.any() or low.sum() == active.sum():
            break
        floored |= low
    real = np.where(floored, float(min_size), t * w)
    sizes = np.floor(real).astype(np.int64)
    sizes = np.maximum(sizes, min_size)
    short = n - int(sizes.sum())
    if short > 0:
        order = np.argsort(-(real - np.floor(real)), kind="stable")
        sizes[order[:short]] += 1
    elif short < 0:  # float round-off only: take single samples from the largest clients
        for k in np.argsort(-sizes, kind="stable")[: -short]:
            sizes[k] -= 1
    return sizes
