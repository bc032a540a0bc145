"""A federated class-incremental stream: the dataset, its tasks and every client's share of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import seeding
from ..errors import FieldError
from .blurry import blur_positions
from .partition import iid_split, partition_task
from .schedule import build_schedule, present, receivers, seen_tasks
from .procedural import ProceduralDataset
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
        return [int(c) for c in self.tasks[task]] + [int(c) for c in self.leaked[task]]

    def leaked_classes(self) -> set[int]:
        """Every class with training samples in the task before its own (``tasks.blurry``)."""
        return {int(c) for classes in self.leaked for c in classes}

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

    def task_sizes(self, task: int) -> np.ndarray:
        """Training samples of each client in ``task`` (int64, one entry per client)."""
        per_client = self.train_indices[task]
        if isinstance(per_client, LazyClientIndices):  # without building any client's array
            return per_client.sizes()
        return np.fromiter((len(i) for i in per_client), dtype=np.int64, count=len(per_client))

    def client_task_sizes(self) -> np.ndarray:
        """Training samples of every (task, client), task by task (one array)."""
        return np.concatenate([self.task_sizes(t) for t in range(self.num_tasks)])

    def summary_rows(self, clients: Sequence[int] | None = None) -> list[dict]:
        """One row per (task, client): samples, number of classes and their ids (computed per
        task with array operations: at 100,000 clients a loop over clients took seconds);
        ``clients`` keeps only those clients' rows."""
        rows: list[dict] = []
        keep = None if clients is None else {int(c) for c in clients}
        for t, per_client in enumerate(self.train_indices):
            n = len(per_client)
            sizes = self.task_sizes(t)
            owner = np.repeat(np.arange(n, dtype=np.int64), sizes)
            flat = np.concatenate(per_client).astype(np.int64, copy=False) if sizes.sum() else np.zeros(0, np.int64)
            labels = np.asarray(self.dataset.y_train, dtype=np.int64)[flat]
            width = int(labels.max()) + 1 if len(labels) else 1
            pairs = np.unique(owner * width + labels)  # distinct (client, class), sorted by client then class
            pair_client, pair_class = pairs // width, pairs % width
            starts = np.searchsorted(pair_client, np.arange(n + 1))
            step = self._steps(t)
            for client in range(n):
                if keep is not None and client not in keep:
                    continue
                ids = pair_class[starts[client]:starts[client + 1]]
                rows.append(_row(t, client, int(step[client]), int(sizes[client]), ids))
        return rows

    def _steps(self, task: int, clients: Sequence[int] | None = None) -> np.ndarray:
        """The step at which each client (or each of ``clients``) learns ``task`` (-1: never)."""
        at_t = (self.schedule if clients is None else self.schedule[np.asarray(clients, dtype=np.int64)]) == task
        return np.where(at_t.any(axis=1), at_t.argmax(axis=1), -1)


CLIENT_COLUMNS = ("task", "client", "step", "samples", "classes", "class_ids")


def _row(task: int, client: int, step: int, samples: int, class_ids: np.ndarray) -> dict:
    return {"task": task, "client": client, "step": step, "samples": samples,
            "classes": int(len(class_ids)), "class_ids": " ".join(map(str, class_ids.tolist()))}


class LazyClientIndices(Sequence):
    """``train_indices[task]`` computed per client when asked for, instead of one array per
    client of the population: ``_client(c)`` gives client ``c``'s indices, ``sizes()`` every
    client's count."""

    def __len__(self) -> int:
        raise NotImplementedError

    def _client(self, client: int) -> np.ndarray:
        raise NotImplementedError

    def sizes(self) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, client):  # type: ignore[override]
        if isinstance(client, slice):
            return [self[c] for c in range(*client.indices(len(self)))]
        client = int(client)
        if not 0 <= client < len(self):
            raise IndexError(client)  # also ends iteration (Sequence.__iter__)
        return self._client(client)


class TaskIndices(LazyClientIndices):
    """A procedural stream's task (:mod:`simulator.data.procedural`): client -> its virtual
    sample indices; empty for a client that never learns the task."""

    def __init__(self, learns: np.ndarray, task: int, num_tasks: int, size: int) -> None:
        self.learns, self.task, self.num_tasks, self.size = learns, task, num_tasks, size

    def __len__(self) -> int:
        return len(self.learns)

    def _client(self, client: int) -> np.ndarray:
        if not self.learns[client]:
            return np.zeros(0, dtype=np.int64)
        start = (client * self.num_tasks + self.task) * self.size
        return np.arange(start, start + self.size, dtype=np.int64)

    def sizes(self) -> np.ndarray:
        return self.learns.astype(np.int64) * self.size


