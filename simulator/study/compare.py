"""``protofed compare``: strategies x seeds, one run directory each, a comparison table and plots.

Every (label, seed) scenario is validated before the first run starts, so bad input fails fast
and writes nothing. A run that fails (after its own retries) is reported in the table and does
not stop the others; the study ends with the list of failed runs (exit 1). A run whose
directory already holds a completed ``summary.json`` for the same resolved scenario is kept and
not run again, so an interrupted comparison can be resumed by repeating the command.

The table of a study folder covers every run in it: runs of earlier calls in the same folder
(other labels or seeds of the same scenario with the same ``--set``) are rows too (``this_call``
false; ``kept`` when completed, ``incomplete`` or ``failed`` when not, without figures). A run of
another scenario in the folder is an error naming it (exit 2): a table never mixes studies, and
never drops a completed result silently.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import pandas as pd

from ..errors import Problem, UserError
from ..results import SUMMARY_KEYS, RunWriter
from ..scenario import Scenario, apply_overrides, blame_overrides, did_you_mean, read_yaml, validate_scenario

TABLE_COLUMNS = ("final_avg_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt", "local_final_avg_accuracy",
                 "open_world_auroc", "bytes_per_round", "wall_seconds")  # open_world_fpr95: in comparison.csv


#: statuses of a row whose figures count: run by this call, or a completed run kept from disk
OK_STATUSES = ("ok", "kept")
#: what an unfinished run's row keeps of its summary (its partial figures are left out, so that
#: no table or plot averages them in)
_IDENTITY_KEYS = ("scenario", "strategy", "seed", "engine", "num_tasks", "num_clients", "completed")


@dataclass
class PlannedRun:
    label: str
    seed: int
    scenario: Scenario
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # what the study's --set changed (config.yaml)


def _resolve_label(raw: dict[str, Any], label: str) -> dict[str, Any] | None:
    """The ``strategy`` mapping for a label: a ``compare:`` entry, or a plain strategy name (its
    defaults, or ``strategy.params`` when it is the scenario's own strategy)."""
    from strategies import STRATEGIES

    entries = raw.get("compare") if isinstance(raw.get("compare"), dict) else {}
    if label in entries and isinstance(entries[label], dict):
        return {"name": entries[label].get("name"), "params": entries[label].get("params", {}) or {}}
    if label in STRATEGIES:
        own = raw.get("strategy") if isinstance(raw.get("strategy"), dict) else {}
        params = own.get("params", {}) if own.get("name", "proto_avg") == label else {}
        return {"name": label, "params": params}
    return None


def _label_overrides(raw: dict[str, Any], label: str) -> dict[str, Any]:
    """``raw`` with the scenario keys of a ``compare:`` label's ``set:`` applied. Its ``compare:``
    section then keeps that label alone: the other labels were validated on the file's own
    scenario, and on this one they would inherit the label's keys (``model.aper`` from the aper
    label makes the prototype-only labels invalid). ``compare`` is result-neutral: a recorded
    run is still recognised as the same."""
    from ..scenario import set_dotted

    entries = raw.get("compare") if isinstance(raw.get("compare"), dict) else {}
    entry = entries.get(label) if isinstance(entries.get(label), dict) else {}
    sets = entry.get("set") if isinstance(entry.get("set"), dict) else {}
    if sets:
        raw = dict(raw, compare={label: entry})
    for key, value in sets.items():
        raw = set_dotted(raw, str(key), value)
    return raw


def study_base(scenario_path: str, sets: Sequence[str]) -> tuple[dict, Scenario, dict, str]:
    """The study's scenario: the file with the study's ``--set`` applied (raw and validated; a bad
    ``--set`` is named as such), what those change and their hash (the folder's tag)."""
    file_raw = read_yaml(scenario_path)
    raw = apply_overrides(file_raw, list(sets)) if sets else file_raw
    try:
        base = validate_scenario(raw, scenario_path)  # the scenario itself must be valid
    except UserError as exc:
        raise blame_overrides(exc, str(scenario_path), list(sets)) from None
    changed, tag = study_overrides(file_raw, base, scenario_path, sets)
    return raw, base, changed, tag


def plan(
    scenario_path: str,
    labels: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | None,
    sets: Sequence[str] = (),
    extra_sets: Sequence[str] = (),
) -> tuple[list[PlannedRun], Path]:
    """Every (label, seed) run, validated. ``sets``: the study's ``--set`` (recorded in each
    run's config.yaml, hashed into the default folder); ``extra_sets``: applied after them but
    not counted as overrides (a sweep cell, named by its own folder)."""
    from strategies import STRATEGIES

    from .run_dirs import scenario_folder

    raw, base, changed, tag = study_base(scenario_path, sets)
    if extra_sets:
        raw = apply_overrides(raw, list(extra_sets))
        base = validate_scenario(raw, scenario_path)
    problems = []
    for label in labels:
        if _resolve_label(raw, label) is None:
            known = sorted(set(STRATEGIES) | set(base.compare))
            broken = STRATEGIES.problems.get(label)  # type: ignore[attr-defined]  # a plugin that failed to load
            problems.append(
                Problem(label, broken.describe() if broken else
                        f"unknown strategy or compare label{did_you_mean(label, known)}; allowed: {', '.join(known)}")
            )
    if problems:
        raise UserError("--strategies", problems)
    root = Path(out_dir) if out_dir else Path(base.output.dir) / scenario_folder(base.name, tag)
    runs = []
    for label in labels:
        for seed in seeds:
            r = _label_overrides(dict(raw, seed=seed, strategy=_resolve_label(raw, label)), label)
            runs.append(PlannedRun(label, seed, validate_scenario(r, scenario_path), root / label / f"seed-{seed}", changed))
    return runs, root


def study_overrides(file_raw: dict[str, Any], base: Scenario, source: str, sets: Sequence[str]) -> tuple[dict[str, Any], str]:
    """What ``sets`` changed in the scenario file (dotted key -> value) and its hash, by the
    rules of ``protofed run --set``: a study with other settings lands in its own folder."""
    from .run_dirs import overrides_of, overrides_tag

    if not sets:
        return {}, ""
    try:
        unset = validate_scenario(file_raw, source).resolved()
    except UserError:  # the file alone is incomplete; --set completes it
        unset = None
    changed = overrides_of(unset, base.resolved())
    return changed, overrides_tag(changed)


def _finished(run: PlannedRun) -> dict[str, Any] | None:
    """The summary of an earlier completed run of exactly this scenario, if there is one."""
    from .run_dirs import differences, recorded_state

    config, summary = recorded_state(run.run_dir)
    if not config or not summary or not summary.get("completed"):
        return None
    return summary if not differences(config, run.scenario.resolved()) else None


def _conflicts(runs: list[PlannedRun]) -> list[Problem]:
    """Run directories that hold a run of another scenario (never replaced without --overwrite)."""
    return [p for r in runs if (p := member_problem(r.run_dir, r))]


def execute(run: PlannedRun, scenario_path: str, *, verbose: bool, out: TextIO | None, say) -> dict[str, Any]:
    """Run one planned run (resuming it when its directory holds an interrupted run of the same
    scenario); its table fields: the summary, ``status`` (ok | failed) and ``error``. A failed
    run never stops the others. Conflicting directories must have been refused before."""
    from ..engine.checkpoint import has_checkpoint
    from ..engine.runner import run_scenario

    try:
        resume = has_checkpoint(run.run_dir) and _same_scenario(run)
        if resume:
            say(f"resuming the interrupted run in {run.run_dir}")
        outcome = run_scenario(
            run.scenario, source=scenario_path, run_dir=run.run_dir, verbose=verbose, out=out,
            resume=resume, overwrite=True, overrides=run.overrides,
        )
        return {**outcome.summary, "status": "ok", "error": ""}
    except KeyboardInterrupt:
        raise
    except UserError as exc:
        return {"status": "failed", "error": exc.render().replace("\n", " ")}
    except (Exception, SystemExit) as exc:  # one failed run must not stop the others (a library's sys.exit included)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}


# --------------------------------------------------------------------------- the study folder
def found_run_dirs(root: Path, planned: Sequence[Path], depth: int) -> list[Path]:
    """Run directories ``root/<depth - 1 folders>/seed-<s>/`` (with a config.yaml) that are not
    among ``planned``: runs of earlier calls that the study's table must cover."""
    mine = {Path(p).resolve() for p in planned}
    pattern = "/".join(["*"] * (depth - 1) + ["seed-*", "config.yaml"])
    found = {p.parent for p in Path(root).glob(pattern) if re.fullmatch(r"seed-\d+", p.parent.name)}
    return sorted(d for d in found if d.resolve() not in mine)


def seed_of(run_dir: Path) -> int:
    return int(run_dir.name.removeprefix("seed-"))


def member_problem(run_dir: Path, run: PlannedRun) -> Problem | None:
    """Why the run in ``run_dir`` is not the run this study would make there (None if it is)."""
    from .run_dirs import describe, differences, recorded_state

    config, _ = recorded_state(run_dir)
    if config is None:  # nothing recorded there: nothing to conflict with
        return None
    diff = differences(config, run.scenario.resolved())
    return Problem(str(run_dir), f"holds a run of a different scenario ({describe(diff, 3)})") if diff else None


def not_this_study(source: str, problems: list[Problem]) -> UserError:
    return UserError(source, [*problems, Problem(
        "--out", "a study folder holds the runs of one scenario (same file, same --set): move those runs away, or choose another --out")])


def _study_members(root: Path, runs: list[PlannedRun], scenario_path: str, sets: Sequence[str]) -> list[PlannedRun]:
    """The runs of earlier calls in ``root`` (same scenario, same --set, any label or seed):
    the table covers them. A run of another scenario there is an error naming it."""
    members, problems = [], []
    for d in found_run_dirs(root, [r.run_dir for r in runs], 2):
        try:
            (run,), _ = plan(scenario_path, [d.parent.name], [seed_of(d)], str(root), sets)
        except UserError as exc:
            problems.append(Problem(str(d), f"holds a run labelled {d.parent.name!r} that this scenario cannot repeat: {exc.problems[0].message}"))
            continue
        problem = member_problem(d, run)
        if problem:
            problems.append(problem)
        else:
            members.append(run)
    if problems:
        raise not_this_study(scenario_path, problems)
    return members


def earlier_rows(table: Path) -> dict[str, dict[str, Any]]:
    """The rows of a study's earlier table, by run directory (empty when there is none)."""
    try:
        df = pd.read_csv(table)
    except (OSError, ValueError):
        return {}
    if "run_dir" not in df.columns:
        return {}
    return {str(r["run_dir"]): r for r in df.to_dict("records")}


def disk_row(run_dir: Path, earlier: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The table fields of a run this call did not run: its summary when it completed (status
    ``kept``); otherwise ``failed`` (with the reason an earlier table gave) or ``incomplete``,
    without figures."""
    from .run_dirs import recorded_state

    _, summary = recorded_state(run_dir)
    summary = summary or {}
    if summary.get("completed"):
        return {**summary, "status": "kept", "error": ""}
    row = {k: summary[k] for k in _IDENTITY_KEYS if k in summary}
    before = earlier.get(str(run_dir), {})
    if before.get("status") == "failed" and isinstance(before.get("error"), str):
        return {**row, "status": "failed", "error": before["error"]}
    return {**row, "status": "incomplete", "error": f"unfinished; continue it with `protofed run --resume {run_dir}` or repeat the study with its label"}


def this_call_failed(df: pd.DataFrame) -> bool:
    """Whether a run of this call failed (the study's exit code 1)."""
    return bool(((df["status"] == "failed") & df["this_call"].astype(bool)).any())


def report_study(df: pd.DataFrame, root: Path, out: TextIO | None) -> None:
    """After the table: which rows came from earlier calls, which runs are not in the figures,
    and the list of this call's failed runs (run directory and a one-line reason)."""
    if out is None:
        return
    earlier = df[~df["this_call"].astype(bool)]
    if len(earlier):
        labels = ", ".join(str(x) for x in dict.fromkeys(earlier["label"]))
        print(f"\nthe table also covers {_count(len(earlier), 'run')} found in {root} from earlier calls ({labels}); "
              "column this_call tells them apart", file=out)
    unfinished = earlier[~earlier["status"].isin(OK_STATUSES)]
    if len(unfinished):
        print(f"not in the figures: {_count(len(unfinished), 'earlier run')} that did not finish:", file=out)
        for _, r in unfinished.iterrows():
            print(f"  {r['run_dir']}: {r['status']}: {_one_line(r['error'])}", file=out)
    failed = df[(df["status"] == "failed") & df["this_call"].astype(bool)]
    if len(failed):
        print(f"\nfailed runs ({len(failed)} of {int(df['this_call'].astype(bool).sum())}; the study went on with the others):", file=out)
        for _, r in failed.iterrows():
            print(f"  {r['run_dir']}: {_one_line(r['error'])}", file=out)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _one_line(text: Any) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= 300 else line[:297] + "..."


def _same_scenario(run: PlannedRun) -> bool:
    from .run_dirs import differences, recorded_state

    config, _ = recorded_state(run.run_dir)
    return bool(config) and not differences(config, run.scenario.resolved())


def run_compare(
    scenario_path: str,
    labels: Sequence[str],
    seeds: Sequence[int],
    *,
    out_dir: str | None = None,
    engine: str | None = None,
    sets: Sequence[str] = (),
    verbose: bool = False,
    out: TextIO | None = sys.stdout,
    overwrite: bool = False,
    parallel: int = 1,
) -> tuple[pd.DataFrame, Path]:
    """``parallel``: runs executed at once (:mod:`simulator.study.executor`); the numbers are those
    of a serial study."""
    from ..engine.runner import build_stream_checked, check_strategy_setup, check_writable
    from ..report.plots import plot_compare

    runs, root = plan(scenario_path, labels, seeds, out_dir, sets)
    for r in runs:
        if engine:
            r.scenario.resources.engine = engine  # type: ignore[assignment]
    stream = build_stream_checked(runs[0].scenario, scenario_path)  # data problems before anything is written
    for r in runs:  # e.g. fedsa text anchors without class names or the text extra
        same = r.scenario.dataset == runs[0].scenario.dataset
        check_strategy_setup(r.scenario, stream if same else build_stream_checked(r.scenario, scenario_path), scenario_path)
    check_writable(root)
    conflicts = [] if overwrite else _conflicts(runs)
    if conflicts:
        conflicts.append(Problem("--overwrite", "give it to replace those runs, or choose another --out"))
        raise UserError(scenario_path, conflicts)
    members = _study_members(root, runs, scenario_path, sets)  # earlier runs of this study: in the table too
    earlier = earlier_rows(root / "comparison.csv")
    started = time.time()
    rows = _execute_study(runs, scenario_path, parallel=parallel, verbose=verbose, out=out, root=root)
    for m in members:
        rows.append({"label": m.label, "seed": m.seed, **disk_row(m.run_dir, earlier), "run_dir": str(m.run_dir), "this_call": False})
    df = pd.DataFrame(rows)
    for key in SUMMARY_KEYS:
        if key not in df.columns:
            df[key] = np.nan
    front = ["label", "seed", "status", *[k for k in SUMMARY_KEYS if k not in ("seed",)]]
    df = df[front + [c for c in df.columns if c not in front]]
    RunWriter(root).write_table("comparison", df.drop(columns=["task_classes", "epsilon_spent"], errors="ignore"))  # nested values: the flat keys stay
    ok = df[df["status"].isin(OK_STATUSES)]
    if len(ok):
        plot_compare(ok, [Path(p) for p in ok["run_dir"]], list(ok["label"]), root)
    if out:
        protocol = runs[0].scenario.evaluation.protocol
        other = "global" if protocol == "local" else "local"
        print(f"\nevaluation protocol: {protocol} (columns prefixed {other}_: the {other} protocol) · "
              f"mean ± std over seeds, n = runs behind each figure", file=out)
        print(format_table(df), file=out)
        print(f"\n{len(ok)}/{len(df)} runs ok in {time.time() - started:.0f}s · results in {root}", file=out)
        report_study(df, root, out)
    return df, root


def _execute_study(runs: list[PlannedRun], scenario_path: str, *, parallel: int, verbose: bool, out: TextIO | None,
                   root: Path) -> list[dict[str, Any]]:
    """This call's rows, in the order of ``runs``: completed runs on disk kept, the others
    executed (``parallel`` at once), each announced with the elapsed time and an ETA."""
    from .executor import execute_runs

    say = (lambda text: print(text, file=out, flush=True)) if out else (lambda text: None)
    rows: list[dict[str, Any]] = [{"label": r.label, "seed": r.seed} for r in runs]
    started, executed, todo = time.time(), [], []  # executed: wall seconds of the runs executed so far
    for i, r in enumerate(runs):
        done = _finished(r)
        if done is not None:
            say(f"kept: {r.run_dir} already holds this completed run ({r.label} · seed {r.seed})")
            rows[i].update(done, status="kept", error="")
        else:
            todo.append((i, r))

    begun: list[int] = []

    def on_start(i: int, r: PlannedRun) -> None:
        begun.append(i)
        left = len(todo) - len(executed)  # this run and those not finished yet
        eta = f" · ETA {_duration(sum(executed) / len(executed) * left / max(1, parallel))}" if executed else ""
        say(f"\n=== run {i + 1}/{len(runs)}: {r.label} · seed {r.seed} ({len(todo) - len(begun)} left after this) · "
            f"elapsed {_duration(time.time() - started)}{eta} ===")

    def on_done(i: int, row: dict[str, Any], seconds: float) -> None:
        rows[i].update(row)
        executed.append(seconds)
        if row["status"] == "failed":
            say(f"FAILED: {runs[i].label} · seed {runs[i].seed}: {row['error']}")
        elif parallel > 1:
            say(f"finished: {runs[i].label} · seed {runs[i].seed} in {_duration(seconds)} ({len(executed)}/{len(todo)})")

    execute_runs(todo, scenario_path, parallel=parallel, verbose=verbose, out=out, log_dir=root / "logs",
                 on_start=on_start, on_done=on_done)
    return [{**row, "run_dir": str(r.run_dir), "this_call": True} for row, r in zip(rows, runs)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def mean_std(values: pd.Series, expected: int | None = None) -> str:
    """``mean ± std (n=k)`` over the runs that have a value: a run whose metric is NaN (e.g. a
    local-protocol task no evaluated client held) is not averaged in silently, the ``n`` says
    how many runs the figure rests on."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    if len(v) == 0:
        return "n/a"
    n = f" (n={len(v)})" if expected is None or len(v) != expected or expected > 1 else ""
    if len(v) == 1:
        return f"{v.iloc[0]:.3f}{n}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}{n}"


def shown_labels(df: pd.DataFrame) -> dict[str, str]:
    """Each label of a study table as figures and tables show it: with the parameters its runs
    set away from the strategy's defaults (``proto_avg (share_weights)``), from ``strategy_params``."""
    from strategies import shown_label

    out: dict[str, str] = {}
    for label, group in df.groupby("label", sort=False):
        params = group["strategy_params"].dropna().astype(str) if "strategy_params" in group.columns else pd.Series([], dtype=str)
        params = params[params.str.strip() != ""]
        out[str(label)] = shown_label(str(label), params.iloc[0] if len(params) else None)
    return out


def _flags(ok: pd.DataFrame) -> str:
    """What a reader must know about a label's runs before trusting its row."""
    notes = []
    for col, what in (("clients_failed_unexpected", "unexpected client failures"), ("missing_cells", "missing matrix cells")):
        if col in ok.columns:
            bad = int((pd.to_numeric(ok[col], errors="coerce").fillna(0) > 0).sum())
            if bad:
                notes.append(f"{bad} run{'s' if bad > 1 else ''} with {what}")
    return "; ".join(notes) or "-"


def format_table(df: pd.DataFrame) -> str:
    """Mean ± std over seeds per label, with the number of runs behind each figure (failed,
    incomplete and pending runs counted apart), and a note on runs with unexpected client
    failures or missing cells."""
    header = ["strategy", "runs", *TABLE_COLUMNS, "notes"]
    lines = []
    shown = shown_labels(df)
    for label, group in df.groupby("label", sort=False):
        ok = group[group["status"].isin(OK_STATUSES)]
        cells = [shown[str(label)], f"{len(ok)}/{len(group)}"]
        for col in TABLE_COLUMNS:
            if col not in ok.columns:
                cells.append("n/a")
            elif col == "bytes_per_round":
                v = pd.to_numeric(ok[col], errors="coerce").dropna()
                cells.append(f"{v.mean():,.0f}" if len(v) else "n/a")
            elif col == "wall_seconds":
                v = pd.to_numeric(ok[col], errors="coerce").dropna()
                cells.append(f"{v.mean():.1f}" if len(v) else "n/a")
            else:
                cells.append(mean_std(ok[col], expected=len(ok)))
        cells.append(_flags(ok))
        lines.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in lines]
    return "\n".join(out)


def seeds_arg(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError.single("--seeds", "--seeds", f"expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError.single("--seeds", "--seeds", "give at least one non-negative seed, e.g. 0,1,2")
    return seeds


def labels_arg(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if not labels:
        raise UserError.single("--strategies", "--strategies", "give at least one strategy or label, e.g. proto_avg,fedavg")
    if len(set(labels)) != len(labels):
        raise UserError.single("--strategies", "--strategies", "a label is listed twice")
    return labels
