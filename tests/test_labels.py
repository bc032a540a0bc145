"""Labels name what differs from a strategy's defaults: on the quickstart proto_avg runs with
share_weights from the scenario, fedproto with its defaults, and every table, title and legend
must say so (`proto_avg (share_weights)`)."""

from __future__ import annotations

import json

import pandas as pd

import protofed
from helpers import tiny
from simulator.study.compare import format_table, shown_labels
from simulator.report.plots import _run_title
from strategies import nondefault_params, shown_label


def test_nondefault_params_read_the_strategy_defaults():
    assert nondefault_params("proto_avg", {"share_weights": True}) == "share_weights"
    assert nondefault_params("proto_avg", {"share_weights": False}) == ""
    assert nondefault_params("fedproto", {"lambda": 0.5}) == "lambda=0.5"
    assert nondefault_params("fedproto", {"lambda": 1.0}) == ""  # the default, written out
    assert nondefault_params("fedproto", {}) == "" and nondefault_params("no_such_strategy", {"x": 1}) == ""
    assert shown_label("fedproto", "") == "fedproto" and shown_label("p", float("nan")) == "p"


def test_a_comparison_names_the_non_default_parameters(tmp_path):
    table = protofed.compare(tiny(), ["proto_avg", "fedproto"], seeds=[0], engine="inline",
                             overrides={"training.rounds_per_task": 1}, out_dir=tmp_path / "cmp", progress=False)
    assert shown_labels(table) == {"proto_avg": "proto_avg (share_weights)", "fedproto": "fedproto"}
    on_disk = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert shown_labels(on_disk) == shown_labels(table)  # an empty value reads back as NaN: no label change
    text = format_table(on_disk)
    assert "proto_avg (share_weights)" in text and "fedproto (" not in text
    run = tmp_path / "cmp" / "proto_avg" / "seed-0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy_params"] == "share_weights"
    assert "proto_avg (share_weights)" in _run_title(run, summary, {})
    # a run directory written before strategy_params existed: read from config.yaml
    old = {k: v for k, v in summary.items() if k != "strategy_params"}
    assert "proto_avg (share_weights)" in _run_title(run, old, {"strategy": {"name": "proto_avg", "params": {"share_weights": True}}})
