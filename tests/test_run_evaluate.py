"""A finished run analysed after the fact: RunResult.test_split / partitions rebuild the run's
data from config.yaml, and RunResult.evaluate repeats its final evaluation from what it saved.
The key check: the mean over clients of evaluate() equals the last row the run recorded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import protofed
from helpers import tiny

# the quickstart kept small: one round of one local epoch per task (about 12 s a run on 2 cores)
QUICK = {"training.rounds_per_task": 1, "training.local_epochs": 1, "output.save": "clients"}


def _last_round(frame: pd.DataFrame) -> pd.DataFrame:
    last_task = frame["task"].max()
    rows = frame[frame["task"] == last_task]
    return rows[rows["round"] == rows["round"].max()]


@pytest.fixture(scope="module", params=["fedproto", "fedavg"])
def quick_run(request, tmp_path_factory):
    """fedproto: nearest global prototype, no weights shared; fedavg: the global model's head."""
    out = tmp_path_factory.mktemp("quick") / request.param
    return protofed.run("scenarios/quickstart.yaml", strategy=request.param, engine="inline", overrides=QUICK,
                        run_dir=out, progress=False)


def _assert_repeats_the_run(result, table: pd.DataFrame) -> None:
    means = result.evaluation_means(table)
    recorded = _last_round(result.metrics).set_index("eval_task")["accuracy"]  # full precision
    assert list(means.index) == list(recorded.index) == list(range(len(result.matrix.columns)))
    assert np.max(np.abs(means.to_numpy() - recorded.to_numpy())) <= 1e-12, (means, recorded)
    # accuracy_matrix.csv holds 6 decimals
    assert np.max(np.abs(means.to_numpy() - result.matrix.iloc[-1].to_numpy())) <= 5e-7
    per_client = _last_round(result.client_metrics)
    both = table.merge(per_client, on=["client", "eval_task"], suffixes=("", "_run"), validate="one_to_one")
    assert len(both) == len(per_client) and np.max(np.abs(both["accuracy"] - both["accuracy_run"])) <= 1e-12


def test_evaluate_repeats_the_last_row_of_the_matrix(quick_run):
    table = quick_run.evaluate()
    assert list(table.columns) == ["client", "eval_task", "correct", "total", "accuracy", "in_mean"]
    assert sorted(table["client"].unique()) == [0, 1, 2, 3, 4] and table["in_mean"].all()
    assert np.allclose(table["accuracy"], table["correct"] / table["total"])
    _assert_repeats_the_run(quick_run, table)
    # one client alone: its rows of the whole table
    alone = quick_run.evaluate(3)
    assert alone.reset_index(drop=True).equals(table[table["client"] == 3].reset_index(drop=True))


