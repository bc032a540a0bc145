"""ResNet backbones (parameter counts, images and 1-D signals), model.norm, BatchNorm statistics
under FedAvg, model.pretrained, and a real plugin backbone installed through protofed.backbones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, MetricRecord

from simulator.cli import main
from simulator.engine.runtime import RunSetup, Runtime
from simulator.errors import UserError
from simulator.learner.backbones import BACKBONES, PretrainedError, build_model, load_pretrained, read_pretrained
from simulator.learner.training import TrainConfig, train_local
from simulator.objective import ClientInfo
from simulator.records import WEIGHT_PREFIX
from simulator.scenario import validate_scenario
from strategies.base import RunInfo, Upload
from strategies.fedavg import FedAvg

REPO = Path(__file__).resolve().parents[1]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv(c_in: int, c_out: int, taps: int) -> int:
    return c_in * c_out * taps  # bias-free convolution


def resnet32_count(channels: int, taps: int) -> int:
    """By hand: stem, 3 x 5 basic blocks (two convs + two BatchNorms each), option A shortcuts."""
    total = conv(channels, 16, taps) + 2 * 16
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(5):
            total += conv(c_in, width, taps) + conv(width, width, taps) + 4 * width
            c_in = width
    return total


def resnet18_count(channels: int, taps: int) -> int:
    total = conv(channels, 64, taps) + 2 * 64
    c_in = 64
    for width in (64, 128, 256, 512):
        for b in range(2):
            total += conv(c_in, width, taps) + conv(width, width, taps) + 4 * width
            if c_in != width:
                total += c_in * width + 2 * width  # option B: 1x1 conv + BatchNorm
            c_in = width
    return total


def test_resnet_parameter_counts_match_the_reference_networks():
    r32 = build_model("resnet32", (3, 32, 32), 64, 100, False, 0)
    assert n_params(r32.backbone) == resnet32_count(3, 9) == 463_504  # iCaRL/PyCIL's "0.46 M"
    r18 = build_model("resnet18", (3, 32, 32), 512, 100, False, 0)
    assert n_params(r18.backbone) == resnet18_count(3, 9) == 11_168_832  # the CIFAR ResNet-18, ~11.2 M
    # a projection only when embedding_dim differs from the pooled width
    r18p = build_model("resnet18", (3, 32, 32), 64, 100, False, 0)
    assert n_params(r18p.backbone) == 11_168_832 + 512 * 64 + 64
    assert isinstance(r32.backbone.proj, torch.nn.Identity) and isinstance(r18p.backbone.proj, torch.nn.Linear)
    # 1-D signals: kernel 3 instead of 3x3
    assert n_params(build_model("resnet32", (40,), 64, 10, False, 0).backbone) == resnet32_count(1, 3)
    assert n_params(build_model("resnet18", (2, 40), 512, 10, False, 0).backbone) == resnet18_count(2, 3)


@pytest.mark.parametrize("name", ["resnet32", "resnet18"])
@pytest.mark.parametrize("shape", [(3, 17, 23), (1, 8, 8), (40,), (4, 33)])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_resnets_take_any_channels_and_size(name, shape, norm):
    model = build_model(name, shape, 24, 5, with_head=True, init_seed=0, norm=norm)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 24) and torch.isfinite(out).all()
    out.sum().backward()  # gradients reach the stem
    stem = next(p for p in model.backbone.parameters())
    assert stem.grad is not None and float(stem.grad.abs().sum()) > 0
    kinds = {type(m).__name__ for m in model.backbone.modules()}
    assert ({"BatchNorm1d", "BatchNorm2d"} & kinds) if norm == "batch" else not ({"BatchNorm1d", "BatchNorm2d"} & kinds)
    assert ("GroupNorm" in kinds) == (norm == "group")


def test_norm_applies_to_the_small_conv_backbones_and_batch_keeps_the_old_weights():
    for name, shape in (("cnn1d", (1, 40)), ("cnn", (1, 8, 8))):
        g = build_model(name, shape, 16, 3, False, 0, norm="group")
        b = build_model(name, shape, 16, 3, False, 0, norm="batch")
        assert not any(k.endswith("running_mean") for k in g.state_dict())
        assert any(k.endswith("running_mean") for k in b.state_dict())
        # the convolutions are initialised identically whatever the norm (norm layers draw no random numbers)
        conv_b = [v for k, v in b.state_dict().items() if v.dim() >= 3]
        conv_g = [v for k, v in g.state_dict().items() if v.dim() >= 3]
        assert all(torch.equal(x, y) for x, y in zip(conv_b, conv_g)) and conv_b


def _client_upload(pid: int, norm: str, shift: float, n: int) -> tuple[Upload, torch.nn.Module]:
    model = build_model("cnn1d", (1, 20), 8, 4, with_head=True, init_seed=0, norm=norm)
    rng = np.random.default_rng(pid)
    x = (rng.normal(size=(n, 1, 20)) * (1 + pid) + shift).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    train_local(model, x, y, TrainConfig(epochs=1, batch_size=8, classifier="head"), seen_classes=[0, 1, 2, 3], num_classes=4, seed=pid)
    objective = FedAvg.Objective(FedAvg.Params(), ClientInfo(pid, 4, 8, "cpu"))
    arrays = objective.upload(model, _no_protos())
    up = Upload(pid, n, ArrayRecord(arrays), MetricRecord({"partition_id": pid, "num_examples": n}), None)
    return up, model


def _no_protos():
    from simulator.learner.prototypes import PrototypeSet

    return PrototypeSet.empty(8)


def test_batchnorm_running_statistics_are_fedavg_averaged_and_the_step_counter_stays_local():
    """The documented behaviour: running mean/var travel and are averaged by samples like weights."""
    (u0, m0), (u1, m1) = _client_upload(0, "batch", -2.0, 24), _client_upload(1, "batch", 3.0, 40)
    key = "backbone.features.1.running_mean"
    assert WEIGHT_PREFIX + key in u0.arrays and WEIGHT_PREFIX + "backbone.features.1.num_batches_tracked" not in u0.arrays
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert not torch.allclose(s0[key], s1[key])  # different local data, different statistics
    server = FedAvg(FedAvg.Params(), RunInfo(seed=0, participation=1.0, num_classes=4, embedding_dim=8))
    server.merge(1, [u0, u1])
    for k in (key, "backbone.features.1.running_var"):
        expected = (24 * s0[k].double() + 40 * s1[k].double()) / 64
        np.testing.assert_allclose(server.global_weights[WEIGHT_PREFIX + k].numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    # group norm: nothing but weights travels
    (g0, _), _ = _client_upload(0, "group", -2.0, 24), None
    assert not any("running" in k or "num_batches" in k for k in g0.arrays.keys())


def test_batch_local_keeps_every_batchnorm_layer_local_like_fedbn(tmp_path):
    (b0, m0) = _client_upload(0, "batch_local", -2.0, 24)
    (b1, _) = _client_upload(0, "batch", -2.0, 24)
    bn = {k for k in m0.state_dict() if k.startswith("backbone.features.1.")}
    assert bn == {f"backbone.features.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    sent = {k[len(WEIGHT_PREFIX):] for k in b0.arrays.keys()}
    assert not sent & bn and not any(".running_" in k for k in sent)
    bn_layers = [n for n, m in m0.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(bn_layers) == 3
    bn_floats = {f"{n}.{p}" for n in bn_layers for p in ("weight", "bias", "running_mean", "running_var")}
    assert {k[len(WEIGHT_PREFIX):] for k in b1.arrays.keys()} - sent == bn_floats  # exactly the BatchNorm layers stay home
    # the same layers otherwise: convolutions and the projection still travel
    assert "backbone.features.0.weight" in sent and "backbone.proj.weight" in sent and "head.weight" in sent
    # end to end: FedAvg with FedBN-style local BatchNorm runs, and uploads less
    from simulator.engine.runner import run_scenario

    def run(norm):
        raw = tiny(tmp_path, backbone="cnn1d", embedding_dim=16, norm=norm)
        return run_scenario(validate_scenario(raw), run_dir=tmp_path / norm, plots=False)

    a, b = run("batch"), run("batch_local")
    assert b.summary["completed"] and b.summary["bytes_up"] < a.summary["bytes_up"]


# --------------------------------------------------------------------------- pretrained
def tiny(tmp_path: Path, **model) -> dict:
    return {
        "name": "bb",
        "seed": 1,
        "dataset": {"source": "synthetic", "num_classes": 4, "dim": 12, "samples_per_class": 20, "class_sep": 5.0},
        "tasks": {"classes_per_task": 2},
        "clients": {"num_clients": 2},
        "training": {"rounds_per_task": 1, "local_epochs": 1, "batch_size": 16},
        "model": {"backbone": "resnet32", "embedding_dim": 64, **model},
        "strategy": {"name": "fedavg"},
        "resources": {"engine": "inline"},
        "output": {"dir": str(tmp_path / "results")},
    }


def test_pretrained_weights_are_every_clients_starting_point(tmp_path):
    donor = build_model("resnet32", (12,), 64, 4, False, init_seed=99)
    torch.save(donor.backbone.state_dict(), tmp_path / "bb.pt")
    whole = tmp_path / "whole.pt"
    torch.save(build_model("resnet32", (12,), 64, 4, True, init_seed=98).state_dict(), whole)  # backbone.* + head.*
    assert set(read_pretrained(whole)) == set(donor.backbone.state_dict())

    scenario = validate_scenario(tiny(tmp_path, pretrained=str(tmp_path / "bb.pt")))
    rt = Runtime(RunSetup(scenario=scenario.resolved(), state_dir=str(tmp_path / "state")))
    for pid in (0, 1):
        got = rt.new_model(pid).backbone.state_dict()
        for k, v in donor.backbone.state_dict().items():
            assert torch.equal(got[k], v), k
    fresh = Runtime(RunSetup(scenario=validate_scenario(tiny(tmp_path)).resolved(), state_dir=str(tmp_path / "s2")))
    assert not torch.equal(fresh.new_model(0).backbone.state_dict()["features.0.weight"], donor.backbone.state_dict()["features.0.weight"])


def test_pretrained_strict_check_names_the_keys(tmp_path):
    state = build_model("resnet32", (12,), 64, 4, False, 0).backbone.state_dict()
    state["extra.weight"] = torch.zeros(3)
    del state["features.0.weight"]
    model = build_model("resnet32", (12,), 64, 4, False, 0)
    with pytest.raises(PretrainedError) as err:
        load_pretrained(model.backbone, state)
    assert "missing keys: features.0.weight" in str(err.value) and "unexpected keys: extra.weight" in str(err.value)

    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    run = tmp_path / "run"
    scen = tmp_path / "s.yaml"
    scen.write_text(yaml.safe_dump(tiny(tmp_path, pretrained=str(bad))))
    assert main(["run", str(scen), "--out", str(run)]) == 2
    assert not run.exists()  # nothing half-written
    with pytest.raises(UserError) as uerr:
        from simulator.engine.runner import run_scenario

        run_scenario(validate_scenario(tiny(tmp_path, pretrained=str(bad))), source="s.yaml", run_dir=run)
    text = str(uerr.value)
    assert "model.pretrained" in text and "features.0.weight" in text and "extra.weight" in text and "s.yaml" in text
    # a cnn1d state dict for a resnet32: shape / key mismatch, and a file that is not a state dict
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="cannot read"):
        read_pretrained(tmp_path / "junk.pt")
    with pytest.raises(PretrainedError, match="not a file"):
        read_pretrained(tmp_path / "nothing.pt")


def test_unknown_norm_and_backbone_are_field_errors(tmp_path):
    with pytest.raises(UserError, match="model.norm"):
        validate_scenario(tiny(tmp_path, norm="layer"))
    with pytest.raises(UserError, match="unknown backbone 'resnet50'"):
        validate_scenario(tiny(tmp_path, backbone="resnet50"))


def test_one_round_with_group_norm_resnet32_on_signals(tmp_path):
    from simulator.engine.runner import run_scenario

    raw = tiny(tmp_path, norm="group")
    out = run_scenario(validate_scenario(raw), run_dir=tmp_path / "run", plots=False)
    assert out.summary["completed"] and np.isfinite(out.matrix[0, 0])


# --------------------------------------------------------------------------- the plugin group
PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "protofed-demo-backbone"
version = "0.2.0"
requires-python = ">=3.11"

[project.entry-points."protofed.backbones"]
tinynet = "protofed_demo_backbone:TINYNET"
factory_net = "protofed_demo_backbone:make_spec"
notaspec = "protofed_demo_backbone:NOT_A_SPEC"
cnn = "protofed_demo_backbone:TINYNET"

[tool.setuptools]
py-modules = ["protofed_demo_backbone"]
"""

