"""Client failures: which are injected on purpose, which are findings.

A client reply can be an error for three reasons, and the simulator tells them apart because
only one of them is noise the user asked for:

* ``injected``: the scenario asked for it (``clients.dropout``, ``clients.fault_injection``).
  The server recomputes the same seeded decision the client made, so it needs no word from the
  client (a fault of mode ``exit`` kills the worker process and leaves none).
* ``worker_died``: the infrastructure lost the message (a Ray worker process died or was
  restarting, the node went away). The message is delivered again a bounded number of times
  before it counts, and it never counts as the client's fault.
* ``error``: anything else: an exception in our code or the method's. Each one is recorded in
  ``failures.csv`` and the first traceback of each distinct error is printed.

A fourth kind of row concerns the whole run, not one reply: ``infrastructure``, the engine's
infrastructure died under the run (Ray's GCS or raylet, or every worker of a round) and the run
was resumed from its last finished task (simulator/engine/retry.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import RunFailure
from ..seeding import rng

INJECTED = "injected"
ERROR = "error"
WORKER_DIED = "worker_died"
KINDS = (INJECTED, ERROR, WORKER_DIED)
#: a failures.csv row of the whole run: its engine's infrastructure died (Ray's GCS, raylet or
#: every worker) and the run was resumed from its last finished task (``attempts`` = retry number)
INFRASTRUCTURE = "infrastructure"

#: how often a message lost to the infrastructure is delivered at most before it counts as
#: failed, and the pause before each new delivery (seconds: grows by half each time, capped):
#: a Ray actor that is restarting refuses messages until its new process has imported torch,
#: which takes tens of seconds on a busy machine, so the attempts span about 100 s in all
MAX_DELIVERIES = 12
RETRY_PAUSE_SECONDS = 1.0
RETRY_PAUSE_MAX_SECONDS = 15.0


def retry_pause(attempt: int) -> float:
    """Seconds to wait before delivery ``attempt + 1`` (attempt counts from 1)."""
    return min(RETRY_PAUSE_SECONDS * 1.5 ** (attempt - 1), RETRY_PAUSE_MAX_SECONDS)

TRACEBACK_MARK = "\n[protofed-traceback]\n"

# Flower's error codes (flwr.common.constant.ErrorCode): 2 = the ClientApp raised; the
# simulation engine reports a dead or unavailable Ray actor with code 0 (UNKNOWN) and the Ray
# exception's class in the reason; 3-5 and 8 say a message, reply or node was lost.
_CLIENT_RAISED = 2
_LOST_CODES = {3, 4, 5, 8}
_INFRA_PATTERNS = (
    "ray.exceptions",
    "RayActorError",
    "ActorDiedError",
    "ActorUnavailableError",
    "WorkerCrashedError",
    "OutOfMemoryError",
    "RaySystemError",
    "NodeDiedError",
    "ObjectLostError",
)


class InfrastructureFailure(RunFailure):
    """The engine's infrastructure died under the run (not the user's or the method's code):
    the runner resumes the run from its last finished task, ``resources.retries`` times at most.
    ``what`` says in a few words what died."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


#: texts of exceptions raised when Ray's own processes are gone or unreachable
_RAY_DEATH_TEXTS = ("GCS", "raylet", "Raylet", "Ray has not been started", "node has crashed", "Owner died")


def infrastructure_cause(exc: BaseException) -> str | None:
    """What of the infrastructure died, when ``exc`` (or an exception it was raised from) says so;
    None for anything else, e.g. a strategy's own exception, which is a bug and never retried."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if isinstance(e, InfrastructureFailure):
            return e.what
        module = type(e).__module__
        if module == "ray" or module.startswith(("ray.", "ray._")):
            return f"Ray failed ({type(e).__name__}: {first})" if first else f"Ray failed ({type(e).__name__})"
        if isinstance(e, (ConnectionError, TimeoutError)) and any(t in str(e) for t in _RAY_DEATH_TEXTS):
            return f"Ray's cluster could not be reached ({first})"
        e = e.__cause__ or e.__context__
    return None


def retry_row(task: int, retry: int, what: str) -> "Failure":
    """The failures.csv row of retry number ``retry`` of a run whose infrastructure died during
    ``task`` (phase ``run``; no round or client: the whole run was resumed)."""
    return Failure("run", task, -1, -1, -1, INFRASTRUCTURE, what[:300], retry)


def injected_fault(scenario, partition_id: int, server_round: int) -> tuple[str, str] | None:
    """``(mode, message)`` when the scenario makes this client fail in this round, else None.
    The client and the server both call this, so a fault is recognised without a reply."""
    c = scenario.clients
    for fault in c.fault_injection:
        if fault.client == partition_id and fault.round == server_round:
            return fault.mode, f"client {partition_id}: injected fault in round {server_round}"
    if c.dropout > 0 and rng(scenario.seed, "dropout", partition_id, server_round).random() < c.dropout:
        return "raise", f"client {partition_id} dropped out of round {server_round}"
    return None


def is_infrastructure(code: int, reason: str) -> bool:
    """Whether an error reply says the message was lost by the infrastructure rather than
    raised by the client's code."""
    if code == _CLIENT_RAISED:
        return False
    return code in _LOST_CODES or any(p in reason for p in _INFRA_PATTERNS)


def split_reason(reason: str) -> tuple[str, str]:
    """``(one-line message, traceback text)`` of an error reply's reason, whichever engine
    wrapped it (Flower's Ray engine: ``<class ...>:<'...Message: X'>``; ours: ``X`` plus the
    traceback after :data:`TRACEBACK_MARK`)."""
    text, _, tb = reason.partition(TRACEBACK_MARK)
    m = re.search(r"Message:\s*(.+)", text)
    wrapped = re.fullmatch(r"\s*<class '([^']+)'>:<'(.*?)'?>?\s*", text, flags=re.S)
    if m:
        text = m.group(1)
    elif wrapped:  # Flower's "<class 'pkg.Error'>:<'message'>" for errors outside the ClientApp
        text = f"{wrapped.group(1).rsplit('.', 1)[-1]}: {wrapped.group(2)}"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else "(no message)"
    first = first.rstrip("'\">").strip()
    return first[:300], tb.strip().rstrip("'\">")


def error_signature(message: str) -> str:
    """Errors that differ only in numbers (client ids, rounds, sizes) count as one."""
    return re.sub(r"\d+", "N", message)


@dataclass
class Failure:
    phase: str  # train | evaluate
    task: int
    round: int
    global_round: int
    client: int
    kind: str
    message: str
    attempts: int = 1

    def row(self) -> dict:
        return {
            "global_round": self.global_round,
            "task": self.task,
            "round": self.round,
            "phase": self.phase,
            "client": self.client,
            "kind": self.kind,
            "attempts": self.attempts,
            "message": self.message,
        }


FAILURE_COLUMNS = ("global_round", "task", "round", "phase", "client", "kind", "attempts", "message")
