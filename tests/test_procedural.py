"""dataset.source: procedural — clients derived from the run seed and their id when sampled."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import interrupted_then_resumed, tiny

from simulator.data.schedule import ABSENT, build_schedule
from simulator.data.stream import ProceduralStream, build_stream
from simulator.engine.runner import run_scenario
from simulator.scenario import validate_scenario


def _raw(num_clients: int = 200, **over) -> dict:
    base = {
        "dataset": {"source": "procedural", "num_classes": 6, "dim": 8, "samples_per_client": 12,
                    "test_samples_per_class": 30, "class_sep": 6.0},
        "clients": {"num_clients": num_clients, "partition": {"scheme": "dirichlet", "alpha": 0.5},
                    "participation": 0.05},
        "evaluation": {"clients": 5, "open_world": False},
        "strategy": {"name": "proto_avg", "params": {"share_weights": False}},
    }
    return tiny(**{**base, **over})  # the sections first, then the overrides (section__key)


def _stream(**over) -> ProceduralStream:
    stream = build_stream(validate_scenario(_raw(**over)))
    assert isinstance(stream, ProceduralStream)
    return stream


def test_a_client_is_the_same_whether_derived_first_or_last_or_elsewhere():
    clients = [0, 7, 199, 42, 3]
    first = _stream()
    forward = {(t, c): first.client_data(t, c) for c in clients for t in range(first.num_tasks)}
    again = _stream()  # a fresh stream asked in the reverse order
    for c in reversed(clients):
        for t in reversed(range(again.num_tasks)):
            x, y = again.client_data(t, c)
            assert np.array_equal(x, forward[t, c][0]) and np.array_equal(y, forward[t, c][1])
    shipped = pickle.loads(pickle.dumps(first))  # as a Ray actor receives it: no block cache travels
    assert not shipped.dataset.blocks._cache
    x, y = shipped.client_data(1, 42)
    assert np.array_equal(x, forward[1, 42][0]) and np.array_equal(y, forward[1, 42][1])
    # a new process: nothing depends on the process's hash seed or on what was drawn before
    code = ("import pickle, sys; sys.path.insert(0, 'tests'); from test_procedural import _stream; "
            "s = _stream(); x, y = s.client_data(1, 42); sys.stdout.buffer.write(pickle.dumps((x, y)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env={"PYTHONHASHSEED": "123",
                         "PATH": "/usr/bin:/bin"}).stdout
    x2, y2 = pickle.loads(out)
    assert np.array_equal(x2, forward[1, 42][0]) and np.array_equal(y2, forward[1, 42][1])


def test_each_task_block_holds_its_classes_and_the_seed_changes_them():
    stream = _stream()
    for t, classes in enumerate(stream.tasks):
        x, y = stream.client_data(t, 5)
        assert x.shape == (12, 8) and x.dtype == np.float32 and set(y.tolist()) <= set(classes)
        assert len(stream.train_indices[t][5]) == 12
    other = build_stream(validate_scenario({**_raw(), "seed": 2}))
    assert not np.array_equal(stream.client_data(0, 5)[0], other.client_data(0, 5)[0])


def test_label_shares_follow_the_dirichlet_closed_form():
    """Per client, the share of one class among its S samples has the variance of a
    Dirichlet-multinomial: Var = (1/S) E[p(1-p)] + Var[p] with p ~ Beta(alpha, (K-1) alpha)."""
    alpha, k, s, n = 0.5, 2, 12, 4000
    stream = _stream(num_clients=n)
    c0 = stream.tasks[0][0]
    shares = np.array([(stream.dataset.blocks.labels(c, 0) == c0).mean() for c in range(n)])
    var_p = (k - 1) / (k**2 * (k * alpha + 1))
    expected = (1 / s) * (1 / k - var_p - 1 / k**2) + var_p
    assert abs(shares.mean() - 1 / k) < 0.02
    assert abs(shares.var() / expected - 1) < 0.08, (shares.var(), expected)
    iid = _stream(num_clients=n, clients__partition={"scheme": "iid"})
    shares = np.array([(iid.dataset.blocks.labels(c, 0) == c0).mean() for c in range(n)])
    assert abs(shares.var() / (0.25 / s) - 1) < 0.08  # binomial(S, 1/2) / S


def test_samples_sit_around_their_class_means_in_standard_units():
    stream = _stream(num_clients=600)
    blocks = stream.dataset.blocks
    x = np.concatenate([stream.client_data(0, c)[0] for c in range(600)])
    y = np.concatenate([stream.client_data(0, c)[1] for c in range(600)])
    for cls in stream.tasks[0]:
        assert np.abs(x[y == cls].mean(axis=0) - blocks.means[cls] / blocks.scale).max() < 0.1
    within = np.concatenate([x[y == cls] - x[y == cls].mean(axis=0) for cls in stream.tasks[0]])
    assert abs(within.std() * blocks.scale - 1.0) < 0.05  # noise 1 in the source's units
    x_test = stream.dataset.x_test
    assert abs(x_test.mean()) < 0.2 and abs(x_test.std() - 1.0) < 0.2


def test_nothing_but_the_schedule_grows_with_the_population():
    small, large = _stream(num_clients=1_000), _stream(num_clients=200_000)
    grows = large.schedule.nbytes + sum(len(t.learns) for t in large.train_indices)  # one int + one bool per client and task
    assert len(pickle.dumps(large)) - len(pickle.dumps(small)) < 1.05 * grows
    with pytest.raises(TypeError, match="never materialised"):
        np.asarray(large.dataset.x_train)


def test_the_shared_schedule_is_task_k_from_the_join_on():
    raw = _raw(num_clients=50, clients__arrival={"initial_fraction": 0.5})
    sc = validate_scenario(raw)
    sched = build_schedule(sc.clients, 3, sc.seed)
    joins = (sched != ABSENT).argmax(axis=1)
    for c in range(50):  # the loop this replaced
        assert sched[c].tolist() == [ABSENT if k < joins[c] else k for k in range(3)]
    assert sorted(np.bincount(joins).tolist()) == [12, 13, 25]


def test_runs_on_both_engines_and_clients_csv_lists_who_took_part(tmp_path):
    outs = {}
    for engine in ("inline", "ray"):
        raw = _raw(resources={"engine": engine, "state_store": "sqlite"})
        outs[engine] = run_scenario(validate_scenario(raw), run_dir=tmp_path / engine, engine=engine, out=None)
        assert outs[engine].summary["completed"]
        assert len(pd.read_csv(tmp_path / engine / "failures.csv")) == 0
    for name in ("accuracy_matrix.csv", "clients.csv", "metrics.csv"):
        if name == "metrics.csv":  # the wall times differ; everything learned must not
            a, b = (pd.read_csv(tmp_path / e / name).filter(regex="acc|loss|bytes") for e in ("inline", "ray"))
            pd.testing.assert_frame_equal(a, b)
            continue
        assert (tmp_path / "inline" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    clients = pd.read_csv(tmp_path / "inline" / "clients.csv")
    took_part = sorted(set(clients["client"]))
    assert 0 < len(took_part) < 200 and len(clients) == 3 * len(took_part)
    assert outs["inline"].summary["clients_took_part"] == len(took_part)
    stream = _stream()
    for row in clients.itertuples():  # each row as the stream derives it
        y = stream.client_data(row.task, row.client)[1]
        assert row.samples == len(y) == 12 and row.class_ids == " ".join(map(str, np.unique(y)))


def test_resume_is_byte_identical(tmp_path, monkeypatch):
    raw = _raw(resources={"engine": "inline", "state_store": "sqlite"})
    interrupted_then_resumed(raw, tmp_path, monkeypatch, out=None)
    for name in ("accuracy_matrix.csv", "client_metrics.csv", "clients.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


@pytest.mark.parametrize("over, field", [
    ({"clients__partition": {"scheme": "shards", "shards_per_client": 2}}, "clients.partition.scheme"),
    ({"strategy": {"name": "joint", "params": {}}}, "strategy.name"),
    ({"continual__backbone": "frozen"}, "continual.backbone"),
    ({"tasks__blurry": 0.2}, "tasks.blurry"),
])
def test_what_needs_the_whole_training_set_is_refused(tmp_path, over, field):
    from simulator.errors import FieldError, UserError

    with pytest.raises((UserError, FieldError)) as err:
        run_scenario(validate_scenario(_raw(**over)), run_dir=tmp_path / "r", out=None)
    assert field in str(err.value)
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_a_million_clients_is_a_valid_scenario():
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[1] / "scenarios" / "scale_1m_clients.yaml"
    sc = validate_scenario(yaml.safe_load(path.read_text()))
    assert sc.clients.num_clients == 1_000_000 and sc.dataset.source == "procedural"


def test_node_ids_are_computed_not_stored():
    from simulator.engine.node_ids import OffsetIds

    nodes = OffsetIds(5)
    assert nodes == {p: p + 1 for p in range(5)} and nodes.inverse() == {p + 1: p for p in range(5)}
    assert nodes.get(5) is None and nodes.inverse().get(0, -1) == -1 and sorted(nodes) == [0, 1, 2, 3, 4]
    assert len(pickle.dumps(OffsetIds(15_000_000))) < 200


def _fake_bench(folder, clients: int, setup: float, rounds: list[float], pss: float) -> None:
    import json

    folder.mkdir(parents=True)
    engines = {}
    for engine in ("inline", "ray"):
        (folder / engine).mkdir()
        prof = {"driver": {"prepare": setup, "ray_init": 0.0}, "rounds": [{"train_exchange": r} for r in rounds]}
        (folder / engine / "profile.json").write_text(json.dumps(prof))
        engines[engine] = {"wall_seconds": sum(rounds) + setup, "peak_pss_bytes": pss * 1e9}
    (folder / "bench.json").write_text(json.dumps({"num_clients": clients, "engines": engines}))


def test_the_population_table_takes_medians_and_projects_a_least_squares_line(tmp_path):
    """docs/scale_experiments.py (the table and figure of docs/performance.md) against numpy."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "scale_experiments.py"
    spec = importlib.util.spec_from_file_location("scale_experiments", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folders = []
    for clients, setups in ((10_000, (1.0, 5.0, 2.0)), (100_000, (2.0, 3.0, 9.0)), (1_000_000, (4.0, 4.5, 30.0))):
        for i, setup in enumerate(setups):
            folders.append(tmp_path / f"{clients}-{i}")
            _fake_bench(folders[-1], clients, setup, [9.0, 1.0 + i, 2.0, 3.0], 0.5 + clients / 1e6)
    rows = mod.medians(folders)
    assert [r["clients"] for r in rows] == [10_000, 100_000, 1_000_000]
    assert [r["inline_setup"] for r in rows] == [2.0, 3.0, 4.5]  # medians of the three
    assert rows[0]["inline_round"] == 2.0  # the first round (actors starting) left out, then the median
    slope, intercept = np.polyfit([10_000, 100_000, 1_000_000], [2.0, 3.0, 4.5], 1)
    assert mod.projection(rows, "inline_setup") == pytest.approx(slope * 15_000_000 + intercept)
    assert "15,000,000 (projected, linear)" in mod.table(rows)


def test_present_ids_take_the_array_path_with_the_same_answer():
    from strategies.base import _present_ids
    from simulator.engine.node_ids import OffsetIds

    gen = np.random.default_rng(0)
    for n in (1, 7, 1000):
        nodes, as_dict = OffsetIds(n), {p: p + 1 for p in range(n)}
        for available in (None, [], sorted(gen.choice(n, size=max(1, n // 3), replace=False).tolist()),
                          list(range(n)), [n - 1, 0] if n > 1 else [0], [-1, 0, n]):
            assert _present_ids(nodes, available) == _present_ids(as_dict, available), (n, available)


@pytest.mark.parametrize("clients, tasks", [
    ({"num_clients": 7}, {}),
    ({"num_clients": 9, "arrival": {"initial_fraction": 0.4, "stale_fraction": 0.3}}, {}),
    ({"num_clients": 5, "task_order": "per_client"}, {"blurry": 0.25}),
])
def test_an_iid_split_of_a_finite_dataset_is_computed_per_client_with_the_eager_arrays(clients, tasks):
    """The iid split is held as one permutation and its bounds; each client's indices equal what
    the eager split (partition_task, one array per client) gives, sizes included."""
    from simulator import seeding
    from simulator.data.partition import partition_task
    from simulator.data.schedule import receivers
    from simulator.data.stream import IidTaskIndices

    raw = tiny(clients={**clients, "partition": {"scheme": "iid"}}, tasks={"initial_classes": 2, "classes_per_task": 2, **tasks})
    sc = validate_scenario(raw)
    stream = build_stream(sc)
    for t in range(stream.num_tasks):
        lazy = stream.train_indices[t]
        assert isinstance(lazy, IidTaskIndices)
        everyone = np.sort(np.concatenate(list(lazy)))
        recv = receivers(stream.schedule, t)
        parts = partition_task(stream.dataset.y_train[everyone], len(recv), sc.clients.partition,
                               seeding.rng(sc.seed, "partition", t), t)
        eager = {c: everyone[p] for c, p in zip(recv, parts)}
        for c in range(sc.clients.num_clients):
            assert np.array_equal(lazy[c], eager.get(c, np.zeros(0, np.int64))), (t, c)
        assert stream.task_sizes(t).tolist() == [len(lazy[c]) for c in range(sc.clients.num_clients)]
