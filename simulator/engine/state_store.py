"""Per-run client state store, keyed by partition id, in a run-private folder deleted when the
run ends: one file per client written atomically (``resources.state_store: files``), or one
SQLite database with a transaction per save (``sqlite``: no file per client, for large
populations; :class:`SqliteClientStateStore`).

Model weights, the task-start teacher and the replay memory live here; only a few counters
travel in Flower's ``context.state`` (which is shipped to the actor and back on every call).
Tensors are saved on the CPU and moved to the client's device on load, so GPU memory does not
grow with the number of clients.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import tempfile
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


class ClientStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._held: dict[int, dict[str, Any]] | None = None

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold every save in memory until the block ends, then write them all; nothing is
        written when the block ends with an exception (or the process dies in it). A cohort runs
        its members inside one such block, so a worker that dies in the middle of a cohort has
        written no member's new state, and the members sent again train from the same state as
        the first time (simulator/engine/cohorts.py)."""
        if self._held is not None:  # already inside one: the outer block writes
            yield
            return
        self._held = {}
        try:
            yield
            held, self._held = self._held, None
            self._write_many(held)
        finally:
            self._held = None

    def _write_many(self, states: dict[int, dict[str, Any]]) -> None:
        for pid, state in states.items():
            self._write(pid, state)

    def path(self, partition_id: int) -> Path:
        return self.root / f"client-{int(partition_id):06d}.pt"

    def ids(self) -> list[int]:
        """The clients that have a saved state, in order (a run reads them without asking each
        of a population that was mostly never sampled)."""
        if not self.root.is_dir():
            return []
        names = (n for n in os.listdir(self.root) if n.startswith("client-") and n.endswith(".pt"))
        return sorted({*(int(n[len("client-"):-len(".pt")]) for n in names), *(self._held or {})})

    def load(self, partition_id: int) -> dict[str, Any] | None:
        if self._held is not None and int(partition_id) in self._held:
            return self._held[int(partition_id)]
        p = self.path(partition_id)
        if not p.exists():
            return None
        return torch.load(p, map_location="cpu", weights_only=False)

    def save(self, partition_id: int, state: dict[str, Any]) -> None:
        if self._held is not None:
            self._held[int(partition_id)] = state
            return
        self._write(partition_id, state)

    def _write(self, partition_id: int, state: dict[str, Any]) -> None:
        p = self.path(partition_id)
        fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class SqliteClientStateStore(ClientStateStore):
    """Every client's state as a blob (``torch.save``) in ``<root>/clients.sqlite``.

    * Atomic: a save is one transaction, and a :meth:`deferred` block (a cohort) writes all its
      members in one; a process killed mid-write leaves the previous states (SQLite's journal).
    * Shared: every process of the run (the driver, each Ray actor) keeps one connection (WAL
      mode: readers do not wait for the writer; writers wait up to :data:`BUSY_SECONDS` for
      each other) and opens it again when the file was replaced (a checkpoint restore), so no
      write goes to a file the run no longer uses.
    * Checkpoints copy the database with SQLite's backup API (:func:`snapshot`), a consistent
      copy however many clients it holds, instead of linking one file per client."""

    FILE = "clients.sqlite"
    BUSY_SECONDS = 120.0
    _db: sqlite3.Connection | None = None
    _db_ident: tuple[int, int, int] | None = None

    def path(self, partition_id: int) -> Path:
        return self.root / self.FILE

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This process's connection, opened again when the file is not the one it opened (a
        checkpoint restore replaced it) or the process is not the one that opened it (a fork)."""
        path = self.root / self.FILE
        ident = None
        if path.exists():
            st = os.stat(path)
            ident = (os.getpid(), st.st_dev, st.st_ino)
        if self._db is None or ident is None or ident != self._db_ident:
            self._close()
            self.root.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(path, timeout=self.BUSY_SECONDS, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # no fsync per commit: a killed process still loses no committed state (WAL), as the
            # file store's rename without fsync; a power cut may lose the last commits, never consistency
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS clients (id INTEGER PRIMARY KEY, state BLOB NOT NULL)")
            st = os.stat(path)
            self._db, self._db_ident = db, (os.getpid(), st.st_dev, st.st_ino)
        yield self._db

    def _close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db, self._db_ident = None, None

    def __getstate__(self) -> dict[str, Any]:  # a connection does not travel (pickling, Ray)
        return {**self.__dict__, "_db": None, "_db_ident": None}

    def cleanup(self) -> None:
        self._close()
        super().cleanup()

    def ids(self) -> list[int]:
        if not (self.root / self.FILE).exists():
            return sorted(self._held or {})
        with self._connect() as db:
            saved = {int(r[0]) for r in db.execute("SELECT id FROM clients")}
        return sorted(saved | set(self._held or {}))

    def load(self, partition_id: int) -> dict[str, Any] | None:
        if self._held is not None and int(partition_id) in self._held:
            return self._held[int(partition_id)]
        if not (self.root / self.FILE).exists():
            return None
        with self._connect() as db:
            row = db.execute("SELECT state FROM clients WHERE id = ?", (int(partition_id),)).fetchone()
        return None if row is None else torch.load(io.BytesIO(row[0]), map_location="cpu", weights_only=False)

    def _write(self, partition_id: int, state: dict[str, Any]) -> None:
        self._write_many({int(partition_id): state})

    def _write_many(self, states: dict[int, dict[str, Any]]) -> None:
        """Every held state of a :meth:`deferred` block (a cohort) in one transaction."""
        if not states:
            return
        blobs = []
        for pid, state in states.items():
            buf = io.BytesIO()
            torch.save(state, buf)
            blobs.append((int(pid), buf.getvalue()))
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO clients (id, state) VALUES (?, ?)", blobs)
                db.execute("COMMIT")
            except BaseException:
                # an interrupt (Ctrl-C) can land after COMMIT: then there is nothing to roll back,
                # and a failed ROLLBACK must not replace the interrupt with an error that the
                # engine would count as the client's failure (seen at 1,000,000 clients)
                if db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise


def make_store(kind: str, root: str | Path) -> ClientStateStore:
    """The store ``resources.state_store`` names."""
    return SqliteClientStateStore(root) if kind == "sqlite" else ClientStateStore(root)


def snapshot(clients_dir: Path, dest: Path) -> bool:
    """Copy a SQLite store in ``clients_dir`` to ``dest`` (a folder) with the backup API, a
    consistent copy of every committed state; False when ``clients_dir`` holds no such store."""
    src = Path(clients_dir) / SqliteClientStateStore.FILE
    if not src.exists():
        return False
    dest.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(src, timeout=SqliteClientStateStore.BUSY_SECONDS)) as a, \
            closing(sqlite3.connect(dest / SqliteClientStateStore.FILE)) as b:
        a.backup(b)
    return True


def to_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
