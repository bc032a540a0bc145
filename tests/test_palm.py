"""PALM (strategies/palm.py): Sinkhorn, the MLE and prototype-contrast losses against hand
computations and against a line-by-line numpy transcription of the official ``PALM.mle_loss`` /
``proto_contra`` (jeff024/PALM, util/loss_functions.py), the federated merge, the open-world score,
and end-to-end runs (resume, both engines' contract: nothing fails, every number finite)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny

from simulator.engine.runner import run_scenario
from simulator.learner.prototypes import PrototypeSet
from simulator.scenario import validate_scenario
from strategies.palm import (
    Objective,
    Params,
    class_assignment,
    ema_update,
    merge_mixtures,
    mixture_scores,
    mle_loss,
    prototype_contrast,
    row_normalised,
    sinkhorn,
    top_k_mask,
)


# --------------------------------------------------------------------------- the official algorithm, in numpy
def _l1_rows(a):
    return a / np.maximum(np.abs(a).sum(1, keepdims=True), 1e-12)


def _l1_cols(a):
    return a / np.maximum(np.abs(a).sum(0, keepdims=True), 1e-12)


def official_sinkhorn(f, protos, eps, iters):
    q = np.exp(f @ protos.T / eps).T  # [P, B]
    b, k = q.shape[1], q.shape[0]
    q = q / q.sum()
    for _ in range(iters):
        q = _l1_rows(q) / k
        q = _l1_cols(q) / b
    return (q * b).T


def official_palm_step(f, labels, protos, num_classes, cache, m, temp, k, eps=0.05, iters=3):
    """``PALM.mle_loss`` + ``proto_contra`` with nviews 1, in numpy: prototype j belongs to class
    ``j % num_classes`` (``arange(num_classes).repeat(cache_size)``)."""
    proto_labels = np.tile(np.arange(num_classes), cache)
    mask = (labels[:, None] == proto_labels[None, :]).astype(float)
    q = official_sinkhorn(f, protos, eps, iters)
    upd = mask * q
    top = np.ones_like(upd)  # k = 0: the official "original" branch, no top-k
    if k > 0:
        top = np.zeros_like(upd)
        np.put_along_axis(top, np.argsort(-upd, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    update_mask = _l1_cols(_l1_rows(top * upd))
    new = m * protos + (1 - m) * update_mask.T @ f
    new = new / np.linalg.norm(new, axis=1, keepdims=True)
    q2 = official_sinkhorn(f, new, eps, iters)
    logits = f @ new.T / temp
    top2 = np.ones_like(update_mask)
    if k > 0:
        top2 = np.zeros_like(update_mask)
        np.put_along_axis(top2, np.argsort(-update_mask, axis=1, kind="stable")[:, :k], 1.0, axis=1)
    w = _l1_rows(top2 * mask * q2)
    mle = -np.mean((w * logits).sum(1) - np.log(np.exp(logits).sum(1)))
    sim = new @ new.T / 0.5
    sim = sim - sim.max(1, keepdims=True)
    same = (proto_labels[:, None] == proto_labels[None, :]).astype(float)
    np.fill_diagonal(same, 0.0)
    not_self = 1.0 - np.eye(len(new))
    pos = (_l1_rows(same) * sim).sum(1)
    neg = np.log((not_self * np.exp(sim)).sum(1))
    contra = -np.mean(pos - neg)
    return mle, contra, new


def ours_palm_step(f, labels, protos_official, num_classes, cache, m, temp, k, eps=0.05, iters=3):
    """Our functions on the same inputs (our layout: class-major, ``cache`` rows per class)."""
    order = np.concatenate([np.arange(cache) * num_classes + c for c in range(num_classes)])  # ours <- official
    protos = torch.tensor(protos_official[order])
    owner = torch.as_tensor(np.repeat(np.arange(num_classes), cache))
    ft, yt = torch.tensor(f), torch.as_tensor(labels)
    q = class_assignment(ft, yt, protos, owner, eps, iters)
    keep = top_k_mask(q, k)
    new = ema_update(ft, row_normalised(q * keep), protos, m)
    q2 = class_assignment(ft, yt, new, owner, eps, iters)
    mle = mle_loss(ft, row_normalised(q2 * keep), new, temp)
    contra = prototype_contrast(new, owner)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return float(mle), float(contra), new.numpy()[back]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("in_batch", [3, 2])
def test_one_step_equals_the_official_code(seed, k, in_batch):
    # in_batch 2: class 2 has components but no sample in the batch (a class-incremental batch)
    rng = np.random.default_rng(seed)
    classes, cache, d = 3, 3, 5
    f = rng.normal(size=(12, d))
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    labels = np.arange(12) % in_batch
    protos = rng.random((classes * cache, d))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    for m, temp in ((0.999, 0.1), (0.5, 0.3)):
        want = official_palm_step(f, labels, protos, classes, cache, m, temp, k)
        got = ours_palm_step(f, labels, protos, classes, cache, m, temp, k)
        assert got[0] == pytest.approx(want[0], rel=1e-9)
        assert got[1] == pytest.approx(want[1], rel=1e-9)
        np.testing.assert_allclose(got[2], want[2], atol=1e-12)


def test_sinkhorn_on_a_symmetric_two_by_two_is_the_softmax_it_balances():
    # two samples on two orthogonal prototypes: the matrix is already balanced, so Sinkhorn
    # returns each row's softmax of the cosines / epsilon: [e^{1/eps}, 1] / (e^{1/eps} + 1)
    eps = 0.5
    q = sinkhorn(torch.eye(2, dtype=torch.float64), eps, 3)
    a = math.exp(1 / eps) / (math.exp(1 / eps) + 1)
    np.testing.assert_allclose(q.numpy(), [[a, 1 - a], [1 - a, a]], atol=1e-12)
    # rows sum to one, columns to B / P
    s = torch.tensor([[0.9, 0.1, -0.3], [0.2, 0.8, 0.5], [0.4, -0.6, 0.7], [0.0, 0.3, 0.1]], dtype=torch.float64)
    q = sinkhorn(s, 0.1, 50)
    np.testing.assert_allclose(q.sum(0).numpy(), [4 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(q.sum(1).numpy(), [1.0] * 4, atol=1e-12)


def test_losses_on_a_hand_computed_case():
    # each sample sits on its own component of one class (k = 2): top-1 keeps it, so
    # MLE = -(1/T - log(e^{1/T} + 1)) = log(1 + e^{-1/T}); with ema 0 the update moves each
    # component onto its sample
    f = torch.eye(2, dtype=torch.float64)
    y = torch.tensor([0, 0])
    protos = torch.tensor([[1.0, 0.2], [0.1, 1.0]], dtype=torch.float64)
    owner = torch.tensor([0, 0])
    q = class_assignment(f, y, protos, owner, 0.05, 3)
    keep = top_k_mask(q, 1)
    np.testing.assert_array_equal(keep.numpy(), np.eye(2))
    new = ema_update(f, row_normalised(q * keep), protos, 0.0)
    np.testing.assert_allclose(new.numpy(), np.eye(2), atol=1e-12)
    t = 0.1
    assert float(mle_loss(f, row_normalised(q * keep), new, t)) == pytest.approx(math.log(1 + math.exp(-1 / t)), rel=1e-12)
    # contrast: components (1,0), (0,1) of class 0 and (-1,0), (0,-1) of class 1; each one's
    # positive (the other of its class) and one negative are orthogonal (cos 0), the other
    # negative is opposite (cos -1): -log(e^0 / (e^0 + e^0 + e^{-2})) = log(2 + e^{-2})
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    got = prototype_contrast(p, torch.tensor([0, 0, 1, 1]))
    assert float(got) == pytest.approx(math.log(2 + math.exp(-2)), rel=1e-12)
    assert prototype_contrast(p, torch.tensor([0, 1, 2, 3])) is None  # one component per class


def test_assignment_weights_only_the_samples_own_class_even_when_other_classes_are_absent():
    f = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], dtype=torch.float64)
    owner = torch.tensor([0, 0, 1, 1])
    q = class_assignment(f, y, protos, owner, 0.05, 3)
    assert torch.all(q[:, :2] == 0)  # class 0's components take part in Sinkhorn, not in the weights
    np.testing.assert_allclose(q[:, 2:].numpy(), (sinkhorn(f @ protos.T, 0.05, 3) * (owner == 1)).numpy()[:, 2:], atol=1e-15)
    w = row_normalised(q * top_k_mask(q, 1))
    np.testing.assert_array_equal(w.numpy(), [[0, 0, 0, 1], [0, 0, 1, 0]])  # each sample's nearest component of class 1


def test_merge_is_the_mass_weighted_mean_direction_in_any_client_order():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 1.0], [0.0, 1.0]])
    ma, mb = np.array([3.0, 0.0]), np.array([1.0, 0.0])
    got = merge_mixtures([a, b], [ma, mb])
    want0 = np.array([3.0, 1.0]) / math.hypot(3, 1)
    np.testing.assert_allclose(got[0], want0, atol=1e-15)
    np.testing.assert_allclose(got[1], [0.0, 1.0], atol=1e-15)  # no mass anywhere: plain mean
    np.testing.assert_allclose(merge_mixtures([b, a], [mb, ma]), got, atol=1e-15)


def test_mixture_score_is_the_largest_cosine_to_any_component():
    comps = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    f = np.array([[3.0, 4.0], [-1.0, -0.5], [0.0, -1.0]])
    want = [max(float(v @ c) / (np.linalg.norm(v) * np.linalg.norm(c)) for c in comps) for v in f]
    np.testing.assert_allclose(mixture_scores(f, comps), want, atol=1e-12)


def test_client_state_keeps_the_components_and_masses_cover_the_clients_classes():
    from simulator.objective import ClientInfo

    obj = Objective(Params(k=3, top_k=2), ClientInfo(0, 6, 4, "cpu"))
    obj.train_classes([0, 1])
    feats = torch.randn(10, 4, requires_grad=True)
    labels = torch.tensor([0, 1] * 5)
    loss = obj.extra_loss(feats, labels, None)
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    obj.observe_embeddings(torch.randn(7, 4), np.array([1, 1, 1, 1, 1, 1, 1]))
    assert sorted(obj._masses) == [1] and obj._masses[1].sum() == pytest.approx(7.0)
    again = Objective(Params(k=3, top_k=2), ClientInfo(0, 6, 4, "cpu"))
    again.load_state_dict(obj.state_dict())
    for c in (0, 1):
        assert torch.equal(again.mixtures[c], obj.mixtures[c])


TASKS = {"initial_classes": 2, "classes_per_task": 2}


def test_run_completes_reports_open_world_and_the_server_merge_reaches_clients(tmp_path):
    raw = tiny(strategy={"name": "palm", "params": {"k": 3, "top_k": 2}})
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", out=None, plots=False)
    assert run.summary["completed"]
    assert pd.read_csv(tmp_path / "run" / "failures.csv").empty
    for key in ("final_avg_accuracy", "avg_forgetting", "open_world_auroc", "open_world_fpr95"):
        assert np.isfinite(run.summary[key]), key
    means = tiny(strategy={"name": "palm", "params": {"k": 3, "top_k": 2, "open_world_score": "class_means"}})
    other = run_scenario(validate_scenario(means), run_dir=tmp_path / "means", out=None, plots=False)
    # the score changes the open-world columns only, never the accuracies
    assert other.summary["final_avg_accuracy"] == run.summary["final_avg_accuracy"]
    assert other.summary["open_world_auroc"] != run.summary["open_world_auroc"]


def test_resume_is_byte_identical(tmp_path, monkeypatch):
    from helpers import interrupted_then_resumed

    raw = tiny(strategy={"name": "palm", "params": {"k": 3}})
    interrupted_then_resumed(raw, tmp_path, monkeypatch, out=None, plots=False)
    for name in ("accuracy_matrix.csv", "client_metrics.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_the_servers_merge_of_two_uploads_is_what_a_client_receives():
    from flwr.app import ArrayRecord, MetricRecord

    from simulator.objective import ClientInfo
    from strategies.base import RunInfo, Upload
    from strategies.palm import PALM, mixtures_from_arrays

    params = Params(k=2, top_k=0, share_weights=False)
    uploads, sent = [], []
    for pid, seed in ((0, 0), (1, 1)):
        obj = Objective(params, ClientInfo(pid, 4, 3, "cpu"))
        obj.train_classes([0, 1])
        g = torch.Generator().manual_seed(seed)
        obj.extra_loss(torch.randn(8, 3, generator=g), torch.tensor([0, 1] * 4), None)
        obj.observe_embeddings(torch.randn(6, 3, generator=g), np.array([0, 0, 0, 1, 1, 1]))
        arrays = ArrayRecord(obj.upload(None, PrototypeSet.empty(3)))
        uploads.append(Upload(pid, 6, arrays, MetricRecord({}), None))
        sent.append(mixtures_from_arrays(arrays))
    server = PALM(params, RunInfo(seed=0, participation=1.0, num_classes=4, embedding_dim=3))
    server.merge(1, uploads)
    client = Objective(params, ClientInfo(2, 4, 3, "cpu"))
    client.receive(server.global_arrays(), None)
    for c in (0, 1):
        want = merge_mixtures([sent[0][0][c], sent[1][0][c]], [sent[0][1][c], sent[1][1][c]])
        np.testing.assert_allclose(client.mixtures[c].numpy(), want, atol=1e-6)