PLUGIN_MODULE = '''\
"""A protofed plugin backbone: one linear layer with tanh (it marks every build)."""

import math
import os

from torch import nn

from simulator.learner.backbones import BackboneSpec


class Tiny(nn.Module):
    def __init__(self, input_shape, embedding_dim):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), embedding_dim), nn.Tanh())
        path = os.environ.get("PROTOFED_DEMO_MARKER")
        if path:
            with open(path, "a") as fh:
                fh.write(f"build {tuple(input_shape)} {embedding_dim}\\n")

    def forward(self, x):
        return self.net(x)


TINYNET = BackboneSpec("tinynet", "demo plugin: linear + tanh", Tiny)


def make_spec():
    return BackboneSpec("factory_net", "demo plugin from a factory", Tiny)


NOT_A_SPEC = 7
'''


def test_a_plugin_backbone_is_installed_listed_and_trained(tmp_path):
    pkg = tmp_path / "protofed-demo-backbone"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "protofed_demo_backbone.py").write_text(PLUGIN_MODULE)
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(pkg)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    marker = tmp_path / "marker.txt"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
               PROTOFED_DEMO_MARKER=str(marker), OMP_NUM_THREADS="1")
    raw = tiny(tmp_path, backbone="tinynet", embedding_dim=6)
    raw["strategy"] = {"name": "proto_avg"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    raw["model"]["backbone"] = "notaspec"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    script = (
        "import contextlib, io, json, sys\n"
        "from simulator.cli import main\n"
        "res = {}\n"
        "for key, argv in json.loads(sys.argv[1]).items():\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        code = main(argv)\n"
        "    res[key] = [code, out.getvalue(), err.getvalue()]\n"
        "print(json.dumps(res))\n"
    )
    jobs = {
        "list": ["list"],
        "bad": ["validate", str(tmp_path / "bad.yaml")],
        "run": ["run", str(tmp_path / "s.yaml"), "--engine", "inline", "--out", str(tmp_path / "run")],
    }
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    code, out, err = res["list"]
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "plugin: protofed-demo-backbone 0.2.0" in lines["tinynet"] and "factory_net" in lines
    assert "plugin" not in lines["cnn"] and "notaspec" not in lines
    assert "'notaspec'" in err and "expected a simulator.learner.backbones.BackboneSpec" in err
    assert "'cnn'" in err and "already taken by the built-in backbone" in err
    code, out, err = res["bad"]
    assert code == 2 and "model.backbone" in err and "backbone 'notaspec' is not available" in err
    code, out, err = res["run"]
    assert code == 0, out + err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is True
    assert "build (12,) 6" in marker.read_text()  # the plugin's own module built the clients' models
    assert "tinynet" not in BACKBONES  # this process never saw the plugin
