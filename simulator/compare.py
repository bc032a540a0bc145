"""``protofed compare``: strategies x seeds, one run directory each, a comparison table and plots.

Every (label, seed) scenario is validated before the first run starts, so bad input fails fast
and writes nothing. A run that fails is reported in the table and does not stop the others. A
run whose directory already holds a completed ``summary.json`` for the same resolved scenario is
kept and not run again, so an interrupted comparison can be resumed by repeating the command.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

import numpy as np
import pandas as pd
import yaml

from .errors import Problem, UserError
from .results import SUMMARY_KEYS, RunWriter
from .scenario import Scenario, apply_overrides, read_yaml, validate_scenario, with_overrides

TABLE_COLUMNS = ("final_avg_accuracy", "avg_forgetting", "bwt", "local_final_avg_accuracy", "bytes_per_round", "wall_seconds")


@dataclass
class PlannedRun:
    label: str
    seed: int
    scenario: Scenario
    run_dir: Path


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


def plan(
    scenario_path: str,
    labels: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | None,
    sets: Sequence[str] = (),
) -> tuple[list[PlannedRun], Path]:
    from strategies import STRATEGIES

    raw = read_yaml(scenario_path)
    if sets:
        raw = apply_overrides(raw, list(sets))
    base = validate_scenario(raw, scenario_path)  # the scenario itself must be valid
    problems = []
    for label in labels:
        if _resolve_label(raw, label) is None:
            known = sorted(set(STRATEGIES) | set(base.compare))
            broken = STRATEGIES.problems.get(label)  # type: ignore[attr-defined]  # a plugin that failed to load
            problems.append(
                Problem(label, broken.describe() if broken else f"unknown strategy or compare label; allowed: {', '.join(known)}")
            )
    if problems:
        raise UserError("--strategies", problems)
    root = Path(out_dir) if out_dir else Path(base.output.dir) / base.name
    runs = []
    for label in labels:
        for seed in seeds:
            r = dict(raw, seed=seed, strategy=_resolve_label(raw, label))
            if label in base.compare and base.compare[label].overrides:  # e.g. continual mechanisms of this label
                r = with_overrides(r, base.compare[label].overrides)
            runs.append(PlannedRun(label, seed, validate_scenario(r, scenario_path), root / label / f"seed-{seed}"))
    return runs, root


def _finished(run: PlannedRun) -> dict[str, Any] | None:
    """The summary of an earlier completed run of exactly this scenario, if there is one."""
    summ, conf = run.run_dir / "summary.json", run.run_dir / "config.yaml"
    if not (summ.exists() and conf.exists()):
        return None
    try:
        summary = json.loads(summ.read_text())
        config = yaml.safe_load(conf.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not summary.get("completed"):
        return None
    config.pop("versions", None)
    config.pop("derived_seeds", None)
    current = run.scenario.resolved()
    current["resources"]["engine"] = config.get("resources", {}).get("engine", current["resources"]["engine"])
    return summary if config == current else None


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
) -> tuple[pd.DataFrame, Path]:
    from .engine.runner import build_stream_checked, check_writable, run_scenario
    from .plots import plot_compare

    runs, root = plan(scenario_path, labels, seeds, out_dir, sets)
    for r in runs:
        if engine:
            r.scenario.resources.engine = engine  # type: ignore[assignment]
    build_stream_checked(runs[0].scenario, scenario_path)  # data problems before anything is written
    check_writable(root)
    rows = []
    started = time.time()
    for i, r in enumerate(runs, 1):
        say = (lambda text: print(text, file=out, flush=True)) if out else (lambda text: None)
        say(f"\n=== run {i}/{len(runs)}: {r.label} · seed {r.seed} ({len(runs) - i} left after this) ===")
        row: dict[str, Any] = {"label": r.label, "seed": r.seed}
        done = _finished(r)
        if done is not None:
            say(f"kept: {r.run_dir} already holds this completed run")
            row.update(done, status="kept", error="")
        else:
            try:
                outcome = run_scenario(r.scenario, source=scenario_path, run_dir=r.run_dir, verbose=verbose, out=out)
                row.update(outcome.summary, status="ok", error="")
            except KeyboardInterrupt:
                raise
            except UserError as exc:
                row.update(status="failed", error=exc.render().replace("\n", " "))
            except Exception as exc:  # one failed run must not stop the comparison
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:500])
            if row["status"] == "failed":
                say(f"FAILED: {row['error']}")
        row["run_dir"] = str(r.run_dir)
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in SUMMARY_KEYS:
        if key not in df.columns:
            df[key] = np.nan
    front = ["label", "seed", "status", *[k for k in SUMMARY_KEYS if k not in ("seed",)]]
    df = df[front + [c for c in df.columns if c not in front]]
    RunWriter(root).write_table("comparison", df.drop(columns=["task_classes"], errors="ignore"))
    ok = df[df["status"] != "failed"]
    if len(ok):
        plot_compare(df, [Path(p) for p in ok["run_dir"]], list(ok["label"]), root)
    if out:
        print(file=out)
        print(format_table(df), file=out)
        print(f"\n{len(ok)}/{len(df)} runs ok in {time.time() - started:.0f}s · results in {root}", file=out)
    return df, root


def mean_std(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if len(v) == 0:
        return "n/a"
    if len(v) == 1:
        return f"{v.iloc[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def format_table(df: pd.DataFrame) -> str:
    """Mean ± std over seeds per label (failed runs counted apart)."""
    header = ["strategy", "runs", *TABLE_COLUMNS]
    lines = []
    for label, group in df.groupby("label", sort=False):
        ok = group[group["status"] != "failed"]
        cells = [str(label), f"{len(ok)}/{len(group)}"]
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
                cells.append(mean_std(ok[col]))
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


def average_accuracy_curve(matrix: np.ndarray) -> np.ndarray:
    """A_k for each task k (NaN for tasks that were not reached)."""
    return np.array([np.nanmean(matrix[k, : k + 1]) if np.isfinite(matrix[k, : k + 1]).any() else math.nan for k in range(len(matrix))])
