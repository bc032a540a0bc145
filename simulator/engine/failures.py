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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..seeding import rng

INJECTED = "injected"
ERROR = "error"
WORKER_DIED = "worker_died"
KINDS = (INJECTED, ERROR, WORKER_DIED)

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