@pytest.mark.parametrize("name, over", [
    ("local", {"strategy": {"name": "local", "params": {}}}),  # prototypes kept in the client state
    ("joint", {"strategy": {"name": "joint", "params": {}}}),  # one client, chosen by the strategy
    ("first_task", {"strategy": {"name": "proto_avg", "params": {"share_weights": "first_task"}}}),
    ("subset_learned", {"clients": {"num_clients": 6, "participation": 0.5,
                                    "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
                        "evaluation": {"clients": 4, "population": "learned"}}),
    # RanPAC's random projection and a frozen backbone's one canonical pass, repeated exactly
    ("frozen_ranpac", {"strategy": {"name": "proto_avg", "params": {"share_weights": False}},
                       "continual": {"backbone": "frozen", "memory_per_class": 0},
                       "model": {"backbone": "mlp", "embedding_dim": 16, "classifier": "ranpac", "ranpac_dim": 32}}),
])
def test_evaluate_repeats_methods_with_their_own_rules(tmp_path, name, over):
    result = protofed.run(tiny(output={"save": "clients"}, **over), run_dir=tmp_path / name, progress=False)
    table = result.evaluate()
    _assert_repeats_the_run(result, table)
    if name == "joint":
        assert table["client"].unique().tolist() == [0]
    if name == "subset_learned":  # 4 clients averaged, the others evaluated but not counted
        assert table.groupby("client")["in_mean"].any().sum() == 4


def test_test_split_is_the_streams_test_set(quick_run):
    cfg = quick_run.config
    split = quick_run.test_split()
    # mnist1d, 6000 samples, test_fraction 0.2: all 10 classes are in some task
    assert len(split) == len(split.x) == len(split.index) == 1200
    assert sorted(split.index.tolist()) == list(range(1200))
    sizes = [cfg["tasks"]["initial_classes"]] + [cfg["tasks"]["classes_per_task"]] * 3
    classes = [set(quick_run.test_split(t).y.tolist()) for t in range(4)]
    assert [len(c) for c in classes] == sizes and len(set().union(*classes)) == 10
    for t in range(4):
        part = quick_run.test_split(t)
        assert (part.task == t).all() and np.array_equal(part.y, split.y[split.task == t])
        assert np.array_equal(part.x, split.x[split.task == t])
    # evaluate() scored exactly these samples
    totals = quick_run.evaluate(0).set_index("eval_task")["total"]
    assert totals.tolist() == [int((split.task == t).sum()) for t in range(4)]


def test_partitions_are_the_runs_and_disjoint(quick_run):
    parts = quick_run.partitions()
    assert list(parts.columns) == ["task", "client", "index", "label"]
    split_classes = {t: set(quick_run.test_split(t).y.tolist()) for t in range(4)}
    for t, rows in parts.groupby("task"):
        assert not rows["index"].duplicated().any()  # every sample to one client (every scheme)
        assert set(rows["label"]) == split_classes[t]
    assert not parts["index"].duplicated().any()  # and no sample in two tasks
    assert quick_run.partitions(2).equals(parts[parts["task"] == 2].reset_index(drop=True))
    # the run's own record of each client's data: its class counts, saved with its model
    for client in range(5):
        saved = torch.load(quick_run.run_dir / "final" / "clients" / f"{client}.pt", weights_only=False)
        mine = parts[parts["client"] == client]["label"].to_numpy()
        assert np.array_equal(np.bincount(mine, minlength=10), saved["class_counts"])


def _noised(arrays: dict, scale: float = 0.5) -> dict:
    gen = np.random.default_rng(0)
    return {k: (v + scale * gen.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v)
            for k, v in arrays.items()}


def test_perturbed_weights_score_differently(quick_run, tmp_path):
    """The evaluation reads the weights the run saved: noise in them changes the accuracy (a
    client's own weights for fedproto, the global model's for fedavg, which overwrites them)."""
    import shutil

    base = quick_run.evaluate(1)
    copy = tmp_path / "copy"
    shutil.copytree(quick_run.run_dir, copy)
    if quick_run.summary["strategy"] == "fedproto":
        path = copy / "final" / "clients" / "1.pt"
        saved = torch.load(path, weights_only=False)
        saved["model"] = {k: torch.as_tensor(v) for k, v in _noised({k: t.numpy() for k, t in saved["model"].items()}).items()}
        torch.save(saved, path)
    else:
        with np.load(copy / "final" / "global.npz") as z:
            arrays = {k: z[k] for k in z.files}
        assert any(k.startswith("w.") for k in arrays)
        np.savez(copy / "final" / "global.npz", **_noised({k: v for k, v in arrays.items()}))
    noisy = protofed.load(copy).evaluate(1)
    assert not np.allclose(noisy["accuracy"], base["accuracy"]), (noisy, base)


def test_a_given_model_is_classified_with_the_global_prototypes(quick_run):
    model = quick_run.client_model(1)
    if quick_run.summary["strategy"] == "fedavg":  # it shares weights, no prototypes
        with pytest.raises(protofed.UserError, match="no prototypes"):
            quick_run.evaluate(model)
        return
    base = quick_run.evaluate(model)
    assert base["client"].unique().tolist() == [-1] and not base["in_mean"].any()
    # fedproto classifies with the client's own weights and the global prototypes: a given
    # model with those weights scores what the client scored
    assert np.allclose(base["accuracy"].to_numpy(), quick_run.evaluate(1)["accuracy"].to_numpy(), atol=1e-12)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + 0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    assert not np.allclose(quick_run.evaluate(model)["accuracy"], base["accuracy"])


def test_a_run_saved_with_global_only_is_refused_client_models(tmp_path):
    result = protofed.run(tiny(output={"save": "global"}, training={"rounds_per_task": 1}), run_dir=tmp_path / "r",
                          progress=False)
    for call in (result.evaluate, lambda: result.evaluate(0), lambda: result.client_model(0)):
        with pytest.raises(protofed.UserError, match=r"output\.save: clients"):
            call()
    torch.manual_seed(0)
    table = result.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16)))
    assert table["eval_task"].tolist() == [0, 1, 2]  # a given model needs only the global state


def test_errors_name_the_argument(quick_run):
    with pytest.raises(protofed.UserError, match=r"task.*0\.\.3"):
        quick_run.test_split(4)
    with pytest.raises(protofed.UserError, match="task"):
        quick_run.partitions(-1)
    with pytest.raises(protofed.UserError, match=r"model.*0\.\.4"):
        quick_run.evaluate(5)
    with pytest.raises(protofed.UserError, match="model"):
        quick_run.evaluate("client 0")
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 8))
    if quick_run.summary["strategy"] == "fedavg":  # no prototypes to classify with
        with pytest.raises(protofed.UserError, match="no prototypes"):
            quick_run.evaluate(wrong)
    else:
        with pytest.raises(protofed.UserError, match="embedding_dim"):
            quick_run.evaluate(wrong)


def test_a_run_saved_with_nothing_is_refused(tmp_path):
    result = protofed.run(tiny(output={"save": "none"}, training={"rounds_per_task": 1}), run_dir=tmp_path / "r",
                          progress=False)
    with pytest.raises(protofed.UserError, match=r"output\.save"):
        result.evaluate()
    assert len(result.test_split()) > 0  # the data needs nothing saved