class IidTaskIndices(LazyClientIndices):
    """An iid split of a finite dataset's task: client -> its sample indices, from one
    permutation and the split's bounds (``simulator.data.partition.iid_split``; the arrays are the
    ones the eager split gives: ``tests/test_procedural.py``)."""

    def __init__(self, pos: np.ndarray, perm: np.ndarray, bounds: np.ndarray, receivers: np.ndarray,
                 num_clients: int) -> None:
        self.pos, self.perm, self.bounds = pos, perm, bounds
        self.part = np.full(num_clients, -1, dtype=np.int64)  # client -> its share (-1: learns no sample of the task)
        self.part[receivers] = np.arange(len(receivers), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.part)

    def _client(self, client: int) -> np.ndarray:
        k = int(self.part[client])
        if k < 0:
            return np.zeros(0, dtype=np.int64)
        return self.pos[np.sort(self.perm[self.bounds[k]:self.bounds[k + 1]])]

    def sizes(self) -> np.ndarray:
        share = np.diff(self.bounds)
        return np.where(self.part >= 0, share[np.maximum(self.part, 0)], 0).astype(np.int64)


@dataclass
class ProceduralStream(FederatedStream):
    """A stream whose clients are derived when asked for (``dataset.source: procedural``):
    nothing here grows with the population except the schedule (one int per client and step)."""

    # (task, client) -> its clients.csv row, derived once; kept by the driver, not pickled to actors
    rows_known: dict[tuple[int, int], dict] = field(default_factory=dict, repr=False, compare=False)

    def summary_rows(self, clients: Sequence[int] | None = None) -> list[dict]:
        """Rows of ``clients`` only (the population's would be millions): by default none. A
        client's rows never change, so each is derived once (``clients.csv`` is rewritten at
        every task's end with the clients that took part so far)."""
        wanted = sorted(int(c) for c in (clients or ()))
        blocks = self.dataset.blocks
        for t in range(self.num_tasks):
            new = [c for c in wanted if (t, c) not in self.rows_known]
            if not new:
                continue
            task = self.train_indices[t]  # TaskIndices: the new clients' counts, not the population's
            steps, sizes = self._steps(t, new), task.learns[new].astype(np.int64) * task.size
            for client, step, size in zip(new, steps.tolist(), sizes.tolist()):
                ids = np.unique(blocks.labels(client, t)) if size else np.zeros(0, np.int64)
                self.rows_known[t, client] = _row(t, client, int(step), int(size), ids)
        return [self.rows_known[t, c] for t in range(self.num_tasks) for c in wanted]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "rows_known": {}}


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
    if isinstance(data, ProceduralDataset):
        return procedural_stream(scenario, data, order, tasks, schedule)
    train_indices: list[list[np.ndarray]] = []
    test_indices: list[np.ndarray] = []
    empty = np.zeros(0, dtype=np.int64)
    positions = [np.flatnonzero(np.isin(data.y_train, classes)).astype(np.int64) for classes in tasks]
    blurry = float(scenario.tasks.blurry)
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
        gen = seeding.rng(seed, "partition", t)
        if scenario.clients.partition.scheme == "iid":  # computed per client when asked for (same arrays)
            perm, bounds = iid_split(len(pos), len(recv), gen, t)
            train_indices.append(IidTaskIndices(pos, perm, bounds, np.asarray(recv, dtype=np.int64), num_clients))
        else:
            parts = partition_task(data.y_train[pos], len(recv), scenario.clients.partition, gen, t)
            per_client = [empty] * num_clients
            for c, p in zip(recv, parts):
                per_client[c] = pos[p]
            train_indices.append(per_client)
        test_indices.append(np.flatnonzero(np.isin(data.y_test, classes)).astype(np.int64))
    return FederatedStream(data, order, tasks, train_indices, test_indices, schedule, leaked)


def procedural_stream(scenario: "Scenario", data: ProceduralDataset, order: list[int], tasks: list[list[int]],
                      schedule: np.ndarray) -> ProceduralStream:
    """The stream of a procedural source: the layout only (no client's samples exist yet)."""
    part = scenario.clients.partition
    if scenario.tasks.blurry > 0:
        raise FieldError("tasks.blurry", "moves samples of a finite dataset between tasks; dataset.source: procedural "
                                         "generates each client's task data from its own mixture: set tasks.blurry to 0")
    if part.scheme not in ("iid", "dirichlet"):
        raise FieldError(
            "clients.partition.scheme",
            f"dataset.source: procedural derives each client's class mixture itself (iid: uniform; dirichlet: "
            f"~ Dir(alpha) per client and task); scheme {part.scheme!r} splits a finite dataset and does not apply",
        )
    data.bind(tasks, int(scenario.clients.num_clients), float(part.alpha) if part.scheme == "dirichlet" else None)
    size = data.blocks.size
    train = [TaskIndices((schedule == t).any(axis=1), t, len(tasks), size) for t in range(len(tasks))]
    for t, classes in enumerate(tasks):
        if not train[t].learns.any():
            raise FieldError("clients.arrival", f"task {t} (classes {[int(c) for c in classes]}) is learned by no client")
    test = [np.flatnonzero(np.isin(data.y_test, classes)).astype(np.int64) for classes in tasks]
    return ProceduralStream(data, order, tasks, train, test, schedule)
