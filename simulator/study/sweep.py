"""``protofed sweep``: a grid of scenario values x strategies x seeds, one run directory each.

Every combination of grid values is a *cell*; the cell's values are applied to the scenario
like ``--set`` overrides, and each cell is then planned exactly as ``protofed compare`` plans a
comparison (:func:`simulator.study.compare.plan`): labels, seeds, validation of every run before the
first starts. Run directories are ``DIR/<cell>/<label>/seed-<s>/`` where ``<cell>`` names the
swept values (``clients.partition.alpha=0.1``; several keys joined by ``,``). A run whose
directory already holds a completed run of the same resolved scenario is kept
(:func:`simulator.study.compare._finished`), so repeating the command resumes an interrupted sweep.

``DIR/sweep.csv`` has one row per run: the swept keys as columns, then ``label, seed, status``
and every summary key. It covers every run of the folder, as ``comparison.csv`` does
(:mod:`simulator.study.compare`): cells, labels and seeds of earlier calls are rows too
(``this_call`` false), a run of another scenario or of other grid keys in the folder is an
error naming it, and the table written after every run lists the runs still to come
(``pending``) and the one Ctrl-C stopped (``interrupted``). With ``--set`` the default folder is
``<name>-set-<hash>/sweep``, as for ``run`` and ``compare``. Plots: see :mod:`simulator.report.sweep_plots`.
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

from .compare import OK_STATUSES, PlannedRun, _conflicts, _finished, format_table, plan, report_study
from ..errors import Problem, UserError
from ..results import SUMMARY_KEYS, RunWriter
from ..scenario import load_yaml_text, overridable_key_problem

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
    sets: list[str] = field(default_factory=list)  # the study's --set


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
    from .compare import study_base
    from .run_dirs import scenario_folder

    _, base, _, tag = study_base(scenario_path, sets)  # other --set values: another folder, as compare
    grid = dict(grid) if grid else dict(base.sweep.grid)
    if not grid:
        raise UserError.single("--grid", "--grid", "give --grid KEY=V1,V2,... or a sweep: {grid: {KEY: [V1, V2]}} section in the scenario")
    labels = list(labels) if labels else (list(base.sweep.strategies) or [base.strategy.name])
    seeds = list(seeds) if seeds is not None else list(base.sweep.seeds)
    root = Path(out_dir) if out_dir else Path(base.output.dir) / scenario_folder(base.name, tag) / "sweep"
    sp = SweepPlan(root, list(grid), make_cells(grid), labels, seeds, sets=list(sets))
    for cell in sp.cells:
        try:
            runs, _ = plan(scenario_path, labels, seeds, str(root / cell.name), sets, extra_sets=cell.sets())
        except UserError as exc:
            if exc.source == "--strategies":
                raise
            source = "--grid" if exc.source == "--set" else exc.source  # the study's --set applied above: the cell's value is wrong
            raise UserError(f"{source} (sweep cell {cell.name})", exc.problems) from None
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
    overwrite: bool = False,
    parallel: int = 1,
) -> tuple[pd.DataFrame, Path]:
    """``live``: a rich progress bar (default: when ``out`` is a terminal); otherwise plain
    lines, each run announced with the elapsed time and an ETA (logs, CI). ``parallel``: runs
    executed at once (:mod:`simulator.study.executor`), with the numbers of a serial sweep."""
    from ..engine.runner import build_stream_checked, check_strategy_setup, check_writable

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
        return _execute(sp, scenario_path, verbose, out, plots, progress, bar if progress else None, overwrite, parallel)
    finally:
        if progress is not None:
            progress.stop()


def _execute(sp: SweepPlan, scenario_path: str, verbose: bool, out: Any, plots: bool,
             progress: Any, bar: Any, overwrite: bool, parallel: int = 1) -> tuple[pd.DataFrame, Path]:
    say = (lambda text: print(text, file=out, flush=True)) if out else (lambda text: None)
    say(
        f"protofed sweep · {len(sp.cells)} cells x {len(sp.labels)} strategies x {len(sp.seeds)} seeds = "
        f"{len(sp.runs)} runs · {', '.join(f'{k}: {len(set(map(value_text, (c.values[k] for c in sp.cells))))} values' for k in sp.keys)}"
    )
    conflicts = [] if overwrite else _conflicts([r for _, r in sp.runs])  # other scenarios' runs are never replaced silently
    if conflicts:
        conflicts.append(Problem("--overwrite", "give it to replace those runs, or choose another --out"))
        raise UserError(scenario_path, conflicts)
    earlier = study_rows(sp, scenario_path)  # runs of earlier calls in the folder: in the table too
    finished = [_finished(r) for _, r in sp.runs]
    if any(f is not None for f in finished):
        say(f"{sum(f is not None for f in finished)} runs already finished: kept")
    eta = Eta(sum(f is None for f in finished))
    rows = [_first_row(cell, r, done) for (cell, r), done in zip(sp.runs, finished)]
    writer = RunWriter(sp.root)
    _run_all(sp, scenario_path, finished, rows, earlier, eta, writer, say,
             dict(verbose=verbose, out=out, parallel=parallel), lambda: progress and progress.update(bar, advance=1, eta=eta.eta()))
    df = _table(rows + earlier, sp.keys)
    writer.write_table("sweep", df)  # also when every run was finished already (no run wrote it)
    ok = df[df["status"].isin(OK_STATUSES)]
    if plots and len(ok):
        from ..report.sweep_plots import plot_sweep

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
        report_study(shown, sp.root, out)
    return df, sp.root


def _run_all(sp: SweepPlan, scenario_path: str, finished: list, rows: list[dict[str, Any]], earlier: list[dict[str, Any]],
             eta: Eta, writer: RunWriter, say, options: dict[str, Any], advance) -> None:
    """Execute the runs not finished on disk (``options["parallel"]`` at once,
    :mod:`simulator.study.executor`); the whole table is written after every finished run, and the
    runs a Ctrl-C stopped are ``interrupted`` in it."""
    from .executor import execute_runs

    for i, ((cell, r), done) in enumerate(zip(sp.runs, finished)):
        if done is not None:
            say(f"kept: {r.run_dir} already holds this completed run ({cell.name} · {r.label} · seed {r.seed})")
            advance()
    todo = [(i, r) for i, ((_, r), done) in enumerate(zip(sp.runs, finished)) if done is None]
    running: set[int] = set()

    def on_start(i: int, r: PlannedRun) -> None:
        running.add(i)
        say(f"\n=== sweep run {i + 1}/{len(sp.runs)} · {sp.runs[i][0].name} · {r.label} · seed {r.seed} · {eta.line()} ===")

    def on_done(i: int, row: dict[str, Any], seconds: float) -> None:
        running.discard(i)
        rows[i].update(row)
        eta.executed.append(seconds / max(1, options["parallel"]))  # the study's time per run
        if row["status"] == "failed":
            say(f"FAILED: {sp.runs[i][0].name} · {sp.runs[i][1].label} · seed {sp.runs[i][1].seed}: {row['error']}")
        advance()
        writer.write_table("sweep", _table(rows + earlier, sp.keys))  # the whole table, after every run

    try:
        execute_runs(todo, scenario_path, parallel=options["parallel"], verbose=options["verbose"], out=options["out"],
                     log_dir=sp.root / "logs", on_start=on_start, on_done=on_done)
    except KeyboardInterrupt:  # the table on disk says which runs stopped, then the usual message
        for i in running:
            rows[i].update(status="interrupted", error="interrupted (Ctrl-C or SIGTERM)")
        writer.write_table("sweep", _table(rows + earlier, sp.keys))
        raise


def _first_row(cell: Cell, r: PlannedRun, done: dict[str, Any] | None) -> dict[str, Any]:
    """A planned run's row before the loop reaches it: ``kept`` with its summary when it is
    finished on disk, else ``pending`` (what an interrupted sweep's table shows for it)."""
    row: dict[str, Any] = {**cell.values, "cell": cell.name, "label": r.label, "seed": r.seed}
    row.update(done or {}, status="kept" if done is not None else "pending", error="")
    return {**row, "run_dir": str(r.run_dir), "this_call": True}


def _cell_from_folder(folder: str, keys: Sequence[str], config: dict[str, Any] | None) -> Cell | None:
    """The cell a folder of this sweep's grid keys names: its values read from the name (as
    ``--grid`` reads them) or, for a shortened name, from the run's config.yaml; None when the
    folder is not a cell over ``keys``."""
    from .run_dirs import _flat

    candidates = []
    m = re.fullmatch(",".join(re.escape(k) + "=(.*)" for k in keys), folder)
    if m:
        candidates.append({k: parse_value(v) for k, v in zip(keys, m.groups())})
    flat = _flat(config or {})
    if all(k in flat for k in keys):
        candidates.append({k: flat[k] for k in keys})
    for values in candidates:
        if cell_name(values) == folder:
            return Cell(values, folder)
    return None


def study_rows(sp: SweepPlan, scenario_path: str) -> list[dict[str, Any]]:
    """Rows of the runs of earlier calls in the sweep folder (other cells, labels or seeds of
    the same scenario, --set and grid keys). A run of another scenario or grid there is an error
    naming it (exit 2)."""
    from .compare import disk_row, earlier_rows, found_run_dirs, member_problem, not_this_study, seed_of
    from .run_dirs import recorded_state

    found = found_run_dirs(sp.root, [r.run_dir for _, r in sp.runs], 3)
    groups: dict[tuple[str, str], list[Path]] = {}
    cells: dict[str, Cell] = {}
    problems: list[Problem] = []
    for d in found:
        cell = cells.get(d.parent.parent.name) or _cell_from_folder(d.parent.parent.name, sp.keys, recorded_state(d)[0])
        if cell is None:
            problems.append(Problem(str(d), f"is not a cell of a sweep over {', '.join(sp.keys)} (another grid in this folder)"))
            continue
        cells[cell.name] = cell
        groups.setdefault((cell.name, d.parent.name), []).append(d)
    table = earlier_rows(sp.root / "sweep.csv")
    rows = []
    for (name, label), dirs in groups.items():
        try:
            runs, _ = plan(scenario_path, [label], [seed_of(d) for d in dirs], str(sp.root / name), sp.sets, extra_sets=cells[name].sets())
        except UserError as exc:
            problems += [Problem(str(d), f"holds a run that this scenario cannot repeat: {exc.problems[0].field}: {exc.problems[0].message}") for d in dirs]
            continue
        for d, run in zip(dirs, runs):
            problem = member_problem(d, run)
            if problem:
                problems.append(problem)
                continue
            rows.append({**cells[name].values, "cell": name, "label": label, "seed": run.seed, **disk_row(d, table),
                         "run_dir": str(d), "this_call": False})
    if problems:
        raise not_this_study(scenario_path, problems)
    return rows


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
    return df, swept_keys(df)


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The swept keys of a sweep table: its columns before ``cell``."""
    return list(df.columns[: list(df.columns).index("cell")])
