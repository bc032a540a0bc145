"""The Ray engine: Flower's simulation runtime runs each client on a pool of Ray actors."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp


def quiet_logs(verbose: bool) -> None:
    """Telemetry off; Flower's logger quiet unless ``--verbose`` (client failures are reported
    by protofed itself, per round)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    level = logging.INFO if verbose else logging.CRITICAL
    logging.getLogger("flwr").setLevel(level)


def run_ray(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    num_cpus_per_client: int,
    num_gpus_per_client: float,
    verbose: bool = False,
) -> None:
    from flwr.simulation import run_simulation

    quiet_logs(verbose)
    backend_config = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config=backend_config,
        verbose_logging=verbose,
    )
