"""resources.state_store: sqlite — every client's state in one SQLite database."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import time

import numpy as np
import pytest
import torch
from helpers import interrupted_then_resumed, run_tiny

from simulator.engine.checkpoint import load_checkpoint, save_checkpoint
from simulator.engine.state_store import SqliteClientStateStore, make_store


def _state(pid: int, version: int, size: int = 1000) -> dict:
    return {"model": {"w": torch.full((size,), float(version))}, "pid": pid, "version": version}


def test_round_trip_and_a_failed_cohort_writes_nothing(tmp_path):
    store = make_store("sqlite", tmp_path / "clients")
    assert isinstance(store, SqliteClientStateStore) and store.load(3) is None
    store.save(3, _state(3, 1))
    assert store.load(3)["version"] == 1
    with pytest.raises(RuntimeError):
        with store.deferred():
            store.save(3, _state(3, 2))
            store.save(4, _state(4, 2))
            assert store.load(3)["version"] == 2  # the block sees its own writes
            raise RuntimeError("a worker dies mid-cohort")
    assert store.load(3)["version"] == 1 and store.load(4) is None
    with store.deferred():
        store.save(3, _state(3, 3))
        store.save(4, _state(4, 3))
    assert [store.load(p)["version"] for p in (3, 4)] == [3, 3]
    names = os.listdir(tmp_path / "clients")  # one database (and its WAL), however many clients
    assert "clients.sqlite" in names and all(n.startswith("clients.sqlite") for n in names) and len(names) <= 3


def _writer(root: str, first: int, count: int, rounds: int, start: int = 0) -> None:
    store = SqliteClientStateStore(root)
    for version in range(start, start + rounds):
        with store.deferred():
            for pid in range(first, first + count):
                store.save(pid, _state(pid, version, size=20_000))


def test_processes_write_at_once_and_a_killed_writer_leaves_whole_states(tmp_path):
    """Two writers at once (as Ray actors), then one killed while it writes: every state left
    loads, and within each cohort all members have the same version (a transaction per cohort)."""
    root = str(tmp_path / "clients")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, first, 20, 3)) for first in (0, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = SqliteClientStateStore(root)
    assert [store.load(p)["version"] for p in range(40)] == [2] * 40
    victim = ctx.Process(target=_writer, args=(root, 0, 20, 100_000, 100))
    victim.start()
    deadline = time.monotonic() + 300
    while store.load(0)["version"] < 102 and time.monotonic() < deadline:  # cohorts written, the next in flight
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join()
    states = [store.load(p) for p in range(20)]
    versions = {st["version"] for st in states}
    assert len(versions) == 1 and min(versions) >= 102, versions  # no cohort is half-written
    for st in states:  # each blob whole
        assert torch.equal(st["model"]["w"], torch.full((20_000,), float(st["version"])))
    with sqlite3.connect(tmp_path / "clients" / "clients.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_checkpoint_is_a_snapshot_that_later_saves_do_not_touch(tmp_path):
    store = SqliteClientStateStore(tmp_path / "clients")
    for pid in range(5):
        store.save(pid, _state(pid, 1))
    save_checkpoint(tmp_path / "run", 0, {}, {}, store.root)
    for pid in range(5):
        store.save(pid, _state(pid, 2))  # written in place: a hard-linked copy would change too
    load_checkpoint(tmp_path / "run", store.root)
    assert [store.load(p)["version"] for p in range(5)] == [1] * 5


def test_runs_give_the_same_matrix_with_either_store(tmp_path):
    """The file store inline, the SQLite store inline and on Ray (actors writing at once)."""
    files = run_tiny(tmp_path, "files", "inline")
    for engine in ("inline", "ray"):
        db = run_tiny(tmp_path, engine, engine, resources={"engine": engine, "state_store": "sqlite"})
        assert db.summary["completed"]
        assert (tmp_path / "files" / "accuracy_matrix.csv").read_bytes() == (tmp_path / engine / "accuracy_matrix.csv").read_bytes()
        assert np.array_equal(files.matrix, db.matrix, equal_nan=True)


def test_resume_from_a_sqlite_checkpoint_is_byte_identical(tmp_path, monkeypatch):
    from helpers import tiny

    raw = tiny(resources={"engine": "inline", "state_store": "sqlite"})
    interrupted_then_resumed(raw, tmp_path, monkeypatch, out=None)
    for name in ("accuracy_matrix.csv", "local_accuracy_matrix.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes()


@pytest.mark.parametrize("kind", ["files", "sqlite"])
def test_stores_list_the_clients_they_hold(tmp_path, kind):
    store = make_store(kind, tmp_path / kind)
    assert store.ids() == []
    for pid in (7, 2, 1000):
        store.save(pid, _state(pid, 0, size=4))
    with store.deferred():
        store.save(5, _state(5, 0, size=4))
        assert store.ids() == [2, 5, 7, 1000]  # held ones included
    assert store.ids() == [2, 5, 7, 1000]


class _InterruptAfterCommit:
    """A connection that raises KeyboardInterrupt (Ctrl-C) right after its ``at``-th COMMIT."""

    def __init__(self, db, counter: list[int], at: int) -> None:
        self._db, self._counter, self._at = db, counter, at

    def execute(self, sql, *args):
        out = self._db.execute(sql, *args)
        if sql == "COMMIT":
            self._counter[0] += 1
            if self._counter[0] == self._at:
                raise KeyboardInterrupt
        return out

    def __getattr__(self, name):
        return getattr(self._db, name)


def test_ctrl_c_right_after_a_commit_stops_the_run_and_resume_is_identical(tmp_path, monkeypatch):
    """An interrupt that lands between a state's COMMIT and the end of the write stops the run
    (it used to become 'cannot rollback - no transaction is active', counted as the client's
    failure, and the run went on); the state written is whole, and --resume ends identical."""
    from contextlib import contextmanager

    from helpers import tiny

    from simulator.engine.runner import run_scenario
    from simulator.scenario import validate_scenario

    raw = tiny(resources={"engine": "inline", "state_store": "sqlite"})
    run_scenario(validate_scenario(raw), run_dir=tmp_path / "full", out=None)
    original = SqliteClientStateStore._connect
    counter = [0]

    @contextmanager
    def connect(self):
        with original(self) as db:
            yield _InterruptAfterCommit(db, counter, at=9)  # task 1 (3 clients x 2 rounds a task)

    monkeypatch.setattr(SqliteClientStateStore, "_connect", connect)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut", out=None)
    monkeypatch.setattr(SqliteClientStateStore, "_connect", original)
    failures = tmp_path / "cut" / "failures.csv"
    assert not failures.exists() or len(failures.read_text().strip().splitlines()) == 1  # the header alone
    run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut", resume=True, out=None)
    for name in ("accuracy_matrix.csv", "client_metrics.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
