"""Plots of a run that explain themselves: forgetting curves and the accuracy-matrix heatmap.

Uses matplotlib's Agg backend (no display needed); every figure is rendered to memory and
written atomically (temporary file in the target folder + ``os.replace``), then closed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml
from matplotlib.ticker import MaxNLocator

from simulator.metrics import (
    STANDARD,
    average_accuracy_curve,
    matrix_from_long,
    missing_cells,
    select_protocol,
    summarize_partial,
)
from simulator.results import read_matrix

from . import figure_style
from .figure_style import (
    MAX_ANNOTATED_TASKS,
    MAX_LEGEND_ENTRIES,
    MAX_LISTED_CLASSES,
    _colors,
    _index_colorbar,
    _save,
    _thinned,
    plt,
    with_formats,
)

__all__ = ["plot_forgetting", "plot_accuracy_matrix", "plot_run"]

FORGETTING_SIZE = (9.0, 5.0)
MATRIX_SIZE = (6.0, 5.0)
_MISSING_COLOR = "#e6e6e6"



def _task_label(j: int, task_labels: Mapping[int, Any] | None) -> str:
    if not task_labels:
        return f"task {j}"
    lab = task_labels.get(j, task_labels.get(str(j)))  # type: ignore[arg-type]
    if lab is None:
        return f"task {j}"
    if isinstance(lab, (list, tuple, np.ndarray)):
        lab = list(lab)
        if len(lab) > MAX_LISTED_CLASSES:
            lab = f"{len(lab)} classes"
        else:
            lab = ("class " if len(lab) == 1 else "classes ") + ", ".join(str(c) for c in lab)
    return f"task {j} ({lab})"


def _with_global_round(df: pd.DataFrame) -> pd.DataFrame:
    """Add column ``_x``: the global round (from ``global_round``, else from ``task`` and ``round``)."""
    df = df.copy()
    if "global_round" in df.columns and df["global_round"].notna().any():
        df["_x"] = pd.to_numeric(df["global_round"], errors="coerce")
        return df[df["_x"].notna()]
    df = df[df["task"].notna() & df["round"].notna()]
    pairs = df[["task", "round"]].drop_duplicates().sort_values(["task", "round"]).reset_index(drop=True)
    order = {(t, r): i + 1 for i, (t, r) in enumerate(zip(pairs["task"], pairs["round"]))}
    df["_x"] = [order[(t, r)] for t, r in zip(df["task"], df["round"])]
    return df


def plot_forgetting(
    metrics: pd.DataFrame,
    path: Path,
    title: str = "",
    task_labels: Mapping[int, str | Sequence[int]] | None = None,
    protocol: str | None = None,
) -> None:
    """Accuracy on each task's test set over training, one line per evaluated task.

    x is the global round (column ``global_round`` if present, else built from ``task`` and
    ``round``); dashed lines mark task boundaries, labelled "task k" on top; a thick black line
    shows the average over the tasks evaluated at that round. ``task_labels`` maps task ids to a
    description (a string, or the list of its classes). ``protocol`` selects one evaluation
    protocol when ``metrics`` has a ``protocol`` column (see :func:`metrics.select_protocol`).
    """
    missing = [c for c in ("task", "round", "eval_task", "accuracy") if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}")
    df = _with_global_round(select_protocol(metrics, protocol))
    ev = df[df["eval_task"].notna() & df["accuracy"].notna()].copy()
    ev["eval_task"] = ev["eval_task"].astype(int)

    fig, ax = plt.subplots(figsize=FORGETTING_SIZE, layout="constrained")
    ax.set_ylim(-0.02, 1.02)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("accuracy on the task's test set")
    ax.set_xlabel("round (tasks trained in order)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    if ev.empty:
        ax.text(0.5, 0.5, "no evaluation rows in the metrics", ha="center", va="center", transform=ax.transAxes)
    else:
        _task_axis(ax, df)
        curves = ev.groupby(["eval_task", "_x"])["accuracy"].mean()
        tasks = sorted(ev["eval_task"].unique())
        n_points = curves.groupby(level=0).size().max()
        marker = "o" if n_points <= 40 and len(tasks) <= MAX_LEGEND_ENTRIES else None
        many = len(tasks) > MAX_LEGEND_ENTRIES
        colors = _index_colorbar(fig, ax, len(tasks), "accuracy on task (colour)") if many else _colors(len(tasks))
        for color, j in zip(colors, tasks):
            c = curves.loc[j]
            ax.plot(c.index, c.to_numpy(), color=color, marker=marker, markersize=4, linewidth=1.2 if many else 1.6,
                    label=_task_label(int(j), task_labels), zorder=3)
        avg = curves.groupby(level=1).mean()
        line = ax.plot(avg.index, avg.to_numpy(), color="black", linewidth=3.0, marker=marker, markersize=5,
                       label="average over seen tasks", zorder=2, alpha=0.85)
        if many:
            ax.legend(handles=line, loc="upper right", fontsize=8, framealpha=0.8)
        else:
            fig.legend(loc="outside right upper", title="accuracy on", fontsize=8, title_fontsize=9, frameon=False)
    if title:
        ax.set_title(title)
    _save(fig, path)


def _task_axis(ax: plt.Axes, df: pd.DataFrame) -> None:
    """Dashed task boundaries and, on a top axis, which task each span of rounds trained
    ("task k" up to a dozen tasks, else every k-th task number)."""
    spans = df.groupby("task")["_x"].agg(["min", "max"]).sort_index()
    lo, hi = spans["min"].to_numpy(float), spans["max"].to_numpy(float)
    many = len(spans) > MAX_LEGEND_ENTRIES
    for k in range(1, len(spans)):
        ax.axvline((hi[k - 1] + lo[k]) / 2, color="0.45", linestyle="--", linewidth=0.6 if many else 1, zorder=1)
    top = ax.secondary_xaxis("top")
    names = [str(int(k)) if many else f"task {int(k)}" for k in spans.index]
    shown = _thinned(names)
    top.set_xticks(((lo + hi) / 2)[shown], names[shown])
    top.tick_params(length=0, labelsize=9 if len(spans) <= 8 else 8)
    if many:
        top.set_xlabel("task trained", fontsize=9)
    pad = 0.5 if (hi - lo).max() == 0 else 0.6
    ax.set_xlim(lo.min() - pad, hi.max() + pad)


def plot_accuracy_matrix(matrix: np.ndarray, path: Path, title: str = "", definitions: str = STANDARD) -> None:
    """Annotated heatmap of ``a[k][j]``: rows = after training task k, columns = evaluated task j.

    Cells above the diagonal are masked (light grey); a subtitle gives the final average
    accuracy and the average forgetting (see :mod:`simulator.metrics`).
    """
    a = np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {a.shape}")
    t = a.shape[0]
    if np.isnan(a[t - 1]).all():  # an unfinished run
        subtitle = "incomplete matrix: metrics not defined"
    else:
        s = summarize_partial(a, definitions)
        forg = "n/a (one task)" if math.isnan(s["avg_forgetting"]) else f"{s['avg_forgetting']:.2f}"
        subtitle = f"final average accuracy {s['final_avg_accuracy']:.2f} · average forgetting {forg}"
        gaps = len(missing_cells(a, definitions))
        if gaps:
            subtitle += f" · {gaps} missing cell{'s' if gaps > 1 else ''} (grey) left out"

    scale = min(max(1.0, t / 8), MAX_ANNOTATED_TASKS / 8)
    fig, ax = plt.subplots(figsize=(MATRIX_SIZE[0] * scale, MATRIX_SIZE[1] * scale), layout="constrained")
    upper = np.triu(np.ones_like(a, dtype=bool), k=1)
    shown = np.ma.masked_array(np.clip(np.nan_to_num(a, nan=0.0), 0, 1), mask=upper | np.isnan(a))
    cmap = plt.get_cmap("viridis").with_extremes(bad=_MISSING_COLOR)
    im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, aspect="equal")
    fontsize = max(7.0, min(10.0, 100.0 / t))
    for k in range(t if t <= MAX_ANNOTATED_TASKS else 0):  # beyond that, the colour alone
        for j in range(k + 1):
            v = a[k, j]
            if np.isnan(v):
                ax.text(j, k, "n/a", ha="center", va="center", fontsize=fontsize, color="0.3")
            else:
                ax.text(j, k, f"{v:.2f}", ha="center", va="center", fontsize=fontsize,
                        color="white" if v < 0.6 else "black")
    ticks = np.arange(t)
    step = 1 if t <= 20 else int(math.ceil(t / 20))
    ax.set_xticks(ticks[::step], [str(j) for j in ticks[::step]])
    ax.set_yticks(ticks[::step], [str(k) for k in ticks[::step]])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task k")
    ax.set_xticks(np.arange(-0.5, t, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, t, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1 if t <= MAX_ANNOTATED_TASKS else 0.3)
    ax.tick_params(which="minor", length=0)
    cbar = fig.colorbar(im, ax=ax, label="accuracy", shrink=0.9)
    cbar.set_ticks(np.linspace(0, 1, 6))
    if title:
        fig.suptitle(title)
    ax.set_title(subtitle, fontsize=9)
    _save(fig, path)


def _read_optional_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _run_title(run_dir: Path, summary: dict, config: dict) -> str:
    scenario = summary.get("scenario", config.get("name"))
    strategy = summary.get("strategy")
    if strategy is None and isinstance(config.get("strategy"), dict):
        strategy = config["strategy"].get("name")
    seed = summary.get("seed", config.get("seed"))
    if scenario is None and strategy is None:
        return run_dir.name
    # inside a compare or sweep folder (<label>/seed-<s>/) the label names the variant
    # (proto_avg_shared), which the strategy name alone does not
    label = run_dir.parent.name if run_dir.name.startswith("seed-") else None
    shown = str(strategy if strategy is not None else "?")
    if label and strategy is not None and label != strategy:
        shown = f"{label}: {strategy}"
    from strategies import shown_label

    shown = shown_label(shown, _strategy_params(summary, config))
    parts = [str(scenario if scenario is not None else "?"), shown]
    if seed is not None:
        parts.append(f"seed {seed}")
    evaluation = config.get("evaluation") if isinstance(config.get("evaluation"), dict) else {}
    protocol = summary.get("protocol") or evaluation.get("protocol")
    if protocol:
        parts.append(f"{protocol} protocol")
    return " · ".join(parts)


def _strategy_params(summary: dict, config: dict) -> str:
    """The run's non-default strategy parameters (summary.json; older runs: from config.yaml)."""
    if isinstance(summary.get("strategy_params"), str):
        return summary["strategy_params"]
    strategy = config.get("strategy") if isinstance(config.get("strategy"), dict) else {}
    from strategies import nondefault_params

    return nondefault_params(str(strategy.get("name")), strategy.get("params") or {})


