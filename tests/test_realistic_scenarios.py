"""Heterogeneity options: each test checks the property the option promises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from simulator.data.schedule import ABSENT, STALE, build_schedule
from simulator.data.stream import build_stream
from simulator.engine.runner import run_scenario
from simulator.errors import UserError
from simulator.metrics import summarize, summarize_any, summarize_asynchronous
from simulator.scenario import validate_scenario
from strategies import RunInfo
from strategies.proto_avg import ProtoAvg


def base(**clients) -> dict:
    return {
        "name": "real",
        "seed": 2,
        "dataset": {"source": "synthetic", "num_classes": 8, "dim": 8, "samples_per_class": 40, "class_sep": 6.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 6, "partition": {"scheme": "iid"}, **clients},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "continual": {"memory_per_class": 5},
        "strategy": {"name": "proto_avg", "params": {"share_weights": True}},
        "evaluation": {"every": "task"},
        "resources": {"engine": "inline"},
    }


def test_per_client_task_orders_differ_and_are_permutations():
    sc = validate_scenario(base(task_order="per_client", num_clients=8))
    sched = build_schedule(sc.clients, 4, sc.seed)
    for row in sched:
        assert sorted(row.tolist()) == [0, 1, 2, 3]
    assert len({tuple(r) for r in sched.tolist()}) > 1
    shared = build_schedule(validate_scenario(base()).clients, 4, 0)
    assert (shared == np.arange(4)).all()


def test_late_joiners_get_nothing_before_arrival(tmp_path):
    raw = base(arrival={"at_task": [0, 0, 0, 1, 2, 3]})
    sc = validate_scenario(raw)
    stream = build_stream(sc)
    for client, join in enumerate([0, 0, 0, 1, 2, 3]):
        assert all(stream.task_at(client, s) == ABSENT for s in range(join))
        for t in range(join):  # no samples of tasks before the arrival
            assert len(stream.train_indices[t][client]) == 0
    out = run_scenario(sc, run_dir=tmp_path / "late")
    cm = pd.read_csv(tmp_path / "late" / "client_metrics.csv")
    for client, join in enumerate([0, 0, 0, 1, 2, 3]):
        assert cm[(cm["client"] == client) & (cm["task"] < join)].empty  # not even evaluated
    m = pd.read_csv(tmp_path / "late" / "metrics.csv").drop_duplicates("global_round")
    assert m.groupby("task")["clients_trained"].max().tolist() == [3, 4, 5, 6]
    assert out.summary["completed"]
    assert (tmp_path / "late" / "plots" / "clients.png").stat().st_size > 0


def test_initial_fraction_and_stale_fraction():
    sc = validate_scenario(base(num_clients=12, arrival={"initial_fraction": 0.5, "stale_fraction": 0.25}))
    sched = build_schedule(sc.clients, 4, sc.seed)
    assert (sched[:, 0] >= 0).sum() == 6  # half present from the start
    joined = (sched != ABSENT).sum(axis=0)
    assert joined.tolist() == [6, 8, 10, 12]  # the rest join in equal groups
    for step in range(1, 4):
        old = int((sched[:, :step] != ABSENT).any(axis=1).sum())
        assert (sched[:, step] == STALE).sum() == round(0.25 * old)


def test_realised_participation_matches_configuration():
    run = RunInfo(seed=1, participation=0.3, num_classes=4, embedding_dim=2, partitions={i: i + 10 for i in range(20)})
    strat = ProtoAvg(ProtoAvg.Params(), run)
    rounds = 400
    counts = np.zeros(20)
    for r in range(1, rounds + 1):
        picked = strat.sample(r)
        assert len(picked) == 6
        counts[picked] += 1
    freq = counts / rounds
    sigma = np.sqrt(0.3 * 0.7 / rounds)
    assert np.all(np.abs(freq - 0.3) < 4.5 * sigma)  # each client sampled at the configured rate
    strat.available = [0, 1, 2, 3]
    assert set(strat.sample(1)) <= {0, 1, 2, 3}  # only present clients


def test_model_heterogeneity_assigns_different_architectures(tmp_path):
    raw = base()
    raw["model"] = {"backbone": ["mlp", "cnn1d"], "embedding_dim": 16}
    raw["strategy"] = {"name": "fedproto", "params": {}}
    sc = validate_scenario(raw)
    from simulator.engine.runtime import RunSetup, Runtime, write_stream

    state = tmp_path / "state"
    state.mkdir()
    write_stream(build_stream(sc), state)
    rt = Runtime(RunSetup(sc.resolved(), str(state)))
    sizes = [sum(p.numel() for p in rt.new_model(c).parameters()) for c in range(4)]
    assert sizes[0] == sizes[2] and sizes[1] == sizes[3] and sizes[0] != sizes[1]
    assert type(rt.new_model(0).backbone).__name__ == "MLP" and type(rt.new_model(1).backbone).__name__ == "CNN1D"
    out = run_scenario(sc, run_dir=tmp_path / "het")
    assert out.summary["completed"] and np.isfinite(out.matrix[-1]).all()


@pytest.mark.parametrize("strategy", [{"name": "fedavg"}, {"name": "finetune"}, {"name": "fpl"}, {"name": "proto_avg", "params": {"share_weights": True}}])
def test_weight_averaging_refuses_mixed_backbones(strategy):
    raw = base()
    raw["model"] = {"backbone": {"mlp": [0, 1, 2], "cnn1d": [3, 4, 5]}, "embedding_dim": 16}
    raw["strategy"] = strategy
    with pytest.raises(UserError) as err:
        validate_scenario(raw)
    assert "averages model weights" in err.value.render() and "model.backbone" in err.value.render()


def test_asynchronous_metrics_by_hand():
    nan = np.nan
    a = np.array([[nan, 0.5, 0.7], [0.6, 0.4, nan], [0.5, 0.6, 0.8]])
    s = summarize_asynchronous(a)
    assert s["final_avg_accuracy"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    assert s["avg_incremental_accuracy"] == pytest.approx(np.mean([0.6, 0.5, (0.5 + 0.6 + 0.8) / 3]))
    # forgetting: task 0 max(0.6) - 0.5; task 1 max(0.5, 0.4) - 0.6; task 2 max(0.7) - 0.8
    assert s["avg_forgetting"] == pytest.approx(np.mean([0.1, -0.1, -0.1]))
    # BWT against the first evaluation: task 0 first at row 1, tasks 1 and 2 at row 0
    assert s["bwt"] == pytest.approx(np.mean([0.5 - 0.6, 0.6 - 0.5, 0.8 - 0.7]))
    tri = np.array([[0.9, nan, nan], [0.7, 0.8, nan], [0.6, 0.5, 0.9]])
    assert summarize_asynchronous(tri) == pytest.approx(summarize(tri))
    assert summarize_any(tri) == pytest.approx(summarize(tri))


def test_asynchronous_run_records_options_in_config(tmp_path):
    raw = base(task_order="per_client", dropout=0.1, participation=0.5, arrival={"initial_fraction": 0.5})
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / "async")
    cfg = yaml.safe_load((tmp_path / "async" / "config.yaml").read_text())
    assert cfg["clients"]["task_order"] == "per_client"
    assert cfg["clients"]["arrival"]["initial_fraction"] == 0.5
    assert cfg["clients"]["dropout"] == 0.1 and cfg["clients"]["participation"] == 0.5
    assert out.summary["completed"] and np.isfinite(out.summary["final_avg_accuracy"])
    clients = pd.read_csv(tmp_path / "async" / "clients.csv")
    assert {"task", "client", "step", "samples", "classes"} <= set(clients.columns)
