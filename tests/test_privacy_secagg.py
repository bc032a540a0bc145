"""Secure aggregation of per-class sums and counts through Flower's SecAgg+ (workflow + client
mod) inside our Message-API loop, on the inline engine: same global prototypes as the plain
run, the merge sees only the sum, dropouts are recovered, non-sum merges are refused."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import run_tiny, tiny

from simulator.cli import main
from simulator.learner.prototypes import PrototypeSet
from simulator.privacy.secagg import decode_loss, decode_sum, encode_upload
from strategies.proto_avg import ProtoAvg


def _spy_merges(monkeypatch) -> list[tuple[list[int], list[str], PrototypeSet]]:
    """Record what reaches ProtoAvg.merge (partition ids, array names) and the result."""
    seen: list[tuple[list[int], list[str], PrototypeSet]] = []
    original = ProtoAvg.merge

    def recording(self, server_round, uploads):
        original(self, server_round, uploads)
        names = sorted({k for u in uploads for k in u.arrays.keys()})
        seen.append(([u.partition_id for u in uploads], names, self.global_protos))

    monkeypatch.setattr(ProtoAvg, "merge", recording)
    return seen


def test_encoding_round_trip_is_a_sum():
    a = PrototypeSet(np.array([0, 2]), np.array([[1.0, 2.0], [3.0, -1.0]]), np.array([2, 4]))
    b = PrototypeSet(np.array([2]), np.array([[1.0, 1.0]]), np.array([1]))
    summed = encode_upload(a, 4, 2, 100.0, train_loss=0.5, num_examples=6) + encode_upload(b, 4, 2, 100.0, train_loss=2.0, num_examples=1)
    total = decode_sum(summed, 4, 2, 100.0)
    assert total.classes.tolist() == [0, 2] and total.counts.tolist() == [2, 5]
    loss, n = decode_loss(summed, 4, 2, 100.0)
    assert n == 7 and loss == pytest.approx((0.5 * 6 + 2.0 * 1) / 7)  # the num_examples-weighted mean
    np.testing.assert_allclose(total.vectors, [[1.0, 2.0], [(12.0 + 1.0) / 5, (-4.0 + 1.0) / 5]], rtol=1e-6)
    with pytest.raises(RuntimeError, match="privacy.secure_range"):
        encode_upload(a, 4, 2, 10.0)  # 4 x 3.0 = 12 > 10


def test_secure_aggregation_gives_the_plain_global_prototypes_and_merge_sees_only_the_sum(tmp_path, monkeypatch):
    # client 2 drops out of global round 3 in both runs: SecAgg+ must unmask the survivors' sum
    over = dict(strategy={"name": "proto_avg", "params": {}},
                clients__fault_injection=[{"client": 2, "round": 3}])
    seen = _spy_merges(monkeypatch)
    secure = run_tiny(tmp_path, "secure", privacy={"secure_aggregation": True}, **over)
    secure_merges = list(seen)
    seen.clear()
    plain = run_tiny(tmp_path, "plain", **over)
    plain_merges = list(seen)
    assert len(secure_merges) == len(plain_merges) == 6
    for (pids_s, names_s, g_s), (pids_p, _, g_p) in zip(secure_merges, plain_merges):
        assert pids_s == [-1]  # one upload: the aggregate, never a client's own
        assert names_s == ["proto.classes", "proto.vectors"]
        assert len(pids_p) >= 2
        assert g_s.classes.tolist() == g_p.classes.tolist()
        np.testing.assert_array_equal(g_s.counts, g_p.counts)
        np.testing.assert_allclose(g_s.vectors, g_p.vectors, atol=1e-4)
    assert [p for p, _, _ in plain_merges][2] == [0, 1]  # the dropout round merged the survivors
    np.testing.assert_array_equal(secure.matrix, plain.matrix)
    failures = pd.read_csv(secure.run_dir / "failures.csv")
    assert failures[["global_round", "client", "kind"]].values.tolist() == [[3, 2, "injected"]]
    s, p = secure.summary, plain.summary
    # the same global state down; up, the dense masked vectors; keys and shares apart (test_definitions.py)
    assert s["bytes_down"] == p["bytes_down"] and s["bytes_up"] > p["bytes_up"] and s["secagg_bytes_up"] > 0
    m = pd.read_csv(secure.run_dir / "metrics.csv").drop_duplicates("global_round")
    assert m["clients_trained"].tolist() == [3, 3, 2, 3, 3, 3]
    assert (m["client_seconds"] > 0).all()  # the survivors' compute time travels in clear


def test_secure_aggregation_with_dp_counts_each_clients_releases(tmp_path):
    out = run_tiny(tmp_path, "both", strategy={"name": "proto_avg", "params": {}},
                   continual={"memory_per_class": 0, "backbone": "frozen"},  # what the DP check accepts
                   privacy={"secure_aggregation": True, "noise_multiplier": 2.0, "clip": 5.0})
    m = pd.read_csv(out.run_dir / "metrics.csv")
    assert m["train_loss"].isna().all()  # withheld under DP, and not rebuilt from the secure sum
    eps = out.summary["epsilon_spent"]
    assert eps["releases_per_client"] == [6, 6, 6]
    assert out.summary["epsilon_spent_max"] > 0


def _refused(tmp_path, capsys, strategy) -> str:
    path = tmp_path / f"{strategy['name']}.yaml"
    path.write_text(yaml.safe_dump(tiny(strategy=strategy, privacy={"secure_aggregation": True})))
    code = main(["run", str(path), "--engine", "inline", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "privacy.secure_aggregation" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    return err


@pytest.mark.parametrize("name,why", [("fedtgp", "trains its global prototypes"), ("fpl", "clusters"),
                                      ("fedsa", "per-client margins")])
def test_non_sum_merges_refuse_secure_aggregation(tmp_path, capsys, name, why):
    assert why in _refused(tmp_path, capsys, {"name": name, "params": {}})


def test_weight_sharing_refuses_secure_aggregation(tmp_path, capsys):
    assert "weights" in _refused(tmp_path, capsys, {"name": "proto_avg", "params": {"share_weights": True}})


def test_secure_aggregation_runs_on_flowers_ray_engine_like_inline(tmp_path):
    # Flower's own simulation runtime (serialised messages, one actor per call): the SecAgg+
    # client state lives in context.state between the four stages of a round
    over = dict(strategy={"name": "proto_avg", "params": {}}, privacy={"secure_aggregation": True},
                training__rounds_per_task=1)
    ray_out = run_tiny(tmp_path, "ray", "ray", **over)
    inline_out = run_tiny(tmp_path, "inline", "inline", **over)
    assert pd.read_csv(ray_out.run_dir / "failures.csv").empty
    np.testing.assert_array_equal(ray_out.matrix, inline_out.matrix)
    assert ray_out.summary["bytes_up"] == inline_out.summary["bytes_up"]
