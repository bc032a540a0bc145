"""Runs survive Ray's infrastructure dying under them (simulator/engine/retry.py,
simulator/study/supervisor.py): resumed from the last finished task, the same numbers as an
uninterrupted run, each retry recorded; Ray's own logging stays off the terminal."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from simulator.engine import ray_engine, server_app
from simulator.engine.runner import run_scenario
from simulator.errors import RunFailure
from simulator.scenario import validate_scenario
from simulator.study.supervisor import RAY_LOG_LINE, is_ray_noise

REPO = Path(__file__).resolve().parents[1]


def scenario(**resources) -> dict:
    """Small, but each task lasts long enough (3 rounds x 2 epochs) to kill Ray inside it."""
    return {
        "name": "retry",
        "seed": 4,
        "dataset": {"source": "synthetic", "num_classes": 8, "dim": 8, "samples_per_class": 40, "class_sep": 5.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 3, "local_epochs": 2, "batch_size": 8},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "continual": {"memory_per_class": 5, "feature_distillation": 0.5},
        "strategy": {"name": "proto_avg", "params": {"share_weights": True}},
        "resources": {"engine": "ray", **resources},
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of :func:`scenario` on the inline engine: Ray gives the inline
    numbers byte for byte (tests/test_engine.py), so a resumed Ray run must give these too."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_scenario(validate_scenario(scenario()), run_dir=run_dir, plots=False, engine="inline")
    return run_dir


def _ray_workers() -> list[psutil.Process]:
    """This process's Ray worker processes that hold the client actors (Ray names a worker's
    process after its actor: ``ray::ClientAppActor``; its own agents are ``ray::...Agent``)."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::") and "Agent" not in cmd:
            out.append(p)
    return out


def test_workers_killed_mid_task_cost_one_retry_and_the_same_matrix(tmp_path, monkeypatch, reference):
    """Every Ray worker is killed (-9) as the second round of task 2 is sent, and no message is
    sent twice (MAX_DELIVERIES 1), so the whole round is lost: the run is resumed from the end of
    task 1 in a new Ray and ends with the reference's accuracy matrix, byte for byte. Ray does
    not restart the killed actors here (ACTOR_MAX_RESTARTS 0): with restarts, whether a message
    sent just after the kill is lost or waits for the restarted actor depends on how fast Ray
    notices the death (CI saw both)."""
    original = server_app.Delivery.exchange
    killed = []

    def exchange(self, msgs, phase, task, rnd, server_round):
        if phase == "train" and server_round == 5 and not killed:  # task 2 (index 1), round 2
            workers = _ray_workers()
            assert workers, "the Ray engine runs its workers below this process"
            for p in workers:
                p.kill()
            psutil.wait_procs(workers, timeout=30)
            killed.append(len(workers))
        return original(self, msgs, phase, task, rnd, server_round)

    monkeypatch.setattr(server_app.Delivery, "exchange", exchange)
    monkeypatch.setattr(server_app, "MAX_DELIVERIES", 1)
    monkeypatch.setattr(ray_engine, "ACTOR_MAX_RESTARTS", 0)
    out = run_scenario(validate_scenario(scenario()), run_dir=tmp_path / "run", plots=False)
    assert killed
    assert out.summary["completed"] is True and out.summary["retries"] == 1
    failures = pd.read_csv(tmp_path / "run" / "failures.csv")
    infra = failures[failures["kind"] == "infrastructure"]
    assert infra[["task", "attempts", "phase"]].values.tolist() == [[1, 1, "run"]]
    assert "global round 5" in infra["message"].iloc[0]
    assert len(failures) == 1  # the lost round's worker_died rows went with the task that was redone
    assert (tmp_path / "run" / "accuracy_matrix.csv").read_bytes() == (reference / "accuracy_matrix.csv").read_bytes()


