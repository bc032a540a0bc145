"""Plotting from Python: protofed.plot_* and RunResult.plot_* return open matplotlib figures,
drawn by the same code as the files, and write nothing."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure

import protofed
from helpers import tiny

FAST = {"training.rounds_per_task": 1}


def _listing(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_run_and_comparison_figures(tmp_path):
    table = protofed.compare(tiny(), ["proto_avg", "fedproto"], seeds=[0], engine="inline", overrides=FAST,
                             out_dir=tmp_path / "cmp", progress=False)
    before = _listing(tmp_path)
    run = protofed.load(table["run_dir"].iloc[0])
    fig = run.plot_forgetting()
    assert isinstance(fig, Figure) and "proto_avg (share_weights)" in fig.axes[0].get_title()
    assert [line.get_label() for line in fig.axes[0].lines][-1] == "average over seen tasks"
    matrix = protofed.plot_accuracy_matrix(run.run_dir, protocol="local")
    assert "final average accuracy" in matrix.axes[0].get_title()
    bars, curves = protofed.plot_comparison(tmp_path / "cmp")
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == ["proto_avg (share_weights)", "fedproto"]
    assert len(protofed.plot_comparison(table)[1].axes[0].lines) == 2
    assert _listing(tmp_path) == before  # nothing written
    for f in (fig, matrix, bars, curves):
        plt.close(f)
    with pytest.raises(protofed.UserError, match="protocol="):
        run.plot_matrix(protocol="both")
    with pytest.raises(protofed.UserError, match="comparison.csv"):
        protofed.plot_comparison(tmp_path)


def test_sweep_figure_single_column(tmp_path):
    table = protofed.sweep(tiny(), grid={"clients.partition.alpha": [0.5, 5.0]}, strategies=["proto_avg"], seeds=[0],
                           engine="inline", overrides=FAST, out_dir=tmp_path / "sw", progress=False)
    wide = protofed.plot_sweep(table)
    narrow = protofed.plot_sweep(tmp_path / "sw", columns=1)
    assert len(wide.axes) == len(narrow.axes) == 4
    assert narrow.get_size_inches()[0] < wide.get_size_inches()[0] / 2
    assert wide.axes[0].get_xlabel().startswith("Dirichlet α")
    plt.close(wide)
    plt.close(narrow)


def test_protofed_plot_columns_redraws_a_sweep_at_column_width(tmp_path, capsys):
    from PIL import Image

    from simulator.cli import main

    protofed.sweep(tiny(), grid={"clients.partition.alpha": [0.5, 5.0]}, strategies=["proto_avg"], seeds=[0],
                   engine="inline", overrides=FAST, out_dir=tmp_path / "sw", progress=False)
    wide = Image.open(tmp_path / "sw" / "sweep.png").size
    assert main(["plot", str(tmp_path / "sw"), "--columns", "1"]) == 0
    narrow = Image.open(tmp_path / "sw" / "sweep.png").size
    assert narrow[0] < wide[0] / 3 and narrow[1] > narrow[0]
