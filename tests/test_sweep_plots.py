"""The sweep figure names its axes, says honestly what its bands show, marks zero forgetting,
and has a single-column layout for papers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from simulator.report.sweep_plots import axis_name, plot_sweep, spread_note

KEY = "clients.partition.alpha"


def _table(seeds: list[int]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{KEY: a, "label": lab, "seed": s, "status": "ok", "scenario": "demo", "protocol": "global",
             "final_avg_accuracy": rng.uniform(0.4, 0.9), "avg_incremental_accuracy": rng.uniform(0.5, 0.9),
             "avg_forgetting": rng.uniform(-0.05, 0.3), "bytes_per_round": 1000.0 * (1 + a)}
            for a in (0.1, 1.0, 10.0) for lab in ("proto_avg", "fedproto") for s in seeds]
    return pd.DataFrame(rows)


def test_axis_names_are_readable_and_keep_the_key():
    assert axis_name(KEY).startswith("Dirichlet α") and KEY in axis_name(KEY)
    assert axis_name("training.some_new_knob") == "some new knob\n(training.some_new_knob)"


def test_spread_note_is_honest_about_one_seed():
    assert spread_note([1, 1, 1]) == "one seed per point: no spread shown"
    assert "mean over 3 seeds" in spread_note([3, 3]) and "standard deviation" in spread_note([3, 3])
    assert "2-3 seeds" in spread_note([2, 3])


@pytest.mark.parametrize("columns,max_width", [(None, 2100), (1, 420)])
def test_sweep_figure_layouts(tmp_path, columns, max_width):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (path,) = plot_sweep(_table([0, 1]), [KEY], tmp_path, columns=columns)
    w, h = Image.open(path).size
    assert w <= max_width and (h > w if columns == 1 else w > h), (w, h)
