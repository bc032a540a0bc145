"""The tracing attack on released means: its score separates members from non-members when
the mean is exact and few samples make it, falls to chance under heavy noise, and
`protofed attack` works on a real run that kept its uploads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_tiny

from simulator.cli import main
from simulator.privacy.attack import tracing_attack


def _release(rng, n_members: int, dim: int, noise: float):
    members = rng.normal(size=(n_members, dim))
    others = rng.normal(size=(200, dim))
    p = members.mean(axis=0) + rng.normal(scale=noise, size=dim)
    return p, members, others


@pytest.mark.parametrize("noise,low,high", [(0.0, 0.95, 1.0), (50.0, 0.4, 0.6)])
def test_tracing_attack_on_synthetic_means(noise, low, high):
    rng = np.random.default_rng(0)
    uploads, truth = [], {}
    for k in range(20):
        p, mem, non = _release(rng, 8, 64, noise)
        uploads.append({"server_round": 1, "pid": k, "classes": np.array([3]), "vectors": p[None], "counts": np.array([8])})
        truth[(k, 1)] = {"member_emb": mem, "member_y": np.full(8, 3), "other_emb": non, "other_y": np.full(200, 3)}
    out = tracing_attack(uploads, truth)
    assert out["releases"] == 20 and out["members"] == 160 and out["non_members"] == 20 * 100
    assert low <= out["auc"] <= high
    if noise == 0.0:
        assert out["tpr_at_1pct_fpr"] > 0.5  # a mean of 8 samples in 64 dimensions gives its members away
    # members and non-members come from one distribution here: without the release nothing leaks
    assert 0.4 <= out["model_only_auc"] <= 0.6


def test_attack_command_on_a_run_that_kept_its_uploads(tmp_path, capsys):
    out = run_tiny(tmp_path, "run", strategy={"name": "proto_avg", "params": {}}, privacy={"keep_uploads": True})
    assert (out.run_dir / "uploads.npz").exists()
    assert main(["attack", str(out.run_dir)]) == 0
    result = json.loads((out.run_dir / "attack.json").read_text())
    t = result["tracing"]
    assert t["releases"] > 0 and t["members"] > 0 and t["non_members"] > 0
    assert 0.0 <= t["auc"] <= 1.0 and 0.0 <= t["tpr_at_1pct_fpr"] <= 1.0
    assert 0.0 <= t["model_only_auc"] <= 1.0  # the baseline that ignores the release
    inv = result["feature_inversion"]
    assert inv["releases"] > 0
    for key in ("top1_member_rate", "top1_member_rate_baseline", "top1_chance"):
        assert 0.0 <= inv[key] <= 1.0
    assert inv["median_nearest_member_over_nonmember"] > 0
    assert (out.run_dir / "plots" / "attack_roc.png").stat().st_size > 0
    with np.load(out.run_dir / "uploads.npz") as z:
        senders = {int(z[k][3]) for k in z.files if k.endswith("/meta")}
    assert senders == {0, 1, 2}  # the server's view: each client's own upload


def test_attack_without_uploads_is_a_clear_error(tmp_path, capsys):
    out = run_tiny(tmp_path, "run", strategy={"name": "proto_avg", "params": {}})
    assert main(["attack", str(out.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "privacy.keep_uploads" in err and "Traceback" not in err


def test_inversion_finds_an_input_that_the_model_maps_onto_the_target():
    import torch

    from simulator.learner.backbones import build_model
    from simulator.privacy.attack import invert

    model = build_model("mlp", (8,), 4, 3, False, 0).eval()
    x0 = np.random.default_rng(0).normal(size=8).astype(np.float32)
    with torch.no_grad():
        target = model(torch.as_tensor(x0)[None])[0].numpy()
        start = model(torch.zeros(1, 8))[0].numpy()
    rec = invert(model, target, (8,), steps=300)
    with torch.no_grad():
        got = model(torch.as_tensor(rec)[None])[0].numpy()
    assert np.linalg.norm(got - target) < 0.1 * np.linalg.norm(start - target)
