"""Experiment tracking with real local stores, read back with each library's own reader:
TensorBoard event files (EventAccumulator) and an MLflow sqlite store (MlflowClient)."""

from __future__ import annotations

import importlib
import json

import pandas as pd
import pytest

import protofed
from helpers import tiny

# both are in the test extra: a missing install must fail here, not skip
for _needed in ("tensorboard", "mlflow"):
    importlib.import_module(_needed)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny(output={"save": "none", "tensorboard": True, "mlflow": {"tracking_uri": uri, "experiment": "study"}})
    result = protofed.run(raw, run_dir=root / "run", progress=False)
    return result, uri


def _per_round(result) -> pd.Series:
    m = result.metrics
    return m.dropna(subset=["accuracy"]).groupby("global_round")["accuracy"].mean()


def test_tensorboard_events_hold_every_round_and_the_summary(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = tracked
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"accuracy/avg_seen_tasks", "loss/train", "bytes/up", "bytes/down", "accuracy/task_0"} <= set(tags)
    events = acc.Scalars("accuracy/avg_seen_tasks")
    expected = _per_round(result)
    assert [e.step for e in events] == list(expected.index) == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == pytest.approx(list(expected), abs=1e-6)
    up = result.metrics.groupby("global_round")["bytes_up"].first()
    assert [e.value for e in acc.Scalars("bytes/up")] == pytest.approx(list(up))
    final = acc.Scalars("summary/final_avg_accuracy")[0].value
    assert final == pytest.approx(result.summary["final_avg_accuracy"], abs=1e-6)
    assert any(t.startswith("scenario") for t in acc.Tags()["tensors"]), acc.Tags()  # the scenario as text


def test_mlflow_run_holds_params_metrics_and_summary(tracked):
    from mlflow.tracking import MlflowClient

    result, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("study")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["clients.num_clients"] == "3"
    assert run.data.params["strategy.name"] == "proto_avg"
    assert run.data.params["output.mlflow.experiment"] == "study"
    history = client.get_metric_history(run.info.run_id, "accuracy/avg_seen_tasks")
    expected = _per_round(result)
    assert sorted(m.step for m in history) == list(expected.index)
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in expected.index] == pytest.approx(list(expected), abs=1e-6)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert run.data.metrics["summary.final_avg_accuracy"] == pytest.approx(summary["final_avg_accuracy"])
    assert run.data.metrics["summary.bytes_up"] == summary["bytes_up"]
