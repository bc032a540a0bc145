"""tasks.blurry: a seeded share of the next task's training samples arrives one task early
(simulator/data/blurry.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import tiny

from simulator.data.blurry import leaked_count
from simulator.data.stream import build_stream
from simulator.engine.runner import run_scenario
from simulator.errors import FieldError, UserError
from simulator.scenario import validate_scenario

# the tiny scenario: 6 classes x 32 training samples, tasks of 2 classes (3 tasks)
TASKS = {"initial_classes": 2, "classes_per_task": 2}


def _stream(blurry: float | None = None, seed: int = 1, **tasks):
    t = {**TASKS, **tasks, **({} if blurry is None else {"blurry": blurry})}
    raw = tiny(tasks=t)
    raw["seed"] = seed
    return build_stream(validate_scenario(raw))


def _task_samples(stream, t: int) -> np.ndarray:
    return np.concatenate(stream.train_indices[t])


def test_leaked_count_rounds_down():
    assert [leaked_count(0.3, n) for n in (32, 10, 3, 0)] == [9, 3, 0, 0]  # 9.6 -> 9, 3.0 -> 3 (not 2)
    assert leaked_count(0.29, 100) == 29  # 28.999999999999996 in floating point
    assert leaked_count(0.999, 5) == 4  # a class always keeps a sample in its own task


def test_each_class_of_the_next_task_gives_floor_f_n_of_its_samples():
    sharp, blurry = _stream(0.0), _stream(0.3)
    y = sharp.dataset.y_train
    assert blurry.tasks == sharp.tasks and blurry.leaked == [sharp.tasks[1], sharp.tasks[2], []]
    for t in range(sharp.num_tasks):
        before, after = _task_samples(sharp, t), _task_samples(blurry, t)
        arrived = np.setdiff1d(after, before)
        left = np.setdiff1d(before, after)
        if t + 1 < sharp.num_tasks:  # what arrived: floor(0.3 x n_c) of each class c of task t + 1
            for c in sharp.tasks[t + 1]:
                n_c = int(np.sum(y[_task_samples(sharp, t + 1)] == c))
                assert int(np.sum(y[arrived] == c)) == math.floor(0.3 * n_c) == 9
            assert set(y[arrived].tolist()) == set(sharp.tasks[t + 1])
            assert set(arrived.tolist()) <= set(_task_samples(sharp, t + 1).tolist())
        else:
            assert len(arrived) == 0
        if t > 0:  # what left: exactly the samples task t - 1 received
            assert np.array_equal(np.sort(left), np.sort(np.setdiff1d(_task_samples(blurry, t - 1), _task_samples(sharp, t - 1))))
            assert set(y[left].tolist()) <= set(sharp.tasks[t])
        else:
            assert len(left) == 0
    every = np.concatenate([_task_samples(blurry, t) for t in range(blurry.num_tasks)])
    assert len(every) == len(set(every.tolist()))  # no sample in two tasks (nor twice to one client)
    original = np.concatenate([_task_samples(sharp, t) for t in range(sharp.num_tasks)])
    assert np.array_equal(np.sort(every), np.sort(original))  # together: the same samples
    for t in range(sharp.num_tasks):  # the test sets do not change
        assert np.array_equal(blurry.test_indices[t], sharp.test_indices[t])
    assert blurry.train_classes(0) == sharp.tasks[0] + sharp.tasks[1] and blurry.train_classes(2) == sharp.tasks[2]


def test_the_leak_is_seeded_and_zero_is_the_sharp_stream():
    a, b, other = _stream(0.25), _stream(0.25), _stream(0.25, seed=2)
    for t in range(a.num_tasks):
        assert all(np.array_equal(p, q) for p, q in zip(a.train_indices[t], b.train_indices[t]))
    # another seed: another class order and another choice (compare the moved samples of a class)
    moved = np.setdiff1d(_task_samples(a, 0), _task_samples(_stream(0.0), 0))
    moved_other = np.setdiff1d(_task_samples(_stream(0.25, seed=2, class_order="sorted"), 0),
                               _task_samples(_stream(0.0, seed=2, class_order="sorted"), 0))
    assert len(moved) == len(moved_other) == 16 and not np.array_equal(moved, moved_other)
    assert other.tasks != a.tasks or not np.array_equal(_task_samples(other, 0), _task_samples(a, 0))
    without, zero = _stream(None), _stream(0.0)
    assert zero.leaked == without.leaked == [[], [], []]
    for t in range(without.num_tasks):
        assert all(np.array_equal(p, q) for p, q in zip(without.train_indices[t], zero.train_indices[t]))
        assert np.array_equal(without.test_indices[t], zero.test_indices[t])


@pytest.mark.parametrize("strategy,online", [("fedavg", False), ("proto_avg", False), ("fedavg", True), ("proto_avg", True)])
def test_a_blurry_run_trains_on_next_task_labels_in_task_0(tmp_path, monkeypatch, strategy, online):
    """fedavg trains a head (its cross-entropy must range over the early labels, or the loss is
    infinite), proto_avg uploads prototypes of them; both with a replay memory, offline and online."""
    import simulator.engine.client_app as client_app

    seen_in_task0: list[tuple[set[int], set[int]]] = []
    real = client_app._train_request

    def recorded(rt, pid, task, rnd, state, model, objective, stack, x, y, seen):
        request = real(rt, pid, task, rnd, state, model, objective, stack, x, y, seen)
        if task == 0:
            seen_in_task0.append(({int(c) for c in np.unique(y)}, set(request.seen_classes)))
        return request

    monkeypatch.setattr(client_app, "_train_request", recorded)
    tasks = {**TASKS, "blurry": 0.25, **({"online": {"batch_size": 4, "communicate_every": 4}} if online else {})}
    params = {"share_weights": True} if strategy == "proto_avg" else {}
    raw = tiny(tasks=tasks, strategy={"name": strategy, "params": params}, continual={"memory_per_class": 4},
               training={"rounds_per_task": 3, "local_epochs": 1, "batch_size": 16, "lr": 0.01})
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", out=None, plots=False)
    stream = build_stream(validate_scenario(raw))
    assert run.summary["completed"]
    assert pd.read_csv(tmp_path / "run" / "failures.csv").empty
    for key in ("final_avg_accuracy", "avg_forgetting"):
        assert np.isfinite(run.summary[key]), key
    assert np.isfinite(run.matrix[np.tril_indices(stream.num_tasks)]).all()
    early = set(stream.tasks[1])
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    task0_ids = {int(c) for ids in clients[clients.task == 0].class_ids for c in str(ids).split()}
    assert early <= task0_ids  # the stream gives task 0's clients task 1's classes
    trained = [labels & early for labels, _ in seen_in_task0]
    assert any(trained)  # and they trained on them
    for labels, seen in seen_in_task0:
        assert labels <= seen  # every label trained on is a class the head's loss ranges over


def test_bad_blurry_values_name_the_field(tmp_path):
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(UserError, match=r"tasks\.blurry"):
            validate_scenario(tiny(tasks={**TASKS, "blurry": bad}))
    one_task = tiny(tasks={"num_tasks": 1, "blurry": 0.2})
    with pytest.raises(FieldError) as err:
        build_stream(validate_scenario(one_task))
    assert err.value.field == "tasks.blurry"
    with pytest.raises(UserError, match=r"tasks\.blurry"):
        run_scenario(validate_scenario(one_task), run_dir=tmp_path / "one", out=None, plots=False)
    assert not (tmp_path / "one").exists()  # refused before anything is written
    build_stream(validate_scenario(tiny(tasks={"num_tasks": 1, "blurry": 0.0})))  # 0 is fine with one task


def test_the_cli_refuses_a_single_blurry_task_with_exit_2(tmp_path, capsys):
    import yaml

    from simulator.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny(tasks={"num_tasks": 1})))
    code = main(["run", str(path), "--engine", "inline", "--out", str(tmp_path / "r"), "--set", "tasks.blurry=0.1"])
    assert code == 2
    assert "tasks.blurry" in capsys.readouterr().err
