"""FPL: FINCH against known clusters, the server merge by hand, the client loss by hand, and an
end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from helpers import reply as _reply
from helpers import run_tiny

from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientInfo
from simulator.records import protos_from_arrays, protos_to_arrays
from strategies import STRATEGIES, RunInfo
from strategies.finch import (
    coarsest_multi_cluster,
    finch,
    first_neighbours,
    num_clusters,
)
from strategies.fpl import FPL, cluster_infonce, clusters_from_arrays


def _dirs(degrees, norms=None) -> np.ndarray:
    """2-D vectors at the given angles (degrees), with optional lengths."""
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    v = np.stack([np.cos(a), np.sin(a)], axis=1)
    if norms is not None:
        v = v * np.asarray(norms, dtype=np.float64)[:, None]
    return v


def _same_partition(labels, groups) -> bool:
    """True when ``labels`` and ``groups`` split the points the same way (up to relabelling)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    pairs = set(zip(labels.tolist(), groups.tolist()))
    return len(pairs) == len(set(labels.tolist())) == len(set(groups.tolist()))


# --------------------------------------------------------------------------- FINCH
def test_finch_first_partition_recovers_three_direction_groups():
    # three groups of directions; within a group the first-neighbour graph is connected
    # (ends link to the middle), lengths differ wildly so only the cosine can group them
    pts = _dirs([0, 1, 2.5, 90, 91.5, 180, 181, 183], norms=[1, 7, 0.2, 3, 0.5, 10, 1, 4])
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    perm = np.random.default_rng(0).permutation(len(pts))  # order must not matter
    parts = finch(pts[perm])
    assert _same_partition(parts[0], np.asarray(groups)[perm])
    assert num_clusters(parts[0]) == 3
    # next step: each group links to its nearest group -> all one cluster, and the hierarchy stops
    assert [num_clusters(p) for p in parts] == [3, 1]
    assert _same_partition(coarsest_multi_cluster(parts), np.asarray(groups)[perm])


def test_finch_three_tight_groups_in_3d_hierarchy_is_nested_and_coarsens():
    rng = np.random.default_rng(3)
    centres = np.eye(3)
    pts = np.concatenate([c + rng.normal(0, 0.03, size=(7, 3)) for c in centres])
    groups = np.repeat([0, 1, 2], 7)
    parts = finch(pts)
    sizes = [num_clusters(p) for p in parts]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # strictly coarser
    assert sizes[-1] < sizes[0]
    # the first partition never mixes groups (tight groups, far apart in angle) ...
    for lab in np.unique(parts[0]):
        assert len(np.unique(groups[parts[0] == lab])) == 1
    # ... and every later partition only merges clusters of the one before
    for fine, coarse in zip(parts, parts[1:]):
        for lab in np.unique(fine):
            assert len(np.unique(coarse[fine == lab])) == 1
    # labels are 0..k-1 over the original points
    for p in parts:
        assert p.shape == (21,) and p.dtype == np.int64 and set(p.tolist()) == set(range(num_clusters(p)))


def test_finch_uses_cosine_not_euclidean():
    # a short vector at 0 deg is Euclidean-closer to the short vector at 60 deg, but its
    # cosine neighbour is the long vector at 2 deg
    pts = _dirs([0, 2, 60], norms=[0.1, 10.0, 0.1])
    assert first_neighbours(pts)[0] == 1


def test_finch_single_point_two_identical_points_and_empty():
    assert [p.tolist() for p in finch(np.array([[1.0, 2.0]]))] == [[0]]
    parts = finch(np.array([[1.0, 2.0], [1.0, 2.0]]))
    assert [p.tolist() for p in parts] == [[0, 0]]
    assert coarsest_multi_cluster(parts).tolist() == [0, 0]
    parts = finch(np.array([[1.0, 0.0], [0.0, 1.0]]))  # two points are each other's neighbour
    assert [p.tolist() for p in parts] == [[0, 0]]
    assert finch(np.zeros((0, 3))) == []


# --------------------------------------------------------------------------- server merge
def _run(n_clients: int = 5, dim: int = 2) -> RunInfo:
    return RunInfo(seed=0, participation=1.0, num_classes=10, embedding_dim=dim, partitions={i: i + 1 for i in range(n_clients)})




