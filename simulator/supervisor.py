"""Runs a Ray-backed command in a child process, so that the death of Ray itself ends like any
other error.

When Ray's raylet dies (killed, or out of memory), Ray's core worker ends the driver process on
the spot: no ``finally`` runs, and what the user sees is Ray's log dump. The ``protofed``
command therefore runs ``run``, ``compare`` and ``bench`` (unless ``--engine inline``) in a
child process and watches it:

* the child reports how it ended in a status file; a child that ends without one died under
  Ray, and the supervisor prints one protofed message (what died, what to try, where the
  finished tasks are) and exits with 1;
* the run directory already holds everything finished (``summary.json`` with
  ``completed: false`` is written at the end of every task);
* processes the dead child left behind (Ray's GCS, workers) are stopped;
* Ray's own log lines (``[state-dump]``, ``(raylet)``) are not passed on unless ``--verbose``;
* SIGINT and SIGTERM are passed to the child, which stops its run as usual.

Tests that call :func:`simulator.cli.main` in-process are not supervised.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

CHILD_ENV = "PROTOFED_SUPERVISED_STATUS"
RAY_NOISE = ("[state-dump]", "(raylet)", "(gcs_server)", "(raylet,", "*** SIGSEGV", "*** Aborted")


def wants_supervision(argv: Sequence[str]) -> bool:
    """Commands that may start Ray, not already under a supervisor, not forced inline."""
    if os.environ.get(CHILD_ENV) or os.environ.get("PROTOFED_NO_SUPERVISOR"):
        return False
    args = list(argv)
    if not args or args[0] not in ("run", "compare", "bench"):
        return False
    if any(a == "--help" or a == "-h" for a in args):
        return False
    for i, a in enumerate(args):
        if a == "--engine=inline" or (a == "--engine" and i + 1 < len(args) and args[i + 1] == "inline"):
            return False
    return True


def _report(**fields) -> None:
    path = os.environ.get(CHILD_ENV)
    if not path:
        return
    try:
        current = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    except (OSError, ValueError):
        current = {}
    current.update(fields)
    try:
        Path(path).write_text(json.dumps(current))
    except OSError:
        pass


def report_status(code: int) -> None:
    """Called by the child as it ends on its own terms."""
    _report(exit_code=int(code))


def report_run_dir(run_dir: Path) -> None:
    """Called by the child when a run starts: where its finished tasks will be."""
    _report(run_dir=str(run_dir))


def _pump(src, dst, verbose: bool) -> None:
    for line in iter(src.readline, ""):
        if verbose or not any(mark in line for mark in RAY_NOISE):
            dst.write(line)
            dst.flush()
    src.close()


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def _stop(pids: set[int]) -> None:
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def _last_run_dir(stdout_lines: list[str]) -> str | None:
    for line in reversed(stdout_lines):
        if line.startswith("run directory: "):
            return line.split(": ", 1)[1].strip()
    return None


def supervise(argv: Sequence[str]) -> int:
    """Run ``protofed ARGV`` in a child process and return the exit code to use."""
    verbose = "--verbose" in argv
    fd, status = tempfile.mkstemp(prefix="protofed-status-", suffix=".json")
    os.close(fd)
    os.unlink(status)
    env = dict(os.environ, **{CHILD_ENV: status, "PYTHONUNBUFFERED": "1"})
    child = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1,
    )
    def forward(signum, frame) -> None:  # the child stops its own run and reports
        try:
            child.send_signal(signum)
        except OSError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    watched: set[int] = set()

    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, sys.stdout, verbose), daemon=True),
        threading.Thread(target=_pump, args=(child.stderr, sys.stderr, verbose), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                watched |= _descendants(child.pid)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    try:
        reported = json.loads(Path(status).read_text())
    except (OSError, ValueError):
        reported = {}
    finally:
        Path(status).unlink(missing_ok=True)
    if "exit_code" in reported:
        if code != reported["exit_code"]:  # it crashed while cleaning up: stop what it left
            _stop(watched)
        return int(reported["exit_code"])
    _stop(watched)
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    where = f" in {reported['run_dir']}" if reported.get("run_dir") else ""
    print(
        f"error: the run's process was ended by Ray ({how}): Ray's raylet or object store died, "
        "most often because the machine ran out of memory or a Ray process was killed. "
        "Try fewer actors at once (a larger resources.num_cpus_per_client), a smaller model or "
        f"batch, or --engine inline. Finished tasks are kept{where}; "
        f"`protofed run --resume {reported.get('run_dir', 'RUN_DIR')}` continues from them.",
        file=sys.stderr,
    )
    return 1
