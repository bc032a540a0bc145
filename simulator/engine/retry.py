"""A run survives its engine's infrastructure: resumed from its last finished task.

A run is resumable at task boundaries (``checkpoint/`` at every task's end) and a resumed run
ends with the numbers of an uninterrupted one, so an infrastructure failure (Ray's GCS, raylet
or workers died; :func:`~simulator.engine.failures.infrastructure_cause` tells it from an
error of the method's code, which is never retried) costs at most the task it happened in:

* in the run's own process (the failure surfaced as an exception): :class:`Retries` shuts
  Ray down, restores the last checkpoint (or the state the process started from) and the
  runner launches the engine again;
* when Ray ended the process itself (a dead raylet or GCS): the supervisor starts a new
  process that resumes the run (:mod:`simulator.study.supervisor`), which tells it which retries came
  before (:func:`~simulator.study.supervisor.earlier_retries`).

Both count against ``resources.retries``; each retry is a row of ``failures.csv`` (kind
``infrastructure``, ``attempts`` = the retry's number) and ``summary.json`` counts them
(``retries``).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

from .failures import INFRASTRUCTURE, Failure, retry_row


class Retries:
    """The retries of one run: the rows already recorded, and how to go back to the last
    finished task."""

    def __init__(self, rec, run_dir: Path, clients_dir: Path, allowed: int, start_task: int, strategy_state: Any) -> None:
        self.rec = rec
        self.run_dir = Path(run_dir)
        self.clients_dir = Path(clients_dir)
        self.allowed = int(allowed)
        # where this process started: a fresh run or the checkpoint it resumed from
        self.initial = (start_task, copy.deepcopy(rec.state_dict()), strategy_state)
        self.rows: list[Failure] = [f for f in rec.failures if f.kind == INFRASTRUCTURE]

    @property
    def used(self) -> int:
        return len(self.rows)

    def add(self, task: int, what: str, retry: int | None = None) -> Failure:
        """Record retry number ``retry`` (the next one if None) of a failure during ``task``."""
        row = retry_row(task, self.used + 1 if retry is None else retry, what)
        if all(r.attempts != row.attempts for r in self.rows):
            self.rows.append(row)
            self.rows.sort(key=lambda r: r.attempts)
        self.sync()
        return row

    def sync(self) -> None:
        """Put every retry row into the recorder (a restored checkpoint may predate some)."""
        present = {f.attempts for f in self.rec.failures if f.kind == INFRASTRUCTURE}
        self.rec.failures.extend(r for r in self.rows if r.attempts not in present)

    def restore(self) -> tuple[int, Any]:
        """Go back to the last finished task: the run's checkpoint (client states, recorder,
        strategy), or the state this process started from; ``(start_task, strategy_state)``."""
        from .checkpoint import has_checkpoint, load_checkpoint

        if has_checkpoint(self.run_dir):
            ckpt = load_checkpoint(self.run_dir, self.clients_dir)
            self.rec.load_state_dict(ckpt["recorder"])
            start, state = int(ckpt["task"]) + 1, ckpt["strategy"]
        else:  # nothing finished yet: start again from scratch
            start, recorder_state, state = self.initial
            self.rec.load_state_dict(copy.deepcopy(recorder_state))
            shutil.rmtree(self.clients_dir, ignore_errors=True)
        self.sync()
        return start, state

