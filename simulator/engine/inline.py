"""The inline engine: the same ServerApp loop and ClientApp handlers, run in this process and
sequentially through a Grid of our own. For debugging, fast tests, and as the reference for
measuring the Ray engine's overhead (same seed -> same accuracy matrix)."""

from __future__ import annotations

import copy
import itertools
import traceback
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from .failures import TRACEBACK_MARK

INLINE_RUN_ID = 1
CLIENT_ERROR_CODE = 2


class KeptReplies:
    """For grids that have every reply as soon as they push: ``push_messages`` keeps them under
    keys of our own and ``pull_messages`` hands them out (once)."""

    _ids: itertools.count
    _replies: dict[str, Message]

    def _keep(self, replies: Iterable[Message], prefix: str) -> list[str]:
        ids = []
        for reply in replies:
            key = f"{prefix}-{next(self._ids)}"
            self._replies[key] = reply
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]


class InlineGrid(KeptReplies, Grid):
    """Delivers each message by calling the ClientApp directly, in order, in this process.

    Node ids are 1..N and node ``i`` holds partition ``i - 1``; each node keeps its own
    Flower ``Context`` (with ``context.state``) across rounds, as a SuperNode would."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict | None = None,
                 run_id: int = INLINE_RUN_ID) -> None:
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_id = run_id
        self.run_config = dict(run_config or {})
        self.contexts: dict[int, Context] = {}  # created when a node first gets a message
        self._run = Run.create_empty(INLINE_RUN_ID)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.num_nodes + 1))

    def partitions(self) -> "OffsetIds":
        """Partition id -> node id (id + 1), known by construction (asking each of 100,000 nodes
        for its id was a full exchange: 24 s at that size); computed, not a dict of the population."""
        from .node_ids import OffsetIds

        return OffsetIds(self.num_nodes)

    def _context(self, node: int) -> Context:
        """The node's Context, made on its first message: nodes never sampled cost nothing."""
        ctx = self.contexts.get(node)
        if ctx is None:
            if not 1 <= node <= self.num_nodes:
                raise KeyError(node)
            ctx = self.contexts[node] = Context(
                run_id=self.run_id, node_id=node, node_config={"partition-id": node - 1, "num-partitions": self.num_nodes},
                state=RecordDict(), run_config=dict(self.run_config),
            )
        return ctx

    def _deliver(self, msg: Message) -> Message:
        ctx = self._context(msg.metadata.dst_node_id)
        # each client gets its own copy, as after serialisation on Ray: Flower builds one
        # content object for many messages (SecAgg+ does), and a client handler that edits
        # its message (secaggplus_mod pops keys) must not change the others' messages
        msg = copy.deepcopy(msg)
        try:
            return self.client_app(msg, ctx)
        except Exception as exc:  # a failing client becomes an error reply, as on Ray
            text = str(exc)
            if TRACEBACK_MARK in text:  # our client handler attached its traceback already
                reason = text
            else:
                reason = f"{type(exc).__name__}: {text}{TRACEBACK_MARK}{traceback.format_exc()}"
            return Message(Error(code=CLIENT_ERROR_CODE, reason=reason), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._keep((self._deliver(msg) for msg in messages), "reply")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def set_server_identity() -> None:
    """Flower stamps new messages with the identity of the running task; in-process runs set
    it to a fixed server identity (node 0 of run 1), as Flower's own runtime does."""
    TaskIdentity.run_id = INLINE_RUN_ID
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = INLINE_RUN_ID
