"""A federated class-incremental stream: the dataset, its tasks and every client's share of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import seeding
from ..errors import FieldError
from .blurry import blur_positions
from .partition import partition_task
from .schedule import build_schedule, present, receivers, seen_tasks
from .sources import ArrayDataset, load_dataset
from .tasks import make_class_order, split_into_tasks

if TYPE_CHECKING:  # pragma: no cover
    from ..scenario import Scenario


@dataclass
class FederatedStream:
    """Tasks of classes, and per task and client the indices of its training samples."""

    dataset: ArrayDataset
    class_order: list[int]
    tasks: list[list[int]]  # class ids per task
    train_indices: list[list[np.ndarray]]  # [task][client] -> indices into dataset.x_train
    test_indices: list[np.ndarray]  # [task] -> indices into dataset.x_test
    schedule: np.ndarray | None = None  # [client, step] -> global task id, ABSENT or STALE (see schedule.py)
    leaked: list[list[int]] | None = None  # [task t] -> classes of task t+1 with training samples in task t (tasks.blurry)

    def __post_init__(self) -> None:
        if self.schedule is None:  # everyone learns task k at step k
            self.schedule = np.tile(np.arange(len(self.tasks), dtype=np.int64), (len(self.train_indices[0]) if self.train_indices else 0, 1))
        if self.leaked is None:
            self.leaked = [[] for _ in self.tasks]

    def task_at(self, client: int, step: int) -> int:
        """The global task ``client`` learns at ``step`` (or ABSENT / STALE)."""
        return int(self.schedule[client, step])

    def seen_tasks(self, step: int) -> list[int]:
        """Global tasks some client has learned by the end of ``step``."""
        return seen_tasks(self.schedule, step)

    def present(self, step: int) -> list[int]:
        """Clients that have joined by ``step``."""
        return present(self.schedule, step)

    def seen_classes_at(self, step: int) -> list[int]:
        """Classes of every task seen by some client by the end of ``step``."""
        return [c for t in self.seen_tasks(step) for c in self.tasks[t]]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_clients(self) -> int:
        return len(self.train_indices[0]) if self.train_indices else 0

    def task_of_class(self) -> dict[int, int]:
        """Class id -> the task that introduces it."""
        return {c: t for t, classes in enumerate(self.tasks) for c in classes}

    def train_classes(self, task: int) -> list[int]:
        """Classes of ``task``'s training samples: its own, then those of the next task that
        leaked into it (``tasks.blurry``; none with sharp boundaries)."""
        leaked = getattr(self, "leaked", None) or [[] for _ in self.tasks]  # a stream pickled before tasks.blurry
        return [int(c) for c in self.tasks[task]] + [int(c) for c in leaked[task]]

    def leaked_classes(self) -> set[int]:
        """Every class with training samples in the task before its own (``tasks.blurry``)."""
        return {int(c) for classes in (getattr(self, "leaked", None) or []) for c in classes}

    def seen_classes(self, task: int) -> list[int]:
        """Classes of tasks ``0..task``, in arrival order."""
        return [c for classes in self.tasks[: task + 1] for c in classes]

    def client_data(self, task: int, client: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` training arrays of one client for one task."""
        idx = self.train_indices[task][client]
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def test_data(self, task: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of all test samples of one task's classes."""
        idx = self.test_indices[task]
        return self.dataset.x_test[idx], self.dataset.y_test[idx]

    def summary_rows(self) -> list[dict]:
        """One row per (task, client): samples, number of classes and their ids (computed per
        task with array operations: at 100,000 clients a loop over clients took seconds)."""
        rows: list[dict] = []
        for t, per_client in enumerate(self.train_indices):
            n = len(per_client)
            sizes = np.fromiter((len(i) for i in per_client), dtype=np.int64, count=n)
            owner = np.repeat(np.arange(n, dtype=np.int64), sizes)
            flat = np.concatenate(per_client).astype(np.int64, copy=False) if sizes.sum() else np.zeros(0, np.int64)
            labels = np.asarray(self.dataset.y_train, dtype=np.int64)[flat]
            width = int(labels.max()) + 1 if len(labels) else 1
            pairs = np.unique(owner * width + labels)  # distinct (client, class), sorted by client then class
            pair_client, pair_class = pairs // width, pairs % width
            starts = np.searchsorted(pair_client, np.arange(n + 1))
            at_t = self.schedule == t
            step = np.where(at_t.any(axis=1), at_t.argmax(axis=1), -1)
            for client in range(n):
                ids = pair_class[starts[client]:starts[client + 1]]
                rows.append({"task": t, "client": client, "step": int(step[client]), "samples": int(sizes[client]),
                             "classes": int(len(ids)), "class_ids": " ".join(map(str, ids.tolist()))})
        return rows


def build_stream(scenario: "Scenario") -> FederatedStream:
    """Load the data, order the classes, cut tasks and partition each task among the clients.

    Deterministic for a given scenario: every random choice comes from ``scenario.seed``.
    """
    seed = int(scenario.seed)
    data = load_dataset(scenario.dataset, seed)
    order = make_class_order(scenario.tasks, data.num_classes, seed)
    tasks = split_into_tasks(order, scenario.tasks)
    num_clients = int(scenario.clients.num_clients)
    schedule = build_schedule(scenario.clients, len(tasks), seed)
    train_indices: list[list[np.ndarray]] = []
    test_indices: list[np.ndarray] = []
    empty = np.zeros(0, dtype=np.int64)
    positions = [np.flatnonzero(np.isin(data.y_train, classes)).astype(np.int64) for classes in tasks]
    blurry = float(getattr(scenario.tasks, "blurry", 0.0))
    if blurry > 0 and len(tasks) < 2:
        raise FieldError("tasks.blurry", f"is {blurry}, but the stream has a single task (classes "
                                         f"{[int(c) for c in tasks[0]]}): there is no next task to leak from; "
                                         "set tasks.blurry to 0 or cut the classes into more tasks")
    positions, leaked = blur_positions(data.y_train, tasks, positions, blurry, seed)
    for t, classes in enumerate(tasks):
        pos = positions[t]
        recv = receivers(schedule, t)  # only clients that learn task t get its samples
        if not recv:
            raise FieldError(
                "clients.arrival",
                f"task {t} (classes {[int(c) for c in classes]}) is learned by no client: every client is absent "
                f"(arrival.at_task) or stale (arrival.stale_fraction) whenever its task order (clients.task_order: "
                f"{getattr(scenario.clients, 'task_order', 'shared')}) reaches it; lower arrival.stale_fraction, "
                "let clients join earlier, or use task_order: shared",
            )
        parts = partition_task(
            data.y_train[pos], len(recv), scenario.clients.partition, seeding.rng(seed, "partition", t), t
        )
        per_client = [empty] * num_clients
        for c, p in zip(recv, parts):
            per_client[c] = pos[p]
        train_indices.append(per_client)
        test_indices.append(np.flatnonzero(np.isin(data.y_test, classes)).astype(np.int64))
    return FederatedStream(data, order, tasks, train_indices, test_indices, schedule, leaked)
