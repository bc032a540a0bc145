"""Class order, task splitting, client partitioning and the assembled federated stream."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from simulator.data.partition import partition_task, repair_min_size
from simulator.data.stream import FederatedStream, build_stream
from simulator.data.tasks import make_class_order, split_into_tasks
from simulator.errors import FieldError
from simulator.scenario import (
    ClientsConfig,
    DatasetConfig,
    DirichletPartition,
    IidPartition,
    PathologicalPartition,
    TasksConfig,
)

IID = IidPartition()


def dirichlet(alpha: float = 0.5, min_size: int = 1) -> DirichletPartition:
    return DirichletPartition(scheme="dirichlet", alpha=alpha, min_size=min_size)


def patho(k: int) -> PathologicalPartition:
    return PathologicalPartition(scheme="pathological", classes_per_client=k)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def task_labels(classes=(3, 5, 8, 9), per_class: int = 50) -> np.ndarray:
    labels = np.repeat(np.asarray(classes), per_class)
    return labels[rng(99).permutation(len(labels))]


def assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted ascending, no duplicates within a client
    allpos = np.concatenate(parts)
    assert len(allpos) == n
    np.testing.assert_array_equal(np.sort(allpos), np.arange(n))


# --------------------------------------------------------------------------- class order
def test_class_order_sorted_seeded_explicit():
    assert make_class_order(TasksConfig(class_order="sorted"), 5, seed=0) == [0, 1, 2, 3, 4]
    seeded = make_class_order(TasksConfig(class_order="seeded"), 10, seed=0)
    assert sorted(seeded) == list(range(10)) and seeded != list(range(10))
    assert seeded == make_class_order(TasksConfig(class_order="seeded"), 10, seed=0)
    assert seeded != make_class_order(TasksConfig(class_order="seeded"), 10, seed=1)
    assert make_class_order(TasksConfig(class_order=[2, 0, 3, 1]), 4, seed=0) == [2, 0, 3, 1]


def test_class_order_explicit_validation():
    with pytest.raises(FieldError) as e:
        make_class_order(TasksConfig(class_order=[0, 1, 1, 7]), 4, seed=0)
    assert e.value.field == "tasks.class_order"
    msg = e.value.message
    assert "each of the 4 classes exactly once" in msg
    assert "missing [2, 3]" in msg and "repeated [1]" in msg and "out of range [7]" in msg
    with pytest.raises(FieldError) as e:
        make_class_order(TasksConfig(class_order=[0, 1, 2]), 4, seed=0)
    assert "missing [3]" in e.value.message and "repeated" not in e.value.message


# --------------------------------------------------------------------------- tasks
def tasks_of(order_len: int, **kw) -> list[list[int]]:
    return split_into_tasks(list(range(order_len)), TasksConfig(**kw))


def test_split_classes_per_task():
    assert tasks_of(10, classes_per_task=2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert tasks_of(10, classes_per_task=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert tasks_of(10, initial_classes=4, classes_per_task=2) == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert tasks_of(10, initial_classes=6, classes_per_task=3) == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9]]
    assert tasks_of(10, initial_classes=10) == [list(range(10))]  # joint training: one task
    assert tasks_of(4) == [[0, 1], [2, 3]]  # default: 2 classes per task
    # the class order is respected, not the ids
    assert split_into_tasks([7, 1, 4, 0, 9], TasksConfig(initial_classes=3, classes_per_task=1)) == [[7, 1, 4], [0], [9]]


def test_split_num_tasks():
    assert tasks_of(10, num_tasks=3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert tasks_of(10, num_tasks=10) == [[i] for i in range(10)]
    assert tasks_of(10, num_tasks=1) == [list(range(10))]
    assert tasks_of(10, initial_classes=4, num_tasks=4) == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert tasks_of(10, initial_classes=5, num_tasks=3) == [[0, 1, 2, 3, 4], [5, 6, 7], [8, 9]]
    assert tasks_of(10, initial_classes=10, num_tasks=1) == [list(range(10))]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"initial_classes": 11}, "tasks.initial_classes"),
        ({"num_tasks": 11}, "tasks.num_tasks"),
        ({"classes_per_task": 11}, "tasks.classes_per_task"),
        ({"initial_classes": 10, "num_tasks": 2}, "tasks.num_tasks"),
        ({"initial_classes": 4, "num_tasks": 1}, "tasks.num_tasks"),
        ({"initial_classes": 8, "num_tasks": 4}, "tasks.num_tasks"),  # 3 more tasks, 2 classes left
    ],
)
def test_split_impossible_requests(kw, field):
    with pytest.raises(FieldError) as e:
        tasks_of(10, **kw)
    assert e.value.field == field


# --------------------------------------------------------------------------- partitions
@pytest.mark.parametrize("cfg", [IID, dirichlet(0.1, 0), dirichlet(0.5, 5), dirichlet(1000.0), patho(1), patho(2), patho(9)])
@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_every_sample_exactly_once(cfg, num_clients):
    labels = task_labels()
    if cfg.scheme == "pathological" and num_clients * min(cfg.classes_per_client, 4) < 4:
        with pytest.raises(FieldError):  # some of the 4 classes would have no holder
            partition_task(labels, num_clients, cfg, rng(1), task=2)
        return
    parts = partition_task(labels, num_clients, cfg, rng(1), task=2)
    assert_exact_cover(parts, len(labels), num_clients)
    again = partition_task(labels, num_clients, cfg, rng(1), task=2)
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)


def test_iid_sizes_and_too_many_clients():
    labels = task_labels(per_class=5)  # 20 samples
    sizes = [len(p) for p in partition_task(labels, 6, IID, rng(), task=0)]
    assert sorted(sizes) == [3, 3, 3, 3, 4, 4]
    with pytest.raises(FieldError) as e:
        partition_task(labels, 21, IID, rng(), task=3)
    assert e.value.field == "clients.num_clients"
    assert "task 3" in e.value.message and "20" in e.value.message and "21" in e.value.message


def label_skew(alpha: float, seeds=range(6)) -> float:
    """Mean over clients (and seeds) of the largest class share of the client's data."""
    labels = np.repeat(np.arange(10), 100)
    shares = []
    for s in seeds:
        for p in partition_task(labels, 10, dirichlet(alpha, 1), rng(s), task=0):
            shares.append(np.bincount(labels[p], minlength=10).max() / len(p))
    return float(np.mean(shares))