def _upload(pid: int, protos: dict[int, np.ndarray], counts: dict[int, int], weight: list[float] | None = None) -> Message:
    classes = sorted(protos)
    ps = PrototypeSet(classes, np.stack([protos[c] for c in classes]), [counts[c] for c in classes])
    arrays = dict(protos_to_arrays(ps))
    if weight is not None:
        arrays["w.layer"] = Array(np.asarray(weight, dtype=np.float32))
    return _reply(pid, arrays, [int(c) for c in ps.counts], int(sum(counts.values())))


def _clusters_of(arrays: ArrayRecord) -> dict[int, np.ndarray]:
    classes, vectors = clusters_from_arrays(arrays)
    return {int(c): vectors[classes == c] for c in np.unique(classes)}


def _sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def test_server_merge_by_hand_two_clusters_unbiased_mean_and_earlier_classes_kept():
    strat = FPL(FPL.Params(), _run(5))
    assert strat.shares_weights  # FPL averages weights by default
    # class 0: clients 0-2 point one way (3 uploads), clients 3-4 another (2 uploads)
    c0 = _dirs([0, 1, 2.5, 90, 91], norms=[1, 3, 2, 5, 1])
    # class 1: clients 0 and 1 only (one cluster)
    c1 = np.array([[2.0, 2.0], [4.0, 0.0]])
    replies = []
    for pid in range(5):
        protos, counts = {0: c0[pid]}, {0: 10 + pid}
        if pid < 2:
            protos[1], counts[1] = c1[pid], 3
        replies.append(_upload(pid, protos, counts, weight=[float(pid), 1.0]))
    arrays, metrics = strat.aggregate_train(1, list(reversed(replies)))
    assert metrics["clients_ok"] == 5

    group_a, group_b = c0[:3].mean(0), c0[3:].mean(0)
    clusters = _clusters_of(arrays)
    np.testing.assert_allclose(_sorted_rows(clusters[0]), _sorted_rows(np.stack([group_a, group_b])), atol=1e-6)
    np.testing.assert_allclose(clusters[1], c1.mean(0, keepdims=True), atol=1e-6)

    got = protos_from_arrays(arrays).as_dict()
    unbiased = (group_a + group_b) / 2
    np.testing.assert_allclose(got[0], unbiased, atol=1e-6)
    assert not np.allclose(got[0], c0.mean(0), atol=1e-3)  # not the plain mean of the uploads
    np.testing.assert_allclose(got[1], c1.mean(0), atol=1e-6)
    assert protos_from_arrays(arrays).counts.tolist() == [10 + 11 + 12 + 13 + 14, 6]
    # FedAvg of the weights: sample-weighted (client pid holds 10 + pid (+6) samples)
    n = np.array([10 + p + (3 if p < 2 else 0) for p in range(5)], dtype=np.float64)
    np.testing.assert_allclose(arrays["w.layer"].numpy(), [(n * np.arange(5)).sum() / n.sum(), 1.0], atol=1e-5)

    # round 2: only class 2 is uploaded; classes 0 and 1 keep their prototypes and clusters
    r2 = [_upload(p, {2: np.array([0.0, -1.0 - p])}, {2: 4}) for p in range(2)]
    arrays2, _ = strat.aggregate_train(2, r2)
    got2 = protos_from_arrays(arrays2).as_dict()
    assert sorted(got2) == [0, 1, 2]
    np.testing.assert_allclose(got2[0], unbiased, atol=1e-6)
    np.testing.assert_allclose(got2[2], [0.0, -1.5], atol=1e-6)
    clusters2 = _clusters_of(arrays2)
    assert sorted(clusters2) == [0, 1, 2] and len(clusters2[0]) == 2 and len(clusters2[2]) == 1
    assert clusters_from_arrays(arrays2)[0].tolist() == [0, 0, 1, 2]  # one row per cluster

    # checkpoint round trip keeps the cluster table
    fresh = FPL(FPL.Params(), _run(5))
    fresh.load_state_dict(strat.state_dict())
    np.testing.assert_array_equal(
        clusters_from_arrays(fresh.global_arrays())[1], clusters_from_arrays(strat.global_arrays())[1]
    )


