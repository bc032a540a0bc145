"""Plots of a sweep (``sweep.csv``).

1-D grid: ``sweep.png``, one panel per metric (final average accuracy, average incremental
accuracy, average forgetting, bytes per round) against the swept value, one line per strategy
label (mean over seeds) with a band of ± one standard deviation across seeds; accuracy bands are
clipped to [0, 1] (a mean ± std may leave the range a metric can take). The x axis is
logarithmic when the values are positive and span two decades or more (alpha 0.05 .. 10), with
ticks at the swept values; bytes per round get a log axis when they differ tenfold or more;
non-numeric values are placed in grid order.

2-D grid: ``sweep_heatmap.png``, a heatmap of the mean final average accuracy per strategy label
(rows = first key, columns = second key), annotated with mean and the number of seeds.

More than two keys: no figure (the table holds everything); a note says so.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .figure_style import _colors, _save, plt

METRICS = (
    ("final_avg_accuracy", "final average accuracy", (0.0, 1.0)),
    ("avg_incremental_accuracy", "average incremental accuracy", (0.0, 1.0)),
    ("avg_forgetting", "average forgetting", (-1.0, 1.0)),
    ("bytes_per_round", "bytes per round (up + down)", None),
)
HINTS = {"final_avg_accuracy": "higher is better", "avg_incremental_accuracy": "higher is better",
         "avg_forgetting": "lower is better; below 0: old tasks improved", "bytes_per_round": "lower is cheaper"}

# readable axis names for the keys people sweep most; any other key is named by its last part
AXIS_NAMES = {
    "clients.partition.alpha": "Dirichlet α (label skew; small = skewed)",
    "clients.partition.shards_per_client": "shards per client",
    "clients.num_clients": "number of clients",
    "clients.participation": "share of clients per round",
    "clients.dropout": "client dropout probability",
    "privacy.epsilon": "privacy budget ε",
    "privacy.delta": "privacy δ",
    "training.lr": "learning rate",
    "training.local_epochs": "local epochs",
    "training.rounds_per_task": "rounds per task",
    "training.batch_size": "batch size",
    "tasks.classes_per_task": "classes per task",
    "tasks.initial_classes": "classes in the first task",
    "continual.memory_per_class": "exemplars kept per class",
    "model.embedding_dim": "embedding dimension",
    "model.backbone": "backbone",
    "seed": "seed",
}


def axis_name(key: str) -> str:
    """The axis label of a swept key: a readable name, with the dotted key it came from."""
    name = AXIS_NAMES.get(key) or key.rsplit(".", 1)[-1].replace("_", " ")
    return name if name == key else f"{name}\n({key})"


def spread_note(ns: Sequence[int]) -> str:
    """What the bands show, honestly: nothing with one seed per point."""
    most = max(ns) if ns else 0
    if most <= 1:
        return "one seed per point: no spread shown"
    fewest = min(n for n in ns if n) if any(ns) else 0
    seeds = f"{most}" if fewest == most else f"{fewest}-{most}"
    return f"line: mean over {seeds} seeds; band: ± one standard deviation across seeds"


def _numeric(values: pd.Series) -> np.ndarray | None:
    v = pd.to_numeric(values, errors="coerce")
    return None if v.isna().any() else v.to_numpy(dtype=float)


def _is(column: pd.Series, value: object) -> pd.Series:
    """Rows whose swept value is ``value`` (10 and 10.0 are the same value; texts compare as text)."""
    num = pd.to_numeric(column, errors="coerce")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        v = None
    if v is not None and num.notna().all():
        return pd.Series(np.isclose(num.to_numpy(float), v, rtol=1e-12, atol=0), index=column.index)
    return column.astype(str) == str(value)


def _tick(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _spans_decades(x: np.ndarray) -> bool:
    return bool(len(x) > 1 and (x > 0).all() and x.max() / x.min() >= 100)


def _subtitle(df: pd.DataFrame) -> str:
    scenario = ", ".join(str(s) for s in dict.fromkeys(df["scenario"].dropna())) if "scenario" in df else "?"
    protocol = ", ".join(str(s) for s in dict.fromkeys(df["protocol"].dropna())) if "protocol" in df else "global"
    seeds = sorted({int(s) for s in df["seed"].dropna()})
    return f"{scenario} · {protocol or 'global'} protocol · {len(seeds)} seed{'s' if len(seeds) != 1 else ''} {seeds}"


def plot_sweep(df: pd.DataFrame, keys: Sequence[str], out_dir: Path, formats: Sequence[str] | None = None,
               columns: int | None = None) -> list[Path]:
    """The sweep's figure in ``out_dir``: ``sweep.png`` for one key (``columns``: see
    :func:`plot_sweep_1d`), ``sweep_heatmap.png`` for two, none for more."""
    from ..study.compare import OK_STATUSES

    ok = df[df["status"].isin(OK_STATUSES)]  # not failed, incomplete or pending runs
    if ok.empty:
        return []
    if len(keys) == 1:
        return [plot_sweep_1d(ok, keys[0], Path(out_dir) / "sweep.png", formats, columns)]
    if len(keys) == 2:
        return [plot_sweep_2d(ok, keys[0], keys[1], Path(out_dir) / "sweep_heatmap.png", formats)]
    return []


def band(sub: pd.DataFrame, key: str, order: Sequence, col: str, clip: tuple[float, float] | None):
    """Per swept value (in ``order``): mean over seeds, mean - std and mean + std clipped to
    ``clip`` (a band may not leave the range the metric can take), and the number of seeds."""
    means, lo, hi, ns = [], [], [], []
    for v in order:
        vals = pd.to_numeric(sub[_is(sub[key], v)][col], errors="coerce").dropna()
        m = vals.mean() if len(vals) else np.nan
        sd = vals.std(ddof=1) if len(vals) > 1 else 0.0
        means.append(m)
        lo.append(m - sd)
        hi.append(m + sd)
        ns.append(len(vals))
    means_a, lo_a, hi_a = (np.asarray(a, dtype=float) for a in (means, lo, hi))
    if clip is not None:
        lo_a, hi_a = np.clip(lo_a, *clip), np.clip(hi_a, *clip)
    return means_a, lo_a, hi_a, ns


UNSET = "unset"


def sweep_order(column: pd.Series) -> tuple[pd.Series, list, np.ndarray | None]:
    """The swept values in plotting order: numbers ascending, else grid order; a value swept as
    ``null`` (e.g. ``privacy.epsilon`` without DP) becomes the category ``unset``, placed last
    (the numbers then sit at evenly spaced positions). Returns the column with ``unset`` filled
    in, the order, and the numeric positions (None: categorical axis)."""
    if column.isna().any():
        column = pd.Series([UNSET if pd.isna(v) else v for v in column], index=column.index, dtype=object)
        values = [v for v in dict.fromkeys(column) if v != UNSET]
        num = _numeric(pd.Series(values))
        if num is not None:
            values = [v for _, v in sorted(zip(num, values))]
        return column, [*values, UNSET], None
    order = list(dict.fromkeys(column))  # grid order
    x_num = _numeric(pd.Series(order))
    if x_num is not None:
        order = [v for _, v in sorted(zip(x_num, order))]
        x_num = np.sort(x_num)
    return column, order, x_num


def plot_sweep_1d(df: pd.DataFrame, key: str, path: Path, formats: Sequence[str] | None = None,
                  columns: int | None = None) -> Path:
    """One panel per metric against the swept value; ``columns=1`` stacks the panels at the width
    of one column of a two-column paper (default: all panels side by side)."""
    from ..study.compare import shown_labels

    labels = list(dict.fromkeys(df["label"]))
    shown = shown_labels(df)
    column, order, x_num = sweep_order(df[key])
    df = df.assign(**{key: column})
    xpos = x_num if x_num is not None else np.arange(len(order), dtype=float)
    ncols = len(METRICS) if not columns else max(1, min(columns, len(METRICS)))
    nrows = -(-len(METRICS) // ncols)
    size = (3.4 * ncols, 2.6 * nrows) if columns else (4.2 * ncols, 4.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False)
    all_ns: list[int] = []
    for ax, (col, title, clip) in zip(axes.flat, METRICS):
        for color, lab in zip(_colors(len(labels)), labels):
            means_a, lo_a, hi_a, ns = band(df[df["label"] == lab], key, order, col, clip)
            all_ns += ns
            ax.plot(xpos, means_a, marker="o", color=color, label=f"{shown[str(lab)]} (n={max(ns) if ns else 0})")
            ax.fill_between(xpos, lo_a, hi_a, color=color, alpha=0.18, linewidth=0)
        _sweep_axes(ax, df, key, col, clip, order, xpos, x_num)
        ax.set_ylabel(title, fontsize=9)
        ax.set_title(HINTS.get(col, ""), fontsize=8, color="0.35")
    axes.flat[0].legend(fontsize=7 if columns else 8, title="strategy (seeds)", title_fontsize=8)
    parts = [f"sweep over {axis_name(key).splitlines()[0]} · {_subtitle(df)}", spread_note(all_ns)]
    if columns:  # a narrow figure: wrap the title rather than let it run off the page
        parts = [textwrap.fill(part, width=24 + 22 * ncols) for part in parts]
    fig.suptitle("\n".join(parts), fontsize=9 if columns else 11)
    _save(fig, path, formats)
    return path


def _sweep_axes(ax, df: pd.DataFrame, key: str, col: str, clip, order: list, xpos: np.ndarray,
                x_num: np.ndarray | None) -> None:
    """Scales, ticks at the swept values (as written in the grid: 0.05, not 5x10^-2), a zero line
    under forgetting, and the x axis's readable name."""
    if x_num is not None and _spans_decades(x_num):
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(xpos, [_tick(v) for v in order], rotation=20 if x_num is None and len(order) > 6 else 0)
    if clip == (0.0, 1.0):
        ax.set_ylim(-0.02, 1.02)
    if col == "avg_forgetting":
        ax.axhline(0.0, color="0.3", linewidth=0.8, zorder=1)
    if col == "bytes_per_round":
        pos = pd.to_numeric(df[col], errors="coerce").dropna()
        if len(pos) and (pos > 0).all() and pos.max() / pos.min() >= 10:
            ax.set_yscale("log")
    ax.set_xlabel(axis_name(key), fontsize=9)
    ax.grid(alpha=0.3)