def test_an_error_of_the_method_on_ray_is_not_retried(tmp_path, monkeypatch):
    """A strategy that raises is a bug, not a dead cluster: the run fails at once, no retry."""
    from strategies import STRATEGIES

    cls = STRATEGIES["proto_avg"]
    original = cls.aggregate_train

    def broken(self, server_round, replies):
        if server_round == 2:
            raise ValueError("a bug in the strategy")
        return original(self, server_round, replies)

    monkeypatch.setattr(cls, "aggregate_train", broken)
    with pytest.raises(RunFailure, match="a bug in the strategy"):
        run_scenario(validate_scenario(scenario()), run_dir=tmp_path / "run", plots=False)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is False and summary["retries"] == 0
    assert "infrastructure" not in set(pd.read_csv(tmp_path / "run" / "failures.csv")["kind"])


def _run_and_kill_raylet(tmp_path: Path, after: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``protofed run`` (supervised, as a user runs it) whose Ray raylet is killed once a line
    starting with ``after`` is printed; the output as the user's terminal shows it."""
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(scenario()))
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PROTOFED_NO_SUPERVISOR", "PROTOFED_SUPERVISED_STATUS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "run", str(scen), "--out", str(run_dir), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(after):
            break
    raylets = [p for p in psutil.Process(proc.pid).children(recursive=True) if "raylet/raylet" in " ".join(p.cmdline())]
    assert raylets, "".join(seen)
    for p in raylets:
        p.kill()
    out, err = proc.communicate(timeout=400)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + out, err), run_dir


def test_a_killed_raylet_is_survived_by_resuming_the_run(tmp_path, reference):
    """Ray's raylet killed in task 2 ends the run's process (Ray does that); the supervisor
    resumes the run in a new one: one protofed line, exit 0, retries 1, the reference matrix."""
    res, run_dir = _run_and_kill_raylet(tmp_path, "task 2/4 · round 1/")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("protofed: ")]
    # "Ray's raylet died" or, when the GCS is found dead too before the supervisor looks (seen
    # once on a loaded 2-core machine), "Ray's raylet and GCS died": both name the raylet
    assert len(lines) == 1 and re.search(r"raylet( and GCS)? died", lines[0]) and "retry 1 of 2" in lines[0], res.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["retries"] == 1
    infra = pd.read_csv(run_dir / "failures.csv").query("kind == 'infrastructure'")
    assert infra[["task", "attempts"]].values.tolist() == [[1, 1]]
    assert (run_dir / "accuracy_matrix.csv").read_bytes() == (reference / "accuracy_matrix.csv").read_bytes()


def test_ray_dying_in_the_first_task_leaves_a_summary_and_keeps_ray_logs_off_the_terminal(tmp_path):
    """No retries allowed: Ray dies in task 1, the run fails with protofed's message naming
    Ray's log folder; no Ray log line reaches the terminal; summary.json says completed: false."""
    res, run_dir = _run_and_kill_raylet(tmp_path, "task 1/4 · round 1/", "--set", "resources.retries=0")
    assert res.returncode == 1, res.stderr
    terminal = res.stdout + res.stderr
    assert "[state-dump]" not in terminal and "(raylet)" not in terminal
    assert not [ln for ln in terminal.splitlines() if RAY_LOG_LINE.match(ln)], terminal
    assert res.stderr.count("ended by Ray") == 1 and "Traceback" not in res.stderr
    logs = res.stderr.split("Ray's logs: ", 1)[1].split()[0].rstrip(".")
    assert Path(logs).is_dir() and any(Path(logs).glob("raylet*")), logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and summary["tasks_completed"] == 0 and summary["retries"] == 0


