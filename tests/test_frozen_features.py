"""A frozen backbone's embeddings are computed once per run (simulator/learner/frozen_features.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.learner.backbones import build_model
from simulator.learner.frozen_features import FrozenFeatures, backbone_key
from simulator.learner.training import embed


def _data(n: int = 50):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 12)).astype(np.float32), rng.normal(size=(n // 2, 12)).astype(np.float32)


def test_lookups_equal_a_forward_pass_and_compute_once():
    x_train, x_test = _data()
    model = build_model("mlp", (12,), 8, 4, with_head=True, init_seed=0)
    cache = FrozenFeatures(x_train, x_test)
    subset = x_train[[5, 3, 40, 3]]  # any order, repeats allowed
    got = embed(model, subset, cache=cache)
    np.testing.assert_allclose(got.numpy(), embed(model, subset).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(embed(model, x_test[:7], cache=cache).numpy(), embed(model, x_test[:7]).numpy(), rtol=1e-6, atol=1e-6)
    assert cache.passes == 1
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the head is not part of the embedding
    embed(model, subset, cache=cache)
    assert cache.passes == 1
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.5)  # another backbone: another table
    np.testing.assert_allclose(embed(model, subset, cache=cache).numpy(), embed(model, subset).numpy(), rtol=1e-6, atol=1e-6)
    assert cache.passes == 2
    # a sample that is not one of the dataset's (here: transformed) is embedded directly
    assert cache.lookup(model, subset + 1e-3) is None
    assert cache.lookup(model, subset.astype(np.float64)) is None


def test_key_covers_buffers_and_tables_are_shared_through_a_folder(tmp_path):
    x_train, x_test = _data()
    model = build_model("cnn1d", (1, 12), 8, 4, with_head=False, init_seed=0, norm="batch")
    key = backbone_key(model)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    bn.running_mean += 1.0  # BatchNorm's statistics change the embedding, so they change the key
    assert backbone_key(model) != key
    x_train, x_test = x_train[:, None, :], x_test[:, None, :]
    first = FrozenFeatures(x_train, x_test, tmp_path)
    a = embed(model, x_train[:9], cache=first)
    second = FrozenFeatures(x_train, x_test, tmp_path)  # another process of the same run
    b = embed(model, x_train[:9], cache=second)
    assert (first.passes, second.passes) == (1, 0)
    assert torch.equal(a, b)
    assert len(list(tmp_path.glob("features-*.pt"))) == 1


@pytest.mark.parametrize("backbone", ["mlp", ["mlp", "cnn1d"]])
def test_a_frozen_run_embeds_the_data_once_per_backbone(tmp_path, monkeypatch, backbone):
    """Every embedding of the run (training uploads, evaluations, final prototypes) is a lookup;
    the driver computes one table per distinct backbone before the clients start."""
    from helpers import tiny
    from simulator.engine.runner import run_scenario
    from simulator.learner import frozen_features
    from simulator.scenario import validate_scenario

    passes, misses = [], []
    real_all, real_lookup = FrozenFeatures._embed_all, FrozenFeatures.lookup

    def counted(self, model, device):
        passes.append(backbone_key(model))
        return real_all(self, model, device)

    def watched(self, model, x, device="cpu"):
        out = real_lookup(self, model, x, device)
        if out is None:
            misses.append(len(x))
        return out

    monkeypatch.setattr(frozen_features.FrozenFeatures, "_embed_all", counted)
    monkeypatch.setattr(frozen_features.FrozenFeatures, "lookup", watched)
    raw = tiny(dataset={"source": "synthetic", "num_classes": 6, "dim": 12, "samples_per_class": 40, "class_sep": 6.0},
               model={"backbone": backbone, "embedding_dim": 16, "classifier": "lda"},
               continual={"backbone": "frozen", "memory_per_class": 5, "memory_selection": "herding"},
               strategy={"name": "proto_avg", "params": {"share_weights": False}})
    if isinstance(backbone, list):
        raw["dataset"].update(dim=12)
    run = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", plots=False, out=None)
    assert run.summary["completed"]
    assert len(passes) == len(set(passes)) == (1 if isinstance(backbone, str) else 2)
    assert misses == []
    import json

    assert "frozen_features" in json.loads((tmp_path / "run" / "profile.json").read_text())["driver"]


def test_ray_actors_read_the_drivers_table_and_match_inline(tmp_path):
    """On Ray every actor looks its features up in the table the driver wrote: the same matrix
    as inline, byte for byte (RanPAC on the frozen features, so the ridge sees them exactly)."""
    from helpers import run_tiny

    over = dict(model={"backbone": "mlp", "embedding_dim": 16, "classifier": "ranpac", "ranpac_dim": 32},
                continual={"backbone": "frozen", "memory_per_class": 0},
                strategy={"name": "proto_avg", "params": {"share_weights": False}})
    ray_out = run_tiny(tmp_path, "ray", "ray", **over)
    inline_out = run_tiny(tmp_path, "inline", "inline", **over)
    assert ray_out.summary["completed"] and inline_out.summary["completed"]
    assert (tmp_path / "ray" / "accuracy_matrix.csv").read_bytes() == (tmp_path / "inline" / "accuracy_matrix.csv").read_bytes()


def test_a_study_embeds_its_data_once_for_all_its_runs(tmp_path, monkeypatch):
    """compare shares the tables through <study dir>/features: the second strategy's runs read
    the first's (same data, backbone, software and machine), so the study computes one pass."""
    import protofed
    from helpers import tiny
    from simulator.learner import frozen_features

    monkeypatch.delenv(frozen_features.SHARED_ENV, raising=False)
    passes = []
    real_all = FrozenFeatures._embed_all
    monkeypatch.setattr(frozen_features.FrozenFeatures, "_embed_all",
                        lambda self, model, device: passes.append(1) or real_all(self, model, device))
    raw = tiny(continual={"backbone": "frozen", "memory_per_class": 0},
               strategy={"name": "proto_avg", "params": {"share_weights": False}},
               compare={"ncm": {"name": "proto_avg"}, "lda": {"name": "proto_avg", "set": {"model.classifier": "lda"}}})
    table = protofed.compare(raw, ["ncm", "lda"], seeds=[0], out_dir=tmp_path / "study", progress=False)
    assert len(table) == 2 and len(passes) == 1
    assert len(list((tmp_path / "study" / "features").glob("features-*.pt"))) == 1
    assert frozen_features.SHARED_ENV not in __import__("os").environ  # the study's setting ends with it
