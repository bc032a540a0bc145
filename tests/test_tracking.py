"""Experiment tracking with real local stores, read back with each library's own reader:
TensorBoard event files (EventAccumulator) and an MLflow sqlite store (MlflowClient), its
artifacts included. MLflow puts a sqlite store's artifacts in ./mlruns of the working
directory, so every run here works in its temporary folder."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd
import pytest

import protofed
from helpers import interrupt_after_task, tiny
from simulator.engine.runner import run_scenario
from simulator.scenario import validate_scenario

# both are in the test extra: a missing install must fail here, not skip
for _needed in ("tensorboard", "mlflow"):
    importlib.import_module(_needed)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = tiny(output={"save": "none", "tensorboard": True, "mlflow": {"tracking_uri": uri, "experiment": "study"}})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the artifacts' ./mlruns
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


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_mlflow_run_holds_the_plots_summary_matrix_and_config_as_artifacts(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    result, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("study").experiment_id])[0]
    rid = run.info.run_id
    assert {"plots", "summary.json", "accuracy_matrix.csv", "config.yaml"} <= _artifacts(client, rid)
    pngs = sorted(p.name for p in (result.run_dir / "plots").glob("*.png"))
    assert {"forgetting.png", "accuracy_matrix.png"} <= set(pngs)
    plots = _artifacts(client, rid, "plots")
    assert plots == {f"plots/{f.name}" for f in (result.run_dir / "plots").iterdir() if f.is_file()}
    assert {f"plots/{name}" for name in pngs} <= plots
    got = client.download_artifacts(rid, "plots/forgetting.png", str(tmp_path))
    assert Path(got).read_bytes() == (result.run_dir / "plots" / "forgetting.png").read_bytes()
    got = client.download_artifacts(rid, "summary.json", str(tmp_path))
    assert json.loads(Path(got).read_text()) == json.loads((result.run_dir / "summary.json").read_text())
    store = Path(uri.removeprefix("sqlite:///")).parent
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(store)  # not the repository's ./mlruns


def test_mlflow_artifacts_without_plots_and_after_resume(tmp_path, monkeypatch):
    """Plots off: the summary but no plots. Interrupted then resumed: each process is its own
    MLflow run with the files as they were when it ended, the resumed one the final plots."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)

    def scenario(experiment: str):
        return validate_scenario(tiny(output={"save": "none", "mlflow": {"tracking_uri": uri, "experiment": experiment}}))

    run_scenario(scenario("no-plots"), run_dir=tmp_path / "no-plots", plots=False, out=None)
    assert not (tmp_path / "no-plots" / "plots").exists()
    (bare,) = client.search_runs([client.get_experiment_by_name("no-plots").experiment_id])
    assert bare.info.status == "FINISHED"
    assert _artifacts(client, bare.info.run_id) == {"summary.json", "accuracy_matrix.csv", "config.yaml"}

    interrupt_after_task(monkeypatch, lambda: run_scenario(scenario("resumed"), run_dir=tmp_path / "cut", out=None))
    exp_id = client.get_experiment_by_name("resumed").experiment_id
    (first,) = client.search_runs([exp_id])
    assert first.info.status == "FAILED"
    cut_png = client.download_artifacts(first.info.run_id, "plots/forgetting.png", str(tmp_path / "first"))
    assert Path(cut_png).read_bytes() == (tmp_path / "cut" / "plots" / "forgetting.png").read_bytes()

    done = run_scenario(scenario("resumed"), run_dir=tmp_path / "cut", resume=True, out=None)
    assert done.summary["completed"] is True
    runs = {r.info.status: r for r in client.search_runs([exp_id])}
    assert set(runs) == {"FAILED", "FINISHED"}
    rid = runs["FINISHED"].info.run_id
    assert {"plots/forgetting.png", "plots/accuracy_matrix.png"} <= _artifacts(client, rid, "plots")
    png = client.download_artifacts(rid, "plots/accuracy_matrix.png", str(tmp_path / "second"))
    assert Path(png).read_bytes() == (tmp_path / "cut" / "plots" / "accuracy_matrix.png").read_bytes()
    summary = client.download_artifacts(rid, "summary.json", str(tmp_path / "second"))
    assert json.loads(Path(summary).read_text())["completed"] is True
    first_summary = client.download_artifacts(first.info.run_id, "summary.json", str(tmp_path / "first"))
    assert json.loads(Path(first_summary).read_text())["tasks_completed"] == 1