def test_share_weights_off_sends_no_weights_and_params_validate():
    strat = FPL(FPL.Params(share_weights=False), _run(2))
    r = [_upload(p, {0: np.array([1.0, float(p)])}, {0: 2}, weight=[1.0, 2.0]) for p in range(2)]
    arrays, _ = strat.aggregate_train(1, r)
    assert "w.layer" not in arrays
    assert STRATEGIES["fpl"] is FPL
    p = FPL.Params()
    assert (p.temperature, p.infonce_weight, p.mse_weight, p.share_weights) == (0.02, 1.0, 1.0, True)
    with pytest.raises(Exception):
        FPL.Params.model_validate({"temperature": 0.0})
    with pytest.raises(Exception):
        FPL.Params.model_validate({"temprature": 0.1})


# --------------------------------------------------------------------------- client loss
def _np_infonce(f, labels, cls, vecs, t, mode):
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    vn = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    out = []
    for i, y in enumerate(labels):
        pos = cls == y
        if not pos.any():
            continue
        s = fn[i] @ vn.T / t
        denom = np.exp(s).sum()
        if mode == "mean_log":
            out.append(np.mean(-np.log(np.exp(s[pos]) / denom)))
        else:
            out.append(-np.log(np.exp(s[pos]).sum() / denom))
    return float(np.mean(out))


def test_infonce_and_mse_by_hand_on_two_samples():
    cls = np.array([0, 0, 1])
    vecs = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 2.0]])
    f = np.array([[0.9, 0.1], [-0.2, 1.0], [3.0, 3.0]])
    labels = np.array([0, 1, 5])  # class 5 has no clusters: left out
    t = 0.5
    ft = torch.tensor(f, dtype=torch.float32, requires_grad=True)
    args = (torch.tensor(labels), torch.tensor(cls), torch.tensor(vecs, dtype=torch.float32), t)
    for mode in ("mean_log", "log_sum"):
        got = cluster_infonce(ft, *args, mode)
        assert got.item() == pytest.approx(_np_infonce(f, labels, cls, vecs, t, mode), rel=1e-5)
    # the two forms differ when a class has several clusters
    assert _np_infonce(f, labels, cls, vecs, t, "mean_log") != pytest.approx(_np_infonce(f, labels, cls, vecs, t, "log_sum"))
    assert cluster_infonce(ft, torch.tensor([7, 8, 9]), *args[1:]) is None

    # the full objective after receiving the server's arrays: InfoNCE (t = 0.02) + MSE to unbiased
    strat = FPL(FPL.Params(infonce_weight=0.5, mse_weight=2.0), _run(2))
    strat.cluster_protos = {0: vecs[:2].astype(np.float32), 1: vecs[2:].astype(np.float32)}
    unbiased = {0: vecs[:2].mean(0), 1: vecs[2]}
    strat.global_protos = PrototypeSet([0, 1], np.stack([unbiased[0], unbiased[1]]), [5, 5])
    obj = FPL.Objective(strat.params, ClientInfo(0, 10, 2, "cpu"))
    assert obj.extra_loss(ft, torch.tensor(labels), None) is None  # nothing received yet
    obj.receive(strat.global_arrays(), model=None)
    loss = obj.extra_loss(ft, torch.tensor(labels), None)
    mse = np.mean([(f[0] - unbiased[0]) ** 2, (f[1] - unbiased[1]) ** 2])
    expected = 0.5 * _np_infonce(f, labels, cls, vecs, 0.02, "mean_log") + 2.0 * mse
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    loss.backward()
    g = ft.grad.numpy()
    assert np.isfinite(g).all() and np.abs(g[:2]).sum() > 0
    assert np.all(g[2] == 0)  # the sample without a prototype gets no gradient
    # inference uses the unbiased prototypes
    assert sorted(obj.inference_prototypes(None).classes.tolist()) == [0, 1]


# --------------------------------------------------------------------------- end to end
def run(tmp_path, name, engine="inline", **over):
    over.setdefault("strategy", {"name": "fpl", "params": {}})
    return run_tiny(tmp_path, name, engine, **over)


def test_fpl_end_to_end_inline(tmp_path):
    out = run(tmp_path, "fpl")
    m = out.matrix
    assert m.shape == (3, 3)
    assert np.isfinite(m[np.tril_indices(3)]).all()
    assert m[0, 0] > 0.5
    assert out.summary["completed"] is True
