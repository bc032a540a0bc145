"""Per-phase timing (simulator/engine/profile.py): the client handlers' phases travel in their
replies, the driver's phases in profile.json, and ``protofed bench`` puts both engines' breakdown
into bench.json. No timing thresholds: only presence, signs, sums and unchanged outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import run_tiny, tiny
from simulator.engine.inline import InlineGrid
from simulator.engine.profile import DRIVER_PHASES, EVALUATE_PHASES, PREFIX, PROFILE_FILE, TRAIN_PHASES, PhaseTimer
from simulator.records import METRICS, payload_bytes

METRICS_COLUMNS = [
    "task", "round", "global_round", "clients_trained", "clients_failed", "clients_failed_injected",
    "clients_failed_unexpected", "clients_idle", "clients_evaluated", "clients_eval_failed", "train_loss",
    "bytes_up", "bytes_down", "seconds", "train_seconds", "client_seconds", "max_client_seconds", "eval_seconds",
    "context_state_bytes", "eval_task", "accuracy", "local_accuracy", "open_world_auroc", "open_world_fpr95",
]
CLIENT_METRICS_COLUMNS = ["task", "round", "global_round", "client", "eval_task", "accuracy", "local_accuracy"]


def test_phase_timer_is_exclusive_and_laps_continue_from_the_last_boundary():
    timer = PhaseTimer()
    with timer.phase("outer"):
        with timer.phase("inner"):
            sum(range(10_000))
        sum(range(10_000))
    timer.lap("after")
    assert set(timer.seconds) == {"outer", "inner", "after"}
    assert all(v >= 0 for v in timer.seconds.values())


@pytest.fixture
def replies(monkeypatch):
    """Every reply the inline grid hands back to the server loop (the real replies, kept)."""
    kept = []
    original = InlineGrid.send_and_receive

    def keep(self, messages, **kwargs):
        out = list(original(self, messages, **kwargs))
        kept.extend(out)
        return out

    monkeypatch.setattr(InlineGrid, "send_and_receive", keep)
    return kept


def test_client_phases_are_present_non_negative_and_within_compute_seconds(tmp_path, replies):
    run_tiny(tmp_path, "run", continual__feature_distillation=0.5)
    timed = [r for r in replies if r.has_content() and "compute_seconds" in r.content[METRICS]]
    kinds = {"train": 0, "evaluate": 0}
    for r in timed:
        m = r.content[METRICS]
        kind = "evaluate" if "correct" in m else "train"
        kinds[kind] += 1
        phases = {k[len(PREFIX):]: float(v) for k, v in m.items() if k.startswith(PREFIX)}
        expected = TRAIN_PHASES if kind == "train" else EVALUATE_PHASES
        assert set(phases) == set(expected), (kind, sorted(phases))
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) <= float(m["compute_seconds"])
    assert kinds["train"] > 0 and kinds["evaluate"] > 0

    profile = json.loads((tmp_path / "run" / PROFILE_FILE).read_text())
    assert profile["engine"] == "inline"
    assert profile["client_calls"] == kinds
    for kind in ("train", "evaluate"):  # the file sums what the replies carried
        from_replies = sum(float(r.content[METRICS][PREFIX + "state_load"]) for r in timed
                           if ("correct" in r.content[METRICS]) == (kind == "evaluate"))
        assert profile[f"client_{kind}"]["state_load"] == pytest.approx(from_replies)
    assert set(DRIVER_PHASES) <= set(profile["driver"])
    assert all(v >= 0 for v in profile["driver"].values())
    assert profile["driver"]["ray_init"] == 0.0
    assert sum(profile["driver"].values()) <= profile["wall_seconds"]
    assert len(profile["rounds"]) == 3 * 2  # every global round, with its own phases
    parts = profile["task_end_writes_parts"]  # where the end-of-task writes go, within their total
    assert {"results", "tracking", "strategy_state", "checkpoint", "final_state"} <= set(parts)
    assert sum(parts.values()) <= profile["driver"]["task_end_writes"] + 1e-6


def test_profile_changes_no_existing_output(tmp_path, replies):
    out = run_tiny(tmp_path, "run")
    run_dir = tmp_path / "run"
    assert list(pd.read_csv(run_dir / "metrics.csv").columns) == METRICS_COLUMNS
    assert list(pd.read_csv(run_dir / "client_metrics.csv").columns) == CLIENT_METRICS_COLUMNS
    assert not any("profile" in k for k in out.summary)
    # the phase figures are bookkeeping: they are not counted as communicated bytes
    for r in replies:
        if r.has_content() and METRICS in r.content and any(k.startswith(PREFIX) for k in r.content[METRICS]):
            before = payload_bytes(r.content)
            for k in [k for k in r.content[METRICS] if k.startswith(PREFIX)]:
                del r.content[METRICS][k]
            assert payload_bytes(r.content) == before


def test_bench_writes_the_profile_of_both_engines(tmp_path):
    from simulator.study.bench import run_bench
    from simulator.scenario import validate_scenario

    raw = tiny(tasks__initial_classes=3, tasks__classes_per_task=3, training__rounds_per_task=1)
    result = run_bench(validate_scenario(raw), source="tiny.yaml", out_dir=tmp_path / "bench", out=None)
    written = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert written["matrices_identical"] is True
    profile = written["profile"]
    assert set(profile) == {"inline", "ray"}
    for engine, flat in profile.items():
        driver = {k: v for k, v in flat.items() if k.startswith("driver.")}
        assert {f"driver.{p}" for p in DRIVER_PHASES} <= set(driver)
        assert all(v >= 0 for v in driver.values())
        assert flat["wall"] == pytest.approx(result["engines"][engine]["wall_seconds"])
        assert flat["engine_overhead"] >= 0
        assert sum(driver.values()) + flat["engine_overhead"] == pytest.approx(flat["wall"])
        for p in TRAIN_PHASES:
            assert flat[f"client.train.{p}"] >= 0
        for p in EVALUATE_PHASES:
            assert flat[f"client.evaluate.{p}"] >= 0
        assert result["engines"][engine]["client_calls"]["train"] > 0
    for engine in ("inline", "ray"):  # CPU seconds per kind of process
        cpu = result["engines"][engine]["cpu_seconds"]
        assert set(cpu) == {"driver", "ray_workers", "ray_system", "ray_worker_processes"} and cpu["driver"] > 0
    assert result["engines"]["inline"]["cpu_seconds"]["ray_workers"] == 0.0
    assert result["engines"]["ray"]["cpu_seconds"]["ray_workers"] > 0.0
    # only the Ray engine starts Ray
    assert profile["inline"]["driver.ray_init"] == 0.0 and profile["ray"]["driver.ray_init"] > 0.0
    # memory: PSS counts pages shared by the processes once, so it never exceeds the RSS sum
    import sys as _sys

    if _sys.platform.startswith("linux"):
        for engine in ("inline", "ray"):
            figs = result["engines"][engine]
            assert 0 < figs["peak_pss_bytes"] <= figs["peak_rss_bytes"]
        assert written["ray_peak_pss_bytes"] == result["engines"]["ray"]["peak_pss_bytes"]


def test_gpu_device_check_says_clearly_when_there_is_no_gpu(tmp_path):
    """docs/gpu_device_check.py runs the GPU bench on a GPU machine; without CUDA it exits 3 with
    a one-line reason and runs nothing."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():  # on a GPU machine the script itself is the check
        pytest.skip("a CUDA GPU is present: run docs/gpu_device_check.py instead")
    script = Path(__file__).resolve().parents[1] / "docs" / "gpu_device_check.py"
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "g")], capture_output=True, text=True)
    assert done.returncode == 3
    assert "no CUDA GPU" in done.stderr and "nothing was run" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "g").exists()
