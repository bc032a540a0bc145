"""Figures stay readable from 2 to 1,000 classes and from 2 to 50 tasks: no matplotlib layout
warning, class lists summarised, no per-class or per-task legend beyond a dozen entries, the
top axis's task labels never overlapping, and image sizes that fit a page."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import tiny
from simulator.report import plots
from simulator.engine.runner import run_scenario
from simulator.scenario import validate_scenario


def _metrics(num_tasks: int, rounds: int, rng: np.random.Generator) -> pd.DataFrame:
    """A metrics table of ``num_tasks`` tasks x ``rounds`` rounds, every seen task evaluated."""
    rows, g = [], 0
    for t in range(num_tasks):
        for r in range(rounds):
            rows += [{"task": t, "round": r, "global_round": g, "eval_task": j, "accuracy": rng.uniform()} for j in range(t + 1)]
            g += 1
    return pd.DataFrame(rows)


def _no_overlap(labels) -> bool:
    boxes = [lab.get_window_extent() for lab in labels if lab.get_text()]
    return all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.mark.parametrize("num_tasks,num_classes", [(2, 2), (20, 200), (50, 1000)])
def test_figures_raise_no_layout_warning(tmp_path, num_tasks, num_classes):
    rng = np.random.default_rng(0)
    metrics = _metrics(num_tasks, 3, rng)
    per = num_classes // num_tasks
    labels = {t: list(range(t * per, (t + 1) * per)) for t in range(num_tasks)}
    matrix = np.tril(rng.uniform(size=(num_tasks, num_tasks)))
    clients = pd.DataFrame([{"global_round": 9, "client": c, "eval_task": t, "accuracy": rng.uniform()}
                            for c in range(30) for t in range(num_tasks)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_forgetting(metrics, tmp_path / "f.png", title="a title", task_labels=labels)
        plots.plot_accuracy_matrix(matrix, tmp_path / "m.png", title="a title")
        plots.plot_clients(clients, tmp_path / "c.png", title="a title", task_labels=labels)
    for name in ("f", "m", "c"):
        w, h = Image.open(tmp_path / f"{name}.png").size
        assert w <= 1600 and h <= 1000, (name, w, h)


def test_task_labels_summarise_long_class_lists():
    assert plots._task_label(3, {3: [4, 7]}) == "task 3 (classes 4, 7)"
    assert plots._task_label(3, {3: [9]}) == "task 3 (class 9)"
    assert plots._task_label(3, {3: list(range(24))}) == "task 3 (24 classes)"


@pytest.mark.parametrize("num_tasks", [2, 12, 13, 50])
def test_top_axis_task_labels_do_not_overlap(num_tasks):
    df = plots._with_global_round(_metrics(num_tasks, 1, np.random.default_rng(0)))
    fig, ax = plots.plt.subplots(figsize=plots.FORGETTING_SIZE, layout="constrained")
    try:
        plots._task_axis(ax, df)
        fig.canvas.draw()
        top = [a for a in ax.child_axes][0]
        shown = [lab for lab in top.get_xticklabels() if lab.get_text()]
        assert 2 <= len(shown) <= plots.MAX_LEGEND_ENTRIES + 1
        assert _no_overlap(shown)
    finally:
        plots.plt.close(fig)


def test_a_200_class_20_task_run_draws_every_figure_without_warnings(tmp_path):
    """The real path: a synthetic 200-class, 20-task run, then plot_run (as `protofed plot`)."""
    raw = tiny(dataset={"source": "synthetic", "num_classes": 200, "dim": 16, "samples_per_class": 12, "class_sep": 6.0},
               tasks={"initial_classes": 10, "classes_per_task": 10},
               training={"rounds_per_task": 1, "local_epochs": 1, "batch_size": 16, "lr": 0.01},
               clients={"num_clients": 3, "partition": {"scheme": "iid"}})
    run = tmp_path / "run"
    out = run_scenario(validate_scenario(raw), run_dir=run, plots=False, out=None)
    assert out.matrix.shape == (20, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = plots.plot_run(run)
    assert {p.name for p in paths} == {"forgetting.png", "accuracy_matrix.png", "clients.png", "prototypes.png"}
    for p in paths:
        w, h = Image.open(p).size
        assert w <= 1600 and h <= 1000, (p.name, w, h)
