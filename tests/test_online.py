"""tasks.online: each client's task data is a stream seen once (simulator/data/online.py)."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
from helpers import tiny

from simulator.data import online
from simulator.engine.runner import run_scenario
from simulator.errors import UserError
from simulator.metrics import anytime_accuracy
from simulator.scenario import validate_scenario

ONLINE = {"batch_size": 4, "communicate_every": 2}


def test_round_slices_cut_one_seeded_order_into_disjoint_pieces():
    idx = np.arange(100, 137)
    slices = [online.round_slice(idx, 3, client=1, task=2, rnd=r, batch_size=4, every=2) for r in range(6)]
    assert [len(s) for s in slices] == [8, 8, 8, 8, 5, 0]
    joined = np.concatenate(slices)
    assert sorted(joined.tolist()) == idx.tolist()  # every sample once
    assert np.array_equal(joined, online.stream_order(idx, 3, 1, 2))
    assert np.array_equal(online.seen_part(idx, 3, 1, 2, rounds=2, batch_size=4, every=2), joined[:16])
    assert not np.array_equal(online.stream_order(idx, 3, 1, 2), online.stream_order(idx, 3, 2, 2))  # per client
    assert online.unseen(np.array([37, 5]), rounds=4, batch_size=4, every=2) == (5, 42)


def test_replay_draws_without_replacement_from_the_memory():
    memory = np.arange(50)
    pick = online.replay_sample(memory, 0, 1, 1, 3, size=8)
    assert len(pick) == len(set(pick.tolist())) == 8 and set(pick.tolist()) <= set(memory.tolist())
    assert np.array_equal(pick, online.replay_sample(memory, 0, 1, 1, 3, size=8))
    assert np.array_equal(online.replay_sample(memory[:5], 0, 1, 1, 3, size=8), memory[:5])


def test_a_run_sees_every_stream_sample_once_and_replays_only_memory(tmp_path, monkeypatch):
    """Every (client, task) trains on disjoint slices of its own samples, in batches of the
    stream's size; what is trained on twice is memory only."""
    import simulator.engine.client_app as client_app

    sliced: dict[tuple[int, int], list[np.ndarray]] = defaultdict(list)
    trained: list[tuple[int, int, np.ndarray, int]] = []
    real_slice, real_request = online.round_slice, client_app._train_request

    def recorded_slice(indices, seed, client, task, rnd, batch_size, every):
        out = real_slice(indices, seed, client, task, rnd, batch_size, every)
        sliced[(client, task)].append(out)
        return out

    def recorded_request(rt, pid, task, rnd, state, model, objective, stack, x, y, seen):
        request = real_request(rt, pid, task, rnd, state, model, objective, stack, x, y, seen)
        trained.append((pid, task, x, request.cfg.batch_size))
        return request

    monkeypatch.setattr(online, "round_slice", recorded_slice)
    monkeypatch.setattr(client_app, "_train_request", recorded_request)
    raw = tiny(tasks={"initial_classes": 2, "classes_per_task": 2, "online": ONLINE},
               training={"rounds_per_task": 6, "local_epochs": 1, "batch_size": 16, "lr": 0.01},
               continual={"memory_per_class": 3})  # 6 rounds of 8: most streams are spent before the end
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", out=None, plots=False)
    assert run.summary["completed"]
    from simulator.data.stream import build_stream

    stream = build_stream(validate_scenario(raw))
    for (client, task), pieces in sliced.items():
        joined = np.concatenate(pieces)
        assert len(joined) == len(set(joined.tolist())), (client, task)  # no sample twice
        assert set(joined.tolist()) <= set(stream.train_indices[task][client].tolist())
        assert all(len(p) <= 8 for p in pieces)
    assert {b for *_, b in trained} == {4}
    # within its task a stream sample is trained on exactly once (the memory replayed then holds
    # earlier tasks' samples only); later it may come back as a memory sample
    x_train = stream.dataset.x_train
    per_task: dict[tuple[int, int], dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
    for pid, task, x, _ in trained:
        for row in x:
            per_task[(pid, task)][row.tobytes()] += 1
    checked = 0
    for (pid, task), pieces in sliced.items():
        for i in np.concatenate(pieces):
            assert per_task[(pid, task)][x_train[i].tobytes()] == 1, (pid, task, i)
            checked += 1
    assert checked > 100
    # a client trains only in rounds that bring stream samples (no replay-only rounds)
    spent = sum(1 for pieces in sliced.values() for piece in pieces if len(piece) == 0)
    assert spent > 0
    for pid, task, x, _ in trained:
        stream_rows = {x_train[i].tobytes() for i in stream.train_indices[task][pid]}
        assert any(row.tobytes() in stream_rows for row in x), (pid, task)
    assert np.isfinite(run.summary["anytime_accuracy"])


def test_online_needs_one_epoch_and_no_dp(tmp_path):
    with pytest.raises(UserError, match="training.local_epochs"):
        run_scenario(validate_scenario(tiny(tasks={"initial_classes": 2, "classes_per_task": 2, "online": ONLINE},
                                            training={"rounds_per_task": 2, "local_epochs": 2})),
                     run_dir=tmp_path / "a", out=None, plots=False)
    assert not (tmp_path / "a").exists()  # nothing half-written


def test_anytime_accuracy_is_the_mean_over_evaluations_of_the_seen_tasks_mean():
    rows = pd.DataFrame({"global_round": [1, 2, 2, 3, 3, 3], "eval_task": [0, 0, 1, 0, 1, 2],
                         "accuracy": [0.9, 0.5, 0.7, 0.3, 0.6, float("nan")]})
    # round 1: 0.9; round 2: 0.6; round 3: (0.3 + 0.6) / 2 (a task without a value is left out)
    assert anytime_accuracy(rows) == pytest.approx((0.9 + 0.6 + 0.45) / 3)
    assert np.isnan(anytime_accuracy(pd.DataFrame()))


def test_the_quickstart_online_warns_of_samples_it_never_sees(tmp_path, capsys):
    import io

    import yaml

    raw = yaml.safe_load(open("scenarios/quickstart.yaml", encoding="utf-8"))
    raw["tasks"]["online"] = {"batch_size": 10, "communicate_every": 5}
    raw["training"].update(local_epochs=1, rounds_per_task=2)
    raw["resources"]["engine"] = "inline"
    out = io.StringIO()
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "q", out=out, plots=False)
    assert "tasks.online:" in out.getvalue() and "never seen" in out.getvalue()
    assert run.summary["completed"]
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert 0.0 <= summary["anytime_accuracy"] <= 1.0
