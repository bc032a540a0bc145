"""Differential privacy on prototype uploads: dp-accounting figures, the noise calibration, the
clipping, and real runs that report the epsilon they spent (or refuse to start)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_tiny, write_tiny

from simulator.cli import main
from simulator.privacy.accounting import calibrate_noise, epsilon_spent, make_plan
from simulator.privacy.config import PrivacyConfig
from simulator.privacy.mechanism import clip_rows, noise_scales, noisy_class_sums, prototypes_from_sums


def test_accountant_matches_dp_accounting_documented_example():
    # dp-accounting's own test (rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian):
    # noise multiplier 4.530877117 gives exactly (1, 1e-6)-DP for one Gaussian release
    assert epsilon_spent(4.530877117, 1, 1e-6) == pytest.approx(1.0, abs=1e-3)
    # composing T Gaussian releases with multiplier z is one release with z / sqrt(T)
    assert epsilon_spent(2.0, 16, 1e-5) == pytest.approx(epsilon_spent(0.5, 1, 1e-5), rel=1e-6)
    # more releases spend more; no release spends nothing
    assert epsilon_spent(1.0, 10, 1e-5) > epsilon_spent(1.0, 5, 1e-5) > 0 == epsilon_spent(1.0, 0, 1e-5)


def test_calibration_meets_the_budget_tightly():
    z = calibrate_noise(4.0, 1e-5, 12)
    assert epsilon_spent(z, 12, 1e-5) <= 4.0 + 1e-6
    assert epsilon_spent(z * 0.97, 12, 1e-5) > 4.0  # not wastefully large


def test_noise_scales_add_up_to_one_release_of_multiplier_z():
    s = noise_scales(1.3, clip=2.0, count_share=0.1)
    # one sample moves a sum by <= clip and a count by 1: the pair is a Gaussian mechanism with z
    assert (2.0 / s.sum_std) ** 2 + (1.0 / s.count_std) ** 2 == pytest.approx(1.0 / 1.3**2)


def test_empirical_noise_std_matches_the_calibration():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 4)) * 3.0
    labels = np.repeat([0, 1, 2], 10)
    classes = np.array([0, 1, 2, 5])  # class 5 is empty and still released
    scales = noise_scales(0.8, clip=1.5, count_share=0.2)
    clean_s, clean_n = noisy_class_sums(emb, labels, classes, 1.5, noise_scales(1e-12, 1.5, 0.2), rng)
    draws_s, draws_n = [], []
    for _ in range(4000):
        s, n = noisy_class_sums(emb, labels, classes, 1.5, scales, rng)
        draws_s.append(s - clean_s)
        draws_n.append(n - clean_n)
    ds, dn = np.stack(draws_s), np.stack(draws_n)
    assert ds.std() == pytest.approx(scales.sum_std, rel=0.03)
    assert dn.std() == pytest.approx(scales.count_std, rel=0.03)
    assert abs(ds.mean()) < 0.05 * scales.sum_std
    np.testing.assert_allclose(clean_n, [10, 10, 10, 0], atol=1e-9)


def test_clipping_bounds_each_sample_and_keeps_short_ones():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    c = clip_rows(x, 1.0)
    np.testing.assert_allclose(c[0], [0.6, 0.8])
    np.testing.assert_allclose(c[1], [0.3, 0.4])
    np.testing.assert_allclose(c[2], [0.0, 0.0])


def test_prototypes_are_post_processing_of_the_noisy_sums():
    p = prototypes_from_sums(np.array([1, 2, 3]), np.array([[4.0, 2.0], [1.0, 1.0], [9.0, 9.0]]), np.array([1.6, 0.4, 3.2]))
    assert p.classes.tolist() == [1, 3]  # class 2's noisy count rounds to 0: dropped
    np.testing.assert_allclose(p.vectors * p.counts[:, None], [[4.0, 2.0], [9.0, 9.0]], rtol=1e-6)


def test_plan_refuses_a_noise_that_exceeds_the_budget():
    with pytest.raises(ValueError, match="more than the requested epsilon"):
        make_plan(PrivacyConfig(epsilon=1.0, noise_multiplier=0.5), 10)
    plan = make_plan(PrivacyConfig(epsilon=100.0, noise_multiplier=0.5), 10)
    assert plan.epsilon_bound == pytest.approx(epsilon_spent(0.5, 10, 1e-5))


#: what the DP check accepts for prototype uploads (issue 19): a backbone that never trains on
#: client data, and no replay memory (tests/test_privacy_end_to_end.py checks both refusals)
ACCEPTED = {"memory_per_class": 0, "backbone": "frozen"}


def test_dp_run_reports_epsilon_per_client_and_noise_changes_prototypes(tmp_path):
    over = dict(strategy={"name": "proto_avg", "params": {}}, clients__participation=0.67, continual=ACCEPTED)
    out = run_tiny(tmp_path, "dp", privacy={"epsilon": 6.0, "delta": 1e-5, "clip": 5.0}, **over)
    s = json.loads((out.run_dir / "summary.json").read_text())
    eps = s["epsilon_spent"]
    rounds = 3 * 2  # tasks x rounds per task
    assert s["privacy_epsilon_bound"] <= 6.0 + 1e-6
    releases = eps["releases_per_client"]
    assert len(releases) == 3 and max(releases) <= rounds and sum(releases) > 0
    assert min(releases) < rounds  # participation 0.67: 2 of 3 clients a round
    z = s["privacy_noise_multiplier"]
    expected = [epsilon_spent(z, r, 1e-5) for r in releases]
    np.testing.assert_allclose(eps["per_client"], expected, rtol=1e-5)
    assert s["epsilon_spent_max"] == pytest.approx(max(expected))
    assert s["epsilon_spent_mean"] == pytest.approx(float(np.mean(expected)))
    assert s["epsilon_spent_max"] <= 6.0 + 1e-6
    assert 0.0 <= s["final_avg_accuracy"] <= 1.0
    plain = run_tiny(tmp_path, "plain", **over)
    assert "epsilon_spent" not in plain.summary
    assert not np.array_equal(out.matrix, plain.matrix, equal_nan=True)


def _write(tmp_path, **over):
    return write_tiny(tmp_path, **over)


def test_run_that_would_exceed_the_budget_is_refused_before_it_starts(tmp_path, capsys):
    path = _write(tmp_path, strategy={"name": "proto_avg", "params": {}}, continual=ACCEPTED,
                  privacy={"epsilon": 1.0, "noise_multiplier": 0.3})
    code = main(["run", str(path), "--engine", "inline", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "privacy.noise_multiplier" in err and "more than the requested epsilon 1" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_dp_refuses_weight_sharing_with_the_prototypical_loss(tmp_path, capsys):
    # tiny() shares weights of a model trained with the prototypical loss: DP-SGD cannot bound
    # one sample's influence there (tests/test_dp_sgd.py covers the strategies it can protect)
    path = _write(tmp_path, privacy={"epsilon": 5.0})
    code = main(["run", str(path), "--engine", "inline", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "strategy.params.share_weights" in err and "prototypical loss" in err
    assert not (tmp_path / "run").exists()


def test_validate_reports_an_over_budget_noise(tmp_path, capsys):
    path = _write(tmp_path, strategy={"name": "proto_avg", "params": {}}, continual=ACCEPTED,
                  privacy={"epsilon": 1.0, "noise_multiplier": 0.3})
    assert main(["validate", str(path)]) == 2
    assert "privacy.noise_multiplier" in capsys.readouterr().err
    ok = _write(tmp_path, strategy={"name": "proto_avg", "params": {}}, continual=ACCEPTED, privacy={"epsilon": 1.0})
    assert main(["validate", str(ok)]) == 0
