"""Dataset sources: shapes, dtypes, standardisation, seeded stratified splits and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulator.data.sources import SOURCES, ArrayDataset, load_dataset, stratified_split
from simulator.errors import FieldError
from simulator.scenario import DatasetConfig


def load(source: str, seed: int = 0, test_fraction: float = 0.2, **params) -> ArrayDataset:
    return load_dataset(DatasetConfig(source=source, test_fraction=test_fraction, **params), seed)


def check_common(ds: ArrayDataset, num_classes: int, input_shape: tuple[int, ...]) -> None:
    assert ds.num_classes == num_classes
    assert ds.input_shape == input_shape
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape == (len(ds.y_train), *input_shape)
    assert ds.x_test.shape == (len(ds.y_test), *input_shape)
    # every class in train and in test, labels exactly 0..C-1
    assert set(np.unique(ds.y_train).tolist()) == set(range(num_classes))
    assert set(np.unique(ds.y_test).tolist()) == set(range(num_classes))
    # scalar standardisation computed on the train split
    assert abs(float(ds.x_train.mean())) < 1e-4
    assert abs(float(ds.x_train.std()) - 1.0) < 1e-4
    assert np.isfinite(ds.x_test).all()


def test_registry_entries_describe_themselves():
    assert set(SOURCES) >= {"mnist1d", "digits", "synthetic", "npz", "folder"}
    for name, spec in SOURCES.items():
        assert spec.name == name
        assert spec.description and "\n" not in spec.description
        assert spec.params_model.model_config.get("extra") == "forbid"


# --------------------------------------------------------------------------- mnist1d
def test_mnist1d_shapes_and_split_sizes():
    ds = load("mnist1d", num_samples=400, test_fraction=0.25)
    check_common(ds, 10, (1, 40))
    assert len(ds.y_train) == 300 and len(ds.y_test) == 100
    assert ds.class_names == [str(i) for i in range(10)]


def test_mnist1d_depends_on_data_seed_and_leaves_global_rng_alone():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    a = load("mnist1d", num_samples=200, data_seed=1)
    assert np.random.rand() == expected_next  # make_dataset's np.random.seed was undone
    b = load("mnist1d", num_samples=200, data_seed=1)
    c = load("mnist1d", num_samples=200, data_seed=2)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_params_are_validated():
    with pytest.raises(FieldError) as e:
        load("mnist1d", num_samples=10)
    assert e.value.field == "dataset.num_samples"
    with pytest.raises(FieldError) as e:
        load("mnist1d", num_sampels=1000)
    assert e.value.field == "dataset.num_sampels"


# --------------------------------------------------------------------------- digits
def test_digits_shapes_stratified_and_seeded():
    ds = load("digits", test_fraction=0.2)
    check_common(ds, 10, (1, 8, 8))
    assert len(ds.y_train) + len(ds.y_test) == 1797
    # stratified: each class's test share is round(n * 0.2)
    full = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.maximum(1, np.round(full * 0.2)).astype(int))
    again = load("digits", test_fraction=0.2)
    other = load("digits", seed=1, test_fraction=0.2)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    assert not np.array_equal(ds.x_test, other.x_test)


def test_digits_takes_no_params():
    with pytest.raises(FieldError) as e:
        load("digits", path="x")
    assert e.value.field == "dataset.path"


# --------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_and_determinism():
    ds = load("synthetic", num_classes=5, dim=7, samples_per_class=20, test_fraction=0.25)
    check_common(ds, 5, (7,))
    np.testing.assert_array_equal(np.bincount(ds.y_test), [5] * 5)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [15] * 5)
    same = load("synthetic", num_classes=5, dim=7, samples_per_class=20, test_fraction=0.25)
    np.testing.assert_array_equal(ds.x_train, same.x_train)
    other_data = load("synthetic", num_classes=5, dim=7, samples_per_class=20, test_fraction=0.25, data_seed=1)
    assert not np.allclose(ds.x_train, other_data.x_train)


def test_synthetic_class_sep_controls_separability():
    def nearest_mean_accuracy(sep: float) -> float:
        ds = load("synthetic", num_classes=10, dim=16, samples_per_class=100, class_sep=sep)
        means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
        pred = np.argmin(((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
        return float((pred == ds.y_test).mean())

    assert nearest_mean_accuracy(20.0) > 0.95
    assert nearest_mean_accuracy(0.1) < 0.4


def test_synthetic_many_classes_is_fast():
    import time

    t0 = time.perf_counter()
    ds = load("synthetic", num_classes=1000, dim=8, samples_per_class=4)
    assert time.perf_counter() - t0 < 2.0
    check_common(ds, 1000, (8,))
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1] * 1000)


# --------------------------------------------------------------------------- stratified split
def test_stratified_split_rule_and_coverage():
    y = np.repeat(np.arange(4), [2, 3, 10, 41])
    train, test = stratified_split(y, 0.5, seed=3)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(len(y)))
    # n_test = max(1, round(n * 0.5)) capped at n - 1: 2 -> 1, 3 -> 2, 10 -> 5, 41 -> 20 (round half to even)
    np.testing.assert_array_equal(np.bincount(y[test], minlength=4), [1, 2, 5, 20])
    train_hi, test_hi = stratified_split(y, 0.99, seed=3)
    np.testing.assert_array_equal(np.bincount(y[train_hi], minlength=4), [1, 1, 1, 1])
    _, test_lo = stratified_split(y, 0.001, seed=3)
    np.testing.assert_array_equal(np.bincount(y[test_lo], minlength=4), [1, 1, 1, 1])
    # seeded
    np.testing.assert_array_equal(stratified_split(y, 0.5, seed=3)[1], test)
    assert not np.array_equal(stratified_split(y, 0.5, seed=4)[1], test)


def test_stratified_split_rejects_singleton_class():
    with pytest.raises(FieldError) as e:
        stratified_split(np.array([0, 0, 1]), 0.5, seed=0, class_names=["cat", "dog"], field="dataset.path")
    assert e.value.field == "dataset.path"
    assert "'dog'" in e.value.message and "test_fraction" in e.value.message


# --------------------------------------------------------------------------- npz
def write_npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_npz_with_split_remaps_labels(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([-3, 7, 100], 10)
    x = rng.normal(size=(30, 2, 3)) * 5 + 2
    ds = load("npz", path=write_npz(tmp_path / "d.npz", x=x, y=y), test_fraction=0.2)
    check_common(ds, 3, (2, 3))
    assert ds.class_names == ["-3", "7", "100"]
    np.testing.assert_array_equal(np.bincount(ds.y_test), [2, 2, 2])
    # each remapped label still points at the right original sample
    mean, std = ds.mean, ds.std
    originals = {tuple(np.round(r, 5).ravel()): lab for r, lab in zip(x, y)}
    for row, lab in zip(ds.x_train, ds.y_train):
        back = tuple(np.round(row.astype(np.float64) * std + mean, 5).ravel())
        assert int(ds.class_names[lab]) == originals[back]


def test_npz_with_given_test_split(tmp_path):
    x = np.arange(24, dtype=np.float64).reshape(12, 2)
    y = np.array([5, 9] * 6)
    x_test = np.full((4, 2), 3.0)
    y_test = np.array([9, 5, 5, 9])
    ds = load("npz", path=write_npz(tmp_path / "d.npz", x=x, y=y, x_test=x_test, y_test=y_test))
    assert ds.class_names == ["5", "9"]
    np.testing.assert_array_equal(ds.y_test, [1, 0, 0, 1])
    assert len(ds.y_train) == 12  # nothing moved from train to test
    assert abs(ds.mean - x.mean()) < 1e-9 and abs(ds.std - x.std()) < 1e-9  # train statistics only
    np.testing.assert_allclose(ds.x_test, (3.0 - x.mean()) / x.std(), rtol=1e-6)


def test_npz_relative_path_from_cwd(tmp_path, monkeypatch):
    write_npz(tmp_path / "rel.npz", x=np.zeros((6, 1)) + np.arange(6)[:, None], y=np.array([0, 1] * 3))
    monkeypatch.chdir(tmp_path)
    assert load("npz", path="rel.npz", test_fraction=0.3).num_classes == 2


def test_npz_integral_float_labels_accepted(tmp_path):
    ds = load("npz", path=write_npz(tmp_path / "f.npz", x=np.random.rand(8, 3), y=np.array([1.0, 2.0] * 4)))
    assert ds.class_names == ["1", "2"]


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"y": np.array([0, 1] * 4)}, "no array 'x'"),
        ({"x": np.zeros((8, 2))}, "no array 'y'"),
        ({"x": np.zeros((8, 2)), "y": np.array([0, 1] * 3)}, "8 samples but y has 6"),
        ({"x": np.zeros((8, 2)), "y": np.array([0, 1] * 4), "x_test": np.zeros((2, 2))}, "no 'y_test'"),
        ({"x": np.zeros((8, 2)), "y": np.array([0, 1] * 4), "y_test": np.array([0, 1])}, "no 'x_test'"),
        ({"x": np.zeros((8, 2)), "y": np.array([0.5, 1] * 4)}, "integer class labels"),
        ({"x": np.zeros((8, 2)), "y": np.array(["a", "b"] * 4)}, "integer class labels"),
        ({"x": np.zeros((8, 2)), "y": np.zeros(8, dtype=int)}, "at least 2 classes"),
        (
            {"x": np.zeros((8, 2)), "y": np.array([0, 1] * 4), "x_test": np.zeros((2, 3)), "y_test": np.array([0, 1])},
            "shape (3,) but x samples have shape (2,)",
        ),
        (
            {"x": np.zeros((8, 2)), "y": np.array([0, 1] * 4), "x_test": np.zeros((2, 2)), "y_test": np.array([0, 4])},
            "never occur in y",
        ),
        (
            {"x": np.zeros((8, 2)), "y": np.array([0, 1] * 4), "x_test": np.zeros((2, 2)), "y_test": np.array([1, 1])},
            "no sample of label(s) [0]",
        ),
        ({"x": np.array([[0.0], [np.nan]] * 4), "y": np.array([0, 1] * 4)}, "NaN"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 0, 1])}, "'1' has only 1 sample"),
    ],
)
def test_npz_errors(tmp_path, arrays, needle):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FieldError) as e:
        load("npz", path=path)
    assert e.value.field == "dataset.path"
    assert needle in e.value.message


def test_npz_missing_and_invalid_files(tmp_path):
    with pytest.raises(FieldError) as e:
        load("npz", path=str(tmp_path / "nope.npz"))
    assert e.value.field == "dataset.path" and "not found" in e.value.message
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip file at all")
    with pytest.raises(FieldError) as e:
        load("npz", path=str(garbage))
    assert e.value.field == "dataset.path" and "not a valid .npz" in e.value.message
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(FieldError) as e:
        load("npz", path=str(single))
    assert "not a valid .npz" in e.value.message
    with pytest.raises(FieldError) as e:
        load("npz")
    assert e.value.field == "dataset.path"


# --------------------------------------------------------------------------- folder
def make_image_folder(root: Path, per_class: dict[str, int], size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for ci, (name, n) in enumerate(per_class.items()):
        d = root / name
        d.mkdir(parents=True)
        for i in range(n):
            if i % 2:  # RGB png
                arr = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(arr, "RGB").save(d / f"img{i}.png")
            else:  # grayscale, upper-case extension, jpg/bmp mix
                arr = np.full((size, size), 40 * ci, dtype=np.uint8)
                ext = [".PNG", ".bmp", ".jpg"][(i // 2) % 3]
                Image.fromarray(arr, "L").save(d / f"img{i}{ext}")
        (d / "notes.txt").write_text("not an image")
    return root


def test_folder_grayscale_and_rgb(tmp_path):
    root = make_image_folder(tmp_path / "imgs", {"b_cat": 5, "a_dog": 4, "c_eel": 6})
    (root / "stray.png").write_bytes(b"")  # files at the top level are not classes
    g = load("folder", path=str(root), image_size=6, test_fraction=0.25)
    check_common(g, 3, (1, 6, 6))
    assert g.class_names == ["a_dog", "b_cat", "c_eel"]
    np.testing.assert_array_equal(np.bincount(np.concatenate([g.y_train, g.y_test])), [4, 5, 6])
    np.testing.assert_array_equal(np.bincount(g.y_test), [1, 1, 2])  # round(4*.25)=1, round(1.25)=1, round(1.5)=2
    c = load("folder", path=str(root), image_size=9, grayscale=False, test_fraction=0.25)
    check_common(c, 3, (3, 9, 9))
    # raw pixels were scaled to [0, 1] before standardisation
    assert 0.0 <= c.mean <= 1.0 and 0.0 < c.std <= 1.0


def test_folder_pixel_values(tmp_path):
    root = tmp_path / "imgs"
    for name, value in (("black", 0), ("white", 255)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((5, 5), value, dtype=np.uint8)).save(root / name / f"{i}.png")
    ds = load("folder", path=str(root), image_size=3, test_fraction=0.5)
    assert ds.mean == pytest.approx(0.5) and ds.std == pytest.approx(0.5)
    np.testing.assert_allclose(ds.x_train[ds.y_train == 0], -1.0)
    np.testing.assert_allclose(ds.x_test[ds.y_test == 1], 1.0)


def folder_error(path: Path, **kw) -> FieldError:
    with pytest.raises(FieldError) as e:
        load("folder", path=str(path), **kw)
    return e.value


def test_folder_errors(tmp_path):
    err = folder_error(tmp_path / "missing")
    assert err.field == "dataset.path" and "not found" in err.message

    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    err = folder_error(a_file)
    assert err.field == "dataset.path" and "not a directory" in err.message

    empty = tmp_path / "empty"
    empty.mkdir()
    err = folder_error(empty)
    assert err.field == "dataset.path" and "no class sub-folders" in err.message

    root = make_image_folder(tmp_path / "r1", {"ant": 3, "bee": 3})
    (root / "cow").mkdir()
    (root / "cow" / "readme.txt").write_text("x")
    err = folder_error(root)
    assert err.field == "dataset.path" and "cow" in err.message and "no images" in err.message

    root = make_image_folder(tmp_path / "r2", {"ant": 3, "bee": 3})
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    err = folder_error(root)
    assert err.field == "dataset.path" and "broken.png" in err.message

    root = make_image_folder(tmp_path / "r3", {"ant": 3, "bee": 1})
    err = folder_error(root)
    assert err.field == "dataset.path" and "'bee'" in err.message and "dataset.test_fraction" in err.message


def test_folder_params_validated(tmp_path):
    err = folder_error(tmp_path, image_size=0)
    assert err.field == "dataset.image_size"
