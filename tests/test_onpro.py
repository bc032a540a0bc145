"""OnPro's mechanisms as continual plugins (simulator/learner/continual/onpro.py): the OPE loss and
APF's pair probabilities against hand computations, state, default-off identity, end to end."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import tiny

from simulator.engine.runner import run_scenario
from simulator.errors import UserError
from simulator.learner.backbones import build_model
from simulator.learner.continual import build_stack, task_data
from simulator.learner.continual.onpro import APF, OPE, ope_loss, pair_counts, pair_probabilities
from simulator.scenario import validate_scenario

ONLINE = {"batch_size": 4, "communicate_every": 2}
TASKS = {"initial_classes": 2, "classes_per_task": 2, "online": ONLINE}
TRAINING = {"rounds_per_task": 4, "local_epochs": 1, "batch_size": 16, "lr": 0.01}


def numpy_ope(z1: np.ndarray, z2: np.ndarray, y: np.ndarray, t: float) -> float:
    """The OPE formula written out with loops: prototypes of normalised views, positives across views."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    classes = sorted(set(y.tolist()))
    p1 = [unit(np.mean([unit(r) for r in z1[y == c]], axis=0)) for c in classes]
    p2 = [unit(np.mean([unit(r) for r in z2[y == c]], axis=0)) for c in classes]
    z, k = p1 + p2, len(classes)
    terms = []
    for i in range(2 * k):
        pos = (i + k) % (2 * k)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(2 * k) if j != i)
        terms.append(math.log(math.exp(float(z[i] @ z[pos]) / t) / den))
    return -sum(terms) / len(terms)


def test_ope_loss_on_orthogonal_prototypes_equals_the_closed_form():
    # identical views, classes along e1 and e2: each anchor's positive scores 1/T = 2, its two
    # negatives 0, so the loss is -log(e^2 / (e^2 + 2)) = log(1 + 2 e^-2)
    z = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    assert float(ope_loss(z, z.clone(), y, 0.5)) == pytest.approx(math.log(1 + 2 * math.exp(-2)), abs=1e-6)


def test_ope_loss_matches_the_formula_on_a_tiny_two_view_batch():
    z1 = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.3, 2.0]])
    z2 = np.array([[0.9, 0.3], [1.0, -0.2], [0.4, 1.0], [0.1, 0.7]])
    y = np.array([0, 0, 1, 1])
    for t in (0.5, 0.1, 2.0):
        got = float(ope_loss(torch.tensor(z1), torch.tensor(z2), torch.tensor(y), t))
        assert got == pytest.approx(numpy_ope(z1, z2, y, t), rel=1e-9)
    three = np.vstack([z1, [[-1.0, -0.5]]]), np.vstack([z2, [[-0.7, -0.9]]]), np.append(y, 2)
    assert float(ope_loss(*(torch.tensor(a) for a in three), 0.5)) == pytest.approx(numpy_ope(*three, 0.5), rel=1e-9)
    # one class: its prototype's only other entry is its positive, so the loss is 0
    assert float(ope_loss(torch.tensor(z1[:2]), torch.tensor(z2[:2]), torch.tensor(y[:2]), 0.5)) == pytest.approx(0.0)


def test_ope_plugin_adds_one_term_per_group_on_a_second_view():
    model = build_model("mlp", (6,), 8, 4, with_head=False, init_seed=0)
    ope = OPE(weight=2.0, temperature=0.5, augment_noise=0.0, augment_scale=0.0)  # view 2 = view 1
    ope.old_classes = [0, 1]
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    feats = model(x)
    ope.before_batch(x)
    got = float(ope.extra_loss(feats, y, None, model, None).detach())
    want = sum(float(ope_loss(feats[m], feats[m], y[m], 0.5).detach()) for m in (y < 2, y >= 2))
    assert got == pytest.approx(2.0 * want, rel=1e-5)
    assert ope.extra_loss(feats, y, None, model, None) is None  # the inputs are used once
    ope2 = OPE(augment_noise=0.1, augment_scale=0.2)
    ope2.before_training(model, 5)
    a = ope2.augment(x)
    ope2.before_training(model, 5)
    assert torch.equal(a, ope2.augment(x)) and not torch.equal(a, x)  # seeded per training call


def test_apf_pair_probabilities_are_softmax_of_inverse_distances():
    protos = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])  # d01 = 1, d02 = 3, d12 = sqrt(10)
    inv = [1.0, 1 / 3, 1 / math.sqrt(10)]
    want = [math.exp(v) / sum(math.exp(w) for w in inv) for v in inv]
    assert pair_probabilities(protos) == pytest.approx(want, rel=1e-12)
    assert pair_counts(np.array([0.5, 0.25, 0.25]), 4, np.random.default_rng(0)).tolist() == [2, 1, 1]
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 13, 50):
        counts = pair_counts(pair_probabilities(protos), n, rng)
        assert counts.sum() == n and (counts >= 0).all()
    many = pair_probabilities(np.random.default_rng(2).normal(size=(6, 3)))
    for n in (3, 11, 25):
        assert pair_counts(many, n, rng).sum() == n


