"""A warm ClientApp executor for Flower's Deployment Engine: ``python -m simulator.deploy``.

With flwr 1.42 a SuperNode never runs a ClientApp itself. In ``--isolation subprocess`` (the
default) it starts ``flower-superexec``, which polls the SuperNode's Runtime API once a second
and starts a fresh ``flwr-clientapp`` process for every message; that process imports the app
(torch included), answers one message and exits. ``--isolation process`` only stops the
SuperNode from starting ``flower-superexec``: whatever runs beside it must claim the tasks on
the Runtime API, and Flower's own ``flower-superexec`` still starts one process per message
(its executors are ``subprocess`` and ``kubernetes``; the warm pools of 1.42 are for Kubernetes
and never for ClientApps).

This module is that "whatever": one long-lived process per SuperNode, started beside a SuperNode
run with ``--isolation process``. It claims each ClientApp task on the Runtime API and runs it
in this process with Flower's own steps (``pull_task_input``, ``install_from_fab``, the app
loader, ``push_message``, ``push_task_output`` from ``flwr.supernode.runtime.run_clientapp``),
so torch is imported once, and the app's module-level caches (the run's setup, data stream
and runtime in :mod:`simulator.flower_app` and :mod:`simulator.engine.runtime`) live from one
message of a run to the next. Client state still goes through the node's state folder after
every message, exactly as with a process per message, so replies are the same byte for byte.

What a process per message gave and this keeps: a task whose ClientApp raises is answered
with Flower's error reply and the worker goes on; a task the SuperNode gives up on (its
heartbeat is refused, e.g. the run was stopped) restarts the worker afresh (``exec``); a task
of another app (a FAB with another hash) also restarts it, so code is never mixed between apps.
What it does not keep: two runs on the same SuperNode share this process (their state is keyed
by run id, and messages are answered one at a time as the SuperNode hands them out).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from typing import Any, Sequence

POLL_SECONDS = 0.25  # Runtime API polls while idle (flower-superexec: 1 s)
PULL_BACKOFF_SECONDS = 0.02  # first wait for a message object not stored yet (Flower: 1 s)
PRELOAD = ("torch",)
TASK_TYPE = "flwr-clientapp"

# times (time.time()) of the steps of the message being answered: claimed, pulled (message and
# context read from the SuperNode), answered (ClientApp returned), pushed (reply sent)
STAMPS: dict[str, float] = {}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulator.deploy",
        description="Run every ClientApp message of a SuperNode (started with --isolation process) "
        "in this one long-lived process.",
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --port)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    p.add_argument("--preload", default=",".join(PRELOAD), help="modules imported at start (comma-separated)")
    p.add_argument("--token", default=None, help=argparse.SUPPRESS)  # a claimed task, across a restart
    p.add_argument("--fab-hash", default=None, help=argparse.SUPPRESS)
    return p


class Restart(BaseException):
    """Start this worker afresh (a new process image), optionally with a claimed task. A
    BaseException, so that a ClientApp's ``except Exception`` never swallows it."""

    def __init__(self, token: str | None = None, fab_hash: str | None = None) -> None:
        super().__init__(token)
        self.token, self.fab_hash = token, fab_hash


def _client(address: str, component: str, token: str | None = None):
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker(),
    )


def _heartbeat(client):
    """Flower's task heartbeat, except that a refused one (the SuperNode dropped the task) asks
    the main thread to restart the worker instead of interrupting it."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611
    from flwr.supercore.heartbeat import HeartbeatSender

    def beat() -> bool:
        try:
            ok = client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success
        except httpx.HTTPError:
            return False
        if not ok:
            os.kill(os.getpid(), signal.SIGUSR1)
        return True

    sender = HeartbeatSender(beat)
    sender.start()
    return sender


_APPS: dict[str, Any] = {}  # fab hash -> loaded ClientApp


def _load_app(run, fab):
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    if fab.hash_str not in _APPS:
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        _APPS[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
    return _APPS[fab.hash_str]


def _quick_object_pulls() -> None:
    """Make this process's ``pull_task_input`` ask again for a not-yet-stored object after
    ``PULL_BACKOFF_SECONDS`` (doubling up to Flower's cap) instead of Flower's 1 s.

    A SuperNode hands a task over as soon as the message is registered, while it may still be
    storing the message's objects (an object it has not stored yet reads as empty, which the
    Runtime API answers with ``object_available: false``). Flower's pull then waits
    ``PULL_INITIAL_BACKOFF`` (1 s in flwr 1.42) before asking again, and on loopback it nearly
    always has to: measured with ``PROTOFED_DEPLOY_LOG``, 1.0-1.2 s of every message's hand-over
    was that wait, against 0.1 s for all of its calls together. Only the wait changes; the calls
    and what they return are Flower's."""
    import functools

    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
        pull_and_inflate_object_from_tree, initial_backoff=PULL_BACKOFF_SECONDS
    )


def run_task(address: str, token: str) -> str:
    """Answer one claimed ClientApp task as ``flwr-clientapp`` does, in this process; returns
    the message type answered."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = _client(address, "flwr-clientapp", token)
    beat = _heartbeat(client)
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = pull_task_input(client)
        STAMPS["pulled"] = time.time()
        app = _load_app(run, fab)
        reply = app(message=message, context=context)
        STAMPS["answered"] = time.time()
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # the ClientApp's failure is the message's, never the worker's
        print(f"ClientApp raised: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        details = f"{type(exc)}:<'{exc}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
                STAMPS["pushed"] = time.time()
        finally:
            beat.stop()
            push_task_output(client=client, context=context, sub_status=status, details=details)
            client.close()
    return message.metadata.message_type if message is not None else "?"


def _claim(client):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TASK_TYPE]))
    if res.HasField("task") and res.token:
        return res.token, res.task.fab_hash
    return None


def serve(address: str, token: str | None = None, fab_hash: str | None = None) -> None:
    """Claim and answer tasks forever; raises :class:`Restart` when a fresh process is needed."""
    served: str | None = fab_hash
    log = os.environ.get("PROTOFED_DEPLOY_LOG")  # JSON lines: one per answered message
    client = _client(address, "SuperExec")
    while True:
        claimed = (token, fab_hash) if token else _claim(client)
        token = None
        if claimed is None:
            time.sleep(POLL_SECONDS)
            continue
        STAMPS.clear()
        STAMPS["claimed"] = time.time()
        if served is not None and claimed[1] and claimed[1] != served:
            raise Restart(*claimed)  # another app: never run its code beside this one's
        served = claimed[1] or served
        kind = run_task(address, claimed[0])
        if log:
            with open(log, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "type": kind, **STAMPS, "done": time.time()}) + "\n")


def _restart(argv: Sequence[str], exc: Restart) -> None:
    args = [a for a in argv]
    for flag in ("--token", "--fab-hash"):
        if flag in args:
            i = args.index(flag)
            del args[i : i + 2]
    if exc.token:
        args += ["--token", exc.token, "--fab-hash", exc.fab_hash or ""]
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "simulator.deploy", *args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for name in filter(None, args.preload.split(",")):
        importlib.import_module(name.strip())
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)

    def dropped(_sig, _frame):
        raise Restart()

    signal.signal(signal.SIGUSR1, dropped)
    _quick_object_pulls()
    try:
        serve(args.runtime_api_address, args.token, args.fab_hash or None)
    except Restart as exc:
        _restart(argv, exc)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
