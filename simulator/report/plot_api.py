"""Figures from Python: the plots ``protofed plot`` writes, returned as open matplotlib figures
(to show in a notebook, restyle, or save where a paper needs them), drawn by the same code.

``run`` is a run directory or a :class:`~simulator.api.RunResult`; ``study`` is a compare or
sweep folder, or the table ``protofed.compare`` / ``protofed.sweep`` returned. Nothing is
written to disk. Exposed as ``protofed.plot_forgetting``, ``protofed.plot_accuracy_matrix``,
``protofed.plot_comparison`` and ``protofed.plot_sweep`` (and as ``RunResult.plot_forgetting``
and ``RunResult.plot_matrix``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..api import RunResult

_UNUSED = Path("unused.png")  # capture_figures() hands the figure back before any path is used


def _run(run: Any) -> "RunResult":
    from ..api import RunResult, load

    return run if isinstance(run, RunResult) else load(run)


def _drawn(draw) -> list["Figure"]:
    """The figures ``draw()`` makes, captured open instead of written."""
    from .figure_style import capture_figures

    with capture_figures() as figs:
        draw()
    return figs


def plot_forgetting(run: Any, protocol: str | None = None) -> "Figure":
    """Accuracy on each task's test set over the rounds, with the average over seen tasks
    (``plots/forgetting.png``). ``protocol``: ``global`` or ``local`` (default: the run's)."""
    from .plots import _run_title, _task_labels, plot_forgetting as draw

    r = _run(run)
    title = _run_title(r.run_dir, r.summary, r.config)
    return _drawn(lambda: draw(r.metrics, _UNUSED, title=title, task_labels=_task_labels(r.summary, r.config), protocol=protocol))[0]


def plot_accuracy_matrix(run: Any, protocol: str = "global") -> "Figure":
    """The accuracy matrix ``a[k][j]`` as an annotated heatmap (``plots/accuracy_matrix.png``);
    ``protocol="local"`` draws the local protocol's matrix."""
    from ..metrics import STANDARD
    from .plots import _run_title, plot_accuracy_matrix as draw

    r = _run(run)
    if protocol not in ("global", "local"):
        raise UserError.single("plot_accuracy_matrix", "protocol=", f"expected 'global' or 'local', got {protocol!r}")
    frame = r.matrix if protocol == "global" else r.local_matrix
    if frame is None:
        raise UserError.single(str(r.run_dir), "protocol=", f"the run recorded no {protocol} matrix")
    title = _run_title(r.run_dir, r.summary, r.config)
    definitions = r.summary.get("metric_definitions", STANDARD)
    return _drawn(lambda: draw(frame.to_numpy(dtype=float), _UNUSED, title=title, definitions=definitions))[0]


def _table(study: Any, name: str) -> pd.DataFrame:
    """The study's table: the one given, or ``name`` read from the folder given."""
    if isinstance(study, pd.DataFrame):
        return study
    path = Path(study) / name
    if not path.is_file():
        raise UserError.single(str(study), "study=", f"holds no {name}: give a {name.split('.')[0]} folder or its table")
    return pd.read_csv(path)


def plot_comparison(study: Any) -> tuple["Figure", "Figure"]:
    """The comparison's two figures: final/incremental accuracy and forgetting per strategy
    (``comparison.png``) and the average accuracy over seen tasks after each task
    (``forgetting_curves.png``)."""
    from ..study.compare import OK_STATUSES
    from .plots import plot_compare

    df = _table(study, "comparison.csv")
    ok = df[df["status"].isin(OK_STATUSES)]
    if ok.empty:
        raise UserError.single("plot_comparison", "study=", "no finished run in the table")
    bars, curves = _drawn(lambda: plot_compare(ok, [Path(p) for p in ok["run_dir"]], list(ok["label"]), _UNUSED.parent))
    return bars, curves


def plot_sweep(study: Any, columns: int | None = None) -> "Figure":
    """The sweep's figure: metrics against the swept value for one key, a heatmap for two
    (``sweep.png`` / ``sweep_heatmap.png``); ``columns=1`` stacks the panels at column width."""
    from ..study.sweep import swept_keys
    from .sweep_plots import plot_sweep as draw

    df = _table(study, "sweep.csv")
    if "cell" not in df.columns:
        raise UserError.single("plot_sweep", "study=", "not a sweep table (no 'cell' column)")
    keys = swept_keys(df)
    if not 1 <= len(keys) <= 2:
        raise UserError.single("plot_sweep", "study=", f"{len(keys)} swept keys: a figure shows one or two (the table holds everything)")
    figs = _drawn(lambda: draw(df, keys, _UNUSED.parent, columns=columns))
    if not figs:
        raise UserError.single("plot_sweep", "study=", "no finished run in the table")
    return figs[0]
