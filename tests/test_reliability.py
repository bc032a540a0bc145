"""Resume at task boundaries, interruption, client faults, non-finite losses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import simulator.engine.checkpoint as checkpoint
from simulator.engine.runner import run_scenario
from simulator.errors import RunFailure
from simulator.scenario import validate_scenario

REPO = Path(__file__).resolve().parents[1]


def tiny(**over) -> dict:
    raw = {
        "name": "rel",
        "seed": 4,
        "dataset": {"source": "synthetic", "num_classes": 8, "dim": 8, "samples_per_class": 40, "class_sep": 5.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "continual": {"memory_per_class": 5, "feature_distillation": 0.5},
        "strategy": {"name": "proto_avg", "params": {"share_weights": True}},
        "resources": {"engine": "inline"},
    }
    raw.update(over)
    return raw


@pytest.mark.parametrize("strategy", ["proto_avg", "fedavg"])
def test_resume_after_interruption_gives_the_same_matrix(tmp_path, monkeypatch, strategy):
    raw = tiny(strategy={"name": strategy, "params": {}})
    full = run_scenario(validate_scenario(raw), run_dir=tmp_path / "full")

    original = checkpoint.save_checkpoint

    def save_then_stop(run_dir, task, *args, **kwargs):
        original(run_dir, task, *args, **kwargs)
        if task == 1:  # interrupted right after the second task
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut")
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["completed"] is False and summary["tasks_completed"] == 2
    assert checkpoint.has_checkpoint(tmp_path / "cut")

    resumed = run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut", resume=True)
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
    assert (tmp_path / "cut" / "accuracy_matrix.csv").read_bytes() == (tmp_path / "full" / "accuracy_matrix.csv").read_bytes()
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["completed"] is True
    assert not checkpoint.has_checkpoint(tmp_path / "cut")  # removed once complete
    m_full = pd.read_csv(tmp_path / "full" / "metrics.csv")
    m_cut = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    timing = [c for c in m_full.columns if c.endswith("seconds")]
    pd.testing.assert_frame_equal(m_full.drop(columns=timing), m_cut.drop(columns=timing))


def test_injected_faults_and_dropout_are_survived_and_recorded(tmp_path):
    raw = tiny()
    raw["clients"] = dict(raw["clients"], dropout=0.3, fault_injection=[{"client": 1, "round": 2, "mode": "raise"}])
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / "f")
    metrics = pd.read_csv(tmp_path / "f" / "metrics.csv").drop_duplicates("global_round")
    assert out.summary["completed"] is True
    assert metrics["clients_failed"].sum() > 0
    assert (metrics["clients_failed"] + metrics["clients_trained"] == 3).all()
    assert metrics.loc[metrics["global_round"] == 2, "clients_failed"].iloc[0] >= 1


def test_dropout_rate_matches_configuration(tmp_path):
    raw = tiny()
    raw["clients"] = dict(raw["clients"], num_clients=10, dropout=0.25, partition={"scheme": "iid"})
    raw["dataset"] = dict(raw["dataset"], samples_per_class=60)
    raw["training"] = dict(raw["training"], rounds_per_task=6)
    raw["evaluation"] = {"every": "task"}
    run_scenario(validate_scenario(raw), run_dir=tmp_path / "d")
    m = pd.read_csv(tmp_path / "d" / "metrics.csv").drop_duplicates("global_round")
    rate = m["clients_failed"].sum() / (10 * len(m))  # 240 client-rounds
    assert abs(rate - 0.25) < 3 * np.sqrt(0.25 * 0.75 / (10 * len(m)))


def test_every_client_failing_keeps_global_state(tmp_path):
    raw = tiny()
    raw["clients"] = dict(raw["clients"], fault_injection=[{"client": c, "round": 3, "mode": "raise"} for c in range(3)])
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / "all")
    m = pd.read_csv(tmp_path / "all" / "metrics.csv").drop_duplicates("global_round")
    assert m.loc[m["global_round"] == 3, "clients_trained"].iloc[0] == 0
    assert out.summary["completed"] is True and np.isfinite(out.matrix[-1, 0])


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    raw = tiny(training={"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16, "lr": 100.0, "grad_clip": 0.0})
    with pytest.raises(RunFailure) as err:
        run_scenario(validate_scenario(raw), run_dir=tmp_path / "nan")
    text = str(err.value)
    assert "client" in text and "task" in text and "round" in text and "training.lr" in text
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["completed"] is False


def _alive(pids: set[int]) -> set[int]:
    """The processes of ``pids`` that still run (zombies count as gone)."""
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_sigterm_keeps_finished_tasks_and_leaves_no_ray_process(tmp_path):
    """Only this run's own processes are watched (the driver's descendants: Ray's raylet, GCS
    and workers), so another Ray run on the same machine does not matter."""
    import psutil

    # ten rounds a task: after the line the test waits for, 29 rounds (several seconds) are left,
    # so the signal lands mid-run even when a loaded machine is slow to pass the line on (with 3
    # rounds, 8 rounds of 0.3 s were left, and a CI run once finished before the signal came)
    raw = tiny(resources={"engine": "ray"}, training={"rounds_per_task": 10, "local_epochs": 1, "batch_size": 8})
    raw["tasks"] = {"initial_classes": 2, "classes_per_task": 1}
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "run", str(scen), "--out", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    deadline = time.time() + 240
    for line in proc.stdout:  # wait until the second task has finished
        if line.startswith("task 3/"):
            break
        assert time.time() < deadline
    ours = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    assert ours, "the Ray engine runs its processes below the driver"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 143, f"exit code {rc} (0: the run had finished before the signal reached it)\n{err}"
    assert f"--resume {run_dir}" in err  # the real path, not a placeholder
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and summary["tasks_completed"] >= 2
    assert checkpoint.has_checkpoint(run_dir)
    deadline = time.time() + 60  # Ray's processes exit on their own schedule once told to
    while _alive(ours) and time.time() < deadline:
        time.sleep(0.5)
    assert _alive(ours) == set()
    # and the interrupted run can be resumed to completion from the command line
    res = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "--resume", str(run_dir), "--engine", "inline"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["completed"] is True


def test_ray_worker_death_is_survived(tmp_path):
    """A client that kills its Ray worker process mid-round (os._exit) costs one failed reply,
    counted as injected. Messages of other clients that the dead or restarting worker lost are
    delivered again, so they never count as failures, however busy the machine is."""
    raw = tiny(resources={"engine": "ray"})
    raw["clients"] = dict(raw["clients"], fault_injection=[{"client": 1, "round": 2, "mode": "exit"}])
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / "die")
    m = pd.read_csv(tmp_path / "die" / "metrics.csv").drop_duplicates("global_round")
    assert out.summary["completed"] is True
    assert m.loc[m["global_round"] == 2, "clients_failed"].iloc[0] == 1
    assert m.loc[m["global_round"] != 2, "clients_failed"].sum() == 0  # the worker came back
    failures = pd.read_csv(tmp_path / "die" / "failures.csv")
    assert failures[["global_round", "client", "kind"]].values.tolist() == [[2, 1, "injected"]]
    assert out.summary["clients_failed_unexpected"] == 0
    assert np.isfinite(out.matrix[-1, 0])


def test_compare_is_resumable(tmp_path):
    from simulator.study.compare import run_compare

    scen = tmp_path / "c.yaml"
    raw = tiny()
    raw["compare"] = {"shared": {"name": "proto_avg", "params": {"share_weights": True}}}
    scen.write_text(yaml.safe_dump(raw))
    df1, root = run_compare(str(scen), ["proto_avg", "shared"], [0], out_dir=str(tmp_path / "cmp"), out=None)
    assert list(df1["status"]) == ["ok", "ok"]
    df2, _ = run_compare(str(scen), ["proto_avg", "shared"], [0, 1], out_dir=str(tmp_path / "cmp"), out=None)
    assert list(df2["status"]) == ["kept", "ok", "kept", "ok"]  # finished runs are not run again
    assert (root / "comparison.png").exists() and (root / "forgetting_curves.png").exists()


def test_ray_dying_under_a_run_ends_with_one_message_and_keeps_finished_tasks(tmp_path):
    """Killing Ray's raylet makes Ray end the driver process on the spot; the supervised
    command still ends like any error once its retries are spent (none here: with retries the
    run is resumed, tests/test_ray_retry.py): one protofed message, exit 1, the finished tasks and
    a summary with completed: false on disk, no Ray process of the run left behind."""
    import psutil

    raw = tiny(resources={"engine": "ray", "retries": 0}, training={"rounds_per_task": 3, "local_epochs": 2, "batch_size": 8})
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "run", str(scen), "--out", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )
    seen = []
    for line in proc.stdout:  # the first task is finished once the second one trains
        seen.append(line)
        if line.startswith("task 2/"):
            break
    ours = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    raylets = [p for p in psutil.Process(proc.pid).children(recursive=True) if "raylet" in " ".join(p.cmdline())]
    assert raylets, "".join(seen)
    for p in raylets:
        p.kill()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.count("ended by Ray") == 1 and "Traceback" not in err and str(run_dir) in err
    assert "[state-dump]" not in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and summary["tasks_completed"] >= 1
    deadline = time.time() + 60
    while _alive(ours) and time.time() < deadline:
        time.sleep(0.5)
    assert _alive(ours) == set()


def test_checkpoint_links_keep_the_state_of_their_task(tmp_path):
    """Checkpoints hard-link the client state files (copying them cost seconds per task at
    1,000 clients); a later save of a client must not reach into the checkpoint."""
    import torch

    from simulator.engine.checkpoint import load_checkpoint, save_checkpoint
    from simulator.engine.state_store import ClientStateStore

    store = ClientStateStore(tmp_path / "state" / "clients")
    store.save(3, {"w": torch.zeros(2)})
    save_checkpoint(tmp_path / "run", 0, {}, {}, store.root)
    store.save(3, {"w": torch.ones(2)})  # the next task's state
    restored = tmp_path / "restored"
    load_checkpoint(tmp_path / "run", restored)
    assert torch.equal(ClientStateStore(restored).load(3)["w"], torch.zeros(2))
    assert torch.equal(store.load(3)["w"], torch.ones(2))
