"""FedSA (semantic anchors): anchor creation, the EMA merge, the client loss and an end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import run_tiny
from torch import nn

from simulator.learner.backbones import ProtoModel, build_model
from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientInfo
from simulator.records import METRICS, UPLOAD, protos_from_arrays, protos_to_arrays
from simulator.seeding import derive_seed
from strategies import STRATEGIES, RunInfo
from strategies.fedsa import FedSA, Objective, Params

NUM_CLASSES, DIM = 10, 6




def _run(seed: int = 0, n_clients: int = 2, num_classes: int = NUM_CLASSES, dim: int = DIM) -> RunInfo:
    return RunInfo(seed=seed, participation=1.0, num_classes=num_classes, embedding_dim=dim,
                   partitions={i: i + 1 for i in range(n_clients)})


def _reply(pid: int, protos: dict[int, list[float]], counts: list[int], n: int | None = None) -> Message:
    classes = sorted(protos)
    ps = PrototypeSet(classes, np.array([protos[c] for c in classes], dtype=np.float32), counts)
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=pid + 1, message_type="train")
    metrics = MetricRecord({"partition_id": pid, "num_examples": int(n if n is not None else sum(counts)),
                            "train_loss": 0.5, "proto.counts": [int(c) for c in ps.counts]})
    return Message(RecordDict({UPLOAD: ArrayRecord(protos_to_arrays(ps)), METRICS: metrics}), reply_to=request)


def _independent_anchors(seed: int, num_classes: int, dim: int) -> np.ndarray:
    """g(R) written out again: noise and network from the derived seed, batch norm over all classes."""
    s = derive_seed(seed, "fedsa_anchors")
    r = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(s))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s)
        l1, b1 = nn.Linear(dim, dim), nn.BatchNorm1d(dim)
        l2, b2 = nn.Linear(dim, dim), nn.BatchNorm1d(dim)

    def bn(h):  # training-mode batch norm with the initial affine parameters (1, 0)
        return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5)

    with torch.no_grad():
        h = torch.relu(bn(l1(r)) * b1.weight + b1.bias)
        return (torch.relu(bn(l2(h)) * b2.weight + b2.bias)).numpy()


def _vec(rng, scale=1.0):
    return (rng.normal(size=DIM) * scale).astype(np.float32).tolist()


# --------------------------------------------------------------------------- anchors on the server
def test_anchors_appear_for_uploaded_classes_and_are_g_of_r_rows():
    rng = np.random.default_rng(0)
    strat = FedSA(Params(anchor_momentum=1.0), _run(seed=5))  # m = 1: the anchor is the fresh g(R) row
    expected = _independent_anchors(5, NUM_CLASSES, DIM)
    assert len(protos_from_arrays(strat.initial_arrays({}), prefix="anchor") or []) == 0  # nothing before any upload

    arrays, _ = strat.aggregate_train(1, [_reply(0, {0: _vec(rng), 1: _vec(rng)}, [3, 4]), _reply(1, {1: _vec(rng), 2: _vec(rng)}, [5, 6])])
    got = protos_from_arrays(arrays, prefix="anchor")
    assert got.classes.tolist() == [0, 1, 2]
    np.testing.assert_allclose(got.vectors, expected[[0, 1, 2]], atol=1e-5)
    assert got.counts.tolist() == [3, 9, 6]
    assert (got.vectors >= 0).all()  # the generator ends with a ReLU

    # inference uses the global prototypes: per class the plain mean of the clients' prototypes
    protos = protos_from_arrays(arrays)
    assert protos.classes.tolist() == [0, 1, 2]
    arrays, _ = strat.aggregate_train(2, [_reply(0, {7: _vec(rng)}, [2])])  # a new task's class
    got = protos_from_arrays(arrays, prefix="anchor")
    assert got.classes.tolist() == [0, 1, 2, 7]  # earlier anchors kept and sent with the new one
    np.testing.assert_allclose(got.vectors, expected[[0, 1, 2, 7]], atol=1e-5)


def test_anchors_of_a_new_task_are_sent_before_its_first_round():
    """The paper has every anchor from the start: the classes a task brings get their anchors in
    the task's first round, before any client uploaded them (the server reads the round's
    seen_classes), and no anchor of a class the stream has not reached is sent."""
    strat = FedSA(Params(), _run(seed=5))
    strat.initial_arrays({})
    expected = _independent_anchors(5, NUM_CLASSES, DIM)
    config = ConfigRecord({"task": 0, "round": 0, "server_round": 1, "seen_classes": [3, 1]})
    msgs = list(strat.configure_train(1, ArrayRecord(), config, grid=None))
    sent = protos_from_arrays(msgs[0].content["global"], prefix="anchor")
    assert sent.classes.tolist() == [1, 3]
    np.testing.assert_allclose(sent.vectors, expected[[1, 3]], atol=1e-5)
    assert protos_from_arrays(msgs[0].content["global"]) is None  # no global prototypes before an upload


def test_anchor_draw_depends_on_the_seed_only():
    a = FedSA(Params(), _run(seed=3)).initial_anchors
    b = FedSA(Params(lambda_=2.0), _run(seed=3, n_clients=5)).initial_anchors
    c = FedSA(Params(), _run(seed=4)).initial_anchors
    torch.manual_seed(123)  # the global torch stream plays no part
    d = FedSA(Params(), _run(seed=3)).initial_anchors
    assert a.shape == (NUM_CLASSES, DIM)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert np.abs(a - c).max() > 0.1
    assert len({tuple(np.round(row, 5)) for row in a}) == NUM_CLASSES  # distinct anchors


# --------------------------------------------------------------------------- the EMA merge
@pytest.mark.parametrize("m", [0.9999, 0.9, 0.0])
def test_ema_towards_plain_mean_of_client_prototypes(m):
    rng = np.random.default_rng(1)
    strat = FedSA(Params(anchor_momentum=m), _run(seed=0))
    g = _independent_anchors(0, NUM_CLASSES, DIM).astype(np.float64)
    # round 1: classes 2 and 4 appear
    q1, q2, q4 = _vec(rng, 3), _vec(rng, 3), _vec(rng, 3)
    strat.aggregate_train(1, [_reply(0, {2: q1, 4: q4}, [10, 1]), _reply(1, {2: q2}, [1])])
    a2 = m * g[2] + (1 - m) * (np.array(q1) + np.array(q2)) / 2
    a4 = m * g[4] + (1 - m) * np.array(q4)
    got = protos_from_arrays(strat.global_arrays(), prefix="anchor").as_dict()
    np.testing.assert_allclose(got[2], a2, atol=1e-6)
    np.testing.assert_allclose(got[4], a4, atol=1e-6)
    # round 2: two clients upload p1, p2 for class 2 with very different counts (plain mean, not weighted)
    p1, p2 = _vec(rng, 3), _vec(rng, 3)
    arrays, _ = strat.aggregate_train(2, [_reply(1, {2: p2}, [50]), _reply(0, {2: p1}, [1])])
    got = protos_from_arrays(arrays, prefix="anchor")
    d = got.as_dict()
    np.testing.assert_allclose(d[2], m * a2.astype(np.float32).astype(np.float64) + (1 - m) * (np.array(p1) + np.array(p2)) / 2, atol=1e-6)
    np.testing.assert_allclose(d[4], a4, atol=1e-6)  # not uploaded: unchanged
    if m == 0.0:
        np.testing.assert_allclose(d[2], (np.array(p1) + np.array(p2)) / 2, atol=1e-6)
    assert dict(zip(got.classes.tolist(), got.counts.tolist())) == {2: 62, 4: 1}


def test_share_weights_fedavgs_the_backbone_and_checkpoint_roundtrip():
    strat = FedSA(Params(share_weights=True, anchor_momentum=0.5), _run(seed=0))
    r1 = _reply(0, {0: [1.0] * DIM}, [2], n=1)
    r2 = _reply(1, {0: [3.0] * DIM}, [2], n=3)
    r1.content[UPLOAD]["w.layer"] = Array(np.array([1.0, 2.0], dtype=np.float32))
    r2.content[UPLOAD]["w.layer"] = Array(np.array([4.0, 8.0], dtype=np.float32))
    arrays, _ = strat.aggregate_train(1, [r1, r2])
    np.testing.assert_allclose(arrays["w.layer"].numpy(), [3.25, 6.5])
    fresh = FedSA(Params(share_weights=True, anchor_momentum=0.5), _run(seed=0))
    fresh.load_state_dict(strat.state_dict())
    for s in (strat, fresh):
        s.aggregate_train(2, [_reply(0, {0: [5.0] * DIM, 3: [1.0] * DIM}, [1, 1])])
    np.testing.assert_array_equal(protos_from_arrays(fresh.global_arrays(), prefix="anchor").vectors,
                                  protos_from_arrays(strat.global_arrays(), prefix="anchor").vectors)


def test_registry_and_params():
    assert STRATEGIES["fedsa"] is FedSA
    p = Params()
    assert (p.lambda_, p.contrastive, p.calibration, p.anchor_momentum, p.share_weights) == (10.0, 1.0, 1.0, 0.9999, False)
    assert Params.model_validate({"lambda": 2.5}).lambda_ == 2.5
    assert Params.model_validate({"lambda": 2.5}).model_dump(by_alias=True)["lambda"] == 2.5
    for bad in ({"anchor_momentum": 1.5}, {"contrastive": -1}, {"margin": 1.0}):
        with pytest.raises(Exception):
            Params.model_validate(bad)


# --------------------------------------------------------------------------- the client objective
def _objective(params: Params, anchors: dict[int, list[float]], num_classes: int, model, dim: int) -> Objective:
    obj = Objective(params, ClientInfo(0, num_classes, dim, "cpu"))
    classes = sorted(anchors)
    ps = PrototypeSet(classes, np.array([anchors[c] for c in classes], dtype=np.float32), [1] * len(classes))
    obj.receive(ArrayRecord(protos_to_arrays(ps, prefix="anchor", with_counts=True)), model)
    return obj


def _identity_model(dim: int, num_classes: int) -> ProtoModel:
    torch.manual_seed(0)
    return ProtoModel(nn.Identity(), dim, num_classes, with_head=True)


def test_margin_is_max_of_local_and_anchor_gaps():
    model = _identity_model(2, 4)
    # anchors 0:(0,0) 1:(3,0) 2:(0,4): nearest other distances 3, 3, 4 -> anchor gap 10/3
    obj = _objective(Params(), {0: [0, 0], 1: [3, 0], 2: [0, 4]}, 4, model, 2)
    x = np.array([[0, 0], [2, 0], [1, 1], [1, 3]], dtype=np.float32)  # local means (1,0), (1,2): gap 2
    y = np.array([0, 0, 1, 1])
    obj.before_training(model, x, y)
    assert obj.local_gap == pytest.approx(2.0) and obj.anchor_gap == pytest.approx(10 / 3)
    assert obj.margin == pytest.approx(10 / 3)
    obj.before_training(model, 3 * x, y)  # local gap 6 now wins
    assert obj.margin == pytest.approx(6.0)
    obj.before_training(model, x[:2], y[:2])  # one local class: local gap 0
    assert obj.local_gap == 0.0 and obj.margin == pytest.approx(10 / 3)
    # local means (0,0), (4,0), (4,3): nearest 4, 3, 3 -> 10/3 too; three classes, one without anchor
    obj.before_training(model, np.array([[0, 0], [4, 0], [4, 3]], np.float32), np.array([0, 1, 3]))
    assert obj.local_gap == pytest.approx(10 / 3)


def test_loss_equals_hand_computation():
    dim, c = 3, 5
    model = _identity_model(dim, c)
    anchors = {0: [1.0, 0.0, 0.0], 2: [0.0, 2.0, 0.0], 3: [0.0, 0.0, 1.5]}
    params = Params(lambda_=2.0, contrastive=0.7, calibration=0.3)
    obj = _objective(params, anchors, c, model, dim)
    obj.margin = 0.4
    feats = torch.tensor([[0.5, 0.1, 0.0], [0.2, 1.0, 0.3], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1, 3])  # class 1 has no anchor
    got = obj.extra_loss(feats, labels, model).item()

    A = np.array([anchors[k] for k in (0, 2, 3)], dtype=np.float64)
    W = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    cal = 0.0
    for i, k in enumerate((0, 2, 3)):
        logits = (W @ A[i] + b)[[0, 2, 3]]
        cal += -(logits[i] - np.log(np.exp(logits).sum()))
    cal /= 3
    f = feats.double().numpy()
    keep = [(0, 0), (1, 1), (3, 2)]  # (sample, anchor column)
    mse = np.mean([(f[s] - A[j]) ** 2 for s, j in keep])
    con = 0.0
    for s, j in keep:
        z = -(np.linalg.norm(f[s] - A, axis=1) + 0.4 * (np.arange(3) == j))
        con += -(z[j] - np.log(np.exp(z).sum()))
    con /= 3
    assert got == pytest.approx(0.3 * cal + 2.0 * mse + 0.7 * con, rel=1e-5)


def test_loss_is_finite_with_gradients_and_none_without_anchors():
    torch.manual_seed(0)
    dim, d, c = 8, 16, 6
    model = build_model("mlp", (dim,), d, c, with_head=True, init_seed=0)
    strat = FedSA(Params(), _run(seed=0, num_classes=c, dim=d))
    rng = np.random.default_rng(0)
    strat.aggregate_train(1, [_reply(0, {k: rng.normal(size=d).tolist() for k in (0, 1, 2)}, [4, 4, 4])])
    obj = Objective(Params(), ClientInfo(0, c, d, "cpu"))
    obj.receive(strat.global_arrays(), model)
    x = rng.normal(size=(12, dim)).astype(np.float32)
    y = np.array([0, 1, 2, 3] * 3)
    obj.before_training(model, x, y)
    assert obj.margin > 0
    model.train()
    feats = model(torch.as_tensor(x))
    feats.retain_grad()
    loss = obj.extra_loss(feats, torch.as_tensor(y), model)
    assert torch.isfinite(loss) and float(loss) > 0
    loss.backward()
    assert torch.isfinite(feats.grad).all()
    assert feats.grad[y != 3].abs().sum() > 0
    assert feats.grad[y == 3].abs().sum() == 0  # class 3 has no anchor: no pull, no contrast
    assert model.head.weight.grad.abs().sum() > 0  # calibration trains the head
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.backbone.parameters())
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.parameters()) > 0
    # a feature exactly on its anchor: the distance's gradient stays finite
    a = torch.as_tensor(strat.global_protos.vectors[:1]).clone().requires_grad_(True)
    obj.extra_loss(a, torch.tensor([0]), model).backward()
    assert torch.isfinite(a.grad).all()
    # first round: nothing received, no extra loss
    empty = Objective(Params(), ClientInfo(0, c, d, "cpu"))
    empty.receive(ArrayRecord({}), model)
    empty.before_training(model, x, y)
    assert empty.extra_loss(feats, torch.as_tensor(y), model) is None
    assert Objective.train_loss == "head" and Objective.inference == "prototype"


# --------------------------------------------------------------------------- end to end
def run(tmp_path, name, engine="inline", **over):
    over.setdefault("strategy", {"name": "fedsa", "params": {}})
    over.setdefault("training", {"rounds_per_task": 3, "local_epochs": 5, "batch_size": 16, "lr": 0.01})
    return run_tiny(tmp_path, name, engine, **over)


def test_fedsa_end_to_end_learns_and_sends_prototypes_only(tmp_path):
    out = run(tmp_path, "fedsa")
    m = out.matrix
    assert m.shape == (3, 3)
    assert np.isfinite(m[np.tril_indices(3)]).all()
    # the anchors (random vectors) are learned onto: first task well above chance (0.5)
    assert m[0, 0] > 0.5
    assert out.summary["completed"] is True
    fedavg = run(tmp_path, "fedavg", strategy={"name": "fedavg", "params": {}})
    assert fedavg.summary["bytes_up"] > 10 * out.summary["bytes_up"]
    assert fedavg.summary["bytes_down"] > 10 * out.summary["bytes_down"]
