"""Online continual learning (``tasks.online``): each client's data of a task is a stream seen once.

A client's samples of a task are put in one seeded order (the stream), cut into batches of
``batch_size``, and round ``r`` of the task trains on batches ``r K .. r K + K - 1`` with ``K =
communicate_every``: one SGD step per batch, each sample once. After ``rounds_per_task`` rounds
the samples still unseen are never seen (the run warns how many). With a replay memory each
round also trains on as many memory samples as it has stream samples, drawn from the memory
without replacement (experience replay, ER; the two are shuffled together in the local loop
rather than paired batch by batch), so a client whose stream is spent, or that gets no new
classes, takes no step: replaying the memory alone for the rest of a task would train away the
task being learned (measured on the quickstart: the new task's accuracy at its end fell to 0.00
- 0.12 when spent clients kept training on their memory). The memory is filled at the task's end
from the samples the client has seen, as in the offline mode. ``continual.apf`` (OnPro's adaptive
prototypical feedback, :mod:`simulator.learner.continual.onpro`) replaces the uniform draw with
one biased towards pairs of classes whose prototypes are close, mixed.
"""

from __future__ import annotations

import numpy as np

from ..seeding import rng


def stream_order(indices: np.ndarray, seed: int, client: int, task: int) -> np.ndarray:
    """The client's samples of ``task`` in the order its stream delivers them."""
    return np.asarray(indices)[rng(seed, "online_stream", client, task).permutation(len(indices))]


def round_slice(indices: np.ndarray, seed: int, client: int, task: int, rnd: int, batch_size: int,
                every: int) -> np.ndarray:
    """The samples round ``rnd`` of ``task`` trains on (empty once the stream is spent)."""
    per_round = batch_size * every
    return stream_order(indices, seed, client, task)[rnd * per_round : (rnd + 1) * per_round]


def seen_part(indices: np.ndarray, seed: int, client: int, task: int, rounds: int, batch_size: int,
              every: int) -> np.ndarray:
    """Every sample the client's stream has delivered after ``rounds`` rounds of ``task``."""
    return stream_order(indices, seed, client, task)[: rounds * batch_size * every]


def replay_sample(memory: np.ndarray, seed: int, client: int, task: int, rnd: int, size: int) -> np.ndarray:
    """``size`` memory samples (all when it holds fewer) for round ``rnd``."""
    memory = np.asarray(memory)
    if len(memory) <= size:
        return memory
    pick = rng(seed, "online_replay", client, task, rnd).choice(len(memory), size=size, replace=False)
    return memory[np.sort(pick)]


def unseen(sizes: np.ndarray, rounds: int, batch_size: int, every: int) -> tuple[int, int]:
    """``(samples never delivered, all samples)`` from the client-task sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    cap = rounds * batch_size * every
    return int(np.maximum(sizes - cap, 0).sum()), int(sizes.sum())
