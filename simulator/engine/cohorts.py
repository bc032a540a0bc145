"""Cohorts: many simulated clients per engine call (``resources.clients_per_call``).

Why: with one SuperNode per simulated client, Flower's simulation runtime pays its per-node and
per-message costs (its dispatcher polls every node's queue; Ray schedules every message) once per
client, which dominated ``scale_1000_clients`` (docs/performance.md "Where the time goes"). With cohorts the
engine starts ``ceil(num_clients / K)`` SuperNodes; each exchange of the server loop packs the
messages of up to ``K`` sampled clients into ONE Flower message, and the SuperNode that receives
it runs the members one after the other through the same ClientApp, then answers once.

How it maps onto Flower (the ServerApp and ClientApp stay real Flower apps):

* Server side, :class:`CohortGrid` wraps the engine's Grid. Strategies and the server loop see one
  *virtual* node per simulated client (node id = partition id + 1) and exchange per-client
  messages exactly as without cohorts; the grid packs them into a message of type
  ``<train|evaluate|query>.cohort`` whose records are the members' records under ``m<j>.``
  prefixes (a record object shared by several members, such as the global model, travels once),
  and unpacks the reply into one reply per member, an error reply for a member that failed.
* Client side, the ClientApp registers a ``cohort`` action for each message category
  (:func:`serve_cohort`): for each member it builds the member's own message and Flower
  ``Context`` (``partition-id`` = the member's client id) and calls the ClientApp with them, so
  mods (SecAgg+), handlers, profiling and failures work per member unchanged.
* A simulated client's ``context.state`` cannot live on a SuperNode (a client is not tied to one
  node from round to round), so it travels with the cohort: the grid keeps each client's state
  and ships it with the member's message, and the reply brings it back. Flower's simulation
  runtime does the same for node contexts (kept by the driver, sent to the actor with each
  message). The client state that matters (weights, memory, optimizer-free learner state) is in
  the per-client state store, as without cohorts.

What stays per client: identity (partition id), data, seeds (every stream is derived from the
client id, task and round, never from the process or call), failures (an exception in one member
becomes that member's error reply; the other members carry on), metrics and bytes (the server
loop counts the per-member messages, as without cohorts). The accuracy matrix is identical with
and without cohorts (tested). A worker process that dies takes its whole cohort's call with it:
every member gets an infrastructure error and the server sends their messages again. The
members' new states are held in memory and written together when the cohort has finished
(``ClientStateStore.deferred``), so a process that dies in the middle of a cohort has written no
member's state and the resent members train from the same state as the first time; members with
an injected ``exit`` fault also run first in their cohort, so no work is lost to them.

Cohorts exist in the simulation engines only (``ray``, ``inline``). A Flower deployment (``flwr
run`` on SuperLink/SuperNodes, :mod:`simulator.flower_app`) keeps one SuperNode per client.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
import traceback
from typing import Any, Callable, ContextManager, Iterable

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from ..errors import RunFailure
from .failures import TRACEBACK_MARK
from .inline import KeptReplies

COHORT_ACTION = "cohort"
COHORT_RECORD = "cohort"  # ConfigRecord naming the members (request) and their outcomes (reply)
MEMBER = "m{}."  # prefix of member j's records
STATE = "s{}."  # prefix of member j's context.state records
CLIENT_ERROR_CODE = 2  # as the inline engine: an exception in the client handler
NODE_WAIT_SECONDS = 120.0


def wait_for_nodes(grid: Grid, count: int) -> list[int]:
    """The grid's node ids once at least ``count`` nodes are up (Flower registers the SuperNodes
    while the engine starts); a RunFailure after ``NODE_WAIT_SECONDS``."""
    deadline = time.time() + NODE_WAIT_SECONDS
    while len(ids := sorted(grid.get_node_ids())) < count:
        if time.time() > deadline:
            raise RunFailure(f"only {len(ids)} of {count} client nodes came up")
        time.sleep(0.02)
    return ids


def cohort_plan(scenario, engine: str, workers: int) -> tuple[int, int]:
    """Clients per call and SuperNodes for a run on ``engine`` with ``workers`` actors."""
    k = resolve_clients_per_call(scenario, engine, workers)
    return k, num_nodes(scenario.clients.num_clients, k, sampled_per_round(scenario), workers)


def num_nodes(num_clients: int, clients_per_call: int, sampled: int | None = None, workers: int = 1) -> int:
    """SuperNodes the engine starts. One client per call: one node per client, as always. With
    cohorts, one node per cohort of a round's ``sampled`` clients, and at least
    ``AUTO_CALLS_PER_WORKER`` per actor, never more than ``ceil(num_clients / K)``: Flower's
    simulation runtime polls every node, so idle nodes cost driver CPU. An exchange with more
    cohorts than nodes (a full evaluation of every client) is sent in waves."""
    k = max(1, int(clients_per_call))
    if k == 1:
        return int(num_clients)
    full = max(1, math.ceil(num_clients / k))
    if sampled is None:
        return full
    return min(full, max(math.ceil(sampled / k), AUTO_CALLS_PER_WORKER * max(1, workers)))


def sampled_per_round(scenario) -> int:
    return max(1, math.ceil(float(scenario.clients.participation) * scenario.clients.num_clients))


AUTO_MAX_PLAIN_CLIENTS = 100  # up to this many clients, auto means one client per call
AUTO_CALLS_PER_WORKER = 4  # auto: a round's sampled clients in about this many calls per actor


def resolve_clients_per_call(scenario, engine: str, workers: int) -> int:
    """``resources.clients_per_call`` as a number. ``auto``: 1 on the inline engine (it has no
    per-message cost to save) and for small federations; otherwise the clients sampled per round
    spread over about ``AUTO_CALLS_PER_WORKER`` calls per actor (several calls per actor keep the
    actors busy when cohorts take unequal times). The choice never changes results."""
    value = scenario.resources.clients_per_call
    if value != "auto":
        return int(value)
    if scenario.privacy.secure_aggregation:  # SecAgg+ keeps one client per call (simulator/privacy/run.py)
        return 1
    n = scenario.clients.num_clients
    if engine == "inline" or n <= AUTO_MAX_PLAIN_CLIENTS:
        return 1
    return max(1, math.ceil(sampled_per_round(scenario) / (AUTO_CALLS_PER_WORKER * max(1, workers))))


def virtual_node(pid: int) -> int:
    from .node_ids import NODE_OFFSET  # the rule OffsetIds computes for the whole population

    return int(pid) + NODE_OFFSET


def _split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` consecutive chunks of near-equal size (load balance over actors)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return [c for c in out if c]


class CohortGrid(KeptReplies, Grid):
    """The engine's Grid as the server loop and strategies see it under cohorts: one virtual node
    per simulated client; messages travel to the real SuperNodes packed by cohort."""

    def __init__(self, grid: Grid, num_clients: int, clients_per_call: int, nodes: int | None = None) -> None:
        self.grid = grid
        self.num_clients = int(num_clients)
        self.k = max(1, int(clients_per_call))
        self.num_real = int(nodes) if nodes else num_nodes(num_clients, self.k)
        self._real: list[int] | None = None
        self._states: dict[int, RecordDict] = {}  # virtual node -> that client's context.state
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.calls = 0  # packed messages sent (engine calls)
        self.members = 0  # client messages carried by them

    # ---- Grid interface
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return [virtual_node(p) for p in range(self.num_clients)]

    def partitions(self) -> "OffsetIds":
        """Client id -> its node, known by construction: the engine's nodes only need to be up
        (asking 10,000 simulated clients for their ids would cost a full exchange)."""
        from .node_ids import NODE_OFFSET, OffsetIds

        self._real_nodes()
        return OffsetIds(self.num_clients, offset=NODE_OFFSET)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._keep(self.send_and_receive(list(messages)), "cohort-reply")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies: list[Message] = []
        by_type: dict[tuple[str, str], list[Message]] = {}
        for m in messages:
            by_type.setdefault((m.metadata.message_type, m.metadata.group_id), []).append(m)
        real = self._real_nodes()
        for (mtype, group), msgs in by_type.items():
            # one message per real node at a time: several waves if there are more clients than
            # the nodes hold (a client messaged twice in one exchange, which the loop never does)
            wave = self.num_real * self.k
            for start in range(0, len(msgs), wave):
                part = msgs[start : start + wave]
                cohorts = _split(part, min(len(real), math.ceil(len(part) / self.k)))
                replies.extend(self._exchange(cohorts, real, mtype, group, timeout))
        return replies

    # ---- internals
    def _real_nodes(self) -> list[int]:
        if self._real is None:
            self._real = wait_for_nodes(self.grid, self.num_real)
        return self._real

    def _exchange(self, cohorts: list[list[Message]], real: list[int], mtype: str, group: str,
                  timeout: float | None) -> list[Message]:
        packed = []
        for node, members in zip(real, cohorts):
            packed.append(Message(self._pack(members), dst_node_id=node, message_type=f"{mtype}.{COHORT_ACTION}",
                                  group_id=group))
        self.calls += len(packed)
        self.members += sum(len(c) for c in cohorts)
        members_of = {node: members for node, members in zip(real, cohorts)}
        out: list[Message] = []
        for reply in self.grid.send_and_receive(packed, timeout=timeout):
            members = members_of.pop(int(reply.metadata.src_node_id), None)
            if members is not None:
                out.extend(self._unpack(reply, members))
        return out

    def _pack(self, members: list[Message]) -> RecordDict:
        content = RecordDict()
        seen: dict[int, str] = {}  # id of a record object already packed -> its key
        refs: list[str] = []
        for j, m in enumerate(members):
            for name, record in m.content.items():
                key = MEMBER.format(j) + name
                first = seen.get(id(record))
                if first is not None:
                    refs.append(f"{key}={first}")  # the same object as an earlier member's: sent once
                    continue
                seen[id(record)] = key
                content[key] = record
            for name, record in self._states.get(m.metadata.dst_node_id, RecordDict()).items():
                content[STATE.format(j) + name] = record
        content[COHORT_RECORD] = ConfigRecord({
            "nodes": [int(m.metadata.dst_node_id) for m in members],
            "pids": [int(m.metadata.dst_node_id) - 1 for m in members],
            "num_clients": self.num_clients,
            "refs": refs or [""],
        })
        return content

    def _unpack(self, reply: Message, members: list[Message]) -> list[Message]:
        if reply.has_error():  # the whole call was lost (a dead worker): every member's message was
            return [Message(Error(code=int(reply.error.code), reason=str(reply.error.reason)), reply_to=m) for m in members]
        info = reply.content[COHORT_RECORD]
        out = []
        for j, m in enumerate(members):
            node = int(m.metadata.dst_node_id)
            state = _records_with_prefix(reply.content, STATE.format(j))
            if len(state) or node in self._states:
                self._states[node] = state
            if int(info["codes"][j]):
                out.append(Message(Error(code=int(info["codes"][j]), reason=str(info["reasons"][j])), reply_to=m))
            else:
                out.append(Message(_records_with_prefix(reply.content, MEMBER.format(j)), reply_to=m))
        return out


def _records_with_prefix(content: RecordDict, prefix: str) -> RecordDict:
    return RecordDict({name[len(prefix):]: rec for name, rec in content.items() if name.startswith(prefix)})


# ---------------------------------------------------------------------------------------------
# ClientApp side


Runner = Callable[[Message, Context], Message]
#: runs a whole cohort at once: (member messages, their contexts, the order to run them in) ->
#: one reply or exception per member (``resources.vectorize``, simulator/engine/client_app.py)
CohortRunner = Callable[[list[Message], list[Context], list[int]], list["Message | Exception"]]


def _error_text(exc: Exception) -> str:
    text = str(exc)
    return text if TRACEBACK_MARK in text else f"{type(exc).__name__}: {text}{TRACEBACK_MARK}{''.join(traceback.format_exception(exc))}"


def serve_cohort(app: Runner, msg: Message, context: Context, first: Callable[[int, Message], bool] | None = None,
                 together: CohortRunner | None = None, hold: Callable[[], ContextManager] | None = None) -> Message:
    """Run every member of a packed message through ``app`` (the ClientApp itself, so its mods
    and handlers see ordinary per-client messages) and pack their replies. ``first(pid, member
    message)`` marks members to run before the others (an injected ``exit`` fault). With
    ``together`` the members run through it instead, all at once. The members run inside
    ``hold()`` (the state store's deferred saves: their new states are written together once
    every member has finished)."""
    info = msg.content[COHORT_RECORD]
    nodes, pids = [int(v) for v in info["nodes"]], [int(v) for v in info["pids"]]
    category = msg.metadata.message_type.split(".")[0]
    refs = dict(r.split("=", 1) for r in info["refs"] if r)
    members: list[Message] = []
    for j, node in enumerate(nodes):
        prefix = MEMBER.format(j)
        content = _records_with_prefix(msg.content, prefix)
        for key, source in refs.items():
            if key.startswith(prefix):
                content[key[len(prefix):]] = msg.content[source]
        # the member's message: the packed message's metadata with the member's node and the plain
        # message type (a ClientApp process has no task identity to stamp a new message with)
        md = copy.copy(msg.metadata)
        md.dst_node_id = node
        md.message_type = category
        members.append(Message(content=content, metadata=md))
    order = list(range(len(nodes)))
    if first is not None:
        order.sort(key=lambda j: not first(pids[j], members[j]))
    contexts = [
        Context(
            run_id=context.run_id,
            node_id=nodes[j],
            node_config={"partition-id": pids[j], "num-partitions": int(info["num_clients"])},
            state=_records_with_prefix(msg.content, STATE.format(j)),
            run_config=dict(context.run_config or {}),
        )
        for j in range(len(nodes))
    ]
    outcomes: list[Message | Exception | None] = [None] * len(nodes)
    with hold() if hold is not None else contextlib.nullcontext():
        if together is not None:
            outcomes = list(together(members, contexts, order))
        else:
            for j in order:
                try:
                    outcomes[j] = app(members[j], contexts[j])
                except Exception as exc:  # this member failed; the others carry on
                    outcomes[j] = exc
    out = RecordDict()
    codes, reasons = [0] * len(nodes), [""] * len(nodes)
    for j, reply in enumerate(outcomes):
        if isinstance(reply, Exception):
            codes[j], reasons[j] = CLIENT_ERROR_CODE, _error_text(reply)
        elif reply is not None and reply.has_error():
            codes[j], reasons[j] = int(reply.error.code) or CLIENT_ERROR_CODE, str(reply.error.reason)
        elif reply is not None:
            for name, record in reply.content.items():
                out[MEMBER.format(j) + name] = record
        for name, record in contexts[j].state.items():
            out[STATE.format(j) + name] = record
    out[COHORT_RECORD] = ConfigRecord({"codes": codes, "reasons": reasons})
    return Message(out, reply_to=msg)


def cohort_stats(grid: Any) -> dict[str, Any] | None:
    """Engine calls and client messages of a run under cohorts (for ``profile.json``)."""
    if not isinstance(grid, CohortGrid):
        return None
    return {"clients_per_call": grid.k, "supernodes": grid.num_real, "engine_calls": grid.calls,
            "client_messages": grid.members}
