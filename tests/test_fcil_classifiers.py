"""The classifiers behind the FCIL baselines' labels, checked against numpy implementations of
their papers' official formulas (written here from the official code's maths, not from ours):
iCaRL's nearest mean of exemplars (PyCIL ``_eval_nme``), FeCAM's estimator (``dipamgoswami/FeCAM``)
fitted on statistics the server merged from several clients, and the merge under partial
participation (the server keeps each client's latest statistics)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from simulator.engine.runner import run_scenario
from simulator.learner.second_order import SecondOrderStats, client_statistics, fit_classifier
from simulator.records import stats_from_arrays, stats_to_arrays
from simulator.scenario import validate_scenario
from strategies.base import RunInfo, Upload
from strategies.proto_avg import ProtoAvg

EPS = 1e-8  # PyCIL's and FeCAM's EPSILON in the feature normalisation


def _features(seed: int, classes, n: int, dim: int = 10, nonneg: bool = True):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, size=n)
    centres = np.random.default_rng(7).normal(size=(6, dim)) * 1.5
    scale = 1.0 + 3.0 * (np.arange(6) % 3)  # classes of very different norms: NME differs from raw NCM
    f = (centres[y] + rng.normal(size=(n, dim))) * scale[y, None]
    if nonneg:
        f = np.maximum(f, 0.0)  # ReLU features, as FeCAM's ResNet gives
        f[y == 2, 3] = 0.0  # one dimension always zero for class 2: exact zeros off the diagonal
    return f, y


def _parts(nonneg: bool = True):
    return [_features(1, [0, 1, 2], 60, nonneg=nonneg), _features(2, [1, 2, 3], 80, nonneg=nonneg),
            _features(3, [0, 3, 2], 50, nonneg=nonneg)]


def _server_merge(parts, kind: str, participation: float = 1.0) -> tuple[ProtoAvg, list]:
    server = ProtoAvg(ProtoAvg.Params(), RunInfo(seed=0, participation=participation, num_classes=6, embedding_dim=10))
    uploads = [Upload(pid, len(y), ArrayRecord(stats_to_arrays(client_statistics(f, y, kind))), MetricRecord({"partition_id": pid}), None)
               for pid, (f, y) in enumerate(parts)]
    return server, uploads


def _merged(parts, kind: str) -> SecondOrderStats:
    server, uploads = _server_merge(parts, kind)
    server.merge_second_order(uploads)
    return stats_from_arrays(server.global_arrays())  # what every client receives


def nme_reference(train_f, train_y, test_f):
    """PyCIL: class mean = normalise(mean of normalised features); test features normalised;
    squared Euclidean distance (``cdist(..., 'sqeuclidean')``), smallest wins."""
    classes = np.unique(train_y)
    v = train_f / (np.linalg.norm(train_f, axis=1, keepdims=True) + EPS)
    means = []
    for c in classes:
        m = v[train_y == c].mean(0)
        means.append(m / np.linalg.norm(m))
    means = np.array(means)
    t = test_f / (np.linalg.norm(test_f, axis=1, keepdims=True) + EPS)
    d = ((t[:, None, :] - means[None]) ** 2).sum(-1)
    return classes, d


def fecam_reference(train_f, train_y, test_f, alpha=(1.0, 1.0), beta=0.5):
    """FeCAM (tukey, shrink, norm_cov, per_class, full_cov): np.cov of x^beta per class, shrink_cov
    applied twice, normalised by the outer product of the standard deviations; class mean =
    normalise((mean of raw x)^beta); test: normalise, ^beta, normalise; Mahalanobis with pinv."""
    classes = np.unique(train_y)
    dists = []
    t = test_f / (np.linalg.norm(test_f, axis=1, keepdims=True) + EPS)
    t = t**beta
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)  # F.normalize (eps 1e-12)
    for c in classes:
        x = train_f[train_y == c]
        cov = np.cov((x**beta).T)
        for _ in range(2):
            diag_mean = np.mean(np.diagonal(cov))
            off = cov.copy()
            np.fill_diagonal(off, 0.0)
            mask = off != 0.0
            off_mean = (off * mask).sum() / mask.sum()
            iden = np.eye(len(cov))
            cov = cov + alpha[0] * diag_mean * iden + alpha[1] * off_mean * (1 - iden)
        sd = np.sqrt(np.diagonal(cov))
        cov = cov / np.outer(sd, sd)
        mu = x.mean(0) ** beta
        diff = t - mu / max(np.linalg.norm(mu), 1e-12)
        dists.append(np.diagonal(diff @ np.linalg.pinv(cov) @ diff.T))
    return classes, np.array(dists).T


def _pooled(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_nme_is_icarls_nearest_mean_of_exemplars_on_merged_statistics():
    parts = _parts(nonneg=False)
    merged = _merged(parts, "nme")
    assert merged.squares is None and merged.raw_sums is None  # first-order: no outer products travel
    f_all, y_all = _pooled(parts)
    test_f, _ = _features(9, [0, 1, 2, 3], 300, nonneg=False)
    classes, d = nme_reference(f_all, y_all, test_f)
    fitted = fit_classifier(merged, "nme")
    assert fitted.classes.tolist() == classes.tolist()
    np.testing.assert_allclose(-fitted.scores(test_f), d, rtol=1e-6, atol=1e-7)  # PyCIL adds 1e-8 to the norms
    pred = fitted.predict(test_f)
    assert np.array_equal(pred, classes[d.argmin(1)])
    # and it is not the Euclidean nearest raw mean that the label used to be
    raw_means = np.array([f_all[y_all == c].mean(0) for c in classes])
    raw = classes[((test_f[:, None] - raw_means[None]) ** 2).sum(-1).argmin(1)]
    assert (raw != pred).sum() >= 5  # 7 of 300 on this fixed data


def test_fecam_on_merged_statistics_equals_the_official_formula_on_pooled_features():
    parts = _parts(nonneg=True)
    merged = _merged(parts, "fecam")
    f_all, y_all = _pooled(parts)
    test_f, _ = _features(9, [0, 1, 2, 3], 300, nonneg=True)
    classes, d = fecam_reference(f_all, y_all, test_f)
    fitted = fit_classifier(merged, "fecam")
    assert fitted.classes.tolist() == classes.tolist()
    np.testing.assert_allclose(-fitted.scores(test_f), d, rtol=1e-7, atol=1e-8)
    assert np.array_equal(fitted.predict(test_f), classes[d.argmin(1)])
    # protofed's own mahalanobis is another estimator: its distances differ
    maha = fit_classifier(_merged(parts, "mahalanobis"), "mahalanobis")
    assert not np.allclose(-maha.scores(test_f), d, rtol=1e-3)


def test_fecam_signed_power_on_features_of_any_sign():
    """FeCAM's x^0.5 is NaN on a negative feature; protofed's signed power equals the official
    formula applied to |x| with the signs put back, and stays finite."""
    parts = _parts(nonneg=False)
    f_all, _ = _pooled(parts)
    assert (f_all < 0).any()
    fitted = fit_classifier(_merged(parts, "fecam"), "fecam")
    test_f, _ = _features(9, [0, 1, 2, 3], 100, nonneg=False)
    s = fitted.scores(test_f)
    assert np.isfinite(s).all()
    # on the non-negative orthant of the data the two definitions coincide
    pos = _parts(nonneg=True)
    a = fit_classifier(_merged(pos, "fecam"), "fecam")
    classes, d = fecam_reference(*_pooled(pos), np.abs(test_f))
    np.testing.assert_allclose(-a.scores(np.abs(test_f)), d, rtol=1e-7, atol=1e-8)


def test_second_order_merge_is_exact_under_partial_participation():
    """Six clients, participation 0.5: each round the strategy samples three, and they upload
    the statistics of all their data (one frozen embedding). Once every client has been sampled,
    the server's statistics are those of all the data pooled. Replacing a class's statistics by
    the round's uploads (the merge as it was) keeps only three clients' samples."""
    parts = [_features(10 + k, [0, 1, 2, 3], 40 + 7 * k, nonneg=False) for k in range(6)]
    run = RunInfo(seed=3, participation=0.5, num_classes=6, embedding_dim=10, partitions={k: 100 + k for k in range(6)})
    server = ProtoAvg(ProtoAvg.Params(), run)
    seen: set[int] = set()
    for rnd in range(1, 30):
        msgs = list(server.configure_train(rnd, server.global_arrays(), ConfigRecord({"task": 0}), None))
        sampled = sorted(m.metadata.dst_node_id - 100 for m in msgs)
        assert len(sampled) == 3
        uploads = [Upload(p, len(parts[p][1]), ArrayRecord(stats_to_arrays(client_statistics(*parts[p], "lda"))),
                          MetricRecord({"partition_id": p}), None) for p in sampled]
        server.merge_second_order(uploads)
        seen.update(sampled)
        if len(seen) == 6 and rnd >= 3:
            break
    assert seen == set(range(6))
    f_all, y_all = _pooled(parts)
    pooled = SecondOrderStats.of(f_all, y_all)
    merged = stats_from_arrays(server.global_arrays())
    assert merged.counts.tolist() == pooled.counts.tolist()
    np.testing.assert_allclose(merged.sums, pooled.sums, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(merged.squares, pooled.squares, rtol=1e-12, atol=1e-9)
    # and it survives a checkpoint
    again = ProtoAvg(ProtoAvg.Params(), run)
    again.load_state_dict(server.state_dict())
    again.merge_second_order([Upload(0, 1, ArrayRecord(stats_to_arrays(client_statistics(*parts[0], "lda"))), MetricRecord({}), None)])
    np.testing.assert_allclose(again.global_stats.squares, pooled.squares, rtol=1e-12, atol=1e-9)


def _tiny(classifier: str) -> dict:
    return {
        "name": "cls", "seed": 4,
        "dataset": {"source": "synthetic", "num_classes": 6, "dim": 8, "samples_per_class": 40, "class_sep": 5.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 4, "participation": 0.5, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 8, "classifier": classifier},
        "strategy": {"name": "proto_avg", "params": {"share_weights": "first_task"}},
        "resources": {"engine": "inline"},
    }


@pytest.mark.parametrize("classifier", ["nme", "fecam"])
def test_new_classifiers_run_end_to_end_with_partial_participation(tmp_path, classifier):
    out = run_scenario(validate_scenario(_tiny(classifier)), run_dir=tmp_path / classifier, plots=False)
    assert out.summary["completed"] and np.isfinite(out.summary["final_avg_accuracy"])
    assert out.summary["final_avg_accuracy"] > 0.5  # 6 well-separated classes (class_sep 5); chance 1/6
