"""End-to-end runs through Flower: the Ray engine once, the inline engine for the rest."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers import run_tiny

from simulator.results import SUMMARY_KEYS


def run(tmp_path, name, engine="inline", **over):
    return run_tiny(tmp_path, name, engine, **over)


def test_ray_engine_end_to_end_matches_inline(tmp_path):
    ray_out = run(tmp_path, "ray", engine="ray")
    inline_out = run(tmp_path, "inline", engine="inline")
    # same seed -> the identical accuracy matrix on both engines
    np.testing.assert_array_equal(ray_out.matrix, inline_out.matrix)
    assert (tmp_path / "ray" / "accuracy_matrix.csv").read_bytes() == (
        tmp_path / "inline" / "accuracy_matrix.csv"
    ).read_bytes()
    # and the same open-world values (per task and their mean)
    ow = ["open_world_auroc", "open_world_fpr95"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ray" / "metrics.csv")[ow], pd.read_csv(tmp_path / "inline" / "metrics.csv")[ow])
    assert np.isfinite(ray_out.summary["open_world_auroc"])
    assert [ray_out.summary[k] for k in ow] == [inline_out.summary[k] for k in ow]
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["engine"] == "ray" and summary["completed"] is True
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0


def test_run_directory_contents_and_values(tmp_path):
    out = run(tmp_path, "r")
    d = out.run_dir
    for f in ("config.yaml", "metrics.csv", "accuracy_matrix.csv", "summary.json", "clients.csv",
              "plots/forgetting.png", "plots/accuracy_matrix.png"):
        assert (d / f).exists() and (d / f).stat().st_size > 0, f
    m = out.matrix
    assert m.shape == (3, 3)
    assert np.isnan(m[0, 1]) and np.isfinite(m[2, 0])
    assert np.nanmin(m) >= 0 and np.nanmax(m) <= 1
    summary = json.loads((d / "summary.json").read_text())
    # the summary agrees with the matrix (DESIGN §5)
    assert summary["final_avg_accuracy"] == pytest.approx(np.nanmean(m[2]))
    assert summary["avg_incremental_accuracy"] == pytest.approx(np.mean([np.nanmean(m[k, : k + 1]) for k in range(3)]))
    assert summary["local_final_avg_accuracy"] is not None
    metrics = pd.read_csv(d / "metrics.csv")
    assert {"task", "round", "eval_task", "accuracy", "clients_failed", "bytes_up"} <= set(metrics.columns)
    # every round of every task was evaluated (evaluation.every: round)
    assert len(metrics.dropna(subset=["eval_task"])) == sum((k + 1) * 2 for k in range(3))
    # the easy synthetic task is learned: first task well above chance
    assert m[0, 0] > 0.8
    clients = pd.read_csv(d / "clients.csv")
    assert clients.groupby("task")["samples"].sum().tolist() == [64, 64, 64]  # 2 classes x 32 train each


def test_inline_is_deterministic(tmp_path):
    a = run(tmp_path, "a")
    b = run(tmp_path, "b")
    assert (a.run_dir / "accuracy_matrix.csv").read_bytes() == (b.run_dir / "accuracy_matrix.csv").read_bytes()
    c = run(tmp_path, "c", seed=2)
    assert not np.array_equal(a.matrix, c.matrix)


def test_fedavg_and_continual_options_run_and_learn(tmp_path):
    # With the tiny default training (2 rounds x 1 epoch) fedavg's m[0, 0] (16 test samples,
    # chance 0.5) measured 0.50-0.81 over seeds 1-5: 0.8125 at the default seed, one sample above
    # the threshold. 3 x 5 (as the FedSA test's fedavg run): each task's accuracy when it is learned
    # (the diagonal, 48 samples) averages 0.94-1.00 over seeds 1-5;
    # failing 0.8 takes 7 more wrong answers than the worst seed.
    fed = run(tmp_path, "fedavg", strategy={"name": "fedavg", "params": {}},
              training={"rounds_per_task": 3, "local_epochs": 5, "batch_size": 16, "lr": 0.01})
    assert np.diag(fed.matrix).mean() > 0.8, fed.matrix
    frozen = run(
        tmp_path,
        "frozen",
        continual={"backbone": "freeze_after_first_task", "feature_distillation": 1.0, "memory_per_class": 0},
        strategy={"name": "proto_avg", "params": {"share_weights": False}},
    )
    assert np.isfinite(frozen.matrix[2, :3]).all()


def test_fedavg_bytes_exceed_prototype_only_bytes(tmp_path):
    protos = run(tmp_path, "p", strategy={"name": "proto_avg", "params": {"share_weights": False}})
    weights = run(tmp_path, "w", strategy={"name": "fedavg", "params": {}})
    assert weights.summary["bytes_up"] > 10 * protos.summary["bytes_up"]


def test_partial_participation_trains_fewer_clients(tmp_path):
    out = run(tmp_path, "pp", clients__num_clients=4, clients__participation=0.5)
    metrics = pd.read_csv(out.run_dir / "metrics.csv")
    assert set(metrics["clients_trained"]) == {2}
