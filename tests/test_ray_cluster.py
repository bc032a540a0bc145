"""The Ray engine connects to an existing Ray cluster (``resources.ray_address``): a real head
node started with ``ray start --head`` on loopback, on a free port, stopped at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_on_an_existing_local_ray_cluster(tmp_path):
    import tempfile

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    start = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        scen = tmp_path / "s.yaml"
        scen.write_text(yaml.safe_dump({
            "name": "cluster",
            "dataset": {"source": "synthetic", "num_classes": 4, "dim": 6, "samples_per_class": 30, "class_sep": 6.0},
            "tasks": {"initial_classes": 2, "classes_per_task": 2},
            "clients": {"num_clients": 3},
            "training": {"rounds_per_task": 1},
            "model": {"backbone": "mlp", "embedding_dim": 8},
            "resources": {"engine": "ray", "state_dir": str(tmp_path / "state")},
        }))
        run = subprocess.run(
            [sys.executable, "-m", "simulator.cli", "run", str(scen), "--out", str(tmp_path / "run"),
             "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["completed"] is True and summary["engine"] == "ray"
        config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert config["resources"]["ray_address"] == f"127.0.0.1:{port}"
        # the client state store lived under resources.state_dir and was cleaned up
        assert (tmp_path / "state").is_dir() and not any((tmp_path / "state").iterdir())
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
