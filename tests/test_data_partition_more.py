"""The `shards` (McMahan) and `quantity` (size skew) partition schemes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from simulator.data.partition import partition_task, quantity_sizes
from simulator.data.stream import build_stream
from simulator.errors import FieldError, UserError
from simulator.scenario import (
    PARTITION_SCHEMES,
    ClientsConfig,
    DatasetConfig,
    QuantityPartition,
    ShardsPartition,
    TasksConfig,
    validate_scenario,
)


def shards(k: int = 2) -> ShardsPartition:
    return ShardsPartition(scheme="shards", shards_per_client=k)


def quantity(distribution: str = "lognormal", **kw) -> QuantityPartition:
    return QuantityPartition(scheme="quantity", distribution=distribution, **kw)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def shuffled_labels(counts, seed: int = 99) -> np.ndarray:
    """Labels 0..C-1 with the given counts per class, in a random order."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return labels[rng(seed).permutation(len(labels))]


def assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


# --------------------------------------------------------------------------- exact cover
CONFIGS = [
    shards(1), shards(2), shards(5),
    quantity("lognormal", sigma=0.3), quantity("lognormal", sigma=3.0, min_size=0), quantity("lognormal", min_size=7),
    quantity("power_law", exponent=0.5), quantity("power_law", exponent=4.0, min_size=0), quantity("power_law", min_size=5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.model_dump()}")
@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_every_sample_exactly_once_and_seeded(cfg, num_clients):
    labels = shuffled_labels([50, 37, 61, 52])
    parts = partition_task(labels, num_clients, cfg, rng(1), task=0)
    assert_exact_cover(parts, len(labels), num_clients)
    if cfg.scheme == "quantity":
        assert min(len(p) for p in parts) >= cfg.min_size
    again = partition_task(labels, num_clients, cfg, rng(1), task=0)
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)
    other = partition_task(labels, num_clients, cfg, rng(2), task=0)
    if num_clients > 1:
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


# --------------------------------------------------------------------------- shards
def test_shards_aligned_to_classes_give_at_most_k_classes():
    # 4 classes x 60 samples, 6 clients x 2 shards = 12 shards of 20: every shard is one class
    labels = shuffled_labels([60] * 4)
    for seed in range(5):
        parts = partition_task(labels, 6, shards(2), rng(seed), task=0)
        assert_exact_cover(parts, len(labels), 6)
        assert [len(p) for p in parts] == [40] * 6
        for p in parts:
            assert 1 <= len(np.unique(labels[p])) <= 2


