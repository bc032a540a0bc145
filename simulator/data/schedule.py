"""Which task each client learns at each step of the federation.

Step ``k`` is the server's k-th task period (``rounds_per_task`` rounds). ``schedule[c][k]``
is the global task id client ``c`` learns at step ``k``, or:

* ``ABSENT`` (-1): the client has not joined yet (late arrival); it is neither trained nor
  evaluated;
* ``STALE`` (-2): the client is present but receives no new classes at this step (GLFC-style
  churn); it keeps training on what it holds (its replay memory) and is evaluated.

``clients.task_order: shared`` gives every present client task ``k`` at step ``k``;
``per_client`` gives each client its own seeded permutation of the tasks (asynchronous
federated continual learning, as in FedSpace). ``clients.arrival`` says when clients join and
what fraction of the present clients gets no new task at each step.
"""

from __future__ import annotations

import numpy as np

from ..seeding import rng

ABSENT = -1
STALE = -2


def build_schedule(clients, num_tasks: int, seed: int) -> np.ndarray:
    """``[num_clients, num_tasks]`` int array of global task ids (or ABSENT / STALE)."""
    n = clients.num_clients
    arrival = getattr(clients, "arrival", None)
    order_kind = getattr(clients, "task_order", "shared")

    # step at which each client joins
    joins = np.zeros(n, dtype=np.int64)
    if arrival is not None:
        if arrival.at_task is not None:
            joins = np.asarray(arrival.at_task, dtype=np.int64)
        elif arrival.initial_fraction < 1.0 and num_tasks > 1:
            n0 = max(1, int(round(arrival.initial_fraction * n)))
            order = rng(seed, "arrival").permutation(n)
            late = order[n0:]
            groups = np.array_split(late, num_tasks - 1)
            for step, group in enumerate(groups, start=1):
                joins[group] = step

    steps = np.arange(num_tasks, dtype=np.int64)
    if order_kind == "per_client":  # one seeded permutation per client: O(population) by nature
        sched = np.full((n, num_tasks), ABSENT, dtype=np.int64)
        for c in range(n):
            tasks = rng(seed, "task_order", c).permutation(num_tasks)
            for step in range(int(joins[c]), num_tasks):
                sched[c, step] = tasks[step - int(joins[c])]
    else:  # task k at step k from the client's join on (array operations: a loop took seconds at 1,000,000 clients)
        sched = np.where(steps[None, :] >= joins[:, None], steps[None, :], ABSENT).astype(np.int64)

    stale = arrival.stale_fraction if arrival is not None else 0.0
    if stale > 0:
        for step in range(1, num_tasks):
            present = np.flatnonzero(joins < step)  # joined before this step ("old" clients)
            k = int(round(stale * len(present)))
            if not np.any(joins == step):
                k = min(k, len(present) - 1)  # someone must learn the new task
            if k > 0:
                chosen = rng(seed, "stale", step).choice(present, size=k, replace=False)
                sched[chosen, step] = STALE
    return sched


def receivers(schedule: np.ndarray, task: int) -> list[int]:
    """Clients that learn global task ``task`` at some step (its samples are split among them)."""
    return np.flatnonzero((schedule == task).any(axis=1)).tolist()


def seen_tasks(schedule: np.ndarray, step: int) -> list[int]:
    """Global tasks that some client has learned by the end of ``step``."""
    block = schedule[:, : step + 1]
    return sorted(int(t) for t in np.unique(block[block >= 0]))


def present(schedule: np.ndarray, step: int) -> list[int]:
    """Clients that have joined by ``step``, ascending (``tolist``: converting one by one took
    seconds at 15,000,000 clients)."""
    return np.flatnonzero(schedule[:, step] != ABSENT).tolist()
