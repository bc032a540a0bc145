"""``protofed sweep``: a grid of scenario values x strategies x seeds, one run directory each.

Every combination of grid values is a *cell*; the cell's values are applied to the scenario
like ``--set`` overrides, and each cell is then planned exactly as ``protofed compare`` plans a
comparison (:func:`simulator.compare.plan`): labels, seeds, validation of every run before the
first starts. Run directories are ``DIR/<cell>/<label>/seed-<s>/`` where ``<cell>`` names the
swept values (``clients.partition.alpha=0.1``; several keys joined by ``,``). A run whose
directory already holds a completed run of the same resolved scenario is kept
(:func:`simulator.compare._finished`), so repeating the command resumes an interrupted sweep.

``DIR/sweep.csv`` has one row per run: the swept keys as columns, then ``label, seed, status``
and every summary key. Plots: see :mod:`simulator.sweep_plots`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import numpy as np
import pandas as pd

from .compare import PlannedRun, _conflicts, _finished, execute, format_table, plan
from .errors import Problem, UserError
from .results import SUMMARY_KEYS, RunWriter
from .scenario import apply_overrides, load_yaml_text, overridable_key_problem, read_yaml, validate_scenario

MAX_CELL_NAME = 200  # below the 255 bytes a file name may have


@dataclass
class Cell:
    values: dict[str, Any]  # dotted key -> value, in grid order
    name: str = ""

    def sets(self) -> list[str]:
        """The cell as ``--set`` texts (values as JSON, which YAML reads back unchanged)."""
        return [f"{k}={json.dumps(v)}" for k, v in self.values.items()]


@dataclass
class SweepPlan:
    root: Path
    keys: list[str]
    cells: list[Cell]
    labels: list[str]
    seeds: list[int]
    runs: list[tuple[Cell, PlannedRun]] = field(default_factory=list)


def value_text(value: Any) -> str:
    """A value as it appears in a cell name: ``0.1``, ``10``, ``true``, ``dirichlet``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def cell_name(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs joined by ``,``; characters a folder name should not hold become ``_``;
    a very long name is cut and made unique with a short hash."""
    text = ",".join(f"{k}={value_text(v)}" for k, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if safe.startswith((".", "-")):
        safe = "_" + safe
    if len(safe) > MAX_CELL_NAME:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        safe = safe[: MAX_CELL_NAME - 9] + "-" + digest
    return safe


def make_cells(grid: Mapping[str, Sequence[Any]]) -> list[Cell]:
    keys = list(grid)
    cells = [Cell(dict(zip(keys, combo))) for combo in itertools.product(*(list(grid[k]) for k in keys))]
    seen: dict[str, Cell] = {}
    for c in cells:
        c.name = cell_name(c.values)
        if c.name in seen:
            raise UserError.single("--grid", ",".join(keys), f"two cells would share the folder {c.name!r} (a value is listed twice?)")
        seen[c.name] = c
    return cells


def parse_value(text: str) -> Any:
    """A ``--grid`` value: YAML like ``--set`` (``0.1`` a float, ``true`` a bool); ``1e-3``, which
    YAML 1.1 reads as text, is taken as the number it means."""
    try:
        value = load_yaml_text(text) if text.strip() else ""
    except Exception:  # not YAML: the text itself
        value = text
    if isinstance(value, str):
        try:
            f = float(value)
            if math.isfinite(f):
                return f
        except ValueError:
            pass
    return value


def grid_arg(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["clients.partition.alpha=0.1,1,10", ...]`` -> ``{key: [values]}``. Values are split on
    commas (a value holding a comma belongs in the scenario's ``sweep:`` section instead)."""
    grid: dict[str, list[Any]] = {}
    problems: list[Problem] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not sep or not values:
            problems.append(Problem(item[:60], "expected KEY=V1,V2,..., e.g. --grid clients.partition.alpha=0.1,1,10"))
            continue
        problem = overridable_key_problem(key)
        if problem:
            problems.append(Problem(key[:60], problem))
        elif key in grid:
            problems.append(Problem(key, "this key is given twice"))
        else:
            grid[key] = [parse_value(v) for v in values]
    if problems:
        raise UserError("--grid", problems)
    return grid


def plan_sweep(
    scenario_path: str,
    grid: Mapping[str, Sequence[Any]] | None,
    labels: Sequence[str] | None,
    seeds: Sequence[int] | None,
    out_dir: str | None,
    sets: Sequence[str] = (),
) -> SweepPlan:
    """Every run of the sweep, validated; nothing is written."""
    raw = read_yaml(scenario_path)
    if sets:
        raw = apply_overrides(raw, list(sets))
    base = validate_scenario(raw, scenario_path)
    grid = dict(grid) if grid else dict(base.sweep.grid)
    if not grid:
        raise UserError.single("--grid", "--grid", "give --grid KEY=V1,V2,... or a sweep: {grid: {KEY: [V1, V2]}} section in the scenario")
    labels = list(labels) if labels else (list(base.sweep.strategies) or [base.strategy.name])
    seeds = list(seeds) if seeds is not None else list(base.sweep.seeds)
    root = Path(out_dir) if out_dir else Path(base.output.dir) / base.name / "sweep"
    sp = SweepPlan(root, list(grid), make_cells(grid), labels, seeds)
    for cell in sp.cells:
        try:
            runs, _ = plan(scenario_path, labels, seeds, str(root / cell.name), [*sets, *cell.sets()])
        except UserError as exc:
            if exc.source in ("--strategies", "--set"):
                raise
            raise UserError(f"{exc.source} (sweep cell {cell.name})", exc.problems) from None
        sp.runs += [(cell, r) for r in runs]
    return sp


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Eta:
    """Elapsed time and an estimate of the time left: the mean wall time of the runs executed so
    far times the runs still to execute (runs already finished on disk are kept and cost nothing)."""

    def __init__(self, to_run: int) -> None:
        self.to_run = to_run
        self.started = time.time()
        self.executed: list[float] = []

    def eta(self) -> str:
        left = self.to_run - len(self.executed)
        return f"ETA {_duration(float(np.mean(self.executed)) * left)}" if self.executed and left > 0 else ""

    def line(self) -> str:
        eta = self.eta()
        return f"elapsed {_duration(time.time() - self.started)}" + (f" · {eta}" if eta else "")


class _LineWriter:
    """A text stream that hands whole lines to ``console.print`` (rich keeps its live progress
    bar below them)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _live_progress(out: TextIO, total: int):
    """A rich progress bar over the whole sweep (runs done, elapsed, our ETA)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=out, force_terminal=True)
    progress = Progress(
        TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("runs ·"), TimeElapsedColumn(),
        TextColumn("{task.fields[eta]}"), console=console,
    )
    task = progress.add_task("sweep", total=total, eta="")
    return progress, task, _LineWriter(console)


