"""Where a run's time goes, per phase: cheap wall-clock timers (``time.perf_counter``) for the
client handlers and for the driver (the process that runs the ServerApp loop).

Client side: the handler wrapper opens a :class:`PhaseTimer` for the call (:func:`client_call`);
code inside the handler marks its phases with ``with phase("state_load"):`` or, at the end of a
stretch of the handler, ``lap("train")``. Phases are
*exclusive*: a phase opened inside another pauses the outer one, so the phases of one call never
sum to more than the call itself. The figures travel back in the reply's metrics as
``profile.<phase>`` next to ``compute_seconds`` (bookkeeping metrics: not counted as
communicated bytes, see :func:`simulator.records.payload_bytes`, and not sent in clear under
SecAgg+, so a secure run has no client phases).

Driver side: :class:`RunProfile` sums the server loop's phases (sending until every reply is in,
the merge, evaluation, scoring, per-task writes), start-up (data stream and checks, ``ray.init``,
Flower's engine until the ServerApp loop starts, discovering the client nodes) and the end of the
run, and the client phases of every reply. The runner writes it to ``profile.json`` in the run
directory, last; ``protofed bench`` reads it from there.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

PREFIX = "profile."
PROFILE_FILE = "profile.json"
GPU_PEAK, WORKER_PID = "gpu_peak_bytes", "worker_pid"  # reply metrics of clients on a GPU

#: client handler phases in the order they happen (the table prints them in this order)
TRAIN_PHASES = ("runtime", "state_load", "model_build", "receive", "task_bookkeeping", "train", "upload",
                "state_save", "reply")
EVALUATE_PHASES = ("runtime", "state_load", "model_build", "receive", "predict", "open_world", "score")
#: driver phases, in order; together with ``engine_overhead`` (wall minus their sum) they add up
#: to the run's wall time
DRIVER_PHASES = ("prepare", "ray_init", "engine_start", "discover_nodes", "strategy_setup", "configure",
                 "train_exchange", "merge", "evaluate_exchange", "scoring", "task_end_writes", "engine_stop",
                 "finish")


class PhaseTimer:
    """Exclusive seconds per phase name within one call (single thread). Two ways to mark a
    phase: ``with timer.phase(name):`` around it, or ``timer.lap(name)`` at its end (everything
    since the previous boundary: the call's start, a lap, or the end of a ``with`` phase), which
    keeps long handlers unindented."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[Any]] = []  # [name, start of its current stretch]
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self.seconds[outer[0]] = self.seconds.get(outer[0], 0.0) + now - outer[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            end = time.perf_counter()
            inner = self._stack.pop()
            self.seconds[inner[0]] = self.seconds.get(inner[0], 0.0) + end - inner[1]
            if self._stack:  # the enclosing phase resumes now
                self._stack[-1][1] = end
            self._last = end


    def resume(self) -> None:
        """Start a new stretch now (a call interleaved with others resumes here: the time
        since its last boundary belonged to the others)."""
        self._last = time.perf_counter()


_CURRENT: contextvars.ContextVar[PhaseTimer | None] = contextvars.ContextVar("protofed_phase_timer", default=None)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def phase(name: str):
    """Time a phase of the client call in progress (a no-op outside one)."""
    timer = _CURRENT.get()
    return timer.phase(name) if timer is not None else _nothing()


def lap(name: str) -> None:
    """End a phase of the client call in progress (see :meth:`PhaseTimer.lap`; a no-op outside one)."""
    timer = _CURRENT.get()
    if timer is not None:
        timer.lap(name)


@contextmanager
def client_call() -> Iterator[PhaseTimer]:
    """The timer of one client handler call."""
    timer = PhaseTimer()
    token = _CURRENT.set(timer)
    try:
        yield timer
    finally:
        _CURRENT.reset(token)


@contextmanager
def resumed_call(timer: PhaseTimer) -> Iterator[PhaseTimer]:
    """Continue the timer of a call that was set aside (cohorts run their members' handlers
    interleaved: prepare all, train together, finish all)."""
    timer.resume()
    token = _CURRENT.set(timer)
    try:
        yield timer
    finally:
        _CURRENT.reset(token)


def to_metrics(timer: PhaseTimer) -> dict[str, float]:
    return {PREFIX + k: float(v) for k, v in timer.seconds.items()}


class RunProfile:
    """What the driver measured over one run (since this process started it: a resumed run
    profiles the part after the resume)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.driver: dict[str, float] = dict.fromkeys(DRIVER_PHASES, 0.0)
        self.client: dict[str, dict[str, float]] = {"train": {}, "evaluate": {}}
        self.client_calls = {"train": 0, "evaluate": 0}
        self.client_compute = {"train": 0.0, "evaluate": 0.0}
        self.rounds: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}
        self.cohorts: dict[str, Any] | None = None  # engine calls under resources.clients_per_call
        self.vectorized = 0  # client updates trained vectorised (resources.vectorize)
        self.gpu_peak: dict[str, int] = {}  # worker process -> peak GPU memory torch allocated there
        self.determinism = {"deterministic": 0, "not_deterministic": 0}  # client calls (resources.deterministic)
        self.task_end: dict[str, float] = {}  # the parts of task_end_writes (results, tracking, ...)

    def add(self, name: str, seconds: float) -> None:
        self.driver[name] = self.driver.get(name, 0.0) + float(seconds)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    @contextmanager
    def task_end_part(self, name: str) -> Iterator[None]:
        """Time one part of the end-of-task writes (inside ``task_end_writes``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.task_end[name] = self.task_end.get(name, 0.0) + time.perf_counter() - t0

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def since(self, name: str) -> float:
        """Seconds since :meth:`mark` ``name`` (0 when it was never marked)."""
        return time.perf_counter() - self.marks[name] if name in self.marks else 0.0

    def add_replies(self, kind: str, replies: Iterable[Any]) -> None:
        """Sum the client phases carried by ``replies`` (Flower messages) under ``kind``."""
        from ..records import METRICS

        sums = self.client[kind]
        for r in replies:
            if not r.has_content() or METRICS not in r.content:
                continue
            m = r.content[METRICS]
            if "compute_seconds" not in m:
                continue
            self.vectorized += int(m.get("vectorized", 0))
            if "deterministic" in m:
                self.determinism["deterministic" if int(m["deterministic"]) else "not_deterministic"] += 1
            if GPU_PEAK in m:
                who = str(int(m.get(WORKER_PID, 0)))
                self.gpu_peak[who] = max(self.gpu_peak.get(who, 0), int(m[GPU_PEAK]))
            self.client_calls[kind] += 1
            self.client_compute[kind] += float(m["compute_seconds"])
            for key, value in m.items():
                if key.startswith(PREFIX):
                    name = key[len(PREFIX):]
                    sums[name] = sums.get(name, 0.0) + float(value)

    def to_dict(self, wall: float | None = None) -> dict[str, Any]:
        wall = time.perf_counter() - self.started if wall is None else wall
        measured = sum(self.driver.values())
        return {
            "wall_seconds": wall,
            "driver": dict(self.driver),
            "engine_overhead": wall - measured,
            "client_calls": dict(self.client_calls),
            "client_compute_seconds": dict(self.client_compute),
            "client_train": dict(self.client["train"]),
            "client_evaluate": dict(self.client["evaluate"]),
            "rounds": list(self.rounds),
            "client_determinism": dict(self.determinism),
            "task_end_writes_parts": dict(self.task_end),
            **({"cohorts": dict(self.cohorts)} if self.cohorts else {}),
            **({"gpu_peak_bytes_per_worker": dict(self.gpu_peak)} if self.gpu_peak else {}),
            **({"client_updates_vectorized": self.vectorized} if self.vectorized else {}),
        }