def test_dirichlet_alpha_controls_label_skew():
    skewed, uniform = label_skew(0.1), label_skew(100.0)
    assert skewed > 0.5
    assert uniform < 0.2
    assert skewed - uniform > 0.3


def test_dirichlet_min_size_respected_including_repair():
    labels = np.repeat(np.arange(4), 250)  # 1000 samples
    for seed in range(5):
        parts = partition_task(labels, 10, dirichlet(0.01, 95), rng(seed), task=0)
        assert_exact_cover(parts, 1000, 10)
        assert min(len(p) for p in parts) >= 95
    # the exact bound: 10 x 100 = 1000 samples leaves every client exactly 100
    parts = partition_task(labels, 10, dirichlet(0.01, 100), rng(0), task=0)
    assert [len(p) for p in parts] == [100] * 10


def test_repair_min_size_hand_computed():
    # sizes [10, 0, 5, 1], min_size 3: deficit 3 + 2 = 5; level 5 (clients above 5 give down to 5)
    owner = np.array([0] * 10 + [2] * 5 + [3])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1] + [2] * 5 + [3])
    fixed = repair_min_size(owner, labels, num_clients=4, min_size=3)
    np.testing.assert_array_equal(np.bincount(fixed, minlength=4), [5, 3, 5, 3])
    # client 0 gives its most frequent class (0) first, largest positions first: 5, 4, 3, 2, 1
    np.testing.assert_array_equal(np.flatnonzero(fixed == 1), [3, 4, 5])  # receiver 1 takes the first 3
    np.testing.assert_array_equal(np.flatnonzero(fixed == 3), [1, 2, 15])  # receiver 3 the next 2
    np.testing.assert_array_equal(fixed[6:15], owner[6:15])  # nothing else moved
    # ties at the top are broken by client id
    owner = np.array([0, 0, 0, 1, 1, 1])
    fixed = repair_min_size(owner, np.zeros(6, int), num_clients=3, min_size=1)
    np.testing.assert_array_equal(np.bincount(fixed, minlength=3), [2, 3, 1])


def test_dirichlet_infeasible_min_size():
    with pytest.raises(FieldError) as e:
        partition_task(task_labels(per_class=5), 5, dirichlet(0.5, 5), rng(), task=4)
    assert e.value.field == "clients.partition.min_size"
    assert "task 4" in e.value.message and "20" in e.value.message and "25" in e.value.message


def test_pathological_class_limits():
    labels = task_labels(classes=range(6), per_class=10)
    for k in (1, 2, 3):
        parts = partition_task(labels, 6, patho(k), rng(k), task=0)
        assert_exact_cover(parts, len(labels), 6)
        for p in parts:
            assert len(np.unique(labels[p])) == k
    # each class is split evenly among its holders (3 clients x 2 classes = 6 slots for 6 classes)
    parts = partition_task(labels, 3, patho(2), rng(0), task=0)
    assert sorted(len(p) for p in parts) == [20, 20, 20]
    # k larger than the task's class count: every client holds all of them
    parts = partition_task(labels, 2, patho(9), rng(0), task=0)
    assert all(len(np.unique(labels[p])) == 6 for p in parts)


def test_pathological_uncovered_class_and_empty_clients():
    labels = task_labels(classes=range(5), per_class=4)
    with pytest.raises(FieldError) as e:
        partition_task(labels, 2, patho(2), rng(), task=1)
    assert e.value.field == "clients.partition.classes_per_client"
    assert "task 1" in e.value.message and "5 classes" in e.value.message
    # more holders than samples of a class: some holders get nothing, still an exact cover
    labels = np.array([0, 1])
    parts = partition_task(labels, 6, patho(1), rng(), task=0)
    assert_exact_cover(parts, 2, 6)
    assert sorted(len(p) for p in parts) == [0, 0, 0, 0, 1, 1]