def run_sweep(
    scenario_path: str,
    grid: Mapping[str, Sequence[Any]] | None = None,
    labels: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    out_dir: str | None = None,
    engine: str | None = None,
    sets: Sequence[str] = (),
    verbose: bool = False,
    out: TextIO | None = sys.stdout,
    plots: bool = True,
    live: bool | None = None,
) -> tuple[pd.DataFrame, Path]:
    """``live``: a rich progress bar (default: when ``out`` is a terminal); otherwise plain
    lines, each run announced with the elapsed time and an ETA (logs, CI)."""
    from .engine.runner import build_stream_checked, check_strategy_setup, check_writable

    sp = plan_sweep(scenario_path, grid, labels, seeds, out_dir, sets)
    for _, r in sp.runs:
        if engine:
            r.scenario.resources.engine = engine  # type: ignore[assignment]
    firsts = {cell.name: r for cell, r in reversed(sp.runs)}
    streams = {}
    for name, r in firsts.items():  # data problems of any cell (an impossible partition) before anything is written
        try:
            streams[name] = build_stream_checked(r.scenario, scenario_path)
        except UserError as exc:
            raise UserError(f"{exc.source} (sweep cell {name})", exc.problems) from None
    for cell, r in sp.runs:  # the strategies' own checks (fedsa text anchors: class names, text model)
        try:
            check_strategy_setup(r.scenario, streams[cell.name], scenario_path)
        except UserError as exc:
            raise UserError(f"{exc.source} (sweep cell {cell.name})", exc.problems) from None
    check_writable(sp.root)
    if live is None:
        live = bool(out is not None and getattr(out, "isatty", lambda: False)())
    progress = None
    if live and out is not None:
        progress, bar, out = _live_progress(out, len(sp.runs))
        progress.start()
    try:
        return _execute(sp, scenario_path, engine, verbose, out, plots, progress, bar if progress else None)
    finally:
        if progress is not None:
            progress.stop()


