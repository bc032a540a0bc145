"""The shared style of every figure: the Agg backend, fonts kept as text in vector files,
colours, a colour bar for long ordered lists, tick thinning, and how a figure is written
(atomically, in the formats asked for) or handed to Python instead (:class:`capture_figures`).
The plotting modules import from here, never from each other."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from simulator.results import atomic_write_bytes  # noqa: E402

DPI = 120
# Figures stay readable from 2 to 1,000 classes and 2 to 50 tasks: class lists longer than this
# are summarised ("24 classes"); beyond this many lines/classes a colour bar replaces the legend;
# matrix cells carry their value only up to this many tasks (the text would not fit).
MAX_LISTED_CLASSES = 6
MAX_LEGEND_ENTRIES = 12
MAX_ANNOTATED_TASKS = 12

# vector figures keep their text as text (TrueType fonts embedded), so a paper's PDF stays
# searchable and editable; matplotlib's default (Type 3) also keeps text, but journals ask for 42
matplotlib.rcParams["pdf.fonttype"] = 42
matplotlib.rcParams["ps.fonttype"] = 42
matplotlib.rcParams["svg.fonttype"] = "none"
PLOT_FORMATS = ("png", "pdf", "svg")
_FORMATS: tuple[str, ...] = ("png",)  # what _save writes when not told: set by plot_run / with_formats


_CAPTURED: list[plt.Figure] | None = None  # inside capture_figures(): figures go here, not to files


class capture_figures:
    """``with capture_figures() as figs:`` every plot drawn inside is appended to ``figs``, open,
    instead of being written (the Python API returns figures this way: ``protofed.plot_*``)."""

    def __enter__(self) -> list[plt.Figure]:
        global _CAPTURED
        self._before, _CAPTURED = _CAPTURED, []
        return _CAPTURED

    def __exit__(self, *exc: object) -> None:
        global _CAPTURED
        _CAPTURED = self._before


def _save(fig: plt.Figure, path: Path, formats: Sequence[str] | None = None) -> None:
    """Render ``fig`` as PNG at ``path`` (and, per ``formats``, as PDF/SVG next to it, same
    stem), each written atomically; always closes the figure (inside :class:`capture_figures`:
    hands it over instead, open and unwritten)."""
    if _CAPTURED is not None:
        _CAPTURED.append(fig)
        return
    fmts = list(dict.fromkeys(formats or _FORMATS))
    try:
        for fmt in fmts:
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=DPI)
            atomic_write_bytes(Path(path).with_suffix("." + fmt), buf.getvalue())
    finally:
        plt.close(fig)


class with_formats:
    """``with with_formats(["png", "pdf"]):`` every plot drawn inside is written in these formats."""

    def __init__(self, formats: Sequence[str] | None) -> None:
        self.formats = tuple(dict.fromkeys(formats)) if formats else None

    def __enter__(self) -> None:
        global _FORMATS
        self._before = _FORMATS
        if self.formats:
            _FORMATS = self.formats

    def __exit__(self, *exc: object) -> None:
        global _FORMATS
        _FORMATS = self._before


def _colors(n: int) -> list:
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")  # strong colours first, then their light partners
        order = list(range(0, 20, 2)) + list(range(1, 20, 2))
        return [cmap(i) for i in order[:n]]
    cmap = plt.get_cmap("turbo")
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def _index_colorbar(fig: plt.Figure, ax: plt.Axes, n: int, label: str, cmap: str = "turbo") -> list:
    """Colours for ``n`` ordered items from ``cmap`` and a colour bar naming them, in place of a
    legend too long to read; returns the colours (item i gets colours[i])."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap

    colors = [plt.get_cmap(cmap)(x) for x in np.linspace(0.05, 0.95, n)]
    norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(colors)), ax=ax, label=label, shrink=0.9)
    bar.ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    return colors


def _thinned(ticks: Sequence[Any], most: int = MAX_LEGEND_ENTRIES) -> slice:
    """Every k-th tick so that at most about ``most`` are labelled."""
    return slice(None, None, max(1, int(math.ceil(len(ticks) / most))))