def _task_labels(summary: dict, config: dict) -> dict[int, Any] | None:
    """Optional ``task_classes`` (mapping or list: task id -> its classes) from summary or config."""
    raw = summary.get("task_classes", config.get("task_classes"))
    if isinstance(raw, list):
        return dict(enumerate(raw))
    if isinstance(raw, dict):
        try:
            return {int(k): v for k, v in raw.items()}
        except (TypeError, ValueError):
            return None
    return None


def plot_run(run_dir: Path, formats: Sequence[str] | None = None) -> list[Path]:
    """Draw ``plots/forgetting.png`` and ``plots/accuracy_matrix.png`` of a run directory.

    Reads ``metrics.csv`` (required), ``accuracy_matrix.csv`` (rebuilt from the metrics when
    absent) and, for the title and task labels, ``summary.json`` / ``config.yaml`` if present.
    Returns the PNG paths; ``formats`` (default: the run's ``output.plot_formats``) adds PDF/SVG
    files of the same names.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(2, f"run directory {run_dir} has no metrics.csv", str(metrics_path))
    metrics = pd.read_csv(metrics_path)
    summary = _read_optional_json(run_dir / "summary.json")
    config = _read_optional_yaml(run_dir / "config.yaml")
    matrix_path = run_dir / "accuracy_matrix.csv"
    if matrix_path.is_file():
        matrix = read_matrix(matrix_path)
    else:
        num_tasks = summary.get("num_tasks") or int(pd.to_numeric(metrics["task"]).max()) + 1
        matrix = matrix_from_long(metrics, int(num_tasks))
    title = _run_title(run_dir, summary, config)
    labels = _task_labels(summary, config)
    out = run_dir / "plots"
    paths = [out / "forgetting.png", out / "accuracy_matrix.png"]
    if formats is None and figure_style._FORMATS == ("png",):  # no caller's choice (protofed plot --format): the run's own
        formats = _run_formats(run_dir)
    with with_formats(formats):
        plot_forgetting(metrics, paths[0], title=title, task_labels=labels)
        plot_accuracy_matrix(matrix, paths[1], title=title, definitions=summary.get("metric_definitions", STANDARD))
        clients_path = run_dir / "client_metrics.csv"
        if clients_path.is_file():
            paths.append(out / "clients.png")
            plot_clients(pd.read_csv(clients_path), paths[-1], title=title, task_labels=labels)
        if (run_dir / "final" / "global.npz").is_file() and (run_dir / "final" / "client_prototypes.npz").is_file():
            from .prototype_plots import plot_prototypes

            paths.append(out / "prototypes.png")
            plot_prototypes(run_dir, paths[-1], title=title)
    return paths


def plot_clients(client_metrics: pd.DataFrame, path: Path, title: str = "", task_labels: Mapping[int, Any] | None = None) -> None:
    """Spread across clients of the final accuracy on each task: one box per task (median,
    quartiles, whiskers) with every client's value as a dot, from the last evaluation."""
    df = client_metrics.copy()
    last = df[df["global_round"] == df["global_round"].max()]
    tasks = sorted(int(t) for t in last["eval_task"].dropna().unique())
    data = [pd.to_numeric(last[last["eval_task"] == t]["accuracy"], errors="coerce").dropna().to_numpy() for t in tasks]
    many = len(tasks) > MAX_LEGEND_ENTRIES
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, (0.4 if many else 1.0) * len(tasks) + 3)), 4.6),
                           layout="constrained")
    ax.boxplot(data, positions=range(len(tasks)), widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0)
    for i, values in enumerate(data):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=14 if len(values) <= 100 else 4, alpha=0.6,
                   color="tab:blue", zorder=3)
    if many:  # task numbers, every k-th: the class lists would overrun each other
        shown = _thinned(tasks, 25)
        ax.set_xticks(range(len(tasks))[shown], [str(t) for t in tasks][shown])
        ax.set_xlabel("task")
    else:
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels([_task_label(t, task_labels) for t in tasks], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("client's accuracy on the task's test set")
    n_clients = last["client"].nunique() if "client" in last else 0
    ax.set_title((title + "\n" if title else "") + f"final accuracy per task across {n_clients} clients (one dot per client)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# --------------------------------------------------------------------------- comparisons
def _run_formats(run_dir: Path) -> list[str] | None:
    """``output.plot_formats`` recorded in a run directory's ``config.yaml`` (None if absent)."""
    try:
        output = _read_optional_yaml(Path(run_dir) / "config.yaml").get("output")
    except (OSError, yaml.YAMLError):
        return None
    return output.get("plot_formats") if isinstance(output, dict) else None


def _study(df: pd.DataFrame) -> str:
    """"<scenario> · <protocol> protocol" from a comparison or sweep table."""
    scen = ", ".join(str(s) for s in dict.fromkeys(df["scenario"].dropna())) if "scenario" in df.columns else ""
    prot = ", ".join(str(s) for s in dict.fromkeys(df["protocol"].dropna())) if "protocol" in df.columns else ""
    return " · ".join(p for p in (scen, f"{prot or 'global'} protocol") if p)


def plot_compare(df: pd.DataFrame, run_dirs: Sequence[Path], labels: Sequence[str], out_dir: Path) -> list[Path]:
    """``comparison.png`` (final average accuracy and average forgetting per strategy, mean with
    std error bars across seeds) and ``forgetting_curves.png`` (average accuracy over the tasks
    seen so far after each task, one line per strategy, shaded mean ± std across seeds)."""
    out_dir = Path(out_dir)
    from ..study.compare import shown_labels

    ok = df[df["status"] != "failed"].copy()
    order = list(dict.fromkeys(ok["label"]))
    shown = shown_labels(ok)
    paths = []
    fmts = _run_formats(run_dirs[0]) if run_dirs and figure_style._FORMATS == ("png",) else None

    fig, axes = plt.subplots(1, 3, figsize=(max(11.0, 1.5 * len(order) + 5), 4.6))
    for ax, col, title in (
        (axes[0], "final_avg_accuracy", "final average accuracy (higher is better)"),
        (axes[1], "avg_incremental_accuracy", "average incremental accuracy (higher is better)"),
        (axes[2], "avg_forgetting", "average forgetting (lower is better)"),
    ):
        if col not in ok.columns:
            ax.set_visible(False)
            continue
        vals = [pd.to_numeric(ok[ok["label"] == lab][col], errors="coerce").dropna() for lab in order]
        means = [v.mean() if len(v) else np.nan for v in vals]
        stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in vals]
        colors = _colors(len(order))
        ax.bar(range(len(order)), means, yerr=stds, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
        for i, (m, sd) in enumerate(zip(means, stds)):
            if np.isfinite(m):
                ax.text(i, max(m, 0) + (sd if np.isfinite(sd) else 0) + 0.02, f"{m:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([shown[str(lab)] for lab in order], rotation=30, ha="right")
        ax.set_ylim(min(0.0, np.nanmin(means) - 0.1) if np.isfinite(np.nanmin(means)) else 0, 1.1)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    seeds = sorted(set(int(s) for s in ok["seed"]))
    spread = f"mean ± std over {len(seeds)} seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0]}): no spread shown"
    fig.suptitle(f"{_study(ok)} · strategies compared · {spread}", fontsize=11)
    fig.tight_layout()
    p = out_dir / "comparison.png"
    _save(fig, p, fmts)
    paths.append(p)

    curves: dict[str, list[np.ndarray]] = {}
    for rd, lab in zip(run_dirs, labels):
        try:
            m = read_matrix(Path(rd) / "accuracy_matrix.csv")
        except (OSError, ValueError):
            continue
        # the same A_k as the run's summary (per-client task orders average a whole row)
        definitions = _read_optional_json(Path(rd) / "summary.json").get("metric_definitions", STANDARD)
        curves.setdefault(lab, []).append(average_accuracy_curve(m, definitions))
    fig, ax = plt.subplots(figsize=FORGETTING_SIZE)
    for color, lab in zip(_colors(len(order)), order):
        if lab not in curves:
            continue
        arr = np.vstack(curves[lab])
        x = np.arange(arr.shape[1])
        mean = np.nanmean(arr, axis=0)
        std = np.nanstd(arr, axis=0, ddof=1) if len(arr) > 1 else np.zeros_like(mean)
        ax.plot(x, mean, marker="o", color=color, label=f"{shown[str(lab)]} (n={len(arr)})")
        ax.fill_between(x, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=color, alpha=0.15)
    ax.set_xlabel("after training task k")
    ax.set_ylabel("average accuracy over tasks 0..k")
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    band = "shaded: ± std across seeds" if len(seeds) > 1 else "one seed: no spread shown"
    ax.set_title(f"{_study(ok)}\naverage accuracy over seen tasks, per strategy ({band})", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    p = out_dir / "forgetting_curves.png"
    _save(fig, p, fmts)
    paths.append(p)
    return paths
