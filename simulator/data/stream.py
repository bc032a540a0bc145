"""A federated class-incremental stream: the dataset, its tasks and every client's share of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import seeding
from .partition import partition_task
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

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_clients(self) -> int:
        return len(self.train_indices[0]) if self.train_indices else 0

    def task_of_class(self) -> dict[int, int]:
        """Class id -> the task that introduces it."""
        return {c: t for t, classes in enumerate(self.tasks) for c in classes}

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
        """One row per (task, client): samples, number of classes and their ids."""
        rows = []
        for t, per_client in enumerate(self.train_indices):
            for client, idx in enumerate(per_client):
                classes = np.unique(self.dataset.y_train[idx])
                rows.append(
                    {
                        "task": t,
                        "client": client,
                        "samples": int(len(idx)),
                        "classes": int(len(classes)),
                        "class_ids": " ".join(str(int(c)) for c in classes),
                    }
                )
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
    train_indices: list[list[np.ndarray]] = []
    test_indices: list[np.ndarray] = []
    for t, classes in enumerate(tasks):
        pos = np.flatnonzero(np.isin(data.y_train, classes)).astype(np.int64)
        parts = partition_task(
            data.y_train[pos], num_clients, scenario.clients.partition, seeding.rng(seed, "partition", t), t
        )
        train_indices.append([pos[p] for p in parts])
        test_indices.append(np.flatnonzero(np.isin(data.y_test, classes)).astype(np.int64))
    return FederatedStream(data, order, tasks, train_indices, test_indices)
