"""Flower's own loader finds and builds protofed's ServerApp and ClientApp from pyproject.toml,
and the loaded apps run a scenario taken from the run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.cli.config_utils import load_and_validate
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.object_ref import load_app

from simulator.engine.inline import InlineGrid, set_server_identity
from simulator.errors import RunFailure

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


def _tiny_scenario(tmp_path: Path) -> Path:
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump({
        "name": "flwrapp",
        "dataset": {"source": "synthetic", "num_classes": 4, "dim": 6, "samples_per_class": 30, "class_sep": 2.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 2},
        "training": {"rounds_per_task": 1},
        "model": {"backbone": "mlp", "embedding_dim": 8},
        "continual": {"memory_per_class": 3},
        "output": {"dir": str(tmp_path / "results")},
    }))
    return scen


def _run(run_id: int, run_config: dict) -> InlineGrid:
    from simulator.flower_app import client_app, server_app

    grid = InlineGrid(client_app, 2, run_config=run_config, run_id=run_id)
    server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    return grid


def test_client_state_is_keyed_by_run_and_removed_at_its_end(tmp_path):
    """Issue 14, point 7: state was kept per node in the temp directory and a second run on the
    same nodes continued from the first run's clients. Now each run has its own folder, the
    ServerApp's last message removes it, and a second run reproduces the first exactly."""
    scen = _tiny_scenario(tmp_path)
    nodes = tmp_path / "nodes"
    cfg = {"scenario": str(scen), "state-dir": str(nodes)}
    _run(11, {**cfg, "out": str(tmp_path / "a")})
    assert sorted(p.name for p in nodes.iterdir()) == ["streams"]  # run-11 removed, stream cached
    _run(12, {**cfg, "out": str(tmp_path / "b")})
    a = (tmp_path / "a" / "accuracy_matrix.csv").read_text()
    assert a == (tmp_path / "b" / "accuracy_matrix.csv").read_text()
    assert len(list((nodes / "streams").glob("*.pkl"))) == 1

    # and a run whose ServerApp died before the cleanup cannot reach a later run's clients
    from simulator import flower_app

    ctx = Context(run_id=21, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config=cfg)
    setup = flower_app._setup(ctx)
    ctx2 = Context(run_id=22, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config=cfg)
    assert flower_app._setup(ctx2).state_dir != setup.state_dir
    assert Path(setup.state_dir) == nodes / "run-21" / "node-5"


def test_default_out_is_per_flower_run_and_relative_scenario_resolves_in_the_app(tmp_path):
    from simulator import flower_app
    from simulator.records import CONFIG, METRICS

    assert (flower_app.CONFIG, flower_app.METRICS) == (CONFIG, METRICS)
    ctx = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config={"scenario": "scenarios/quickstart.yaml"})
    assert flower_app.scenario_path(ctx) == REPO / "scenarios" / "quickstart.yaml"
    scen = _tiny_scenario(tmp_path)
    _run(7, {"scenario": str(scen), "out": "", "state-dir": str(tmp_path / "nodes")})
    run_dir = tmp_path / "results" / "flwrapp" / "proto_avg" / "seed-0" / "flwr-run-7"
    assert json.loads((run_dir / "summary.json").read_text())["completed"] is True


def test_query_messages_do_not_import_torch():
    """Every message on the Deployment Engine starts a fresh process: partition discovery and
    cleanup must stay cheap (no torch, no data)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from flwr.app import ConfigRecord, Context, Message, RecordDict\n"
        "from simulator.engine.inline import set_server_identity\n"
        "from simulator.flower_app import client_app\n"
        "set_server_identity()\n"
        "ctx = Context(run_id=1, node_id=1, node_config={'partition-id': 3}, state=RecordDict(), run_config={})\n"
        "msg = Message(RecordDict({'config': ConfigRecord({'hello': 1})}), dst_node_id=1, message_type='query')\n"
        "reply = client_app(msg, ctx)\n"
        "assert reply.content['metrics']['partition_id'] == 3\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


class _CountingGrid(InlineGrid):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.sent: list[str] = []

    def _deliver(self, msg):
        self.sent.append(msg.metadata.message_type)
        return super()._deliver(msg)


def test_cleanup_rides_on_the_final_evaluation_and_a_failed_run_is_cleaned_too(tmp_path):
    from simulator.flower_app import client_app, server_app

    scen = _tiny_scenario(tmp_path)
    nodes = tmp_path / "nodes"
    cfg = {"scenario": str(scen), "out": str(tmp_path / "ok"), "state-dir": str(nodes)}
    grid = _CountingGrid(client_app, 2, run_config=cfg)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    assert grid.sent.count("query") == 2  # partition discovery only: no extra cleanup round trip
    assert sorted(p.name for p in nodes.iterdir()) == ["streams"]

    bad = yaml.safe_load(scen.read_text())
    bad["training"].update(lr=100.0, grad_clip=0.0, rounds_per_task=2)  # a non-finite loss stops the run
    scen.write_text(yaml.safe_dump(bad))
    cfg = {**cfg, "out": str(tmp_path / "failed")}
    grid = _CountingGrid(client_app, 2, run_config=cfg)
    with pytest.raises(RunFailure, match="training.lr"):
        server_app(grid, Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=cfg))
    assert grid.sent.count("query") == 4  # discovery, then the cleanup message to both nodes
    assert sorted(p.name for p in nodes.iterdir()) == ["streams"]
