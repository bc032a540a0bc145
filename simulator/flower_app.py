"""The same ServerApp and ClientApp, as objects Flower's own tooling can load.

``pyproject.toml`` names them under ``[tool.flwr.app.components]``; the scenario file travels in
the run config (``scenario = "scenarios/quickstart.yaml"``, override with
``flwr run . --run-config 'scenario="my.yaml"'``). On Flower's Deployment Engine each SuperNode
is started with ``--node-config "partition-id=<i> num-partitions=<n>"``; it rebuilds the
federated data stream from the scenario (deterministic from its seed) and keeps its client state
in ``state-dir`` (run config; default a folder under the system temp directory). The ServerApp
writes the usual run directory to ``out`` (run config; default
``<output.dir>/<name>/<strategy>/seed-<seed>``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .engine.runtime import RunSetup


def _config(context: Context) -> dict[str, Any]:
    return dict(context.run_config or {})


def _scenario(context: Context):
    from .scenario import load_scenario

    path = _config(context).get("scenario")
    if not path:
        raise ValueError('set the run config key "scenario" to a scenario file')
    return load_scenario(str(path))


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from .engine.runner import run_scenario

    scenario = _scenario(context)
    out = _config(context).get("out")
    run_scenario(scenario, source=str(_config(context)["scenario"]), run_dir=Path(out) if out else None, grid=grid)


_SETUPS: dict[tuple[str, int], RunSetup] = {}


def _setup(context: Context) -> RunSetup:
    key = (str(_config(context).get("scenario")), int(context.node_id))
    if key not in _SETUPS:
        scenario = _scenario(context)
        root = _config(context).get("state-dir") or Path(tempfile.gettempdir()) / f"protofed-node-{context.node_id}"
        _SETUPS[key] = RunSetup(scenario=scenario.resolved(), state_dir=str(root))
    return _SETUPS[key]


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    from .engine.client_app import _train as train

    return train(_setup(context), msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    from .engine.client_app import _evaluate as evaluate

    return evaluate(_setup(context), msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    from .engine.client_app import _query as query

    return query(_setup(context), msg, context)