def test_shards_boundaries_add_at_most_one_class_each():
    # unequal classes: shard edges do not line up with class edges, so a shard may straddle one
    # class boundary (shards are smaller than every class). Each of the C - 1 boundaries inside
    # the label-sorted order adds at most one class to the client holding that shard.
    counts = [23, 41, 17, 35, 29]
    labels = shuffled_labels(counts)
    n, c = len(labels), len(counts)
    for k in (2, 3, 4):
        assert -(-n // (5 * k)) <= min(counts)  # shards (10, 15, 20 of them) smaller than any class
        for seed in range(5):
            parts = partition_task(labels, 5, shards(k), rng(seed), task=0)
            assert_exact_cover(parts, n, 5)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= k  # equal shards (up to one sample each)
            extra = 0
            for p in parts:
                held = len(np.unique(labels[p]))
                assert held <= 2 * k  # every shard holds at most 2 classes
                extra += max(0, held - k)
            assert extra <= c - 1


def test_shards_are_contiguous_in_label_order():
    # with one shard per client and 2 clients, each client's labels form a contiguous label range
    labels = shuffled_labels([10, 10, 10, 10])
    parts = partition_task(labels, 2, shards(1), rng(0), task=0)
    ranges = sorted((labels[p].min(), labels[p].max()) for p in parts)
    assert ranges == [(0, 1), (2, 3)]


def test_shards_fewer_samples_than_shards():
    labels = shuffled_labels([3, 3, 3])  # 9 samples
    parts = partition_task(labels, 3, shards(3), rng(), task=0)  # exactly 9 shards of 1
    assert [len(p) for p in parts] == [3, 3, 3]
    with pytest.raises(FieldError) as e:
        partition_task(labels, 5, shards(2), rng(), task=6)
    assert e.value.field == "clients.partition.shards_per_client"
    assert "task 6" in e.value.message and "9" in e.value.message and "5 x 2 = 10" in e.value.message


# --------------------------------------------------------------------------- quantity: shape
def test_lognormal_sizes_have_the_requested_log_sigma():
    # 50 clients, 50 000 samples: the smallest client still has ~50 samples, so rounding and the
    # min_size floor barely touch the shape and the log sizes are the drawn N(0, sigma^2) values
    # (plus a constant). The sample std (ddof=1) of 50 normal draws has a standard error of about
    # sigma / sqrt(2 * 49) ~ 0.10 sigma; averaged over 20 seeds ~ 0.023 sigma. Its bias is
    # ~ -sigma / (4 * 49) ~ -0.005 sigma. A tolerance of 0.1 sigma is > 4 standard errors.
    n, k = 50_000, 50
    for sigma in (0.5, 1.0):
        stds = []
        for seed in range(20):
            sizes = quantity_sizes(n, k, "lognormal", sigma, 1.5, 1, rng(seed))
            assert sizes.sum() == n and sizes.min() >= 1
            stds.append(np.log(sizes).std(ddof=1))
        assert abs(np.mean(stds) - sigma) < 0.1 * sigma, (sigma, np.mean(stds))


def test_power_law_sizes_decay_like_rank_to_the_minus_exponent():
    # 20 clients, 100 000 samples: the smallest share (rank 20, exponent 2) is ~ 100000 / 1.6 /
    # 400 ~ 150 samples, so integer rounding moves log(size) by < 0.01 and the log-log slope of
    # the sorted sizes is the exponent up to ~0.01.
    n, k = 100_000, 20
    ranks = np.arange(1, k + 1)
    for exponent in (0.5, 1.5, 2.0):
        for seed in range(3):
            sizes = quantity_sizes(n, k, "power_law", 1.0, exponent, 1, rng(seed))
            assert sizes.sum() == n
            slope, _ = np.polyfit(np.log(ranks), np.log(np.sort(sizes)[::-1]), 1)
            assert slope == pytest.approx(-exponent, abs=0.02)
    # the ranks are dealt in a seeded random order, not client 0 = largest
    orders = {tuple(np.argsort(-quantity_sizes(n, k, "power_law", 1.0, 1.5, 1, rng(s)))) for s in range(4)}
    assert len(orders) == 4


def test_quantity_partition_sizes_match_quantity_sizes():
    labels = shuffled_labels([300] * 10)
    cfg = quantity("power_law", exponent=1.0, min_size=3)
    parts = partition_task(labels, 8, cfg, rng(5), task=0)
    expected = quantity_sizes(len(labels), 8, "power_law", 1.0, 1.0, 3, rng(5))
    assert [len(p) for p in parts] == expected.tolist()


def test_min_size_floor_lifts_only_the_small_clients():
    # exponent 4 over 10 clients: proportional sizes would be ~923, 58, 11, 4, 1, 0, ... of 1000
    sizes = quantity_sizes(1000, 10, "power_law", 1.0, 4.0, 20, rng(0))
    assert sizes.sum() == 1000 and sizes.min() == 20
    top = np.sort(sizes)[::-1]
    assert top[0] > 700 and top[1] > 40  # the large clients keep their proportional shape
    assert list(top[2:]) == [20] * 8
    # exact bound: num_clients x min_size == n gives everyone exactly min_size
    assert quantity_sizes(100, 10, "lognormal", 2.0, 1.5, 10, rng(0)).tolist() == [10] * 10
    # min_size 0 allows empty clients under heavy skew
    sizes = quantity_sizes(100, 30, "power_law", 1.0, 6.0, 0, rng(0))
    assert sizes.sum() == 100 and sizes.min() == 0


# --------------------------------------------------------------------------- quantity: labels iid
def chi2_per_dof(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Sum over clients of Pearson's chi^2 of the client's label counts against the task's
    proportions, divided by its degrees of freedom. For a uniformly random split its expectation
    is <= 1 (exactly 1 for multinomial sampling, a little less without replacement), whatever the
    client sizes; label skew makes it large."""
    c = labels.max() + 1
    p = np.bincount(labels, minlength=c) / len(labels)
    total, dof = 0.0, 0
    for part in parts:
        if len(part) == 0:
            continue
        observed = np.bincount(labels[part], minlength=c)
        expected = p * len(part)
        total += float(((observed - expected) ** 2 / expected).sum())
        dof += c - 1
    return total / dof


def test_quantity_labels_are_iid_within_clients():
    labels = shuffled_labels([100, 300, 200, 400, 250, 150, 350, 50, 120, 80])  # uneven task classes
    p = np.bincount(labels) / len(labels)
    for distribution in ("lognormal", "power_law"):
        stats = []
        for seed in range(5):
            parts = partition_task(labels, 20, quantity(distribution), rng(seed), task=0)
            stats.append(chi2_per_dof(labels, parts))
            largest = max(parts, key=len)
            tv = 0.5 * np.abs(np.bincount(labels[largest], minlength=10) / len(largest) - p).sum()
            assert tv < 0.1
        # 20 clients x 9 dof = 180 dof: the statistic / dof has a std of ~ sqrt(2 / 180) ~ 0.1
        # per seed, ~0.05 over 5 seeds; 1.4 is > 8 of those above the expected <= 1
        assert np.mean(stats) < 1.4, (distribution, stats)
    # the statistic does detect label skew: the shards split gives a huge value
    assert chi2_per_dof(labels, partition_task(labels, 20, shards(2), rng(0), task=0)) > 20


# --------------------------------------------------------------------------- quantity: errors
def test_quantity_impossible_min_size():
    labels = shuffled_labels([10, 10])
    with pytest.raises(FieldError) as e:
        partition_task(labels, 7, quantity(min_size=3), rng(), task=2)
    assert e.value.field == "clients.partition.min_size"
    assert "task 2" in e.value.message and "20" in e.value.message and "7 x 3 = 21" in e.value.message


@pytest.mark.parametrize(
    "partition, field",
    [
        ({"scheme": "shards", "shards_per_client": 0}, "clients.partition.shards_per_client"),
        ({"scheme": "quantity", "sigma": 0}, "clients.partition.sigma"),
        ({"scheme": "quantity", "exponent": -1.0}, "clients.partition.exponent"),
        ({"scheme": "quantity", "sigma": float("inf")}, "clients.partition.sigma"),
        ({"scheme": "quantity", "min_size": -1}, "clients.partition.min_size"),
        ({"scheme": "quantity", "distribution": "zipf"}, "clients.partition.distribution"),
        ({"scheme": "shards", "alpha": 0.5}, "clients.partition.alpha"),
    ],
)
def test_schema_errors_name_the_field(partition, field):
    with pytest.raises(UserError) as e:
        validate_scenario({"clients": {"partition": partition}})
    assert [p.field for p in e.value.problems] == [field]


def test_schema_defaults_and_scheme_list():
    assert PARTITION_SCHEMES[-2:] == ("shards", "quantity")
    s = validate_scenario({"clients": {"partition": {"scheme": "shards"}}})
    assert s.clients.partition.model_dump() == {"scheme": "shards", "shards_per_client": 2}
    q = validate_scenario({"clients": {"partition": {"scheme": "quantity"}}})
    assert q.clients.partition.model_dump() == {
        "scheme": "quantity", "distribution": "lognormal", "sigma": 1.0, "exponent": 1.5, "min_size": 1,
    }
    with pytest.raises(UserError) as e:
        validate_scenario({"clients": {"partition": {"scheme": "sharded"}}})
    assert "'shards', 'quantity'" in e.value.problems[0].message
    for cls in (ShardsPartition, QuantityPartition):
        for name, f in cls.model_fields.items():
            assert name == "scheme" or f.description
    with pytest.raises(ValidationError):
        QuantityPartition(scheme="quantity", sigma=-1)


# --------------------------------------------------------------------------- through the stream
@pytest.mark.parametrize("partition", [{"scheme": "shards", "shards_per_client": 2}, {"scheme": "quantity", "distribution": "power_law"}])
def test_build_stream_with_new_schemes(partition):
    ns = SimpleNamespace(
        seed=3,
        dataset=DatasetConfig(source="synthetic", num_classes=6, dim=4, samples_per_class=40),
        tasks=TasksConfig(classes_per_task=2),
        clients=ClientsConfig(num_clients=4, partition=partition),
    )
    s = build_stream(ns)
    for t, classes in enumerate(s.tasks):
        task_train = np.concatenate(s.train_indices[t])
        np.testing.assert_array_equal(np.sort(task_train), np.flatnonzero(np.isin(s.dataset.y_train, classes)))
    again = build_stream(ns)
    for a, b in zip(s.train_indices, again.train_indices):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
