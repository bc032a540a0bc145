"""Shared by the test modules: a tiny, fast scenario (synthetic data, an MLP, 3 clients,
3 tasks) and a one-call inline run of it."""

from __future__ import annotations

from pathlib import Path

from simulator.engine.runner import RunOutcome, run_scenario
from simulator.scenario import validate_scenario


def tiny(**over) -> dict:
    """The tiny scenario as a raw mapping; ``section__key=value`` overrides nested keys and
    ``section=value`` replaces a whole section."""
    raw = {
        "name": "tiny",
        "seed": 1,
        "dataset": {"source": "synthetic", "num_classes": 6, "dim": 8, "samples_per_class": 40, "class_sep": 6.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.01},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "continual": {"memory_per_class": 5},
        "strategy": {"name": "proto_avg", "params": {"share_weights": True}},
        "resources": {"engine": "inline"},
    }
    for key, value in over.items():
        node = raw
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def write_tiny(tmp_path: Path, name: str = "s.yaml", **over) -> Path:
    """The tiny scenario with ``over`` as a YAML file (for the CLI and file-based checks)."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny(**over)))
    return path


def run_tiny(tmp_path: Path, name: str, engine: str = "inline", **over) -> RunOutcome:
    return run_scenario(validate_scenario(tiny(**over)), run_dir=tmp_path / name, engine=engine, out=None)


def run_info(n_clients: int = 3, dim: int = 4, seed: int = 0, num_classes: int = 10):
    """What the engine tells a strategy, for ``n_clients`` clients on nodes 1..n."""
    from strategies import RunInfo

    return RunInfo(seed=seed, participation=1.0, num_classes=num_classes, embedding_dim=dim,
                   partitions={i: i + 1 for i in range(n_clients)})


def reply(pid: int, arrays: dict, counts: list[int], n: int):
    """A client's training reply as the engine would receive it: uploaded arrays, and metrics
    with the partition id, sample count, loss and prototype counts."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from simulator.records import METRICS, UPLOAD

    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=pid + 1, message_type="train")
    metrics = MetricRecord({"partition_id": pid, "num_examples": n, "train_loss": 0.5, "proto.counts": counts})
    return Message(RecordDict({UPLOAD: ArrayRecord(arrays), METRICS: metrics}), reply_to=request)


def interrupted_then_resumed(raw: dict, tmp_path: Path, monkeypatch, stop_after_task: int = 1, **run_kw):
    """Run ``raw`` once straight through (``tmp_path/full``) and once interrupted right after the
    checkpoint of ``stop_after_task`` then resumed (``tmp_path/cut``); returns (full, resumed)."""
    import json

    full = run_scenario(validate_scenario(raw), run_dir=tmp_path / "full", **run_kw)
    interrupt_after_task(monkeypatch, lambda: run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut", **run_kw),
                         stop_after_task)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["tasks_completed"] == stop_after_task + 1
    resumed = run_scenario(validate_scenario(raw), run_dir=tmp_path / "cut", resume=True, **run_kw)
    return full, resumed


def interrupt_after_task(monkeypatch, start_run, stop_after_task: int = 0) -> None:
    """Call ``start_run()`` and stop it (KeyboardInterrupt, as Ctrl-C) right after the checkpoint
    of task ``stop_after_task`` is written; checkpoints work normally again afterwards."""
    import pytest

    import simulator.engine.checkpoint as checkpoint

    original = checkpoint.save_checkpoint

    def save_then_stop(run_dir, task, *args, **kwargs):
        original(run_dir, task, *args, **kwargs)
        if task == stop_after_task:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        start_run()
    monkeypatch.setattr(checkpoint, "save_checkpoint", original)
