"""Second-order prototypes (model.classifier: mahalanobis | lda) merged exactly by the server, and
share_weights: first_task (FedAvg during the first task only, then a frozen backbone)."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from helpers import interrupted_then_resumed
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from simulator.engine.runner import run_scenario
from simulator.learner.backbones import build_model
from simulator.learner.prototypes import class_means
from simulator.learner.second_order import SecondOrderStats, mahalanobis_correlations, fit_classifier, lda_covariance
from simulator.learner.training import embed
from simulator.records import FROZEN_FLAG, WEIGHT_PREFIX, protos_to_arrays, stats_from_arrays, stats_to_arrays
from simulator.scenario import validate_scenario
from strategies.base import RunInfo, Upload
from strategies.proto_avg import ProtoAvg


def client_data(seed: int, classes, n: int):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n)
    centers = np.random.default_rng(0).normal(size=(10, 12)) * 2
    return (centers[y] + rng.normal(size=(n, 12)) * (1 + seed)).astype(np.float32), y


def test_federated_second_order_statistics_equal_pooled_ones():
    """Three clients embed with one shared backbone; the server's merged statistics give the
    same means, covariances and predictions as fitting on all their data pooled."""
    model = build_model("mlp", (12,), 8, 10, with_head=False, init_seed=3)
    parts = [client_data(0, [0, 1, 2], 50), client_data(1, [1, 2, 3], 70), client_data(2, [0, 3], 30)]
    server = ProtoAvg(ProtoAvg.Params(), RunInfo(seed=0, participation=1.0, num_classes=10, embedding_dim=8))
    uploads = []
    for pid, (x, y) in enumerate(parts):
        f = embed(model, x)
        arrays = {**protos_to_arrays(class_means(f, y)), **stats_to_arrays(SecondOrderStats.of(f, y))}
        protos = class_means(f, y)
        uploads.append(Upload(pid, len(y), ArrayRecord(arrays), MetricRecord({"partition_id": pid}), protos))
    server.merge(1, uploads)
    server.merge_second_order(uploads)
    merged = stats_from_arrays(server.global_arrays())  # what every client receives

    x_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    f_all = embed(model, x_all).numpy().astype(np.float64)
    pooled = SecondOrderStats.of(f_all, y_all)
    assert merged.classes.tolist() == [0, 1, 2, 3] and merged.counts.tolist() == pooled.counts.tolist()
    np.testing.assert_allclose(merged.means, pooled.means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(server.global_protos.vectors, pooled.means, rtol=1e-5, atol=1e-5)  # proto_avg's NCM too
    # the covariances against numpy's own estimator on the pooled features
    for i, c in enumerate(pooled.classes):
        fc = f_all[y_all == c]
        raw = merged.scatter()[i] / (len(fc) - 1)
        np.testing.assert_allclose(raw, np.cov(fc, rowvar=False), rtol=1e-5, atol=1e-6)
    within = sum(np.cov(f_all[y_all == c], rowvar=False) * (np.sum(y_all == c) - 1) for c in pooled.classes)
    w = within / (len(y_all) - 4)
    np.testing.assert_allclose(lda_covariance(merged), 0.9 * w + 0.1 * np.trace(w) / 8 * np.eye(8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mahalanobis_correlations(merged), mahalanobis_correlations(pooled), rtol=1e-5, atol=1e-6)
    a, b = fit_classifier(merged, "lda"), fit_classifier(pooled, "lda")
    np.testing.assert_allclose(a.scores(f_all), b.scores(f_all), rtol=1e-5, atol=1e-4)
    assert np.array_equal(a.predict(f_all), b.predict(f_all))
    # mahalanobis: statistics of L2-normalised embeddings, merged the same way
    norm_up = [stats_to_arrays(SecondOrderStats.of(embed(model, x), y, normalize=True)) for x, y in parts]
    from simulator.learner.second_order import merge_stats

    merged_n = merge_stats([stats_from_arrays(ArrayRecord(u)) for u in norm_up])
    pooled_n = SecondOrderStats.of(f_all, y_all, normalize=True)
    np.testing.assert_allclose(mahalanobis_correlations(merged_n), mahalanobis_correlations(pooled_n), rtol=1e-5, atol=1e-6)
    a, b = fit_classifier(merged_n, "mahalanobis"), fit_classifier(pooled_n, "mahalanobis")
    np.testing.assert_allclose(a.scores(f_all), b.scores(f_all), rtol=1e-5, atol=1e-4)
    assert np.array_equal(a.predict(f_all), b.predict(f_all))
    corr = mahalanobis_correlations(pooled_n)
    np.testing.assert_allclose(np.diagonal(corr, axis1=1, axis2=2), 1.0)  # correlation matrices
    # a class uploaded again replaces that client's statistics of it; other clients' and classes' stay
    f = embed(model, parts[0][0][:10])
    again = Upload(0, 10, ArrayRecord(stats_to_arrays(SecondOrderStats.of(f, np.zeros(10, np.int64)))), MetricRecord({}), None)
    server.merge_second_order([again])
    assert server.global_stats.counts.tolist() == [10 + int(np.sum(parts[2][1] == 0))] + merged.counts.tolist()[1:]


def test_second_order_classifiers_beat_ncm_on_correlated_classes():
    """Two classes with a shared, strongly correlated covariance whose means differ along an axis
    (not an eigenvector): NCM projects on that axis (accuracy ~ Phi(0.5) = 0.69), LDA on the
    discriminant (Mahalanobis separation 3.2, ~ Phi(1.6) = 0.95)."""
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.95], [0.95, 1.0]])
    mu = np.array([[0.0, 0.0], [1.0, 0.0]])
    y = np.repeat([0, 1], 400)
    f = mu[y] + rng.multivariate_normal([0, 0], cov, size=len(y))
    f = f + np.array([4.0, 4.0])  # away from the origin: L2 normalisation (mahalanobis) keeps the direction
    stats = SecondOrderStats.of(f[::2], y[::2])
    test_f, test_y = f[1::2], y[1::2]
    d = ((test_f[:, None, :] - stats.means[None]) ** 2).sum(-1)
    ncm = (stats.classes[d.argmin(1)] == test_y).mean()
    lda = (fit_classifier(stats, "lda").predict(test_f) == test_y).mean()
    maha = (fit_classifier(SecondOrderStats.of(f[::2], y[::2], normalize=True), "mahalanobis").predict(test_f) == test_y).mean()
    assert ncm < 0.8 and lda > ncm + 0.1 and maha > ncm + 0.05, (ncm, lda, maha)


def test_first_task_sends_the_frozen_backbone_once_per_client():
    params = ProtoAvg.Params.model_validate({"share_weights": "first_task"})
    assert params.share_weights == "first_task" and ProtoAvg.weight_sharing(params)
    server = ProtoAvg(params, RunInfo(seed=0, participation=1.0, num_classes=4, embedding_dim=2, partitions={0: 10, 1: 11, 2: 12}))
    server.global_weights = {WEIGHT_PREFIX + "x": Array(np.ones(3))}
    arrays = server.global_arrays()

    def sent(task: int) -> dict[int, ArrayRecord]:
        msgs = server.configure_train(1, arrays, ConfigRecord({"task": task}), None)
        return {m.metadata.dst_node_id - 10: m.content["global"] for m in msgs}

    first = sent(0)
    assert all(WEIGHT_PREFIX + "x" in a and FROZEN_FLAG not in a for a in first.values())
    server.holding_frozen = {0, 2}  # clients 0 and 2 trained after the freeze
    later = sent(1)
    assert FROZEN_FLAG in later[1] and WEIGHT_PREFIX + "x" in later[1]  # client 1 still needs the backbone
    for p in (0, 2):
        assert FROZEN_FLAG in later[p] and WEIGHT_PREFIX + "x" not in later[p]
    before = dict(server.global_weights)
    server.merge_weights([Upload(0, 5, ArrayRecord({WEIGHT_PREFIX + "x": Array(np.zeros(3))}), MetricRecord({}), None)])
    assert server.global_weights == before  # no averaging once frozen
    state = server.state_dict()
    again = ProtoAvg(params, server.run)
    again.load_state_dict(state)
    assert again.holding_frozen == {0, 2}


def tiny(**over) -> dict:
    raw = {
        "name": "so",
        "seed": 4,
        "dataset": {"source": "synthetic", "num_classes": 8, "dim": 8, "samples_per_class": 40, "class_sep": 5.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "strategy": {"name": "proto_avg", "params": {"share_weights": "first_task"}},
        "resources": {"engine": "inline"},
    }
    raw.update(over)
    return raw


def test_first_task_and_second_order_end_to_end(tmp_path):
    full = run_scenario(validate_scenario(tiny(strategy={"name": "proto_avg", "params": {"share_weights": True}})), run_dir=tmp_path / "a", plots=False)
    first = run_scenario(validate_scenario(tiny()), run_dir=tmp_path / "b", plots=False)
    maha = run_scenario(validate_scenario(tiny(model={"backbone": "mlp", "embedding_dim": 16, "classifier": "mahalanobis"})), run_dir=tmp_path / "c", plots=False)
    per_round = {
        k: pd.read_csv(tmp_path / k / "metrics.csv").groupby("global_round")[["task", "bytes_up", "bytes_down"]].first()
        for k in ("a", "b", "c")
    }
    a, b, c = per_round["a"], per_round["b"], per_round["c"]
    # first task: the same traffic as share_weights true; later: no weights uploaded
    assert (b[b.task == 0].bytes_up == a[a.task == 0].bytes_up).all()
    assert (b[b.task > 0].bytes_up < a[a.task > 0].bytes_up / 20).all()
    # down: the frozen backbone once (first round after task 0), then prototypes only
    later = b[b.task > 0].bytes_down.tolist()
    assert later[0] > 10 * later[1] and later[1] == pytest.approx(later[-1], rel=0.5)
    assert not np.array_equal(np.nan_to_num(full.matrix), np.nan_to_num(first.matrix))
    # second-order statistics travel (16 x 16 float64 per class) and change the predictions
    assert (c.bytes_up > b.bytes_up).all()
    assert not np.array_equal(np.nan_to_num(maha.matrix), np.nan_to_num(first.matrix))
    assert maha.summary["completed"] and np.isfinite(maha.summary["final_avg_accuracy"])


def test_resume_with_first_task_and_lda_gives_the_same_matrix(tmp_path, monkeypatch):
    raw = tiny(model={"backbone": "mlp", "embedding_dim": 16, "classifier": "lda"},
               clients={"num_clients": 3, "arrival": {"at_task": [0, 0, 2]}})
    full, resumed = interrupted_then_resumed(raw, tmp_path, monkeypatch, plots=False)
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
    # the late joiner (client 2, task 2) got the frozen backbone in its first message
    m = pd.read_csv(tmp_path / "full" / "metrics.csv").groupby("global_round")[["task", "bytes_down"]].first()
    t2 = m[m.task == 2].bytes_down.tolist()
    weights = sum(v.numel() * 4 for k, v in build_model("mlp", (8,), 16, 8, False, 0).backbone.state_dict().items())
    # one backbone, to one client, once (less the statistics of the task's classes added after round 1)
    assert 0.9 * weights < t2[0] - t2[1] < weights


def test_classifier_key_is_validated():
    from simulator.errors import UserError

    with pytest.raises(UserError, match="model.classifier"):
        validate_scenario(tiny(model={"backbone": "mlp", "classifier": "knn"}))
    with pytest.raises(UserError, match="strategy.params.share_weights"):
        validate_scenario(tiny(strategy={"name": "proto_avg", "params": {"share_weights": "last_task"}}))


def test_statistics_travel_as_upper_triangles_and_come_back_whole():
    """Sums of outer products are symmetric: only the upper triangle is sent (D (D + 1) / 2 of
    the D x D values per class) and the receiver rebuilds the full matrix exactly."""
    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(40, 6)), np.repeat([3, 1, 7, 2], 10)
    stats = SecondOrderStats.of(f, y)
    arrays = stats_to_arrays(stats)
    assert arrays["so.squares_upper"].numpy().shape == (4, 21) and "so.squares" not in arrays
    back = stats_from_arrays(ArrayRecord(arrays))
    np.testing.assert_array_equal(back.classes, stats.classes)
    np.testing.assert_array_equal(back.counts, stats.counts)
    np.testing.assert_array_equal(back.sums, stats.sums)
    np.testing.assert_allclose(back.squares, stats.squares, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back.squares, np.swapaxes(back.squares, 1, 2))
    full = 4 * 6 * 6 * 8
    assert sum(a.numpy().nbytes for k, a in arrays.items() if "squares" in k) == 4 * 21 * 8 < full
    empty = stats_from_arrays(ArrayRecord(stats_to_arrays(SecondOrderStats.empty(6))))
    assert len(empty) == 0 and empty.squares.shape == (0, 6, 6)
