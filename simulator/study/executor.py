"""How a study (``compare``, ``sweep``) executes its runs: one after another in this process,
or ``parallel`` at once, each in a process of its own.

* Serially, the runs share one Ray (:func:`simulator.engine.ray_engine.study_ray`): Ray starts
  once per study instead of once per run; each run still has its own actors, state and results.
* With ``parallel`` N > 1, at most N runs execute at once, each in a fresh (spawned) process
  that runs :func:`simulator.study.compare.execute` exactly as the serial study does, writes its
  output to ``<study>/logs/<run>.log`` and hands its table row back through a JSON file. On the
  Ray engine the study starts one local Ray cluster (or uses ``resources.ray_address``, an
  existing cluster) and every run connects to it as a driver of its own; each run's actors book
  N times its CPUs with Ray, so that N runs' actor pools fit the cluster together (a run whose
  pool only partly fit could wait forever on another run). Torch threads, data, seeds and
  cohorts do not depend on it: the numbers are those of a serial study.
* A run that fails, or whose process dies, is a ``failed`` row; the others go on.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

from . import compare
from .compare import PlannedRun

#: a run's index in the study and its row (status ok | failed, error, summary keys)
Done = Callable[[int, dict[str, Any], float], None]


def parallel_arg(value: Any, source: str = "--parallel") -> int:
    """``--parallel N`` / ``parallel=N``: a positive number of runs at once."""
    from ..errors import UserError

    try:
        n = int(value)
        ok = n >= 1 and float(value) == n and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError.single(source, source, f"expected a positive whole number of runs at once, got {value!r}")
    return n


def execute_runs(
    todo: Sequence[tuple[int, PlannedRun]],
    scenario_path: str,
    *,
    parallel: int,
    verbose: bool,
    out: TextIO | None,
    log_dir: Path,
    on_start: Callable[[int, PlannedRun], None],
    on_done: Done,
) -> None:
    """Execute ``todo`` (index in the study, run); ``on_start`` before each run starts,
    ``on_done(index, row, seconds)`` as each finishes (in the order they finish)."""
    from ..engine.ray_engine import study_ray

    say = (lambda text: print(text, file=out, flush=True)) if out else (lambda text: None)
    with study_ray(), shared_features(log_dir.parent / "features"):
        if parallel <= 1 or len(todo) <= 1:
            for i, run in todo:
                on_start(i, run)
                t0 = time.time()
                row = compare.execute(run, scenario_path, verbose=verbose, out=out, say=say)
                on_done(i, row, time.time() - t0)
            return
        _execute_parallel(todo, scenario_path, parallel, verbose, log_dir, say, on_start, on_done)


@contextmanager
def shared_features(folder: Path) -> Iterator[None]:
    """The study's runs (and its parallel children, which inherit the environment) share frozen
    backbones' feature tables through ``folder`` (:mod:`simulator.learner.frozen_features`),
    unless ``PROTOFED_FEATURE_CACHE`` already names one."""
    from ..learner.frozen_features import SHARED_ENV

    if os.environ.get(SHARED_ENV):
        yield
        return
    os.environ[SHARED_ENV] = str(folder)
    try:
        yield
    finally:
        os.environ.pop(SHARED_ENV, None)


@dataclass
class _Child:
    index: int
    run: PlannedRun
    process: Any
    result: Path
    log: Path
    started: float


def _cluster_address(runs: Sequence[PlannedRun], verbose: bool) -> str | None:
    """The Ray cluster the runs of a parallel study connect to: ``resources.ray_address`` when
    given, else a local Ray started here (the study owns it); None on the inline engine."""
    ray_runs = [r for r in runs if r.scenario.resources.engine == "ray"]
    if not ray_runs:
        return None
    if ray_runs[0].scenario.resources.ray_address:
        return None  # each run connects to its own resources.ray_address
    import ray

    from ..engine.ray_engine import quiet_logs, start_ray

    quiet_logs(verbose)
    start_ray(verbose, None)
    return ray.get_runtime_context().gcs_address


def _execute_parallel(todo, scenario_path: str, parallel: int, verbose: bool, log_dir: Path, say,
                      on_start, on_done: Done) -> None:
    import multiprocessing

    from ..engine.ray_engine import SHARE_ENV, STUDY_ADDRESS_ENV

    address = _cluster_address([r for _, r in todo], verbose)
    env = {SHARE_ENV: str(parallel), **({STUDY_ADDRESS_ENV: address} if address else {})}
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no Ray, torch or run state inherited
    log_dir.mkdir(parents=True, exist_ok=True)
    waiting, running = list(todo), []
    say(f"running {len(todo)} runs, at most {parallel} at once; each run's output: {log_dir}/<run>.log")
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                i, run = waiting.pop(0)
                on_start(i, run)
                running.append(_start(ctx, i, run, scenario_path, verbose, log_dir, env))
            time.sleep(0.2)
            for child in [c for c in running if not c.process.is_alive()]:
                running.remove(child)
                child.process.join()
                on_done(child.index, _row_of(child), time.time() - child.started)
    except BaseException:
        _stop_children(running)
        raise


def _log_name(run: PlannedRun, log_dir: Path) -> Path:
    parts = run.run_dir.parts[-3:] if len(run.run_dir.parts) >= 3 else run.run_dir.parts
    return log_dir / ("__".join(parts) + ".log")


def _start(ctx, i: int, run: PlannedRun, scenario_path: str, verbose: bool, log_dir: Path, env: dict[str, str]) -> _Child:
    log = _log_name(run, log_dir)
    result = log.with_suffix(".row.json")
    result.unlink(missing_ok=True)
    p = ctx.Process(target=_child_main, args=(run, scenario_path, verbose, str(log), str(result), env),
                    name=f"protofed-run-{i}")
    p.start()
    return _Child(i, run, p, result, log, time.time())


def _row_of(child: _Child) -> dict[str, Any]:
    """The row the child wrote; a child that died without one is a failed run."""
    try:
        row = json.loads(child.result.read_text())
        child.result.unlink(missing_ok=True)
        return row
    except (OSError, ValueError):
        code = child.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "failed", "error": f"the run's process ended without a result ({how}); its output: {child.log}"}


def _stop_children(running: list[_Child]) -> None:
    """Ctrl-C or SIGTERM of the study: each running run stops as an interrupted run does
    (its finished tasks kept), then the study ends."""
    import signal

    for c in running:
        if c.process.is_alive():
            os.kill(c.process.pid, signal.SIGTERM)
    deadline = time.time() + 60
    for c in running:
        c.process.join(timeout=max(0.0, deadline - time.time()))
        if c.process.is_alive():
            c.process.kill()
            c.process.join()


def _child_main(run: PlannedRun, scenario_path: str, verbose: bool, log: str, result: str, env: dict[str, str]) -> None:
    """One run of a parallel study, in its own process: its output to ``log``, its row to
    ``result`` (written last, atomically)."""
    import signal

    from ..cli import _on_sigterm
    from .supervisor import CHILD_ENV

    os.environ.pop(CHILD_ENV, None)  # the study's process reports to the supervisor, not its runs
    os.environ.update(env)
    signal.signal(signal.SIGTERM, _on_sigterm)  # stop like an interrupted run: finished tasks kept
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", buffering=1, encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)  # Ray's and torch's own output too
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        row = compare.execute(run, scenario_path, verbose=verbose, out=f, say=lambda text: print(text, file=f, flush=True))
    tmp = Path(result).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=str))
    os.replace(tmp, result)