def plot_sweep_2d(df: pd.DataFrame, key_r: str, key_c: str, path: Path, formats: Sequence[str] | None = None) -> Path:
    from ..study.compare import shown_labels

    labels = list(dict.fromkeys(df["label"]))
    shown = shown_labels(df)

    def ordered(key: str) -> list:
        vals = list(dict.fromkeys(df[key]))
        num = _numeric(pd.Series(vals))
        return [v for _, v in sorted(zip(num, vals))] if num is not None else vals

    rows, cols = ordered(key_r), ordered(key_c)
    fig, axes = plt.subplots(1, len(labels), figsize=(1.1 * len(cols) * len(labels) + 2.5, 0.8 * len(rows) + 2.2),
                             layout="constrained", squeeze=False)
    im = None
    for ax, lab in zip(axes[0], labels):
        sub = df[df["label"] == lab]
        grid = np.full((len(rows), len(cols)), np.nan)
        count = np.zeros((len(rows), len(cols)), dtype=int)
        for i, rv in enumerate(rows):
            for j, cv in enumerate(cols):
                sel = sub[_is(sub[key_r], rv) & _is(sub[key_c], cv)]
                vals = pd.to_numeric(sel["final_avg_accuracy"], errors="coerce").dropna()
                if len(vals):
                    grid[i, j], count[i, j] = vals.mean(), len(vals)
        im = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                if count[i, j]:
                    ax.text(j, i, f"{grid[i, j]:.2f}\nn={count[i, j]}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(cols)), [str(v) for v in cols])
        ax.set_yticks(range(len(rows)), [str(v) for v in rows])
        ax.set_xlabel(axis_name(key_c), fontsize=9)
        ax.set_ylabel(axis_name(key_r), fontsize=9)
        ax.set_title(shown[str(lab)], fontsize=10)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="final average accuracy (mean over seeds)", shrink=0.9)
    fig.suptitle(f"final average accuracy (mean over the seeds n in each cell) · {_subtitle(df)}", fontsize=11)
    _save(fig, path, formats)
    return path
