"""The learner on its own: no Flower, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.learner.backbones import BACKBONES, build_model
from simulator.learner.evaluation import per_class_correct, predict
from simulator.learner.prototypes import PrototypeSet, class_means, nearest_prototype
from simulator.learner.replay import memory_indices, update_memory
from simulator.learner.training import (
    NonFiniteLoss,
    TrainConfig,
    compute_prototypes,
    prototypical_loss,
    train_local,
)


def blobs(n_per=40, classes=(0, 1, 2), dim=6, sep=6.0, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, sep, size=(max(classes) + 1, dim))
    x = np.concatenate([means[c] + rng.normal(size=(n_per, dim)) for c in classes]).astype(np.float32)
    y = np.repeat(np.array(classes), n_per)
    return x, y


@pytest.mark.parametrize("name,shape", [("mlp", (6,)), ("cnn1d", (1, 40)), ("cnn1d", (40,)), ("cnn", (1, 8, 8)), ("cnn", (3, 28, 28))])
def test_backbones_map_to_embedding_dim(name, shape):
    model = build_model(name, shape, 24, 5, with_head=True, init_seed=0)
    out = model(torch.zeros(4, *shape))
    assert out.shape == (4, 24)
    assert model.head is not None and model.head(out).shape == (4, 5)
    assert {"mlp", "cnn1d", "cnn", "resnet32", "resnet18"} <= set(BACKBONES)


def test_same_init_seed_same_weights():
    a = build_model("mlp", (6,), 8, 3, False, 7)
    b = build_model("mlp", (6,), 8, 3, False, 7)
    c = build_model("mlp", (6,), 8, 3, False, 8)
    for (ka, va), (_, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(va, vb)
    assert not all(torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_class_means_and_nearest_prototype_by_hand():
    feats = np.array([[0, 0], [2, 0], [10, 10], [12, 10]], dtype=np.float32)
    p = class_means(feats, np.array([3, 3, 7, 7]))
    assert p.classes.tolist() == [3, 7] and p.counts.tolist() == [2, 2]
    np.testing.assert_allclose(p.vectors, [[1, 0], [11, 10]])
    pred = nearest_prototype(torch.tensor([[1.2, 0.3], [9.0, 9.0]]), p)
    assert pred.tolist() == [3, 7]


def test_prototype_set_update_and_select():
    a = PrototypeSet([2, 0], [[2.0], [0.0]], [1, 1])
    assert a.classes.tolist() == [0, 2]  # kept sorted
    b = a.updated_with(PrototypeSet([2, 5], [[9.0], [5.0]], [3, 4]))
    assert b.as_dict()[2].tolist() == [9.0] and b.as_dict()[0].tolist() == [0.0] and len(b) == 3
    assert b.select([5]).classes.tolist() == [5]


def test_prototypical_loss_by_hand_and_gradients():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [12.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = prototypical_loss(f, y)
    # leave-one-out: sample 0's own-class prototype is sample 1 (dist 4), other class mean (11,0): dist 121
    d_own, d_other = torch.tensor([4.0, 4.0, 4.0, 4.0]), torch.tensor([121.0, 81.0, 81.0, 121.0])
    expected = torch.log1p(torch.exp(d_own - d_other)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_prototypical_loss_uses_known_prototypes_of_other_classes():
    f = torch.tensor([[0.0], [1.0]], requires_grad=True)
    y = torch.tensor([0, 0])
    alone = prototypical_loss(f, y)
    assert alone.item() == 0.0  # one class, nothing to separate from
    with_known = prototypical_loss(f, y, torch.tensor([[0.5]]), torch.tensor([4]))
    assert with_known.item() > 0.1  # a known prototype of class 4 sits right between them


def test_train_local_learns_separable_blobs_with_prototypes_and_head():
    x, y = blobs()
    for classifier in ("prototype", "head"):
        model = build_model("mlp", (6,), 8, 3, with_head=True, init_seed=0)
        stats = train_local(model, x, y, TrainConfig(epochs=5, batch_size=16, lr=0.01, classifier=classifier),
                            seen_classes=[0, 1, 2], num_classes=3, seed=0)
        assert stats.steps == 5 * 8 and np.isfinite(stats.loss)
        protos = compute_prototypes(model, x, y)
        pred = predict(model, x, classifier="prototype", seen_classes=[0, 1, 2], protos=protos)
        assert (pred == y).mean() > 0.95


def test_training_is_deterministic_given_seed():
    x, y = blobs()
    outs = []
    for _ in range(2):
        model = build_model("mlp", (6,), 8, 3, False, 0)
        train_local(model, x, y, TrainConfig(epochs=2, batch_size=8), seen_classes=[0, 1, 2], num_classes=3, seed=5)
        outs.append(compute_prototypes(model, x, y).vectors)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_frozen_backbone_does_not_change():
    x, y = blobs()
    model = build_model("cnn1d", (6,), 8, 3, False, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, x, y, TrainConfig(epochs=1, freeze_backbone=True), seen_classes=[0, 1, 2], num_classes=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and batch-norm statistics alike


def test_feature_distillation_pulls_towards_teacher():
    x, y = blobs()
    import copy

    def drift(weight):
        model = build_model("mlp", (6,), 8, 3, False, 0)
        teacher = copy.deepcopy(model)
        train_local(model, x, y, TrainConfig(epochs=3, lr=0.05, distill_weight=weight), seen_classes=[0, 1, 2],
                    num_classes=3, teacher=teacher, seed=0)
        with torch.no_grad():
            return float(((model(torch.as_tensor(x)) - teacher(torch.as_tensor(x))) ** 2).mean())

    assert drift(50.0) < 0.5 * drift(0.0)


def test_non_finite_loss_raises():
    x, y = blobs()
    x[0, 0] = np.nan
    model = build_model("mlp", (6,), 8, 3, False, 0)
    with pytest.raises(NonFiniteLoss):
        train_local(model, x, y, TrainConfig(epochs=1, batch_size=1000), seen_classes=[0, 1, 2], num_classes=3)


def test_head_prediction_is_restricted_to_seen_classes():
    x, y = blobs(classes=(0, 1))
    model = build_model("mlp", (6,), 8, 5, True, 0)
    with torch.no_grad():
        model.head.bias[4] = 1e6  # an unseen class with a huge logit must never be predicted
    pred = predict(model, x, classifier="head", seen_classes=[0, 1])
    assert set(pred.tolist()) <= {0, 1}


def test_per_class_correct_counts():
    correct, total = per_class_correct(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
    assert correct.tolist() == [1, 1, 1, 0] and total.tolist() == [1, 1, 2, 0]


def test_replay_memory_per_class_and_kept_across_tasks():
    rng = np.random.default_rng(0)
    idx = np.arange(100, 160)
    labels = np.repeat([0, 1, 2], 20)
    mem = update_memory({}, idx, labels, 5, rng)
    assert {c: len(v) for c, v in mem.items()} == {0: 5, 1: 5, 2: 5}
    assert all(set(v) <= set(idx[labels == c]) for c, v in mem.items())
    mem2 = update_memory(mem, np.arange(3), np.array([0, 3, 3]), 5, rng)
    assert np.array_equal(mem2[0], mem[0]) and len(mem2[3]) == 2  # existing class untouched; few samples kept
    assert len(memory_indices(mem2)) == 17
    assert update_memory({}, idx, labels, 0, rng) == {}
