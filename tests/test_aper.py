"""APER (``model.aper``): a frozen copy of the initial backbone beside the adapted one, features
concatenated; the adapted branch trains during the first task only (``share_weights: first_task``),
the frozen one never trains and never travels, and every class's prototype is the central mean of
the concatenated features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import tiny
from simulator.errors import UserError
from simulator.learner.backbones import DualBranch, build_model
from simulator.learner.training import TrainConfig, embed, train_local
from simulator.records import shared_state, weights_to_arrays
from simulator.scenario import validate_scenario

DIM = 16


def aper_raw(**over) -> dict:
    """The tiny scenario (synthetic data, mlp, 3 clients, tasks of 2 classes) as federated APER."""
    base = {
        "model": {"backbone": "mlp", "embedding_dim": DIM, "aper": True},
        "continual": {"backbone": "train", "memory_per_class": 0},
        "strategy": {"name": "proto_avg", "params": {"share_weights": "first_task"}},
        "training": {"rounds_per_task": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.05},
    }
    return tiny(**{**base, **over})  # whole sections first, then section__key overrides, in order


# --------------------------------------------------------------------------- the model
def test_dual_branch_concatenates_a_frozen_copy_that_never_trains_or_travels():
    plain = build_model("mlp", (8,), DIM, 6, with_head=False, init_seed=3)
    model = build_model("mlp", (8,), DIM, 6, with_head=False, init_seed=3, aper=True)
    assert isinstance(model.backbone, DualBranch)
    x = torch.randn(20, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (20, 2 * DIM)
        assert torch.equal(out[:, :DIM], plain(x)) and torch.equal(out[:, DIM:], plain(x))  # both start as the initial one
    # the adapted branch carries exactly the plain model's weights, under its own prefix; the frozen one none
    shared = shared_state(model, include_head=False)
    assert sorted(shared) == sorted(f"backbone.adapted.{k[len('backbone.'):]}" for k in shared_state(plain, include_head=False))
    sizes = lambda arrays: sum(a.numpy().nbytes for a in arrays.values())  # noqa: E731
    assert sizes(weights_to_arrays(model, False)) == sizes(weights_to_arrays(plain, False))
    # train(): the frozen branch stays in eval mode; training changes the adapted branch only
    model.train()
    assert not model.backbone.frozen.training and model.backbone.adapted.training
    frozen_before = {k: v.clone() for k, v in model.backbone.frozen.state_dict().items()}
    adapted_before = {k: v.clone() for k, v in model.backbone.adapted.state_dict().items()}
    y = np.repeat([0, 1], 10)
    from simulator.learner.prototypes import PrototypeSet

    # a known prototype of another class, 2 x DIM wide: the loss uses its adapted half
    protos = PrototypeSet(np.array([2]), np.ones((1, 2 * DIM), np.float32), np.array([5]))
    stats = train_local(model, x.numpy(), y, TrainConfig(epochs=2, batch_size=10, lr=0.1), seen_classes=[0, 1, 2],
                        num_classes=6, known=protos)
    assert stats.steps == 4
    assert all(torch.equal(v, frozen_before[k]) for k, v in model.backbone.frozen.state_dict().items())
    assert any(not torch.equal(v, adapted_before[k]) for k, v in model.backbone.adapted.state_dict().items())
    assert all(not p.requires_grad for p in model.backbone.frozen.parameters())
    with torch.no_grad():
        assert torch.equal(embed(model, x.numpy())[:, :DIM], plain(x))


def test_head_width_and_training_features():
    model = build_model("mlp", (8,), DIM, 6, with_head=True, init_seed=0, aper=True)
    assert model.head is not None and model.head.in_features == 2 * DIM
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert torch.equal(model.train_features(x), model(x)[:, model.train_columns])


# --------------------------------------------------------------------------- a federated run
@pytest.fixture(scope="module")
def aper_run(tmp_path_factory):
    """One federated APER run, with every client upload and every merge observed."""
    import simulator.engine.client_app as client_app
    from simulator.engine.runner import run_scenario
    from strategies.proto_avg import ProtoAvg

    uploads, merges = [], []
    real_upload, real_merge = client_app._upload, ProtoAvg.merge

    def watched_upload(rt, model, objective, x, y, private):
        with torch.no_grad():
            feats = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
        uploads.append({"frozen": bool(objective.backbone_frozen), "feats": feats, "x": x.copy(),
                        "classes": len(np.unique(y)),
                        "frozen_state": {k: v.clone() for k, v in model.backbone.frozen.state_dict().items()},
                        "adapted_state": {k: v.clone() for k, v in model.backbone.adapted.state_dict().items()}})
        return real_upload(rt, model, objective, x, y, private)

    def watched_merge(self, server_round, ups):
        real_merge(self, server_round, ups)
        merges.append((self.step, self.round_in_task, self.global_protos))

    tmp = tmp_path_factory.mktemp("aper")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_app, "_upload", watched_upload)
        mp.setattr(ProtoAvg, "merge", watched_merge)
        raw = aper_raw(output={"save": "clients"})
        run = run_scenario(validate_scenario(raw), run_dir=tmp / "run", out=None, plots=False)
    return raw, tmp / "run", run, uploads, merges


def _initial_backbone(raw: dict):
    from simulator.seeding import derive_seed

    return build_model("mlp", (8,), DIM, 6, False, derive_seed(raw["seed"], "model_init"))


def test_first_half_is_the_initial_backbone_throughout_and_the_adapted_half_moves_in_the_first_task_only(aper_run):
    raw, _, run, uploads, _ = aper_run
    assert run.summary["completed"]
    initial = _initial_backbone(raw)
    init_state = initial.backbone.state_dict()
    assert len(uploads) == 3 * 3 * 3  # 3 tasks x 3 rounds x 3 clients
    for u in uploads:
        with torch.no_grad():
            first = initial(torch.as_tensor(u["x"], dtype=torch.float32)).numpy()
        assert np.array_equal(u["feats"][:, :DIM], first)
        assert all(torch.equal(v, init_state[k]) for k, v in u["frozen_state"].items())
    trained = [u for u in uploads if not u["frozen"]]
    frozen = [u for u in uploads if u["frozen"]]
    # task 0: rounds 0 and 1 fine-tune (3 clients each), round 2 is the prototype pass; then frozen
    assert len(trained) == 6 and len(frozen) == 21
    assert any(not torch.equal(v, init_state[k]) for u in trained for k, v in u["adapted_state"].items())
    ref = frozen[0]["adapted_state"]
    assert any(not torch.equal(v, init_state[k]) for k, v in ref.items())  # it did adapt
    for u in frozen:  # nothing changes after the first task: one averaged backbone everywhere
        assert all(torch.equal(v, ref[k]) for k, v in u["adapted_state"].items())
        assert not np.array_equal(u["feats"][:, :DIM], u["feats"][:, DIM:])


def test_first_task_prototypes_stay_identical_once_frozen(aper_run):
    _, _, _, _, merges = aper_run
    assert [(s, r) for s, r, _ in merges] == [(t, r) for t in range(3) for r in range(3)]
    first = merges[2][2]  # after the first task's prototype pass
    classes = first.classes
    assert len(classes) == 2 and first.vectors.shape[1] == 2 * DIM
    for _, _, protos in merges[2:]:
        later = protos.select(classes)
        assert np.array_equal(later.vectors, first.vectors) and np.array_equal(later.counts, first.counts)


def test_federated_prototypes_equal_central_means_of_the_concatenated_features(aper_run):
    """An independent computation: every client's training data of every task pooled, embedded
    by the final (frozen) model, class means in numpy (float64)."""
    from simulator.data.stream import build_stream

    raw, run_dir, _, _, merges = aper_run
    scenario = validate_scenario(raw)
    stream = build_stream(scenario)
    saved = torch.load(run_dir / "final" / "clients" / "0.pt", map_location="cpu", weights_only=False)
    model = build_model("mlp", (8,), DIM, 6, False, 0, aper=True)
    model.load_state_dict(saved["model"])
    model.eval()
    idx = np.concatenate([np.asarray(i) for per_task in stream.train_indices for i in per_task])
    x, y = stream.dataset.x_train[idx], stream.dataset.y_train[idx]
    with torch.no_grad():
        feats = model(torch.as_tensor(x, dtype=torch.float32)).numpy().astype(np.float64)
    central = {int(c): feats[y == c].mean(axis=0) for c in np.unique(y)}
    final = merges[-1][2]
    assert sorted(int(c) for c in final.classes) == sorted(central)
    for c, v, n in zip(final.classes, final.vectors, final.counts):
        assert n == int((y == c).sum())
        np.testing.assert_allclose(v, central[int(c)], rtol=1e-5, atol=1e-5)
    global_npz = np.load(run_dir / "final" / "global.npz")
    assert not any(k.startswith("w.backbone.frozen") for k in global_npz.files)


def test_frozen_branch_adds_no_bytes_to_any_upload(aper_run, tmp_path):
    """The same run without aper: in the first round both send the same weights (the frozen
    branch travels in neither direction); uploads differ only by the prototypes' second half."""
    from simulator.engine.runner import run_scenario

    raw, run_dir, _, uploads, _ = aper_run
    plain = aper_raw(model={"backbone": "mlp", "embedding_dim": DIM})
    run_scenario(validate_scenario(plain), run_dir=tmp_path / "plain", out=None, plots=False)
    a = pd.read_csv(run_dir / "metrics.csv").drop_duplicates(["task", "round"]).set_index(["task", "round"])
    b = pd.read_csv(tmp_path / "plain" / "metrics.csv").drop_duplicates(["task", "round"]).set_index(["task", "round"])
    assert a.loc[(0, 0), "bytes_down"] == b.loc[(0, 0), "bytes_down"]  # the initial weights, no prototypes yet
    classes_uploaded = sum(u["classes"] for u in uploads[:3])  # the first round's three uploads
    assert a.loc[(0, 0), "bytes_up"] - b.loc[(0, 0), "bytes_up"] == classes_uploaded * DIM * 4
    # after the first task only prototypes travel, 2 x DIM float32 per class
    later = a.loc[(1, 1)]
    assert later["bytes_up"] < a.loc[(0, 0), "bytes_up"] / 10


