"""TARGET (``strategies/target.py``, ``simulator/learner/generator.py``): generator shapes, the
data-free synthesis against a real trained teacher, the client's distillation loss, and
end-to-end inline runs (bytes, resume, reproducibility)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import interrupted_then_resumed, tiny
from simulator.engine.runner import run_scenario
from simulator.scenario import validate_scenario
from simulator.learner.backbones import build_model
from simulator.learner.generator import Generator, SynthesisConfig, bn_hooks, reinitialise, synthesize
from simulator.learner.training import TrainConfig, train_local
from simulator.objective import ClientInfo
from strategies.target import Params, TargetObjective

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "shape, kind, conv",
    [((40,), "signal", torch.nn.Conv1d), ((3, 17), "signal", torch.nn.Conv1d),
     ((3, 32, 32), "image", torch.nn.Conv2d), ((1, 13, 9), "image", torch.nn.Conv2d), ((28, 28), "image", torch.nn.Conv2d)],
)
def test_generator_output_shapes(shape, kind, conv):
    g = Generator(shape, num_classes=5, kind="image" if len(shape) == 2 and kind == "image" else "auto")
    assert g.kind == kind
    assert any(isinstance(m, conv) for m in g.modules())
    x, y = g.sample(6, [1, 3], torch.Generator().manual_seed(0))
    assert x.shape == (6, *shape)
    assert set(y.tolist()) <= {1, 3}
    assert torch.isfinite(x).all()
    # the label is an input: different labels, same noise -> different samples
    z = torch.randn(4, g.nz)
    assert not torch.allclose(g(z, torch.full((4,), 1)), g(z, torch.full((4,), 3)))


def _digits_teacher():
    """A cnn1d with BatchNorm trained on 4 digit classes (sklearn digits as 64-sample signals)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0 - 0.3).astype(np.float32)
    keep = np.isin(d.target, [0, 1, 2, 3])
    x, y = x[keep], d.target[keep].astype(np.int64)
    teacher = build_model("cnn1d", (64,), 16, 10, True, init_seed=0)
    train_local(teacher, x, y, TrainConfig(epochs=4, lr=0.05, classifier="head"), seen_classes=[0, 1, 2, 3], num_classes=10)
    return teacher


def test_synthesis_makes_the_teacher_see_the_labels_and_lowers_the_bn_loss():
    teacher = _digits_teacher()
    student = copy.deepcopy(teacher)
    reinitialise(student, 1)
    assert not torch.allclose(student.head.weight, teacher.head.weight)
    hooks = bn_hooks(teacher)
    assert len(hooks) == 3  # one per conv block
    for h in hooks:
        h.remove()
    torch.manual_seed(0)
    gen = Generator((64,), 10)
    cfg = SynthesisConfig(rounds=12, warmup=4, generator_steps=10, student_steps=10, batch_size=64)
    report = synthesize(gen, teacher, student, [0, 1, 2, 3], cfg, seed=3)
    # 1024 fresh samples, labels drawn uniformly over the 4 classes: chance is 0.25, and a
    # teacher at chance exceeds 0.30 on 1024 samples with probability < 1e-4 (binomial sd 0.0135).
    # Measured (OMP_NUM_THREADS=1): 0.615-0.753 (mean 0.65, sd 0.04) for these seeds under
    # avx512/avx2/default kernels, 2 threads and 1e-6 relative noise on the teacher's weights
    # (11 runs); 0.657-0.946 for 5 other generator/synthesis seeds and 3 teacher seeds.
    # 0.45 is 0.165 (about 4 sd of the spread under perturbation) below the lowest.
    # The 64-sample probe of the report (teacher_acc_after: 0.578-0.797 over the same
    # perturbations) is too small for a fixed threshold; it is only compared with its value before.
    x, y = gen.sample(1024, [0, 1, 2, 3], torch.Generator().manual_seed(7))
    with torch.no_grad():
        pred = teacher.head(teacher(x))[:, :4].argmax(1)
    acc = float((pred == y).float().mean())
    assert acc > 0.45, (acc, report)
    # before 0.08-0.38, after - before >= 0.39 in every run measured
    assert report.teacher_acc_after > report.teacher_acc_before + 0.15, report
    # bn_after / bn_before measured 0.086-0.202
    assert report.bn_after < 0.5 * report.bn_before, report
    assert report.ce_after < report.ce_before
    assert not any(m._forward_hooks for m in teacher.modules())  # hooks removed


def _objective(model, classes=(0, 1)):
    obj = TargetObjective(Params(), ClientInfo(0, 10, 16, "cpu"))
    gen = Generator((8,), 10)
    obj.gen_task, obj.classes, obj.spec = 1, list(classes), [gen.nz, gen.ngf, 0, 8]
    obj.gen_state = gen.state_dict()
    obj.old_state = copy.deepcopy(model.state_dict())
    return obj, gen


