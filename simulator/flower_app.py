"""The same ServerApp and ClientApp, as objects Flower's own tooling can load.

``pyproject.toml`` names them under ``[tool.flwr.app.components]`` and declares the run-config
keys under ``[tool.flwr.app.config]`` (Flower rejects undeclared keys):

``scenario``
    The scenario file. A relative path resolves against the app directory, the folder that
    ``flwr run <app>`` packs into the app bundle and ships to the SuperLink and every SuperNode
    (so ``scenarios/quickstart.yaml`` means the repository's file wherever the app runs).
``out``
    The run directory the ServerApp writes. ``""`` (default) means
    ``<output.dir>/<name>/<strategy>/seed-<seed>/flwr-run-<Flower run id>``, so two deployed runs
    never share a folder. Relative paths (and ``output.dir``) resolve against the working
    directory of the ServerApp process, i.e. the folder ``flower-superlink`` was started in.
``state-dir``
    Where each SuperNode keeps client state. ``""`` (default) means
    ``<system temp>/protofed-nodes``; relative paths resolve against the SuperNode's working
    directory.

Client state on a SuperNode lives in ``<state-dir>/run-<Flower run id>/node-<node id>/``: keyed by
Flower's run id, so a second ``flwr run`` on the same SuperNodes starts from fresh clients
(before, state was keyed by node only and a second run silently continued from the first run's
models and replay memory). The folder is deleted when the run ends: a node deletes it right
after answering the run's final evaluation (its last message) and says so in the reply; when the
run ends in any other way (a failure, a node not evaluated at the end) the ServerApp sends every
node that has not confirmed one last ``query`` message marked ``cleanup``. Removing on the last
message saves a round trip (a process start per node) on every successful run; the cleanup
message covers the rest. Only a ServerApp killed from outside leaves a folder behind, and that
folder can never be read by another run (its run id is unique).

Start-up cost: with Flower's default isolation each message starts a fresh ``flwr-clientapp``
process; the recipe in docs/engines.md instead runs each SuperNode with ``--isolation process`` beside one
long-lived ClientApp process (:mod:`simulator.deploy`), where the caches below (``_SETUPS`` and
the engine's runtimes) last from one message of a run to the next. Either way this module
imports nothing heavy at import time; ``query`` messages (partition discovery, cleanup) never
import torch, and the federated data stream is built once per node and scenario and cached
under ``<state-dir>/streams/<hash of the resolved scenario>.pkl``; later messages of this and
later runs load it instead of rebuilding it. With ``PROTOFED_DEPLOY_LOG`` set, every message
answered appends a JSON line (process start, handler start and end) to that file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

# The app directory: the folder ``flwr run`` packed (Flower installs the bundle on every node and
# imports this module from there).
APP_DIR = Path(__file__).resolve().parents[1]

# Record names, as in simulator.records (importing that module would import torch; a test keeps
# the two equal).
CONFIG, METRICS = "config", "metrics"
CLEANUP_KEY = "cleanup"
STATE_REMOVED_KEY = "state_removed"  # in a final evaluate reply: this node already cleaned up
CLEANUP_TIMEOUT_SECONDS = 120.0
STREAMS_DIR = "streams"


def _config(context: Context) -> dict[str, Any]:
    return dict(context.run_config or {})


def scenario_path(context: Context) -> Path:
    """The run config's ``scenario``, resolved against the app directory when relative."""
    value = str(_config(context).get("scenario") or "")
    if not value:
        raise ValueError('set the run config key "scenario" to a scenario file')
    path = Path(value).expanduser()
    return path if path.is_absolute() else APP_DIR / path


def node_root(context: Context) -> Path:
    value = str(_config(context).get("state-dir") or "")
    return Path(value).expanduser().absolute() if value else Path(tempfile.gettempdir()) / "protofed-nodes"


def node_run_dir(context: Context) -> Path:
    """This node's private folder for this run: keyed by Flower's run id, then the node."""
    return node_root(context) / f"run-{int(context.run_id)}" / f"node-{int(context.node_id)}"


