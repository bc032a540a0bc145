"""Runs a Ray-backed command in a child process, so that the death of Ray itself ends like any
other error.

When Ray's raylet dies (killed, or out of memory), Ray's core worker ends the driver process on
the spot: no ``finally`` runs, and what the user sees is Ray's log dump. The ``protofed``
command therefore runs ``run``, ``compare`` and ``bench`` (unless ``--engine inline``) in a
child process and watches it:

* the child reports how it ended in a status file; a child that ends without one died under
  Ray. The run it was on (which the child reported, with ``resources.retries``) is then resumed
  from its last finished task in a new child (``run --resume``; ``compare`` and ``sweep``
  repeated, which resume their interrupted run and keep the finished ones), with one protofed
  line saying what died; once its retries are spent the run fails: ``run`` prints one protofed
  message (what died, what to try, where the finished tasks and Ray's logs are) and exits with
  1, a study fails that run at once when resumed and goes on with the others;
* the run directory already holds everything finished (``summary.json`` with
  ``completed: false`` is written at the end of every task);
* processes the dead child left behind (Ray's GCS, workers) are stopped;
* Ray's own log lines (``[state-dump]`` blocks, ``(raylet)``, its C++ and Python log lines)
  are not passed on unless ``--verbose``: they stay in Ray's log folder;
* SIGINT and SIGTERM are passed to the child, which stops its run as usual.

Tests that call :func:`simulator.cli.main` in-process are not supervised.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

CHILD_ENV = "PROTOFED_SUPERVISED_STATUS"
RETRY_ENV = "PROTOFED_RETRIES"  # {run_dir: [[retry, task, what died], ...]} for a resumed child
SPENT_ENV = "PROTOFED_RETRIES_SPENT"  # {run_dir: why}: runs a resumed study must fail at once
RAY_NOISE = ("[state-dump]", "(raylet)", "(gcs_server)", "(raylet,", "*** SIGSEGV", "*** Aborted")
#: the start of a line that Ray's processes log (C++: ``[2026-01-01 12:00:00,123 E 123 456]``,
#: Python: ``2026-01-01 12:00:00,123	ERROR``; ``*** ... ***`` and ``PC: @`` of a fatal signal)
RAY_LOG_LINE = re.compile(
    r"^\s*(\x1b\[[0-9;]*m)?(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"
    r"|\*\*\* |PC: @|@ +0x)"
)


def wants_supervision(argv: Sequence[str]) -> bool:
    """Commands that may start Ray, not already under a supervisor, not forced inline."""
    if os.environ.get(CHILD_ENV) or os.environ.get("PROTOFED_NO_SUPERVISOR"):
        return False
    args = list(argv)
    if not args or args[0] not in ("run", "compare", "sweep", "bench"):
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


def report_run_dir(run_dir: Path, retries: int = 0) -> None:
    """Called by the child when a run starts: where its finished tasks will be, and how often
    the run may be resumed if Ray dies under it (``resources.retries``)."""
    _report(run_dir=str(run_dir), retries_allowed=int(retries))


def report_ray_logs(path: str | None) -> None:
    """Called by the child once Ray runs: the folder of Ray's logs, named if Ray dies."""
    if path:
        _report(ray_logs=path)


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def earlier_retries(run_dir: Path) -> list[tuple[int, int, str]]:
    """``(retry, task, what died)`` of each time the supervisor resumed this run in a new process
    after Ray had ended the previous one (the runner records them in failures.csv)."""
    try:
        data = json.loads(os.environ.get(RETRY_ENV) or "{}")
    except ValueError:
        return []
    for key, rows in data.items():
        if _same_dir(key, run_dir):
            return [(int(r), int(t), str(w)) for r, t, w in rows]
    return []


def retries_spent(run_dir: Path) -> str | None:
    """Why this run must not be tried again (Ray died under it more often than it may be
    resumed), when a study resumed by the supervisor reaches it; else None."""
    try:
        data = json.loads(os.environ.get(SPENT_ENV) or "{}")
    except ValueError:
        return None
    return next((why for key, why in data.items() if _same_dir(key, run_dir)), None)


def is_ray_noise(line: str, in_block: bool) -> bool:
    """Whether a line of the child's output is Ray's own logging: a marked or Ray-formatted line,
    or an indented (or empty) line that continues one (a ``[state-dump]`` or log-tail block)."""
    if any(mark in line for mark in RAY_NOISE) or RAY_LOG_LINE.match(line):
        return True
    return in_block and (not line.strip() or line[:1] in (" ", "\t"))


#: what Ray's own messages say died (the supervisor's one line repeats it)
RAY_DEATHS = {"Raylet is terminated": "raylet", "Failed to connect to GCS": "GCS", "GCS may have been killed": "GCS",
              "node has crashed": "node"}


def _pump(src, dst, verbose: bool, died: list[str] | None = None) -> None:
    """Pass the child's lines on; Ray's logging only with ``--verbose`` (it stays in Ray's log
    folder, which the error message names). What Ray says died is added to ``died``."""
    in_block = False
    for line in iter(src.readline, ""):
        in_block = is_ray_noise(line, in_block)
        if died is not None:
            died += [name for mark, name in RAY_DEATHS.items() if mark in line and name not in died]
        if verbose or not in_block:
            dst.write(line)
            dst.flush()
    src.close()


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


