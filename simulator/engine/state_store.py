"""Per-run client state store: one file per client (keyed by partition id) in a run-private
folder, written atomically, deleted when the run ends.

Model weights, the task-start teacher and the replay memory live here; only a few counters
travel in Flower's ``context.state`` (which is shipped to the actor and back on every call).
Tensors are saved on the CPU and moved to the client's device on load, so GPU memory does not
grow with the number of clients.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
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
            for pid, state in held.items():
                self._write(pid, state)
        finally:
            self._held = None

    def path(self, partition_id: int) -> Path:
        return self.root / f"client-{int(partition_id):06d}.pt"

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


def to_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