def test_resume_after_the_first_task_is_byte_identical(tmp_path, monkeypatch):
    from helpers import interrupted_then_resumed

    interrupted_then_resumed(aper_raw(), tmp_path, monkeypatch, stop_after_task=0, out=None, plots=False)
    for name in ("accuracy_matrix.csv", "client_metrics.csv"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


def test_ray_gives_the_inline_matrix(tmp_path):
    from simulator.engine.runner import run_scenario

    for engine in ("ray", "inline"):
        run_scenario(validate_scenario(aper_raw()), run_dir=tmp_path / engine, engine=engine, out=None, plots=False)
    assert (tmp_path / "ray" / "accuracy_matrix.csv").read_bytes() == (tmp_path / "inline" / "accuracy_matrix.csv").read_bytes()


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "over, field, words",
    [
        ({"continual__backbone": "frozen"}, "model.aper", "would never adapt"),
        ({"strategy": {"name": "proto_avg", "params": {"share_weights": True}}}, "model.aper", "must stop training"),
        ({"strategy": {"name": "proto_avg", "params": {"share_weights": False}}}, "model.aper", "must stop training"),
        ({"training__rounds_per_task": 1}, "training.rounds_per_task", "at least 2 rounds"),
        ({"strategy": {"name": "fedproto", "params": {"share_weights": "first_task"}}}, "model.aper", "loss terms of its own"),
        ({"continual__lwf": {"weight": 1.0}}, "model.aper", "continual.lwf"),
    ],
)
def test_impossible_combinations_are_refused_by_field(over, field, words):
    with pytest.raises(UserError) as err:
        validate_scenario(aper_raw(**over))
    assert any(p.field == field and words in p.message for p in err.value.problems), err.value.problems


