"""The Ray engine: Flower's simulation runtime runs each client on a pool of Ray actors.

A single run starts Ray and shuts it down at its end; the runs of a study share one Ray
(:func:`study_ray`) or, with ``--parallel``, one cluster (:mod:`simulator.study.executor`). Two of
Flower's internals are adjusted for that, only while a study needs it: its Ray backend's
``terminate`` (which would shut Ray down) and its actor pool's size (a share of the cluster).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

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


#: the Ray of a study (:func:`study_ray`): whether a study owns this process's Ray, and the
#: (address, worker environment) it was started with
_STUDY: dict = {"owned": False, "key": None}
STUDY_ADDRESS_ENV = "PROTOFED_STUDY_RAY_ADDRESS"  # the runs of a --parallel study connect here
SHARE_ENV = "PROTOFED_RAY_SHARE"  # how many runs share the cluster at once (--parallel N)
PER_RUN_ENV = "PROTOFED_RAY_PER_RUN"  # 1: every run of a study starts and stops its own Ray (as before)


@contextmanager
def study_ray():
    """A study's runs in this process share one Ray: the first run starts it (or connects to
    ``resources.ray_address``), the following ones reuse it, and it is shut down when the study
    ends. Each run still has its own actors (Flower's pool, terminated at the run's end), state
    and results. ``PROTOFED_RAY_PER_RUN=1``: every run starts and stops its own Ray."""
    if _STUDY["owned"] or os.environ.get(PER_RUN_ENV, "") not in ("", "0"):
        yield
        return
    _STUDY["owned"] = True
    try:
        yield
    finally:
        _STUDY["owned"] = False
        stop_ray()


def stop_ray() -> None:
    """Shut this process's Ray down, if it was started (without importing Ray otherwise)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


@contextmanager
def _keep_study_ray():
    """While a study owns Ray: Flower's Ray backend ends a simulation with ``ray.shutdown()``;
    it then only terminates the run's own actors, and Ray stays up for the next run."""
    if not _STUDY["owned"]:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    original = RayBackend.terminate

    def terminate_actors(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    RayBackend.terminate = terminate_actors  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayBackend.terminate = original  # type: ignore[method-assign]


def study_share() -> int:
    """How many runs of a study use the Ray cluster at once (1 unless ``--parallel``)."""
    try:
        return max(1, int(os.environ.get(SHARE_ENV, "1")))
    except ValueError:
        return 1


@contextmanager
def _shared_pool(share: int):
    """A run of a ``--parallel N`` study gets 1/N of the actors that fit the cluster (at least
    one): Flower sizes a run's actor pool to the whole cluster, and N such pools that only partly
    fit could wait on each other forever. The number of actors never changes results."""
    if share <= 1:
        yield
        return
    from flwr.simulation.ray_transport import ray_actor

    original = ray_actor.pool_size_from_resources

    def shared(client_resources):
        return max(1, original(client_resources) // share)

    ray_actor.pool_size_from_resources = shared
    try:
        yield
    finally:
        ray_actor.pool_size_from_resources = original


# Ray restarts a client actor whose process died this many times (-1: always). A test sets 0 to
# make a killed worker lose every message routed to it: with restarts, a message submitted after
# Ray has noticed the death waits for the restarted actor and succeeds, one submitted before
# fails, and which of the two happens depends on timing (tests/test_ray_retry.py).
ACTOR_MAX_RESTARTS = -1


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
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client, "max_restarts": ACTOR_MAX_RESTARTS},
        "init_args": {
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    try:
        with _keep_study_ray(), _shared_pool(study_share()):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    finally:
        import ray

        if ray.is_initialized() and not _STUDY["owned"]:  # a study's Ray outlives its runs (study_ray)
            ray.shutdown()


def start_ray(verbose: bool, address: str | None = None) -> None:
    """Start Ray ourselves (Flower's backend then reuses it), so that our SIGTERM handler,
    which ``ray.init`` replaces with one that exits at once, can be put back: an interrupted run
    must write what it finished and shut Ray down."""
    import signal
    import sys
    import threading

    import ray

    address = address or os.environ.get(STUDY_ADDRESS_ENV) or None  # a --parallel study's cluster
    key = (address, tuple(sorted(determinism.ray_env().items())))
    if ray.is_initialized():
        if _STUDY["key"] in (None, key):
            return
        ray.shutdown()  # a run of the study asks for other settings (e.g. resources.deterministic)
    _STUDY["key"] = key
    handler = signal.getsignal(signal.SIGTERM)
    if not address:
        # a local Ray prestarts one idle worker per CPU; Flower's client actors get workers of
        # their own, so those idle ones only compete with the actors for the CPU while everything
        # starts. Measured on the quickstart: ray.init 2.05 s instead of 2.6-3.5 s. (Ray's own
        # configuration names, read from the environment; a name Ray drops is simply ignored.)
        os.environ.setdefault("RAY_enable_worker_prestart", "0")
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        for name, value in LOCAL_CLUSTER_CONFIG.items():  # read by the GCS, the raylet and every worker
            os.environ.setdefault(f"RAY_{name}", value)
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
    global _LAST_LOG_DIR
    from ..study.supervisor import report_ray_logs

    _LAST_LOG_DIR = ray_log_dir()
    report_ray_logs(_LAST_LOG_DIR)


_LAST_LOG_DIR: str | None = None


def last_log_dir() -> str | None:
    """Ray's log folder of the Ray this process started last (kept after ``ray.shutdown``)."""
    return _LAST_LOG_DIR


#: Ray's timeouts for a local single-node cluster. Ray's defaults are made for clusters of many
#: machines, where a node that does not answer for a while should be given up: the GCS checks
#: each raylet every 3 s and declares its node dead after 5 checks failed (10 s each), and a
#: process that loses the GCS exits after 60 s ("Failed to connect to GCS within 60 seconds").
#: On one machine a process that does not answer is starved of CPU (other jobs, the run's own
#: actors), not gone, and giving up on it kills the whole run ("Owner's node has crashed"). A
#: process that really died is noticed at once anyway (its socket closes). So: checks every
#: 10 s, 60 s each, 30 failures (several minutes of silence) before the node counts as dead;
#: 5 minutes to reach the GCS again and for a starting worker to register. (Ray's names, read
#: from the environment, which a user's own RAY_... setting overrides.)
LOCAL_CLUSTER_CONFIG = {
    "health_check_period_ms": "10000",
    "health_check_timeout_ms": "60000",
    "health_check_failure_threshold": "30",
    "gcs_rpc_server_reconnect_timeout_s": "300",
    "worker_register_timeout_seconds": "300",
}


def ray_log_dir() -> str | None:
    """The folder of this Ray session's logs (Ray's own processes and this driver's), where
    Ray's messages stay unless ``--verbose``; None when Ray is not started here."""
    try:
        import ray

        node = ray._private.worker._global_node  # noqa: SLF001 - Ray has no public accessor for it
        return str(node.get_logs_dir_path()) if node is not None else None
    except Exception:
        return None


def ray_workers(num_cpus_per_client: int) -> int:
    """How many client actors Flower's Ray backend will run at once: the cluster's CPUs over the
    CPUs each client asks for (Ray must be started)."""
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return max(1, int(cpus // max(1, num_cpus_per_client)) // study_share())