# --------------------------------------------------------------------------- stream
def scenario_ns(partition: dict, num_clients: int = 4, seed: int = 0, **tasks) -> SimpleNamespace:
    """The parts of a Scenario that build_stream reads, built from the real config models."""
    return SimpleNamespace(
        seed=seed,
        dataset=DatasetConfig(source="synthetic", num_classes=6, dim=4, samples_per_class=30),
        tasks=TasksConfig(**(tasks or {"initial_classes": 2, "classes_per_task": 2})),
        clients=ClientsConfig(num_clients=num_clients, partition=partition),
    )


def check_stream(s: FederatedStream) -> None:
    ds = s.dataset
    assert sorted(c for t in s.tasks for c in t) == list(range(ds.num_classes))
    assert sorted(s.class_order) == list(range(ds.num_classes))
    all_train = []
    for t, classes in enumerate(s.tasks):
        task_train = np.concatenate(s.train_indices[t])
        all_train.append(task_train)
        # the task holds exactly its classes, train and test, and all of their samples
        assert set(ds.y_train[task_train].tolist()) == set(classes)
        np.testing.assert_array_equal(np.sort(task_train), np.flatnonzero(np.isin(ds.y_train, classes)))
        assert set(ds.y_test[s.test_indices[t]].tolist()) == set(classes)
        np.testing.assert_array_equal(s.test_indices[t], np.flatnonzero(np.isin(ds.y_test, classes)))
    joined = np.concatenate(all_train)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(ds.y_train)))  # each sample once overall


@pytest.mark.parametrize(
    "partition",
    [{"scheme": "iid"}, {"scheme": "dirichlet", "alpha": 0.3, "min_size": 3}, {"scheme": "pathological", "classes_per_client": 1}],
)
def test_build_stream_covers_everything(partition):
    s = build_stream(scenario_ns(partition))
    assert s.num_tasks == 3 and s.num_clients == 4
    assert [len(t) for t in s.tasks] == [2, 2, 2]
    check_stream(s)


def test_build_stream_helpers_and_determinism():
    sc = scenario_ns({"scheme": "dirichlet", "alpha": 0.5}, num_clients=3)
    s = build_stream(sc)
    t2c = s.task_of_class()
    assert all(t2c[c] == t for t, cl in enumerate(s.tasks) for c in cl)
    assert s.seen_classes(0) == s.tasks[0]
    assert s.seen_classes(2) == s.tasks[0] + s.tasks[1] + s.tasks[2] == s.class_order
    x, y = s.client_data(1, 2)
    idx = s.train_indices[1][2]
    np.testing.assert_array_equal(x, s.dataset.x_train[idx])
    assert set(y.tolist()) <= set(s.tasks[1])
    xt, yt = s.test_data(1)
    assert len(xt) == len(yt) == len(s.test_indices[1])

    rows = s.summary_rows()
    assert len(rows) == 3 * 3
    assert [(r["task"], r["client"]) for r in rows[:4]] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    for r in rows:
        ids = [int(c) for c in r["class_ids"].split()]
        part = s.train_indices[r["task"]][r["client"]]
        assert r["samples"] == len(part)
        assert r["classes"] == len(ids) and ids == sorted(set(s.dataset.y_train[part].tolist()))

    again = build_stream(sc)
    assert again.class_order == s.class_order
    for a, b in zip(s.train_indices, again.train_indices):
        for pa, pb in zip(a, b):
            np.testing.assert_array_equal(pa, pb)
    other = build_stream(scenario_ns({"scheme": "dirichlet", "alpha": 0.5}, num_clients=3, seed=1))
    assert other.class_order != s.class_order or any(
        not np.array_equal(pa, pb) for a, b in zip(s.train_indices, other.train_indices) for pa, pb in zip(a, b)
    )


def test_build_stream_partition_errors_name_the_field():
    with pytest.raises(FieldError) as e:
        build_stream(scenario_ns({"scheme": "iid"}, num_clients=200))
    assert e.value.field == "clients.num_clients" and "task 0" in e.value.message


def test_build_stream_from_validated_scenario():
    """The real path: a raw scenario mapping validated by the scenario module."""
    from simulator.scenario import validate_scenario

    scenario = validate_scenario(
        {
            "seed": 3,
            "dataset": {"source": "synthetic", "num_classes": 5, "samples_per_class": 12, "dim": 3},
            "tasks": {"initial_classes": 3, "num_tasks": 3, "class_order": "sorted"},
            "clients": {"num_clients": 2, "partition": {"scheme": "iid"}},
        }
    )
    assert scenario.dataset.params()["class_sep"] == 3.0  # the source's defaults were filled in
    s = build_stream(scenario)
    assert s.tasks == [[0, 1, 2], [3], [4]]
    assert s.dataset.input_shape == (3,)
    check_stream(s)