def test_local_aper_with_freeze_after_first_task_is_accepted_and_the_cli_refuses_with_exit_2(tmp_path):
    import subprocess
    import sys

    import yaml

    ok = aper_raw(continual={"backbone": "freeze_after_first_task", "memory_per_class": 0},
                  strategy={"name": "proto_avg", "params": {"share_weights": False}})
    assert validate_scenario(ok).model.feature_dim == 2 * DIM
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(aper_raw(continual__backbone="frozen")))
    from pathlib import Path

    cli = Path(sys.executable).parent / "protofed"
    proc = subprocess.run([str(cli), "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "model.aper" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_efficientnet_frozen_branch_holds_the_imagenet_weights():
    from simulator.learner.backbones import read_pretrained

    state = read_pretrained("imagenet", "efficientnet_lite0")
    model = build_model("efficientnet_lite0", (3, 32, 32), 1280, 10, False, 0, pretrained=state, aper=True)
    frozen = model.backbone.frozen.state_dict()
    assert all(torch.equal(frozen[k], v) for k, v in state.items())
    assert not any(k.startswith("backbone.frozen.") for k in shared_state(model, include_head=False))


def test_the_aper_label_does_not_leak_into_the_other_labels_of_a_study(tmp_path):
    """A label's run keeps its own compare entry only: validated with model.aper set, the
    prototype-only labels of digits_pretrained.yaml would be refused."""
    from pathlib import Path

    from simulator.study.compare import plan

    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "digits_pretrained.yaml"
    runs, _ = plan(str(scenario), ["aper", "ranpac", "simplecil"], [0], str(tmp_path))
    by_label = {r.label: r.scenario for r in runs}
    assert by_label["aper"].model.aper and by_label["aper"].model.feature_dim == 2560
    assert list(by_label["aper"].compare) == ["aper"]
    assert not by_label["ranpac"].model.aper and not by_label["simplecil"].model.aper
    assert by_label["aper"].training.rounds_per_task == 3 and by_label["simplecil"].training.rounds_per_task == 1


def test_clients_holding_the_frozen_averaged_backbone_share_one_feature_table(monkeypatch, tmp_path):
    """With BatchNorm (cnn1d) the clients' step counters differ after the first task, yet their
    averaged frozen backbones embed alike: one canonical pass for the whole run, every later
    embedding of a dataset sample a lookup."""
    from simulator.engine.runner import run_scenario
    from simulator.learner import frozen_features
    from simulator.learner.frozen_features import FrozenFeatures

    passes, misses = [], []
    real_all, real_lookup = FrozenFeatures._embed_all, FrozenFeatures.lookup
    monkeypatch.setattr(frozen_features.FrozenFeatures, "_embed_all",
                        lambda self, model, device: passes.append(1) or real_all(self, model, device))

    def watched(self, model, x, device="cpu"):
        out = real_lookup(self, model, x, device)
        if out is None:
            misses.append(len(x))
        return out

    monkeypatch.setattr(frozen_features.FrozenFeatures, "lookup", watched)
    raw = aper_raw(dataset={"source": "mnist1d", "num_samples": 600}, tasks={"initial_classes": 2, "classes_per_task": 4},
                   model={"backbone": "cnn1d", "embedding_dim": 8, "aper": True})
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", out=None, plots=False)
    assert run.summary["completed"]
    assert passes == [1] and misses == []
