"""Continual mechanisms as plugins (simulator/learner/continual): LwF, online EWC, herding, PRD,
TEEN on hand-made tensors, their composition on the one training loop, and resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import interrupted_then_resumed
import torch

from simulator.engine.runner import run_scenario
from simulator.errors import UserError
from simulator.learner.backbones import build_model
from simulator.learner.continual import MECHANISMS, build_stack, herding_order, select_memory, task_data
from simulator.learner.continual.base import OldOutputs, kl_distillation
from simulator.learner.continual.ewc import EWC, FISHER_MAX
from simulator.learner.continual.lwf import LwF
from simulator.learner.continual.prd import PRD, supcon_loss
from simulator.learner.continual.teen import TEEN, calibrate_prototypes
from simulator.learner.prototypes import PrototypeSet
from simulator.scenario import validate_scenario


def toy(n: int = 24, dim: int = 6, classes=(0, 1, 2, 3), seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.asarray(classes), n // len(classes))
    centers = rng.normal(size=(max(classes) + 1, dim)) * 3
    x = (centers[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    return x, y


def protos(classes, vectors) -> PrototypeSet:
    return PrototypeSet(np.asarray(classes), np.asarray(vectors, dtype=np.float32), np.ones(len(classes)))


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def old_outputs(model, x) -> OldOutputs:
    with torch.no_grad():
        f = model(x)
        return OldOutputs(f.clone(), model.head(f).clone() if model.head is not None else None)


# --------------------------------------------------------------------------- LwF
@pytest.mark.parametrize("with_head", [True, False])
def test_lwf_is_zero_for_an_unchanged_model_and_positive_with_gradients_after_a_change(with_head):
    model = build_model("mlp", (6,), 8, 6, with_head=with_head, init_seed=0)
    x, y = toy(classes=(4, 5))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    data = task_data(x, y, [4, 5], [0, 1, 2, 3, 4, 5], 6,
                     None if with_head else protos([0, 1, 2, 3], np.random.default_rng(3).normal(size=(4, 8))),
                     "head" if with_head else "prototype", "cpu", 8)
    assert data.old_classes == [0, 1, 2, 3]
    lwf = LwF(weight=2.0, temperature=2.0)
    lwf.on_task_start(model, data)
    old = old_outputs(model, xt)
    model.eval()
    f = model(xt)
    loss = lwf.extra_loss(f, yt, model.head(f) if with_head else None, model, old)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    perturb(model)
    f = model(xt)
    loss = lwf.extra_loss(f, yt, model.head(f) if with_head else None, model, old)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) > 1e-6
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.parameters()) > 0
    if with_head:  # only the old classes' logits are distilled: the new classes' rows get no gradient from LwF
        assert float(model.head.weight.grad[4:].abs().sum()) == 0.0 and float(model.head.weight.grad[:4].abs().sum()) > 0
        # and the cross-entropy keeps the task's own classes (plus those of the replay memory)
        assert lwf.train_classes([0, 1, 2, 3, 4, 5]) == [4, 5]
        with_memory = task_data(x, y, [4, 5], [0, 1, 2, 3, 4, 5], 6, None, "head", "cpu", 8, memory_classes=[1])
        lwf.on_task_start(model, with_memory)
        assert lwf.train_classes([0, 1, 2, 3, 4, 5]) == [1, 4, 5]
        assert LwF(weight=0.0).train_classes([0, 1]) == [0, 1]
    else:
        assert lwf.train_classes([0, 1, 2, 3, 4, 5]) == [0, 1, 2, 3, 4, 5]


def test_kl_distillation_by_hand():
    old = torch.tensor([[1.0, 0.0]])
    new = torch.tensor([[0.0, 1.0]])
    t = 2.0
    p = torch.softmax(old / t, 1)[0]
    q = torch.softmax(new / t, 1)[0]
    expected = float((p * (p.log() - q.log())).sum())
    assert float(kl_distillation(old, new, t)) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- EWC
def test_online_ewc_zero_at_the_anchor_and_fisher_accumulates():
    model = build_model("mlp", (6,), 8, 4, with_head=True, init_seed=0)
    x, y = toy(classes=(0, 1))
    data = task_data(x, y, [0, 1], [0, 1], 4, None, "head", "cpu", 8)
    ewc = EWC(weight=1000.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ewc.on_task_end(model, data)
    for k, v in model.state_dict().items():  # the Fisher estimate leaves the model as it was
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    f1 = {k: v.clone() for k, v in ewc.fisher.items()}
    assert all(float(v.max()) <= FISHER_MAX for v in f1.values())
    assert sum(float(v.sum()) for v in f1.values()) > 0
    assert float(f1["head.weight"][2:].abs().sum()) == 0.0  # classes not seen yet: no Fisher

    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    f = model(xt)
    assert float(ewc.extra_loss(f, yt, model.head(f), model, None).detach()) == 0.0
    perturb(model, 0.1)
    loss = ewc.extra_loss(model(xt), yt, None, model, None)
    # by hand: (lambda / 2) sum F (theta - theta*)^2
    expected = 0.5 * 1000.0 * sum(float((f1[k] * (p.detach() - ewc.anchor[k]) ** 2).sum()) for k, p in model.named_parameters())
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5) and expected > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # online: the second task's Fisher is added to the first, the anchor moves to the new weights
    x2, y2 = toy(classes=(2, 3), seed=5)
    data2 = task_data(x2, y2, [2, 3], [0, 1, 2, 3], 4, None, "head", "cpu", 8)
    from simulator.learner.continual.ewc import empirical_fisher

    f2 = empirical_fisher(model, data2)
    ewc.on_task_end(model, data2)
    for k in f1:
        torch.testing.assert_close(ewc.fisher[k], f1[k] + f2[k])
        assert torch.equal(ewc.anchor[k], dict(model.named_parameters())[k].detach())


# --------------------------------------------------------------------------- herding
def test_herding_picks_the_known_exemplars():
    # normalised: e1=(1,0), e2=(0,1), e3=(1,1)/sqrt2, e4=(1,0); class mean (0.677, 0.427).
    # k=1: e3 is nearest the mean; k=2: e1 and e4 tie ((e3+e1)/2 is 0.191 away), the first wins;
    # k=3: e2 (0.178 away) beats e4 (0.296); then e4.
    feats = np.array([[3.0, 0.0], [0.0, 0.5], [2.0, 2.0], [7.0, 0.0]])  # row scale does not matter
    assert herding_order(feats, 4).tolist() == [2, 0, 1, 3]
    assert herding_order(feats, 2).tolist() == [2, 0]
    # through the memory update: the samples at those positions, per class, others untouched
    idx = np.array([10, 11, 12, 13, 20, 21])
    labels = np.array([5, 5, 5, 5, 6, 6])
    table = {10: feats[0], 11: feats[1], 12: feats[2], 13: feats[3], 20: np.array([1.0, 0.0]), 21: np.array([0.0, 1.0])}
    mem = select_memory("herding", {9: np.array([1, 2])}, idx, labels, 2, np.random.default_rng(0),
                        lambda i: np.stack([table[int(j)] for j in i]))
    assert mem[5].tolist() == [10, 12] and len(mem[6]) == 2 and mem[9].tolist() == [1, 2]
    rand = select_memory("random", {}, idx, labels, 2, np.random.default_rng(0))
    assert set(rand) == {5, 6} and all(len(v) == 2 for v in rand.values())


def test_herding_mean_tracks_the_class_mean_better_than_random():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 5)) + 1.0
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    mu = fn.mean(0)
    herd = np.linalg.norm(fn[herding_order(f, 10)].mean(0) - mu)
    rand = np.mean([np.linalg.norm(fn[rng.choice(200, 10, replace=False)].mean(0) - mu) for _ in range(50)])
    assert herd < rand / 2  # ratio 0.155 here, 0.178-0.294 over 5 seeds


# --------------------------------------------------------------------------- PRD
def test_supcon_by_hand_and_prd_loss_finite_with_gradients():
    # two samples of class 0, one of class 1, tau 1: anchor 0 has one positive (sample 1)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    # anchors 0 and 1: log(e^1 / (e^1 + e^0)); anchor 2 has no positive and is left out
    expected = -math.log(math.e / (math.e + 1.0))
    assert float(supcon_loss(f, y, 1.0)) == pytest.approx(expected, rel=1e-6)

    model = build_model("mlp", (6,), 8, 6, with_head=False, init_seed=0)
    x, yy = toy(classes=(4, 5))
    xt, yt = torch.as_tensor(x), torch.as_tensor(yy)
    data = task_data(x, yy, [4, 5], [0, 1, 2, 3, 4, 5], 6, protos([0, 1, 2], np.random.default_rng(1).normal(size=(3, 8))), "prototype", "cpu", 8)
    prd = PRD(weight=1.0, temperature=0.1)
    prd.on_task_start(model, data)
    old = old_outputs(model, xt)
    assert float(prd.relation_loss(model(xt), old.features).detach()) == pytest.approx(0.0, abs=1e-6)
    perturb(model, 0.2)
    feats = model(xt)
    rel = prd.relation_loss(feats, old.features)
    loss = prd.extra_loss(feats, yt, None, model, old)
    assert float(rel.detach()) > 0 and math.isfinite(float(loss.detach())) and float(loss.detach()) > float(rel.detach())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())


# --------------------------------------------------------------------------- TEEN
def test_teen_calibration_by_hand():
    new = np.array([[2.0, 0.0]])
    old = np.array([[2.0, 0.0], [0.0, 3.0]])
    # normalised: n = (1, 0), base (1, 0), (0, 1); weights softmax(16 * (1, 0)) = (w1, w2);
    # D = normalise((w1, w2)); p <- ||p|| (0.5 n + 0.5 D) with ||p|| = 2
    w1 = math.exp(16) / (math.exp(16) + 1.0)
    w2 = 1.0 - w1
    d = np.array([w1, w2]) / math.hypot(w1, w2)
    expected = 2.0 * (0.5 * np.array([1.0, 0.0]) + 0.5 * d)
    np.testing.assert_allclose(calibrate_prototypes(new, old, 0.5, 16.0)[0], expected, rtol=1e-6)
    # the plugin calibrates only the classes that are not base classes, and keeps the counts
    teen = TEEN(alpha=0.5, tau=16.0)
    held = PrototypeSet(np.array([0, 1, 7]), np.array([[2.0, 0.0], [0.0, 3.0], [2.0, 0.0]], dtype=np.float32), np.array([3, 4, 5]))
    out = teen.inference_prototypes(held, [0, 1])
    np.testing.assert_array_equal(out.vectors[:2], held.vectors[:2])
    np.testing.assert_allclose(out.vectors[2], expected, rtol=1e-6)
    assert out.counts.tolist() == [3, 4, 5]
    # alpha 0; alpha 1 with tau -> 0 (uniform weights): normalise((1, 0) + (0, 1)) times ||p|| = 2
    np.testing.assert_allclose(calibrate_prototypes(new, old, 0.0, 16.0), new)
    np.testing.assert_allclose(calibrate_prototypes(new, old, 1.0, 1e-9), [[math.sqrt(2), math.sqrt(2)]], rtol=1e-6)


# --------------------------------------------------------------------------- composition
def tiny(**over) -> dict:
    raw = {
        "name": "cont",
        "seed": 4,
        "dataset": {"source": "synthetic", "num_classes": 8, "dim": 8, "samples_per_class": 40, "class_sep": 5.0},
        "tasks": {"initial_classes": 2, "classes_per_task": 2},
        "clients": {"num_clients": 3, "partition": {"scheme": "dirichlet", "alpha": 1.0, "min_size": 4}},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "mlp", "embedding_dim": 16},
        "resources": {"engine": "inline"},
    }
    raw.update(over)
    return raw


def test_stack_is_composed_from_the_scenario_and_round_trips_its_state():
    cfg = validate_scenario(tiny(continual={"lwf": {"weight": 3.0}, "ewc": {}, "teen": {"alpha": 0.1}})).continual
    stack = build_stack(cfg, uses_continual=True)
    assert [p.name for p in stack.plugins] == ["lwf", "ewc", "teen"] and stack.plugins[0].weight == 3.0
    assert not build_stack(cfg, uses_continual=False)  # finetune: nothing
    assert set(MECHANISMS) <= set(type(cfg).model_fields)
    model = build_model("mlp", (6,), 8, 4, with_head=True, init_seed=0)
    x, y = toy(classes=(2, 3))
    stack.task_change(model, task_data(x, y, [0, 1], [0, 1], 4, None, "head", "cpu", 8),
                      task_data(x, y, [2, 3], [0, 1, 2, 3], 4, protos([0, 1], np.ones((2, 8))), "head", "cpu", 8))
    assert stack.old_state is not None and stack.plugins[1].fisher
    state = stack.state_dict()
    again = build_stack(cfg, uses_continual=True, state=state)
    assert again.plugins[0].old_classes == [0, 1]
    assert again.plugins[1].ce_classes == [2, 3]  # EWC narrows the cross-entropy as LwF does
    for k in state["plugins"]["ewc"]["fisher"]:
        assert torch.equal(again.plugins[1].fisher[k], stack.plugins[1].fisher[k])
    with pytest.raises(UserError, match="continual.lwf.temperature"):
        validate_scenario(tiny(continual={"lwf": {"temperature": 0}}))
    with pytest.raises(UserError, match="continual.memory_selection"):
        validate_scenario(tiny(continual={"memory_selection": "best"}))


def _run(tmp_path, name, **over):
    return run_scenario(validate_scenario(tiny(**over)), run_dir=tmp_path / name, plots=False)


def test_mechanisms_change_training_except_for_finetune(tmp_path):
    mech = {"lwf": {"weight": 5.0}, "ewc": {"weight": 1e5}}
    base = _run(tmp_path, "a", strategy={"name": "fedavg"})
    with_m = _run(tmp_path, "b", strategy={"name": "fedavg"}, continual=mech)
    assert not np.array_equal(np.nan_to_num(base.matrix), np.nan_to_num(with_m.matrix))
    ft = _run(tmp_path, "c", strategy={"name": "finetune"})
    ft_m = _run(tmp_path, "d", strategy={"name": "finetune"}, continual=mech)
    np.testing.assert_array_equal(ft.matrix, ft_m.matrix)  # finetune ignores every mechanism
    p = _run(tmp_path, "e", strategy={"name": "proto_avg"})
    p_teen = _run(tmp_path, "f", strategy={"name": "proto_avg"}, continual={"teen": {"alpha": 0.9, "tau": 1.0}})
    assert not np.array_equal(np.nan_to_num(p.matrix), np.nan_to_num(p_teen.matrix))
    # the first task has no old classes: TEEN changes nothing there
    assert p.matrix[0, 0] == p_teen.matrix[0, 0]


@pytest.mark.parametrize(
    "strategy, continual",
    [
        ("fedavg", {"lwf": {}, "ewc": {}, "memory_per_class": 4, "memory_selection": "herding"}),
        ("proto_avg", {"prd": {}, "teen": {}, "lwf": {}}),
    ],
)
def test_resume_with_mechanisms_gives_the_same_matrix(tmp_path, monkeypatch, strategy, continual):
    raw = tiny(strategy={"name": strategy}, continual=continual)
    full, resumed = interrupted_then_resumed(raw, tmp_path, monkeypatch, plots=False)
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