def test_ray_log_blocks_are_told_from_protofed_lines():
    """What Ray printed when its raylet or GCS died (captured on this machine, shortened)."""
    ray_lines = [
        "\x1b[33m(raylet)\x1b[0m Raylet is terminated. Termination is unexpected. Last 20 lines of the Raylet logs:",
        "    [state-dump] \tray::rpc::NodeInfoGcsService.grpc_client.RegisterNode - 1 total (0 active)",
        "    [state-dump] ",
        "    [2026-12-04 17:34:32,150 I 8956 8956] (raylet) accessor.cc:453: Received address and liveness notification",
        "",
        "[2026-12-04 17:40:01,002 E 9001 9010] gcs_rpc_client.h:179: Failed to connect to GCS within 60 seconds. "
        "GCS may have been killed. It's either GCS is terminated by `ray stop` or is killed unexpectedly.",
        "    The rest of the message, indented",
        "*** SIGTERM received at time=1733333333 on cpu 1 ***",
        "PC: @     0x7f0000000000  (unknown)  (unknown)",
        "    @     0x7f0000000001        224  (unknown)",
        "2026-12-04 17:40:01,500\tERROR worker.py:421 -- Unhandled error (suppress with 'RAY_IGNORE_UNHANDLED_ERRORS=1')",
    ]
    ours = [
        "task 2/4 · round 1/3 · 3/3 clients · loss 0.739 · acc 0.812 · 0.2s · elapsed 20s · ETA 2s",
        "protofed: Ray's raylet died during task 2 of the run in /tmp/x; resuming it from its last finished task",
        "warning: client 1 failed in the train phase of global round 2 (an error that no fault injection caused; tried 1x): boom",
        "  Traceback (most recent call last):",  # protofed's own indented traceback after its warning
    ]
    state = False
    for line in ray_lines:
        state = is_ray_noise(line + "\n", state)
        assert state, line
    for line in ours:
        state = is_ray_noise(line + "\n", state)
        assert not state, line


def test_a_local_ray_cluster_waits_for_starved_processes_instead_of_giving_them_up():
    """Ray's GCS and raylet of a local cluster run with the patient health checks and GCS
    reconnection time of simulator/engine/ray_engine.py (Ray's defaults declare a node dead
    after about 50 s without an answer, which CPU starvation alone can cause)."""
    import ray

    from simulator.engine.ray_engine import LOCAL_CLUSTER_CONFIG, start_ray

    assert int(LOCAL_CLUSTER_CONFIG["health_check_failure_threshold"]) > 5  # Ray's default
    assert int(LOCAL_CLUSTER_CONFIG["gcs_rpc_server_reconnect_timeout_s"]) > 60  # Ray's default
    start_ray(False)
    try:
        procs = {}
        for p in psutil.Process(os.getpid()).children(recursive=True):
            cmd = " ".join(p.cmdline())
            for name in ("raylet/raylet", "gcs_server"):
                if name in cmd:
                    procs[name] = p.environ()
        assert set(procs) == {"raylet/raylet", "gcs_server"}
        for env in procs.values():
            for key, value in LOCAL_CLUSTER_CONFIG.items():
                assert env.get(f"RAY_{key}") == value, key
    finally:
        ray.shutdown()


def test_a_compare_whose_raylet_dies_resumes_that_run_and_finishes_the_study(tmp_path, reference):
    """The case of the issue: Ray dies under one run of a ``compare``; the study is not lost:
    that run is resumed (retries 1, the uninterrupted matrix) and the next one runs."""
    raw = scenario()
    raw["compare"] = {"shared": {"name": "proto_avg", "params": {"share_weights": True}}}
    scen = tmp_path / "c.yaml"
    scen.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("PROTOFED_NO_SUPERVISOR", "PROTOFED_SUPERVISED_STATUS")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "compare", str(scen), "--strategies", "shared,fedavg", "--seeds", "4", "--out", str(tmp_path / "cmp")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("task 2/4 · round 1/"):
            break
    for p in psutil.Process(proc.pid).children(recursive=True):
        if "raylet/raylet" in " ".join(p.cmdline()):
            p.kill()
    out, err = proc.communicate(timeout=600)
    text = "".join(seen) + out
    assert proc.returncode == 0, text[-3000:] + err[-3000:]
    assert len([ln for ln in text.splitlines() if ln.startswith("protofed: ")]) == 1, text
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert list(table["status"]) == ["ok", "ok"] and list(table["retries"]) == [1, 0]
    first = Path(table["run_dir"][0])
    assert (first / "accuracy_matrix.csv").read_bytes() == (reference / "accuracy_matrix.csv").read_bytes()