# ---------------------------------------------------------------------------------------------
# ServerApp


REPLY_POLL_SECONDS = 0.1


class PollingGrid(Grid):
    """Flower's deployed grid, with replies pulled every ``REPLY_POLL_SECONDS`` instead of every
    3 s: Flower 1.42's ``send_and_receive`` sleeps 3 s between pulls, which adds about 1.5 s to
    every round trip (train, evaluate, and each query) of a run on loopback. Everything else is
    the wrapped grid's."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL_SECONDS) -> None:
        self.grid, self.poll = grid, poll
        self.cleaned: set[int] = set()  # nodes whose final evaluate reply said their state is gone

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        expected = len(waiting)
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        # done when every id has its reply; also by count, for grids whose ids are not message ids
        # (the inline engine's Grid returns keys of its own)
        while waiting and len(replies) < expected:
            got = list(self.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting or len(replies) >= expected or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.poll)
        for r in replies:
            if r.has_content() and METRICS in r.content and STATE_REMOVED_KEY in r.content[METRICS]:
                self.cleaned.add(int(r.metadata.src_node_id))
        return replies


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from .engine.runner import default_run_dir, run_scenario
    from .errors import UserError
    from .scenario import load_scenario

    grid = PollingGrid(grid)
    try:
        path = scenario_path(context)
        scenario = load_scenario(path)
        out = str(_config(context).get("out") or "")
        run_dir = Path(out).expanduser() if out else default_run_dir(scenario) / f"flwr-run-{int(context.run_id)}"
        # progress lines on stdout: Flower's flwr-serverapp mirrors stdout to `flwr log`
        run_scenario(scenario, source=str(path), run_dir=run_dir, grid=grid, out=sys.stdout)
        print(f"run directory: {run_dir.absolute()}", flush=True)
    except UserError as exc:  # the one-screen message, not a traceback, in `flwr log`
        print(str(exc), flush=True)
        raise RuntimeError(str(exc)) from None  # Flower marks the run failed with this reason
    finally:
        cleanup_nodes(grid)


def cleanup_nodes(grid: Grid, timeout: float = CLEANUP_TIMEOUT_SECONDS) -> int:
    """Ask every node of the run that has not yet removed its client state for this run (see
    the ClientApp's evaluate) to delete it; returns how many confirmed. Best effort: a node that
    is gone keeps its (run-keyed, never reused) folder."""
    try:
        done = getattr(grid, "cleaned", set())
        node_ids = [n for n in grid.get_node_ids() if int(n) not in done]
        msgs = [
            Message(
                RecordDict({CONFIG: ConfigRecord({CLEANUP_KEY: 1})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
                group_id="cleanup",
            )
            for n in node_ids
        ]
        replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
    except Exception as exc:  # never hide the run's own outcome behind a cleanup problem
        print(f"warning: client state cleanup failed: {exc}", flush=True)
        return 0
    ok = sum(1 for r in replies if r.has_content())
    if ok < len(node_ids):
        print(f"warning: {len(node_ids) - ok} of {len(node_ids)} nodes did not confirm the state cleanup", flush=True)
    return ok


# ---------------------------------------------------------------------------------------------
# ClientApp

_SETUPS: dict[tuple[int, int, str], Any] = {}


def scenario_hash(resolved: dict[str, Any]) -> str:
    text = json.dumps(resolved, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_stream(scenario, resolved: dict[str, Any], root: Path, run_dir: Path) -> Path:
    """Put the run's data stream at ``run_dir/stream.pkl`` (where the runtime reads it), from the
    node's cache of streams keyed by the scenario's hash; build it once per node on a miss. The
    stream is deterministic from the scenario, so every node and the ServerApp agree."""
    from .engine.runtime import STREAM_FILE

    target = run_dir / STREAM_FILE
    if target.exists():
        return target
    cache = root / STREAMS_DIR / f"{scenario_hash(resolved)}.pkl"
    if not cache.exists():
        import pickle

        from .data.stream import build_stream

        cache.parent.mkdir(parents=True, exist_ok=True)
        stream = build_stream(scenario)
        _atomic_write(cache, lambda fh: pickle.dump(stream, fh, protocol=pickle.HIGHEST_PROTOCOL))
    tmp = run_dir / f".{STREAM_FILE}.{os.getpid()}"
    try:
        os.link(cache, tmp)  # a hard link: removing the run folder keeps the cache
    except OSError:
        shutil.copyfile(cache, tmp)
    os.replace(tmp, target)
    return target


def _setup(context: Context):
    from .engine.runtime import RunSetup

    path = scenario_path(context)
    key = (int(context.run_id), int(context.node_id), str(path))
    if key not in _SETUPS:
        from .scenario import load_scenario

        scenario = load_scenario(path)
        resolved = scenario.resolved()
        run_dir = node_run_dir(context)
        run_dir.mkdir(parents=True, exist_ok=True)
        ensure_stream(scenario, resolved, node_root(context), run_dir)
        _SETUPS[key] = RunSetup(scenario=resolved, state_dir=str(run_dir))
    return _SETUPS[key]


def _cleanup(context: Context) -> None:
    run_dir = node_run_dir(context)
    for key in [k for k in _SETUPS if k[:2] == (int(context.run_id), int(context.node_id))]:
        from .engine.runtime import release_runtime

        release_runtime(_SETUPS.pop(key))
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # the run's folder, once its last node has left
    except OSError:
        pass


client_app = ClientApp()
TIMING_LOG = "PROTOFED_DEPLOY_LOG"  # env: a file that gets one JSON line per message answered


@functools.lru_cache(maxsize=1)
def _process_start() -> float:
    """When this process started (read once: a long-lived ClientApp answers many messages)."""
    import psutil

    return psutil.Process().create_time()


def _timed(handler):
    """With ``PROTOFED_DEPLOY_LOG`` set, append when this process started, when the handler
    began and when it returned (``time.time()``) to that file: the start-up cost of a message."""

    def wrapped(msg: Message, context: Context) -> Message:
        began = time.time()
        try:
            return handler(msg, context)
        finally:
            log = os.environ.get(TIMING_LOG)
            if log:
                row = {"where": "clientapp", "pid": os.getpid(), "type": msg.metadata.message_type,
                       "process_start": _process_start(), "began": began, "returned": time.time()}
                with open(log, "a") as fh:
                    fh.write(json.dumps(row) + "\n")

    wrapped.__name__, wrapped.__doc__ = handler.__name__, handler.__doc__
    return wrapped


@client_app.train()
@_timed
def _train(msg: Message, context: Context) -> Message:
    from .engine.client_app import _train as train

    return train(_setup(context), msg, context)


@client_app.evaluate()
@_timed
def _evaluate(msg: Message, context: Context) -> Message:
    from .engine.client_app import _evaluate as evaluate
    from .engine.runtime import runtime_for

    setup = _setup(context)
    reply = evaluate(setup, msg, context)
    # the run's final evaluation is this node's last message: drop its state now and say so,
    # which spares the ServerApp a cleanup round trip to this node (one process start)
    rt = runtime_for(setup)
    last_round = rt.stream.num_tasks * rt.scenario.training.rounds_per_task
    if int(msg.content[CONFIG]["server_round"]) == last_round:
        _cleanup(context)
        if reply.has_content() and METRICS in reply.content:
            reply.content[METRICS][STATE_REMOVED_KEY] = 1
    return reply


@client_app.query()
@_timed
def _query(msg: Message, context: Context) -> Message:
    """Partition discovery (``engine.client_app._query``'s reply) or, at the end of the run, the
    cleanup of this node's state; neither needs torch or the data."""
    config = msg.content.config_records.get(CONFIG)
    if config is not None and CLEANUP_KEY in config:
        _cleanup(context)
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({METRICS: MetricRecord({"partition_id": pid})}), reply_to=msg)