def _execute(sp: SweepPlan, scenario_path: str, engine: str | None, verbose: bool, out: Any, plots: bool,
             progress: Any, bar: Any) -> tuple[pd.DataFrame, Path]:
    say = (lambda text: print(text, file=out, flush=True)) if out else (lambda text: None)
    say(
        f"protofed sweep · {len(sp.cells)} cells x {len(sp.labels)} strategies x {len(sp.seeds)} seeds = "
        f"{len(sp.runs)} runs · {', '.join(f'{k}: {len(set(map(value_text, (c.values[k] for c in sp.cells))))} values' for k in sp.keys)}"
    )
    conflicts = _conflicts([r for _, r in sp.runs])  # run directories of other scenarios are never replaced
    if conflicts:
        raise UserError(scenario_path, conflicts)
    finished = [_finished(r) for _, r in sp.runs]
    if any(f is not None for f in finished):
        say(f"{sum(f is not None for f in finished)} runs already finished: kept")
    eta = Eta(sum(f is None for f in finished))
    rows: list[dict[str, Any]] = []
    writer = RunWriter(sp.root)
    for i, (cell, r) in enumerate(sp.runs, 1):
        say(f"\n=== sweep run {i}/{len(sp.runs)} · {cell.name} · {r.label} · seed {r.seed} · {eta.line()} ===")
        row: dict[str, Any] = {**cell.values, "cell": cell.name, "label": r.label, "seed": r.seed}
        done = finished[i - 1]
        if done is not None:
            say(f"kept: {r.run_dir} already holds this completed run")
            row.update(done, status="kept", error="")
        else:
            t0 = time.time()
            row.update(execute(r, scenario_path, verbose=verbose, out=out, say=say))
            eta.executed.append(time.time() - t0)
            if row["status"] == "failed":
                say(f"FAILED: {row['error']}")
        row["run_dir"] = str(r.run_dir)
        rows.append(row)
        if progress is not None:
            progress.update(bar, advance=1, eta=eta.eta())
        writer.write_table("sweep", _table(rows, sp.keys))  # the table so far, after every run
    df = _table(rows, sp.keys)
    ok = df[df["status"] != "failed"]
    if plots and len(ok):
        from .sweep_plots import plot_sweep

        try:
            for p in plot_sweep(df, sp.keys, sp.root, sp.runs[0][1].scenario.output.plot_formats):
                say(str(p))
        except Exception as exc:  # plotting must never lose the finished runs
            say(f"warning: plotting failed: {exc}")
    if out:
        shown = df.assign(label=df["cell"] + " · " + df["label"].astype(str))
        print(file=out)
        print(format_table(shown), file=out)
        print(f"\n{len(ok)}/{len(df)} runs ok in {_duration(time.time() - eta.started)} · results in {sp.root}", file=out)
    return df, sp.root


def _table(rows: list[dict[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for key in SUMMARY_KEYS:
        if key not in df.columns:
            df[key] = np.nan
    front = [*keys, "cell", "label", "seed", "status", *[k for k in SUMMARY_KEYS if k != "seed"]]
    df = df[front + [c for c in df.columns if c not in front]]
    return df.drop(columns=["task_classes", "epsilon_spent"], errors="ignore")  # nested values: the flat keys stay


def read_sweep(root: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """``sweep.csv`` of a sweep folder and its swept keys (the columns before ``cell``)."""
    df = pd.read_csv(Path(root) / "sweep.csv")
    keys = list(df.columns[: list(df.columns).index("cell")])
    return df, keys