def test_apf_replays_the_requested_number_mostly_from_the_confused_pair(monkeypatch):
    x = np.arange(30, dtype=np.float32).reshape(15, 2)
    y = np.repeat([0, 1, 2], 5)
    apf = APF(base_rate=0.5, mixup_p=0.0)  # no mixing: every replayed row is a memory row
    # classes 0 and 1 close, 2 far: p(0,1) = softmax([10, 0.1, 0.1])[0] > 0.999
    monkeypatch.setattr(APF, "prototypes", lambda self, *a: np.array([[0.0], [0.1], [10.0]]))
    rx, ry = apf.replay(None, x, y, 10, np.random.default_rng(0), "cpu")
    assert len(rx) == len(ry) == 10
    rows = {r.tobytes(): int(c) for r, c in zip(x, y)}
    assert all(rows[r.tobytes()] == c for r, c in zip(rx, ry))
    assert set(ry[5:].tolist()) <= {0}  # the pair part: n from (0, 1), labelled with its first class when unmixed
    rx, ry = apf.replay(None, x, y, 40, np.random.default_rng(0), "cpu")
    assert len(ry) == 15  # never more than the memory holds
    mixed = APF(base_rate=0.0, mixup_p=1.0, mixup_alpha=0.4)
    mx, my = mixed.replay(None, x, y, 6, np.random.default_rng(3), "cpu")
    assert len(my) == 6 and set(my.tolist()) <= {0, 1}
    assert not all(r.tobytes() in rows for r in mx)  # inputs are interpolated


def test_state_survives_the_client_state_store_and_bad_values_are_named():
    cfg = validate_scenario(tiny(tasks=TASKS, training=TRAINING,
                                 continual={"memory_per_class": 3, "ope": {"temperature": 0.3}, "apf": {}})).continual
    stack = build_stack(cfg, uses_continual=True)
    assert [p.name for p in stack.plugins] == ["ope", "apf"] and stack.plugins[0].temperature == 0.3
    model = build_model("mlp", (6,), 8, 4, with_head=False, init_seed=0)
    x, y = np.zeros((4, 6), np.float32), np.array([2, 2, 3, 3])
    stack.task_change(model, None, task_data(x, y, [2, 3], [0, 1, 2, 3], 4, None, "prototype", "cpu", 4))
    again = build_stack(cfg, uses_continual=True, state=stack.state_dict())
    assert again.plugins[0].old_classes == [0, 1]
    assert not build_stack(cfg, uses_continual=False)
    for bad, key in (({"ope": {"temperature": 0}}, "continual.ope.temperature"),
                     ({"ope": {"temperature": -1.0}}, "continual.ope.temperature"),
                     ({"apf": {"mixup_lower": 0.7}}, "continual.apf"),
                     ({"apf": {"mixup_alpha": 0}}, "continual.apf.mixup_alpha")):
        with pytest.raises(UserError, match=key.replace(".", r"\.")):
            validate_scenario(tiny(continual={"memory_per_class": 3, **bad}))
    with pytest.raises(ValueError, match="continual.ope.temperature"):
        OPE(temperature=0.0)


@pytest.mark.parametrize("continual, message", [
    ({"memory_per_class": 3, "apf": {}}, "needs tasks.online"),
    ({"memory_per_class": 0, "apf": {}}, "memory_per_class"),
])
def test_apf_needs_online_and_a_memory(tmp_path, continual, message):
    tasks = {"initial_classes": 2, "classes_per_task": 2} if "needs" in message else TASKS
    with pytest.raises(UserError, match="continual.apf") as err:
        run_scenario(validate_scenario(tiny(tasks=tasks, training=TRAINING, continual=continual)),
                     run_dir=tmp_path / "run", out=None, plots=False)
    assert message in str(err.value)


def test_off_by_default_leaves_results_byte_identical(tmp_path):
    def matrix(name: str, continual: dict) -> bytes:
        raw = tiny(tasks=TASKS, training=TRAINING, continual={"memory_per_class": 3, **continual})
        run_scenario(validate_scenario(raw), run_dir=tmp_path / name, out=None, plots=False)
        return (tmp_path / name / "accuracy_matrix.csv").read_bytes()

    plain = matrix("plain", {})
    assert matrix("nulls", {"ope": None, "apf": None}) == plain
    assert matrix("ope0", {"ope": {"weight": 0.0}}) == plain  # weight 0 is off
    assert matrix("ope", {"ope": {}}) != plain  # and the tiny run does notice it when on


@pytest.mark.parametrize("strategy", ["fedavg", "proto_avg"])
def test_online_run_with_both_mechanisms_completes(tmp_path, monkeypatch, strategy):
    calls = []
    real = APF.replay

    def counted(self, *args):
        out = real(self, *args)
        calls.append(len(out[1]))
        return out

    monkeypatch.setattr(APF, "replay", counted)
    params = {"share_weights": True} if strategy == "proto_avg" else {}
    raw = tiny(tasks=TASKS, training=TRAINING, strategy={"name": strategy, "params": params},
               continual={"memory_per_class": 3, "ope": {}, "apf": {}})
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", out=None, plots=False)
    assert run.summary["completed"]
    assert pd.read_csv(tmp_path / "run" / "failures.csv").empty
    for key in ("final_avg_accuracy", "avg_forgetting", "anytime_accuracy"):
        assert np.isfinite(run.summary[key]), key
    assert np.isfinite(run.matrix[np.tril_indices(run.matrix.shape[0])]).all()
    assert calls and all(n > 0 for n in calls)  # APF chose the replay of the rounds after the first task


def test_resume_with_both_mechanisms_and_blurry_boundaries_is_byte_identical(tmp_path, monkeypatch):
    """OPE's state and APF's seeded replay are kept in the client state store: a run interrupted
    after task 1 and resumed ends as the uninterrupted one (online, blurry boundaries on)."""
    from helpers import interrupted_then_resumed

    raw = tiny(tasks={**TASKS, "blurry": 0.2}, training=TRAINING,
               continual={"memory_per_class": 3, "ope": {}, "apf": {}})
    interrupted_then_resumed(raw, tmp_path, monkeypatch, out=None, plots=False)
    for name in ("accuracy_matrix.csv", "client_metrics.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
