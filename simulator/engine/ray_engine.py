"""The Ray engine: Flower's simulation runtime runs each client on a pool of Ray actors."""

from __future__ import annotations

import logging
import os

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from . import determinism


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
    address: str | None = None,
) -> None:
    from flwr.simulation import run_simulation

    quiet_logs(verbose)
    start_ray(verbose, address)
    backend_config = {
        # max_restarts: Ray restarts an actor whose process died, so one crashed client costs
        # one failed reply instead of every later message routed to the dead actor
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client, "max_restarts": -1},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def start_ray(verbose: bool, address: str | None = None) -> None:
    """Start Ray ourselves (Flower's backend then reuses it), so that our SIGTERM handler,
    which ``ray.init`` replaces with one that exits at once, can be put back: an interrupted run
    must write what it finished and shut Ray down."""
    import signal
    import sys
    import threading

    import ray

    if ray.is_initialized():
        return
    handler = signal.getsignal(signal.SIGTERM)
    if not address:
        # a local Ray prestarts one idle worker per CPU; Flower's client actors get workers of
        # their own, so those idle ones only compete with the actors for the CPU while everything
        # starts. Measured on the quickstart: ray.init 2.05 s instead of 2.6-3.5 s. (Ray's own
        # configuration names, read from the environment; a name Ray drops is simply ignored.)
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    pythonpath = os.pathsep.join(sys.path)  # actors import the project as the driver does
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    ray.init(
        address=address,
        # the actors start with the driver's deterministic-kernel environment (simulator/engine/determinism.py)
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **determinism.ray_env()}},
        logging_level=logging.INFO if verbose else logging.ERROR,
        log_to_driver=verbose,
        **({} if address else {"include_dashboard": False}),
    )
    if threading.current_thread() is threading.main_thread() and callable(handler):
        signal.signal(signal.SIGTERM, handler)


def ray_workers(num_cpus_per_client: int) -> int:
    """How many client actors Flower's Ray backend will run at once: the cluster's CPUs over the
    CPUs each client asks for (Ray must be started)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus // max(1, num_cpus_per_client)))
