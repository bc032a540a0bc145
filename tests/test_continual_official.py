"""FedEWC, PRD and TEEN as their official code defines them (issue 19, "Baselines as their papers
define them"): EWC's narrowed cross-entropy (PyCIL models/ewc.py), PRD's per-old-task relation
distillation with the official defaults (Probing-Continual-Learning methods/repe.py), TEEN as a
post-hoc calibration of the prototypes used for prediction (wangkiw/TEEN soft_calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.engine.runner import run_scenario
from simulator.learner.backbones import build_model
from simulator.learner.continual import build_stack, task_data
from simulator.learner.continual.ewc import EWC
from simulator.learner.continual.base import OldOutputs
from simulator.learner.continual.prd import PRD, supcon_loss
from simulator.learner.prototypes import PrototypeSet
from simulator.learner.training import head_loss
from simulator.scenario import PrdConfig, validate_scenario


def toy(classes, n_per_class: int = 6, dim: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n_per_class)
    x = (rng.normal(size=(max(classes) + 1, dim))[y] * 3 + rng.normal(size=(len(y), dim))).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- FedEWC
def test_ewc_cross_entropy_on_new_class_samples_ignores_the_old_classes_logits():
    """PyCIL's EWC trains new tasks with ``cross_entropy(logits[:, known:], targets - known)``:
    the old classes' logits get no gradient from the classification loss (before the fix, EWC
    kept the cross-entropy over every seen class and pushed them down)."""
    model = build_model("mlp", (6,), 8, 6, with_head=True, init_seed=0)
    x, y = toy([4, 5])
    ewc = EWC(weight=1000.0)
    ewc.on_task_start(model, task_data(x, y, [4, 5], [0, 1, 2, 3, 4, 5], 6, None, "head", "cpu", 8))
    kept = ewc.train_classes([0, 1, 2, 3, 4, 5])
    assert kept == [4, 5]
    mask = torch.zeros(6, dtype=torch.bool)
    mask[kept] = True
    loss = head_loss(model.head(model(torch.as_tensor(x))), torch.as_tensor(y), mask)
    loss.backward()
    w = model.head.weight.grad
    assert torch.count_nonzero(w[:4]) == 0 and torch.count_nonzero(w[4:]) > 0
    # the same narrowing as PyCIL's F.cross_entropy(logits[:, known:], targets - known)
    logits = model.head(model(torch.as_tensor(x))).detach()
    ref = torch.nn.functional.cross_entropy(logits[:, 4:], torch.as_tensor(y) - 4)
    assert float(head_loss(logits, torch.as_tensor(y), mask)) == pytest.approx(float(ref), rel=1e-6)
    # the first task (no old classes), prototype strategies and weight 0: nothing narrowed
    first = EWC()
    first.on_task_start(model, task_data(x, y, [4, 5], [4, 5], 6, None, "head", "cpu", 8))
    assert first.train_classes([4, 5]) == [4, 5]
    off = EWC(weight=0.0)
    off.on_task_start(model, task_data(x, y, [4, 5], [0, 1, 2, 3, 4, 5], 6, None, "head", "cpu", 8))
    assert off.train_classes([0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]
    # replayed classes stay in the cross-entropy, as with LwF
    mem = EWC()
    mem.on_task_start(model, task_data(x, y, [4, 5], [0, 1, 2, 3, 4, 5], 6, None, "head", "cpu", 8, memory_classes=[1]))
    assert mem.train_classes([0, 1, 2, 3, 4, 5]) == [1, 4, 5]


def test_ewc_narrowing_reaches_the_client_through_the_stack():
    cfg = validate_scenario({
        "name": "e", "dataset": {"source": "synthetic", "num_classes": 6, "dim": 6, "samples_per_class": 10},
        "tasks": {"initial_classes": 2, "classes_per_task": 2}, "continual": {"ewc": {}},
        "resources": {"engine": "inline"}}).continual
    stack = build_stack(cfg, uses_continual=True)
    model = build_model("mlp", (6,), 8, 6, with_head=True, init_seed=0)
    x, y = toy([2, 3])
    stack.task_change(model, None, task_data(x, y, [2, 3], [0, 1, 2, 3], 6, None, "head", "cpu", 8))
    assert stack.train_classes([0, 1, 2, 3]) == [2, 3]
    again = build_stack(cfg, uses_continual=True, state=stack.state_dict())  # kept across rounds
    assert again.train_classes([0, 1, 2, 3]) == [2, 3]


# --------------------------------------------------------------------------- PRD
def _kl_batchmean(s_old: np.ndarray, s_new: np.ndarray, t: float) -> float:
    def log_softmax(z):
        z = z / t
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lq, lp = log_softmax(s_old), log_softmax(s_new)
    return float((np.exp(lq) * (lq - lp)).sum(1).mean())


def test_prd_relation_loss_is_the_official_sum_over_old_tasks():
    """``relation_distillation_loss``: one softmax + KL(batchmean) per old task on
    ``<h, p_c> / ||p_c||`` (features not normalised), summed; computed here by hand in numpy.
    Before the fix: one softmax over every old prototype on cosine similarities."""
    rng = np.random.default_rng(0)
    protos_v = rng.normal(size=(5, 4)) * np.array([[1.0], [2.0], [0.5], [3.0], [1.5]])
    h_new = rng.normal(size=(3, 4)) * 2
    h_old = h_new + rng.normal(size=(3, 4))
    # old classes 0..4 learned in tasks [0, 1], [2, 3, 4]; the current task has 5, 6
    x, y = toy([5, 6], n_per_class=2, dim=4)
    data = task_data(x, y, [5, 6], list(range(7)), 7, PrototypeSet(np.arange(5), protos_v, np.ones(5)),
                     "prototype", "cpu", 8, task_classes=[[0, 1], [2, 3, 4], [5, 6]])
    assert data.old_tasks == [[0, 1], [2, 3, 4]]
    prd = PRD(weight=0.5, temperature=0.2, distill_weight=3.0, distill_temperature=2.0)
    prd.on_task_start(None, data)
    s_new = h_new @ protos_v.T / np.linalg.norm(protos_v, axis=1)
    s_old = h_old @ protos_v.T / np.linalg.norm(protos_v, axis=1)
    expected = _kl_batchmean(s_old[:, :2], s_new[:, :2], 2.0) + _kl_batchmean(s_old[:, 2:], s_new[:, 2:], 2.0)
    one_softmax = _kl_batchmean(s_old, s_new, 2.0)
    assert abs(expected - one_softmax) > 1e-3  # the two forms differ on these tensors
    got = prd.relation_loss(torch.tensor(h_new, dtype=torch.float32), torch.tensor(h_old, dtype=torch.float32))
    assert float(got) == pytest.approx(expected, rel=1e-5)
    # extra_loss = weight * SupCon + distill_weight * relation
    f, fo = torch.tensor(h_new, dtype=torch.float32), torch.tensor(h_old, dtype=torch.float32)
    labels = torch.tensor([5, 5, 6])
    total = prd.extra_loss(f, labels, None, None, OldOutputs(fo, None))
    assert float(total) == pytest.approx(0.5 * float(supcon_loss(f, labels, 0.2)) + 3.0 * expected, rel=1e-5)
    # without task_classes every old class forms one group (the old single-softmax form)
    flat = PRD(distill_temperature=2.0)
    flat.on_task_start(None, task_data(x, y, [5, 6], list(range(7)), 7, PrototypeSet(np.arange(5), protos_v, np.ones(5)),
                                       "prototype", "cpu", 8))
    assert float(flat.relation_loss(f, fo)) == pytest.approx(one_softmax, rel=1e-5)


def test_prd_defaults_are_the_official_parser_defaults():
    # utils/parser.py: supcon_temperature 0.2, distill_coef 1.0, distill_temp 2
    for obj in (PRD(), PrdConfig()):
        assert (obj.weight, obj.temperature, obj.distill_weight, obj.distill_temperature) == (1.0, 0.2, 1.0, 2.0)


# --------------------------------------------------------------------------- TEEN
def _tiny_fedproto(tmp_path, name: str, continual: dict):
    raw = {
        "name": "teen", "seed": 3,
        "dataset": {"source": "synthetic", "num_classes": 6, "dim": 8, "samples_per_class": 40, "class_sep": 3.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "strategy": {"name": "fedproto"},
        "continual": continual,
        "resources": {"engine": "inline"},
    }
    return run_scenario(validate_scenario(raw), run_dir=tmp_path / name, plots=False)


def test_teen_is_post_hoc_uploads_unchanged_predictions_changed(tmp_path):
    """TEEN is training-free: with fedproto (whose later rounds train towards the merged
    prototypes) the uploaded, merged prototypes must be those of the run without TEEN, bit for
    bit; only the predictions change. Before the fix the client calibrated what it uploaded."""
    plain = _tiny_fedproto(tmp_path, "plain", {})
    teen = _tiny_fedproto(tmp_path, "teen", {"teen": {"alpha": 0.9, "tau": 1.0}})
    g0 = np.load(plain.run_dir / "final" / "global.npz")
    g1 = np.load(teen.run_dir / "final" / "global.npz")
    assert sorted(g0.files) == sorted(g1.files)
    for k in g0.files:
        np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)
    # the base task has nothing to calibrate; later tasks' predictions change
    assert plain.matrix[0, 0] == teen.matrix[0, 0]
    later = ~np.isnan(plain.matrix[1:])
    assert not np.array_equal(plain.matrix[1:][later], teen.matrix[1:][later])
