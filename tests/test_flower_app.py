"""Flower's own loader finds and builds protofed's ServerApp and ClientApp from pyproject.toml,
and the loaded apps run a scenario taken from the run config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from flwr.app import Context, RecordDict
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app

from simulator.engine.inline import InlineGrid, set_server_identity

REPO = Path(__file__).resolve().parents[1]


def test_flower_loader_builds_both_apps_and_they_run(tmp_path):
    config, _warnings = load_and_validate(REPO / "pyproject.toml", check_module=True)
    components = config["tool"]["flwr"]["app"]["components"]
    server = load_app(components["serverapp"], ValueError, REPO)
    client = load_app(components["clientapp"], ValueError, REPO)
    assert isinstance(server, ServerApp) and isinstance(client, ClientApp)
    assert (REPO / config["tool"]["flwr"]["app"]["config"]["scenario"]).exists()

    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump({
        "name": "flwrapp",
        "dataset": {"source": "synthetic", "num_classes": 4, "dim": 6, "samples_per_class": 30, "class_sep": 6.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 2},
        "training": {"rounds_per_task": 1},
        "model": {"backbone": "mlp", "embedding_dim": 8},
    }))
    run_config = {"scenario": str(scen), "out": str(tmp_path / "run"), "state-dir": str(tmp_path / "nodes")}
    set_server_identity()
    grid = InlineGrid(client, 2, run_config=run_config)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is True and summary["engine"] == "flower"
    assert summary["final_avg_accuracy"] > 0.5