def _ray_process(proc) -> str | None:
    """Which of Ray's own processes this is ("raylet", "GCS"), else None."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return None
    return "raylet" if "raylet/raylet" in cmd else ("GCS" if "gcs_server" in cmd else None)


def _watch(child: subprocess.Popen) -> tuple[int, set[int], list[str]]:
    """Wait for the child; its exit code, every descendant seen, and Ray's processes (raylet,
    GCS) that died while the child still ran, first death first."""
    import psutil

    watched: set[int] = set()
    ray_procs: dict[int, str] = {}
    died: list[str] = []
    while True:
        try:
            code: int | None = child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            code = None
        # Ray's processes outlive the driver (until stopped) unless they died first; a dead raylet
        # ends the driver at once (then the GCS may follow), a dead GCS only minutes later
        gone = {name for pid, name in ray_procs.items() if not _alive(pid)}
        died += [name for name in ("raylet", "GCS") if name in gone and name not in died]
        if code is not None:
            return code, watched, died
        try:
            now = {p.pid: p for p in psutil.Process(child.pid).children(recursive=True)}
        except psutil.Error:
            now = {}
        ray_procs.update({pid: name for pid, p in now.items() if pid not in ray_procs and (name := _ray_process(p))})
        watched |= set(now)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _launch(argv: Sequence[str], env: dict[str, str], verbose: bool) -> tuple[int, dict, set[int], list[str]]:
    """Run ``protofed ARGV`` once in a child; its exit code, what it reported, its descendants
    and the Ray processes that died before it."""
    fd, status = tempfile.mkstemp(prefix="protofed-status-", suffix=".json")
    os.close(fd)
    os.unlink(status)
    child = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        env=dict(env, **{CHILD_ENV: status, "PYTHONUNBUFFERED": "1"}),
    )

    def forward(signum, frame) -> None:  # the child stops its own run and reports
        try:
            child.send_signal(signum)
        except OSError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    said: list[str] = []  # what Ray's messages say died
    pumps = [
        threading.Thread(target=_pump, args=(child.stdout, sys.stdout, verbose, said), daemon=True),
        threading.Thread(target=_pump, args=(child.stderr, sys.stderr, verbose, said), daemon=True),
    ]
    for t in pumps:
        t.start()
    try:
        code, watched, died = _watch(child)
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
    return code, reported, watched, said or died


def _resume_argv(argv: Sequence[str], run_dir: str) -> list[str]:
    """The command that continues the study after Ray died under ``run_dir``: ``compare`` and
    ``sweep`` resume their interrupted run and keep the finished ones when repeated; ``run``
    becomes ``run --resume RUN_DIR`` with the same engine, Ray address and verbosity."""
    args = list(argv)
    if args[0] != "run" or "--resume" in args or any(a.startswith("--resume=") for a in args):
        return args
    kept = ["run", "--resume", run_dir]
    for i, a in enumerate(args):
        if a in ("--engine", "--ray-address") and i + 1 < len(args):
            kept += [a, args[i + 1]]
        elif a.startswith(("--engine=", "--ray-address=")) or a == "--verbose":
            kept.append(a)
    return kept


def supervise(argv: Sequence[str]) -> int:
    """Run ``protofed ARGV`` in a child process and return the exit code to use. When Ray ends
    the child (its raylet or GCS died), the run it was on is resumed from its last finished task
    in a new child, ``resources.retries`` times at most; then the run fails (a study goes on
    with its other runs)."""
    verbose = "--verbose" in argv
    env = dict(os.environ)
    history: dict[str, list[list]] = {}  # run dir -> [retry, task, what died] of each resume
    spent: dict[str, str] = {}
    while True:
        code, reported, watched, died = _launch(argv, env, verbose)
        if "exit_code" in reported:
            if code != reported["exit_code"]:  # it crashed while cleaning up: stop what it left
                _stop(watched)
            return int(reported["exit_code"])
        _stop(watched)
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        what = f"Ray's {' and '.join(died)} died" if died else f"Ray ended the run's process ({how})"
        run_dir = reported.get("run_dir")
        allowed = int(reported.get("retries_allowed", 0))
        logs = f" Ray's logs: {reported['ray_logs']}." if reported.get("ray_logs") else ""
        done = len(history.get(run_dir, [])) if run_dir else 0
        if run_dir and argv[0] in ("run", "compare", "sweep") and run_dir not in spent:
            if done < allowed:
                task = _tasks_completed(run_dir)
                history.setdefault(run_dir, []).append([done + 1, task, what])
                print(f"protofed: {what} during task {task + 1} of the run in {run_dir}; resuming it from "
                      f"its last finished task (retry {done + 1} of {allowed}).{logs}", flush=True)
                env[RETRY_ENV] = json.dumps(history)
                argv = _resume_argv(argv, run_dir)
                continue
            if argv[0] != "run":  # the study goes on without this run
                spent[run_dir] = f"{what} under this run {done + 1} times ({done} retries spent).{logs}"
                print(f"protofed: {spent[run_dir]} The run failed; the study goes on.", flush=True)
                env[SPENT_ENV] = json.dumps(spent)
                continue
        where = f" in {run_dir}" if run_dir else ""
        spent_text = f" after {done} retries" if done else ""
        print(
            f"error: the run's process was ended by Ray{spent_text} ({what}; {how}): Ray's raylet or object "
            "store died, most often because the machine ran out of memory or a Ray process was killed. "
            "Try fewer actors at once (a larger resources.num_cpus_per_client), a smaller model or "
            f"batch, or --engine inline. Finished tasks are kept{where}; "
            f"`protofed run --resume {run_dir or 'RUN_DIR'}` continues from them.{logs}",
            file=sys.stderr,
        )
        return 1


def _tasks_completed(run_dir: str) -> int:
    """``tasks_completed`` of the run's summary.json (0 if there is none)."""
    try:
        return int(json.loads((Path(run_dir) / "summary.json").read_text()).get("tasks_completed", 0))
    except (OSError, ValueError, TypeError):
        return 0