def test_kd_loss_zero_for_the_old_model_and_has_gradients_otherwise():
    model = build_model("mlp", (8,), 16, 10, True, init_seed=0)
    obj, gen = _objective(model)
    x, _ = gen.sample(16, [0, 1], torch.Generator().manual_seed(0))
    model.eval()
    same = obj.distillation(model, x)
    assert abs(float(same.detach())) < 1e-6
    with torch.no_grad():
        model.head.weight[0] += 1.0  # the model moved away from the old one
    moved = obj.distillation(model, x)
    assert float(moved.detach()) > 1e-4
    moved.backward()
    assert model.head.weight.grad is not None and float(model.head.weight.grad.abs().sum()) > 0
    # extra_loss scales it by kd_weight (25) and draws its own synthetic batch
    model.zero_grad()
    obj.before_training(model, np.zeros((4, 8), np.float32), np.array([2, 2, 3, 3]))
    extra = obj.extra_loss(torch.zeros(16, 16), torch.zeros(16, dtype=torch.long), model)
    assert extra is not None and float(extra.detach()) > 0 and extra.requires_grad
    # the cross-entropy leaves out the old classes, except those in the client's own data
    assert obj.train_classes([0, 1, 2, 3]) == [2, 3]
    obj.before_training(model, np.zeros((2, 8), np.float32), np.array([1, 2]))
    assert obj.train_classes([0, 1, 2, 3]) == [1, 2, 3]


def _target_tiny(**params):
    # synthetic data (no BatchNorm in the mlp: CE and adversarial terms only) and a cnn1d
    # variant below for the BatchNorm path; few synthesis steps to stay fast
    p = {"synthesis_rounds": 3, "warmup": 1, "generator_steps": 3, "student_steps": 3, "synthesis_batch_size": 32, **params}
    return {"strategy": {"name": "target", "params": p}, "continual": {"memory_per_class": 0}}


def run_tiny(tmp_path, name, **over):
    return run_scenario(validate_scenario(tiny(**over)), run_dir=tmp_path / name, engine="inline", out=None, plots=False)


def test_end_to_end_bytes_include_the_generator(tmp_path):
    from strategies.target import Target

    out = run_tiny(tmp_path, "t", **_target_tiny())
    fed = run_tiny(tmp_path, "f", strategy={"name": "fedavg"}, continual={"memory_per_class": 0})
    assert out.summary["completed"] and out.summary["num_tasks"] == 3
    m, f = (pd.read_csv(r.run_dir / "metrics.csv") for r in (out, fed))
    down = m.groupby(["task", "round"])["bytes_down"].first()
    fdown = f.groupby(["task", "round"])["bytes_down"].first()
    # the same payload as fedavg in the first task; in each later task's first round the
    # generator goes to all 3 clients (plus task id, seed, classes, spec); later rounds add 16 B
    gen = Generator((8,), 6, nz=Params().nz, ngf=Params().ngf)
    gen_bytes = sum(p.numel() * 4 for p in gen.parameters())
    assert down[(0, 0)] == fdown[(0, 0)]
    for task, n_old in ((1, 2), (2, 4)):
        extra = down[(task, 0)] - fdown[(task, 0)]
        assert extra == 3 * (gen_bytes + 8 + 8 + 8 * n_old + 8 * 4), (task, extra)
        assert down[(task, 1)] - fdown[(task, 1)] == 3 * 16
    assert out.summary["bytes_down"] > fed.summary["bytes_down"]
    assert np.isfinite(np.asarray(out.matrix)[np.tril_indices(3)]).all()
    assert Target.name == "target"


def test_resume_gives_the_identical_matrix(tmp_path, monkeypatch):
    # with a replay memory: target composes with the continual mechanisms like fedavg
    raw = tiny(**{**_target_tiny(), "continual": {"memory_per_class": 5}})
    full, resumed = interrupted_then_resumed(raw, tmp_path, monkeypatch, stop_after_task=1, plots=False)
    np.testing.assert_array_equal(resumed.matrix, full.matrix)
    assert resumed.summary["bytes_down"] == full.summary["bytes_down"]


def test_seeded_runs_reproduce_with_batchnorm_teacher(tmp_path):
    over = dict(**_target_tiny(), model={"backbone": "cnn1d", "embedding_dim": 16})
    a = run_tiny(tmp_path, "a", **over)
    b = run_tiny(tmp_path, "b", **over)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.summary["bytes_down"] == b.summary["bytes_down"]
    c = run_tiny(tmp_path, "c", **{**over, "seed": 2})
    assert not np.array_equal(np.nan_to_num(a.matrix), np.nan_to_num(c.matrix))


