"""A study starts Ray once for all its runs, and runs ``--parallel N`` of them at once; the
numbers are those of a serial study with a Ray per run, byte for byte.

Real runs of the tiny scenario (one round per task). The Ray cluster of the last test is a real
``ray start --head`` on loopback, started in a session of its own and stopped by that session
only (``ray stop`` would stop every Ray of the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import tiny

import protofed
from simulator.cli import main
from simulator.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
LABELS = ("proto_avg", "local")


def _scenario(tmp_path: Path, engine: str = "inline") -> Path:
    raw = tiny(training={"rounds_per_task": 1, "local_epochs": 1, "batch_size": 16, "lr": 0.01},
               output={"dir": str(tmp_path / "res"), "save": "none"},
               resources={"engine": engine, "state_dir": str(tmp_path / "state")})
    path = tmp_path / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _matrices(out: Path) -> dict[str, bytes]:
    return {label: (out / label / "seed-1" / "accuracy_matrix.csv").read_bytes() for label in LABELS}


def test_parallel_inline_compare_gives_the_serial_numbers(tmp_path, capsys):
    scen = _scenario(tmp_path)
    base = ["compare", str(scen), "--strategies", ",".join(LABELS), "--seeds", "1", "--engine", "inline"]
    assert main([*base, "--out", str(tmp_path / "serial")]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "par"), "--parallel", "2"]) == 0
    text = capsys.readouterr().out
    assert _matrices(tmp_path / "par") == _matrices(tmp_path / "serial")
    # both runs were started before either finished, each in its own process with its own log
    assert text.index("=== run 2/2") < text.index("finished:")
    logs = sorted(p.name for p in (tmp_path / "par" / "logs").glob("*.log"))
    assert len(logs) == 2 and all("protofed · tiny" in (tmp_path / "par" / "logs" / n).read_text() for n in logs)
    df = pd.read_csv(tmp_path / "par" / "comparison.csv")
    assert list(df["status"]) == ["ok", "ok"] and list(df["label"]) == list(LABELS)


def test_a_failed_run_of_a_parallel_study_does_not_stop_the_others(tmp_path, capsys):
    raw = yaml.safe_load(_scenario(tmp_path).read_text())
    raw["compare"] = {"bad": {"name": "local", "set": {"model.pretrained": str(tmp_path / "missing.pt")}}}
    scen = tmp_path / "bad.yaml"
    scen.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    code = main(["compare", str(scen), "--strategies", "bad,local", "--seeds", "1", "--engine", "inline",
                 "--out", str(out), "--parallel", "2"])
    assert code == 1
    df = pd.read_csv(out / "comparison.csv").set_index("label")
    assert df.loc["local", "status"] == "ok" and df.loc["bad", "status"] == "failed"
    assert "model.pretrained" in df.loc["bad", "error"]
    assert str(out / "bad" / "seed-1") in capsys.readouterr().out.split("failed runs", 1)[1]


def test_parallel_must_be_a_positive_number(tmp_path, capsys):
    scen = _scenario(tmp_path)
    assert main(["compare", str(scen), "--strategies", "local", "--parallel", "0"]) == 2
    assert "--parallel" in capsys.readouterr().err
    with pytest.raises(UserError) as err:
        protofed.sweep(scen, {"clients.num_clients": [2, 3]}, "local", parallel="two", out_dir=tmp_path / "sw")
    assert err.value.source == "parallel=" and not (tmp_path / "sw").exists()


def test_one_ray_per_study_gives_the_numbers_of_a_ray_per_run(tmp_path, monkeypatch):
    import ray

    from simulator.study.compare import run_compare

    scen = _scenario(tmp_path, "ray")
    starts: list[str | None] = []
    real_init = ray.init

    def counted(*args, **kwargs):
        starts.append(kwargs.get("address"))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(ray, "init", counted)
    monkeypatch.setenv("PROTOFED_RAY_PER_RUN", "1")  # as before: each run starts and stops its own Ray
    run_compare(str(scen), LABELS, [1], out_dir=str(tmp_path / "per_run"), out=None)
    assert len(starts) == 2
    monkeypatch.delenv("PROTOFED_RAY_PER_RUN")
    df, _ = run_compare(str(scen), LABELS, [1], out_dir=str(tmp_path / "study"), out=None)
    assert len(starts) == 3  # one Ray for the whole study
    assert list(df["status"]) == ["ok", "ok"] and not ray.is_initialized()  # the study shut it down
    assert _matrices(tmp_path / "study") == _matrices(tmp_path / "per_run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, head: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert head.poll() is None, head.stdout.read()[-2000:] if head.stdout else "ray start ended"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise AssertionError("the Ray head did not start")


def test_parallel_runs_on_an_existing_ray_cluster(tmp_path):
    port = _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="pf-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        _wait_for_port(port, head)
        time.sleep(3)  # the raylet registers after the GCS listens
        out = tmp_path / "cluster"
        run = subprocess.run(
            [sys.executable, "-m", "simulator.cli", "compare", str(_scenario(tmp_path, "ray")), "--strategies",
             ",".join(LABELS), "--seeds", "1", "--out", str(out), "--parallel", "2", "--ray-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert run.stdout.index("=== run 2/2") < run.stdout.index("finished:")  # at once
        for label in LABELS:
            config = yaml.safe_load((out / label / "seed-1" / "config.yaml").read_text())
            assert config["resources"]["ray_address"] == f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGINT)  # ray start --block shuts its node down on Ctrl-C
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    # the serial study on the inline engine computes the same numbers (Ray == inline, test_engine.py)
    assert main(["compare", str(_scenario(tmp_path)), "--strategies", ",".join(LABELS), "--seeds", "1",
                 "--engine", "inline", "--out", str(tmp_path / "serial")]) == 0
    assert _matrices(out) == _matrices(tmp_path / "serial")
