"""Vectorised cohort training (torch.func) against the sequential loop it replaces: same weights
and statistics within float tolerance, the dense prototypical loss against the original, and the
cases that must fall back. Real models, real PyTorch training, sklearn's digits."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from simulator.learner.backbones import ProtoModel, build_model
from simulator.learner.prototypes import PrototypeSet
from simulator.learner.training import NonFiniteLoss, TrainConfig, prototypical_loss, train_local
from simulator.learner.vectorized import (
    CohortNonFiniteLoss,
    dense_prototypical_loss,
    train_cohort,
    why_not_vectorizable,
)

ATOL = 1e-5  # on every weight after two epochs: only the summation order differs
NUM_CLASSES = 10
EMB = 12


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = ((d.data - d.data.mean()) / d.data.std()).astype(np.float32)
    return x, d.target.astype(np.int64)


def cohort_data(digits, sizes, seed=0):
    """Member i gets sizes[i] samples of classes 0..5 (classes 6..9 are 'old': known only)."""
    x, y = digits
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(y < 6)
    xs, ys = [], []
    for n in sizes:
        pick = rng.choice(pool, size=n, replace=False)
        xs.append(x[pick])
        ys.append(y[pick])
    return xs, ys


def knowns_for(k, seed=1):
    """Known prototypes: old classes 6..9 and classes 1, 3 that also appear in the batches; every
    other member has none."""
    rng = np.random.default_rng(seed)
    protos = PrototypeSet([1, 3, 6, 7, 8, 9], rng.normal(size=(6, EMB)).astype(np.float32), [5] * 6)
    return [protos if i % 2 == 0 else None for i in range(k)]


def models_for(backbone, k, norm):
    shape = (64,) if backbone == "mlp" else (1, 64)
    return [build_model(backbone, shape, EMB, NUM_CLASSES, with_head=True, init_seed=10 + i, norm=norm) for i in range(k)]


def run_both(models, xs, ys, cfg, knowns, seeds, seen=range(8)):
    seen_each = seen if isinstance(seen, list) else [seen] * len(models)
    seq = copy.deepcopy(models)
    if models[0].backbone.__class__.__name__ == "CNN1D":
        xs = [x.reshape(len(x), 1, 64) for x in xs]
    vec_stats = train_cohort(models, xs, ys, cfg, seen_classes=seen_each, num_classes=NUM_CLASSES,
                             knowns=knowns, seeds=seeds)
    seq_stats = [
        train_local(m, x, y, cfg, seen_classes=se, num_classes=NUM_CLASSES, known=kn, seed=s)
        for m, x, y, se, kn, s in zip(seq, xs, ys, seen_each, knowns, seeds)
    ]
    return vec_stats, seq_stats, seq


def assert_same(models, seq, vec_stats, seq_stats):
    assert len(vec_stats) == len(seq_stats)
    for v, s in zip(vec_stats, seq_stats):
        assert (v.steps, v.samples) == (s.steps, s.samples)
        assert v.loss == pytest.approx(s.loss, rel=1e-5, abs=1e-6)
    for m, r in zip(models, seq):
        for (name, a), (_, b) in zip(m.state_dict().items(), r.state_dict().items()):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda e, n=name: f"{n}: {e}")
        assert [p.requires_grad for p in m.parameters()] == [p.requires_grad for p in r.parameters()]
        assert m.backbone.training == r.backbone.training


@pytest.mark.parametrize(
    "backbone,norm,classifier,frozen",
    [
        ("mlp", "batch", "prototype", False),
        ("mlp", "batch", "head", False),
        ("mlp", "batch", "head", True),
        ("cnn1d", "group", "prototype", False),
        ("cnn1d", "none", "head", False),
        ("cnn1d", "batch", "head", True),  # BatchNorm in a frozen (eval-mode) backbone is allowed
        ("cnn1d", "batch", "prototype", True),  # nothing to train: loss values only, as train_local
    ],
)
def test_cohort_equals_sequential_train_local(digits, backbone, norm, classifier, frozen):
    sizes = [0, 1, 2, 17, 40, 9]  # an empty member, a one-sample member, unequal step counts
    xs, ys = cohort_data(digits, sizes)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3, classifier=classifier,
                      freeze_backbone=frozen, grad_clip=1.0)
    models = models_for(backbone, len(sizes), norm)
    before = copy.deepcopy(models)
    assert why_not_vectorizable(models, cfg, hooks_have_losses=False, teacher=None, private=None) is None
    vec_stats, seq_stats, seq = run_both(models, xs, ys, cfg, knowns_for(len(sizes)), seeds=[5, 6, 7, 8, 9, 10])
    assert_same(models, seq, vec_stats, seq_stats)
    assert vec_stats[0].steps == 0 and vec_stats[0].samples == 0
    assert [s.steps for s in vec_stats[1:]] == [2, 2, 4, 10, 2]  # 17 = 8 + 8 + 1, 9 = 8 + 1: 1-sample batches are skipped
    for name, p in models[0].state_dict().items():  # the empty member is untouched
        assert torch.equal(p, before[0].state_dict()[name])
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(models[4].parameters(), before[4].parameters()))
    if frozen and classifier == "prototype":
        assert moved == 0.0
    else:
        assert moved > 1e-3  # it trained
    if classifier == "prototype":  # the head gets no gradient, hence no weight decay either
        assert torch.equal(models[4].head.weight, before[4].head.weight)
    if frozen:
        assert torch.equal(models[4].backbone.state_dict()[next(iter(models[4].backbone.state_dict()))],
                           before[4].backbone.state_dict()[next(iter(before[4].backbone.state_dict()))])


def test_clipping_momentum_and_weight_decay_are_the_sequential_ones(digits):
    """The clip binds (weights differ from an unclipped run) and still matches the sequential loop;
    plain SGD (no momentum, no decay) matches too."""
    sizes = [30, 12, 3]
    xs, ys = cohort_data(digits, sizes, seed=3)
    knowns = knowns_for(3)
    clipped = TrainConfig(epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=5e-3, grad_clip=0.05)
    models = models_for("mlp", 3, "batch")
    vec_stats, seq_stats, seq = run_both(models, xs, ys, clipped, knowns, seeds=[1, 2, 3])
    assert_same(models, seq, vec_stats, seq_stats)
    free = copy.deepcopy(models_for("mlp", 3, "batch")[0])
    train_local(free, xs[0], ys[0], TrainConfig(**{**clipped.__dict__, "grad_clip": 0.0}), seen_classes=range(8),
                num_classes=NUM_CLASSES, known=knowns[0], seed=1)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(free.parameters(), models[0].parameters())) > 1e-3
    plain = TrainConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.0, weight_decay=0.0, grad_clip=0.0)
    models = models_for("mlp", 3, "batch")
    vec_stats, seq_stats, seq = run_both(models, xs, ys, plain, knowns, seeds=[4, 5, 6])
    assert_same(models, seq, vec_stats, seq_stats)
    # each member's own seen classes for the head (the head's columns differ per member)
    head = TrainConfig(epochs=2, batch_size=8, lr=0.05, classifier="head", grad_clip=1.0)
    models = models_for("mlp", 3, "batch")
    seen = [list(range(6)), list(range(8)), list(range(10))]
    vec_stats, seq_stats, seq = run_both(models, xs, ys, head, knowns, seeds=[7, 8, 9], seen=seen)
    assert_same(models, seq, vec_stats, seq_stats)


# ----------------------------------------------------------------------------- dense loss
def _random_case(rng):
    b = int(rng.integers(1, 13))
    present = rng.choice(NUM_CLASSES, size=int(rng.integers(1, 5)), replace=False)
    labels = torch.as_tensor(rng.choice(present, size=b))
    feats = torch.as_tensor(rng.normal(size=(b, 5)), dtype=torch.float32)
    if rng.random() < 0.25:
        kc = torch.zeros(0, dtype=torch.int64)
    else:  # known classes, some of them overlapping the batch's classes
        kc = torch.as_tensor(np.sort(rng.choice(NUM_CLASSES, size=int(rng.integers(1, 6)), replace=False)))
    kv = torch.as_tensor(rng.normal(size=(len(kc), 5)), dtype=torch.float32)
    return feats, labels, kc, kv


def _dense_inputs(feats, labels, kc, kv, pad):
    """Padded to len + pad rows (padding: copies of row 0 with random labels, masked out)."""
    b = len(labels)
    fp = torch.cat([feats, feats[:1].repeat(pad, 1) * 3.0])
    lp = torch.cat([labels, torch.randint(0, NUM_CLASSES, (pad,))])
    valid = torch.arange(b + pad) < b
    dense_kv = torch.zeros(NUM_CLASSES, feats.shape[1])
    dense_km = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    dense_kv[kc] = kv
    dense_km[kc] = True
    return fp, lp, valid, dense_kv, dense_km


def test_dense_prototypical_loss_equals_prototypical_loss_on_random_batches():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    zero_cases = 0
    for _ in range(300):
        feats, labels, kc, kv = _random_case(rng)
        f_ref = feats.clone().requires_grad_(True)
        ref = prototypical_loss(f_ref, labels, kv if len(kc) else None, kc if len(kc) else None)
        ref.backward()
        pad = int(rng.integers(0, 4))
        fp, lp, valid, dkv, dkm = _dense_inputs(feats, labels, kc, kv, pad)
        fp.requires_grad_(True)
        got = dense_prototypical_loss(fp, lp, valid, dkv, dkm)
        got.backward()
        assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)
        torch.testing.assert_close(fp.grad[: len(labels)], f_ref.grad, atol=1e-5, rtol=1e-4)
        assert torch.count_nonzero(fp.grad[len(labels):]) == 0  # padding takes no part
        zero_cases += ref.item() == 0.0
    assert zero_cases > 5  # the degenerate cases (fewer than 2 candidates, nobody kept) were drawn


def test_dense_prototypical_loss_degenerate_cases_by_hand():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    known_v = torch.zeros(NUM_CLASSES, 2)
    no_known = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    all_valid = torch.ones(3, dtype=torch.bool)
    # one class, no known prototypes: a single candidate -> 0
    assert dense_prototypical_loss(f, torch.tensor([4, 4, 4]), all_valid, known_v, no_known).item() == 0.0
    # every sample alone in its class, no known prototypes: nobody kept -> 0 (prototypical_loss too)
    lab = torch.tensor([1, 2, 3])
    assert dense_prototypical_loss(f, lab, all_valid, known_v, no_known).item() == 0.0
    assert prototypical_loss(f, lab).item() == 0.0
    # a sample alone in its class with a known prototype of that class is kept
    km = no_known.clone()
    km[3] = True
    known_v[3] = torch.tensor([0.5, 0.5])
    got = dense_prototypical_loss(f, lab, all_valid, known_v, km)
    ref = prototypical_loss(f, lab, known_v[[3]], torch.tensor([3]))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6) and got.item() > 0
    # all padding: 0 with a zero gradient
    fz = f.clone().requires_grad_(True)
    out = dense_prototypical_loss(fz, lab, torch.zeros(3, dtype=torch.bool), known_v, km)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(fz.grad) == 0


def test_dense_prototypical_loss_under_vmap_equals_one_by_one():
    rng = np.random.default_rng(7)
    cases = [_random_case(rng) for _ in range(6)]
    width = max(len(c[1]) for c in cases) + 1
    rows = [_dense_inputs(f, lab, kc, kv, width - len(lab)) for f, lab, kc, kv in cases]
    stacked = [torch.stack(t) for t in zip(*rows)]
    batched = torch.vmap(dense_prototypical_loss)(*stacked)
    one = torch.stack([dense_prototypical_loss(*r) for r in rows])
    ref = torch.stack([prototypical_loss(f, lab, kv if len(kc) else None, kc if len(kc) else None)
                       for f, lab, kc, kv in cases])
    torch.testing.assert_close(batched, one, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batched, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- fallbacks
class _DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)


def test_why_not_vectorizable_refusals():
    cfg = TrainConfig()
    ok = dict(hooks_have_losses=False, teacher=None, private=None)
    mlps = models_for("mlp", 2, "batch")
    assert why_not_vectorizable(mlps, cfg, **ok) is None
    assert "fewer than 2" in why_not_vectorizable(mlps[:1], cfg, **ok)
    assert "DP-SGD" in why_not_vectorizable(mlps, cfg, **{**ok, "private": object()})
    assert "own loss" in why_not_vectorizable(mlps, cfg, **{**ok, "hooks_have_losses": True})
    teacher = copy.deepcopy(mlps[0])
    assert "distillation" in why_not_vectorizable(mlps, TrainConfig(distill_weight=1.0), **{**ok, "teacher": teacher})
    assert why_not_vectorizable(mlps, cfg, **{**ok, "teacher": teacher}) is None  # distill_weight 0: unused
    mixed = [mlps[0], models_for("cnn1d", 1, "none")[0]]
    assert "different architectures" in why_not_vectorizable(mixed, cfg, **ok)
    wider = [mlps[0], build_model("mlp", (64,), EMB + 1, NUM_CLASSES, True, 0)]
    assert "different architectures" in why_not_vectorizable(wider, cfg, **ok)
    no_head = [mlps[0], build_model("mlp", (64,), EMB, NUM_CLASSES, False, 0)]
    assert "different architectures" in why_not_vectorizable(no_head, cfg, **ok)
    bn = models_for("cnn1d", 2, "batch")  # the default model.norm
    reason = why_not_vectorizable(bn, cfg, **ok)
    assert reason is not None and "BatchNorm1d" in reason and "running statistics" in reason
    assert why_not_vectorizable(bn, TrainConfig(freeze_backbone=True), **ok) is None  # eval-mode backbone
    assert why_not_vectorizable(models_for("cnn1d", 2, "group"), cfg, **ok) is None
    drop = [ProtoModel(_DropoutNet(), 3, 3, True) for _ in range(2)]
    assert "Dropout" in why_not_vectorizable(drop, cfg, **ok)
    heads = models_for("mlp", 2, "batch")
    headless = [build_model("mlp", (64,), EMB, NUM_CLASSES, False, i) for i in range(2)]
    assert why_not_vectorizable(heads, TrainConfig(classifier="head"), **ok) is None
    assert "head" in why_not_vectorizable(headless, TrainConfig(classifier="head"), **ok)


def test_non_finite_loss_names_the_member_and_changes_no_model(digits):
    xs, ys = cohort_data(digits, [10, 12, 9, 11], seed=5)
    xs[3] = xs[3].copy()
    xs[2] = xs[2].copy()
    xs[2][4, 0] = np.inf  # member 2 breaks (and member 3 would not)
    cfg = TrainConfig(epochs=1, batch_size=4)
    models = models_for("mlp", 4, "batch")
    before = copy.deepcopy(models)
    with pytest.raises(NonFiniteLoss) as err:
        train_cohort(models, xs, ys, cfg, seen_classes=[range(8)] * 4, num_classes=NUM_CLASSES,
                     knowns=[None] * 4, seeds=[0, 1, 2, 3])
    assert isinstance(err.value, CohortNonFiniteLoss) and err.value.member == 2
    assert "member 2" in str(err.value)
    with pytest.raises(NonFiniteLoss):  # the sequential loop stops on the same member
        train_local(copy.deepcopy(before[2]), xs[2], ys[2], cfg, seen_classes=range(8), num_classes=NUM_CLASSES, seed=2)
    for m, b in zip(models, before):
        for p, q in zip(m.parameters(), b.parameters()):
            assert torch.equal(p, q)