def test_the_baseline_scenario_has_a_target_label(tmp_path):
    from pathlib import Path

    from simulator.study.compare import plan

    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "fcil_baselines_mnist1d.yaml"
    runs, _ = plan(str(scenario), ["target", "fedavg"], [0], str(tmp_path / "cmp"))
    s = {r.label: r.scenario for r in runs}
    assert s["target"].strategy.name == "target" and s["target"].continual.lwf is None
    assert Params.model_validate(s["target"].strategy.params).kd_weight == 25.0


def test_a_client_absent_from_the_first_round_receives_the_teacher(tmp_path):
    """The generator goes once per task to each client; a client that was not sampled in the
    task's first round gets the teacher's weights with it, and distils that model, not the
    global model of the later round."""
    from flwr.app import ArrayRecord, ConfigRecord

    from helpers import reply, run_info
    from simulator.records import load_weights, weights_to_arrays
    from strategies.target import GEN, SPEC, TEACHER, Target

    def new_model():
        return build_model("mlp", (8,), 16, 6, True, init_seed=0)

    run = run_info(n_clients=2, dim=16, num_classes=6)
    run.new_model, run.input_shape = new_model, (8,)
    strat = Target(Params(synthesis_rounds=2, warmup=1, generator_steps=2, student_steps=2, synthesis_batch_size=8), run)
    arrays = strat.initial_arrays(weights_to_arrays(new_model(), include_head=True))

    def config(task, rnd, seen):
        return ConfigRecord({"task": task, "round": rnd, "server_round": 1, "seen_classes": seen, "eval_tasks": [0]})

    msgs = strat.configure_train(1, arrays, config(0, 0, [0, 1]), None)
    assert all(SPEC not in m.content["global"] for m in msgs)  # no generator in the first task
    teacher = dict(strat.global_weights)
    msgs = strat.configure_train(2, arrays, config(1, 0, [0, 1, 2, 3]), None)
    assert strat.gen_task == 1 and strat.gen_classes == [0, 1] and 1 in strat.reports
    for m in msgs:  # first round of the task: the generator, no teacher (the global model is the teacher)
        keys = list(m.content["global"].keys())
        assert SPEC in keys and any(k.startswith(GEN) for k in keys) and not any(k.startswith(TEACHER) for k in keys)
    # only client 0 replies in that round; the global model then moves
    moved = new_model()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.5)
    strat.aggregate_train(2, [reply(0, weights_to_arrays(moved, include_head=True), [], 10)])
    assert strat.holding_gen == {0}
    arrays = strat.global_arrays()
    later = {p: strat._extra(p, 3, first_round=False) for p in (0, 1)}
    assert SPEC not in later[0] and not any(k.startswith(GEN) for k in later[0])  # client 0 holds it
    assert SPEC in later[1] and any(k.startswith(TEACHER) for k in later[1])
    # client 1 receives the moved global model with the teacher: it distils the teacher
    model = new_model()
    obj = TargetObjective(strat.params, ClientInfo(1, 6, 16, "cpu"))
    obj.receive(ArrayRecord({**dict(arrays.items()), **later[1]}), model)
    expected = new_model()
    load_weights(expected, ArrayRecord(teacher))
    for k, v in expected.state_dict().items():
        assert torch.equal(obj.old_state[k], v), k
    assert not torch.equal(model.head.weight, expected.head.weight)  # the model itself is the moved one
    # the objective's state round-trips (client state store, resume)
    again = TargetObjective(strat.params, ClientInfo(1, 6, 16, "cpu"))
    again.load_state_dict(obj.state_dict())
    x, _ = again.generator().sample(4, again.classes, torch.Generator().manual_seed(0))
    y, _ = obj.generator().sample(4, obj.classes, torch.Generator().manual_seed(0))
    assert torch.equal(x, y)
    # and the server's state too
    twin = Target(strat.params, run)
    twin.load_state_dict(strat.state_dict())
    assert twin._extra(1, 3, False).keys() == later[1].keys() and twin.holding_gen == {0}


def test_a_generator_kind_that_cannot_make_the_samples_is_refused_before_the_run(tmp_path):
    from simulator.errors import UserError

    scenario = validate_scenario(tiny(**_target_tiny(generator="image")))  # the tiny scenario's samples are (8,)
    with pytest.raises(UserError) as err:
        run_scenario(scenario, run_dir=tmp_path / "r", engine="inline", out=None, plots=False)
    assert "strategy.params.generator" in str(err.value) and "image generator" in str(err.value)
    assert not (tmp_path / "r").exists()  # nothing written
