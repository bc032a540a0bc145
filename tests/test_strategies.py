"""Merge rules against hand-computed values, through real Flower messages."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from helpers import reply as _reply

from simulator.learner.prototypes import PrototypeSet, class_means, merge_class_means
from simulator.records import (
    protos_from_arrays,
    protos_to_arrays,
    record_bytes,
)
from strategies import STRATEGIES, RunInfo
from strategies.fedavg import FedAvg
from strategies.proto_avg import ProtoAvg


def _run(n_clients: int = 3, dim: int = 4) -> RunInfo:
    return RunInfo(seed=0, participation=1.0, num_classes=10, embedding_dim=dim, partitions={i: i + 1 for i in range(n_clients)})




def _client_upload(rng, pid, classes, dim):
    """A client's raw sample features (so the pooled mean can be computed independently)."""
    feats, labels = [], []
    for c in classes:
        n = int(rng.integers(1, 30))
        feats.append(rng.normal(c, 1.0, size=(n, dim)))
        labels += [c] * n
    feats = np.concatenate(feats).astype(np.float32)
    labels = np.array(labels)
    protos = class_means(feats, labels)
    return feats, labels, _reply(pid, protos_to_arrays(protos), [int(c) for c in protos.counts], len(labels))


def test_proto_avg_equals_pooled_mean_across_rounds_and_tasks():
    rng = np.random.default_rng(0)
    dim = 5
    strat = ProtoAvg(ProtoAvg.Params(), _run(3, dim))
    expected: dict[int, np.ndarray] = {}
    # two tasks, two rounds each; clients hold different subsets of the task's classes
    schedule = {0: [[0, 1], [1, 2], [0, 2]], 1: [[3], [3, 4], [4]]}
    server_round = 0
    for task, holdings in schedule.items():
        for _ in range(2):
            server_round += 1
            replies, pooled_f, pooled_y = [], [], []
            for pid, classes in enumerate(holdings):
                f, y, msg = _client_upload(rng, pid, classes, dim)
                replies.append(msg)
                pooled_f.append(f)
                pooled_y.append(y)
            f, y = np.concatenate(pooled_f), np.concatenate(pooled_y)
            for c in np.unique(y):
                expected[int(c)] = f[y == c].astype(np.float64).mean(0)
            arrays, metrics = strat.aggregate_train(server_round, list(reversed(replies)))
            got = protos_from_arrays(arrays)
            assert sorted(got.classes.tolist()) == sorted(expected)  # earlier tasks' classes kept
            for c, v in got.as_dict().items():
                np.testing.assert_allclose(v, expected[c], atol=1e-6)
            assert metrics["clients_ok"] == 3


def test_merge_class_means_weighting_by_hand():
    a = PrototypeSet([0, 1], [[0.0, 0.0], [2.0, 2.0]], [1, 3])
    b = PrototypeSet([0], [[4.0, 8.0]], [3])
    samples = merge_class_means([a, b], "samples")
    np.testing.assert_allclose(samples.as_dict()[0], [3.0, 6.0])  # (1*0 + 3*4) / 4
    np.testing.assert_allclose(samples.as_dict()[1], [2.0, 2.0])
    assert samples.counts.tolist() == [4, 3]
    uniform = merge_class_means([a, b], "uniform")
    np.testing.assert_allclose(uniform.as_dict()[0], [2.0, 4.0])


def test_fedavg_is_sample_weighted_mean_of_weights():
    strat = FedAvg(FedAvg.Params(), _run(2))
    r1 = _reply(0, {"w.layer": Array(np.array([1.0, 2.0], dtype=np.float32))}, [], 1)
    r2 = _reply(1, {"w.layer": Array(np.array([4.0, 8.0], dtype=np.float32))}, [], 3)
    arrays, _ = strat.aggregate_train(1, [r1, r2])
    np.testing.assert_allclose(arrays["w.layer"].numpy(), [3.25, 6.5])  # (1*1 + 3*4) / 4, (2 + 24) / 4


def test_failed_replies_are_dropped_and_all_failed_keeps_state():
    from flwr.app import Error

    strat = ProtoAvg(ProtoAvg.Params(), _run(2, 2))
    rng = np.random.default_rng(1)
    _, _, good = _client_upload(rng, 0, [0], 2)
    request = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=2, message_type="train")
    bad = Message(Error(code=2, reason="boom"), reply_to=request)
    arrays, metrics = strat.aggregate_train(1, [good, bad])
    assert metrics["clients_ok"] == 1 and metrics["clients_failed"] == 1
    before = protos_from_arrays(arrays)
    arrays2, metrics2 = strat.aggregate_train(2, [bad])
    assert arrays2 is None and metrics2["clients_ok"] == 0  # nothing to merge, no division by zero
    np.testing.assert_array_equal(protos_from_arrays(strat.global_arrays()).vectors, before.vectors)


def test_seeded_sampling_is_reproducible_and_respects_participation():
    run = RunInfo(seed=3, participation=0.3, num_classes=10, embedding_dim=2, partitions={i: 100 + i for i in range(10)})
    s1, s2 = ProtoAvg(ProtoAvg.Params(), run), ProtoAvg(ProtoAvg.Params(), run)
    assert s1.sample(5) == s2.sample(5)
    assert len(s1.sample(5)) == 3
    assert len({tuple(s1.sample(r)) for r in range(1, 20)}) > 1  # differs between rounds


def test_record_bytes_counts_payload():
    arr = Array(np.zeros((3, 4), dtype=np.float32))
    assert len(arr.data) >= 48  # the serialised buffer: 48 bytes of values plus the .npy header
    rd = RecordDict(
        {
            "a": ArrayRecord({"x": arr}),
            "m": MetricRecord({"n": 1, "l": [1, 2, 3]}),
            "c": ConfigRecord({"s": "abc"}),
        }
    )
    assert record_bytes(rd) == len(arr.data) + 8 * 4 + 3


def test_registry_has_both_strategies_with_params_schemas():
    assert {"proto_avg", "fedavg"} <= set(STRATEGIES)
    assert ProtoAvg.Params().share_weights is False
    with pytest.raises(Exception):
        ProtoAvg.Params.model_validate({"share_weight": True})


def test_head_methods_upload_weights_and_no_prototypes():
    """FedAvg's merge uses the weights alone: its clients send an empty prototype set (nothing
    a merge would ignore, nothing a DP budget must pay for); proto_avg sends its prototypes."""
    from simulator.learner.backbones import build_model
    from simulator.objective import ClientInfo
    from simulator.records import has_weights

    rng = np.random.default_rng(0)
    feats, labels = rng.normal(size=(12, 4)).astype(np.float32), np.repeat([0, 1, 2], 4)
    local = class_means(feats, labels)
    info = ClientInfo(0, 10, 4, "cpu")
    for cls, protos_sent in ((FedAvg, 0), (ProtoAvg, 3)):
        model = build_model("mlp", (8,), 4, 10, cls.Objective.needs_head(), 0)
        params = cls.Params.model_validate({"share_weights": True} if cls is ProtoAvg else {})
        up = cls.Objective(params, info).upload(model, local)
        assert len(protos_from_arrays(ArrayRecord(up))) == protos_sent
        assert has_weights(ArrayRecord(up))
