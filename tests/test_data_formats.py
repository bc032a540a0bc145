"""CIFAR-10/100 pickles and MNIST / Fashion-MNIST IDX files, read from tiny files written here.

No test touches the network: downloads are pointed at a closed local port or at file:// URLs.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simulator.data import formats
from simulator.data.sources import SOURCES, ArrayDataset, load_dataset
from simulator.errors import FieldError
from simulator.scenario import DatasetConfig

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CLOSED_PORT = "http://127.0.0.1:9/"  # the discard port: nothing listens, connections are refused at once


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """A proxy from the environment must not turn the local URLs below into real requests."""
    for var in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def load(source: str, **params) -> ArrayDataset:
    return load_dataset(DatasetConfig(source=source, **params), seed=0)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def images(labels: np.ndarray, pixels: int, seed: int) -> np.ndarray:
    """uint8 images whose first pixel encodes the label (to check labels stay with their image)."""
    x = np.random.default_rng(seed).integers(0, 256, size=(len(labels), pixels), dtype=np.uint8)
    x[:, 0] = labels
    return x


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- CIFAR writers
def dump(path: Path, obj, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, per_class: int = 2) -> Path:
    """cifar-10-batches-py/ with five tiny data batches (each with every class), a test batch and
    batches.meta; the batches use different pickle protocols (2 goes through _codecs.encode)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, protocol in enumerate((2, 3, 4, 5, 2), start=1):
        labels = np.tile(np.arange(10), per_class)
        dump(
            base / f"data_batch_{i}",
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels.tolist(),
             b"data": images(labels, 3072, seed=i), b"filenames": [b"f.png"] * len(labels)},
            protocol,
        )
    test_labels = np.arange(10)
    dump(base / "test_batch", {b"labels": test_labels.tolist(), b"data": images(test_labels, 3072, seed=9)}, 4)
    dump(base / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}, 2)
    return base


def write_cifar100(root: Path) -> Path:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name, reps, seed in (("train", 2, 1), ("test", 1, 2)):
        fine = np.tile(np.arange(100), reps)
        dump(base / name, {b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                           b"data": images(fine, 3072, seed)}, 4)
    dump(base / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, 2)
    return base


def test_registry_has_the_standard_formats():
    for name in ("cifar10", "cifar100", "mnist", "fashion_mnist"):
        spec = SOURCES[name]
        assert "test_fraction unused" in spec.description
        assert "test_fraction is not used" in spec.params_model.model_fields["root"].description
        assert spec.params_model.model_fields["root"].is_required()
        assert spec.params_model.model_fields["download"].default is False
    assert SOURCES["cifar100"].params_model.model_fields["label_type"].default == "fine"


def test_cifar10_tiny(tmp_path):
    write_cifar10(tmp_path)
    ds = load("cifar10", root=str(tmp_path))
    assert ds.input_shape == (3, 32, 32) and ds.x_train.dtype == np.float32
    assert ds.class_names == CIFAR10_NAMES
    assert len(ds.y_train) == 100 and len(ds.y_test) == 10
    np.testing.assert_array_equal(ds.y_train, np.tile(np.tile(np.arange(10), 2), 5))  # batches 1..5 in order
    np.testing.assert_array_equal(ds.y_test, np.arange(10))
    # scaled to [0, 1], then standardised with the train split's scalar mean/std
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-4
    raw = ds.x_train.astype(np.float64) * ds.std + ds.mean
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    np.testing.assert_allclose(raw[:, 0, 0, 0] * 255, ds.y_train, atol=1e-3)  # pixel 0 = label
    # channel-first layout: row-major [3, 32, 32] from the 3072 bytes (R plane, G plane, B plane)
    batch1 = images(np.tile(np.arange(10), 2), 3072, seed=1)
    np.testing.assert_allclose(raw[:20] * 255, batch1.reshape(-1, 3, 32, 32), atol=1e-3)
    np.testing.assert_allclose((ds.x_test.astype(np.float64) * ds.std + ds.mean)[:, 0, 0, 0] * 255, np.arange(10), atol=1e-3)


def test_cifar100_fine_and_coarse(tmp_path):
    write_cifar100(tmp_path)
    fine = load("cifar100", root=str(tmp_path))
    assert fine.num_classes == 100 and fine.input_shape == (3, 32, 32)
    assert fine.class_names[:2] == ["fine0", "fine1"] and len(fine.y_train) == 200 and len(fine.y_test) == 100
    coarse = load("cifar100", root=str(tmp_path), label_type="coarse")
    assert coarse.num_classes == 20 and coarse.class_names[-1] == "coarse19"
    np.testing.assert_array_equal(coarse.y_train, fine.y_train // 5)
    np.testing.assert_array_equal(coarse.x_train, fine.x_train)
    with pytest.raises(FieldError) as e:
        load("cifar100", root=str(tmp_path), label_type="superclass")
    assert e.value.field == "dataset.label_type"


def test_cifar_pickle_from_numpy_1_module_names(tmp_path):
    # the official files (and NumPy 1) name numpy.core.multiarray._reconstruct, NumPy 2 numpy._core
    base = write_cifar10(tmp_path)
    blob = pickle.dumps({b"labels": list(range(10)), b"data": images(np.arange(10), 3072, 9)}, protocol=2)
    assert b"numpy._core.multiarray" in blob
    (base / "test_batch").write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert load("cifar10", root=str(tmp_path)).y_test.tolist() == list(range(10))


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("kind", ["os.system", "eval", "getattr-chain"])
def test_restricted_unpickler_refuses_code(tmp_path, kind):
    base = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = pickle.dumps({b"data": Evil(marker), b"labels": []}, protocol=2)
    elif kind == "eval":
        payload = pickle.dumps(EvalEvil(), protocol=4)
    else:  # a hand-written pickle: builtins.getattr(builtins.__import__('os'), 'system')
        payload = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR."
    (base / "data_batch_3").write_bytes(payload)
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path))
    assert e.value.field == "dataset.root"
    assert "data_batch_3" in e.value.message and "refused to load global" in e.value.message
    assert not marker.exists()
    # the restricted unpickler on its own
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        formats.RestrictedUnpickler(io.BytesIO(payload)).load()


def test_restricted_unpickler_refuses_other_codecs():
    # protocol 2 encodes bytes as _codecs.encode(text, 'latin1'); no other codec is allowed
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        formats.RestrictedUnpickler(io.BytesIO(payload)).load()


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({b"data": np.zeros((10, 100), np.uint8)}, "uint8 array [N, 3072]"),
        ({b"data": np.zeros((10, 3072), np.float32)}, "uint8 array [N, 3072]"),
        ({b"labels": list(range(9))}, "10 images but 9 labels"),
        ({b"labels": [0] * 9 + [10]}, "label 10 is outside 0..9"),
        ({b"labels": [0] * 10}, "no sample of class(es) 'automobile'"),
    ],
)
def test_cifar_bad_contents(tmp_path, patch, needle):
    base = write_cifar10(tmp_path)
    batch = {b"labels": list(range(10)), b"data": images(np.arange(10), 3072, 9), **patch}
    dump(base / "test_batch", batch, 4)
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path))
    assert e.value.field == "dataset.root" and needle in e.value.message


def test_cifar_garbage_and_wrong_keys(tmp_path):
    base = write_cifar10(tmp_path)
    (base / "batches.meta").write_bytes(b"not a pickle")
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path))
    assert "batches.meta" in e.value.message
    dump(base / "batches.meta", {b"names": []}, 4)
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path))
    assert "'label_names'" in e.value.message
    write_cifar100(tmp_path / "c100")
    dump(tmp_path / "c100" / "cifar-100-python" / "train", {b"data": np.zeros((2, 3072), np.uint8)}, 4)
    with pytest.raises(FieldError) as e:
        load("cifar100", root=str(tmp_path / "c100"))
    assert "not a CIFAR batch" in e.value.message and "'fine_labels'" in e.value.message


def test_cifar_missing_files_name_the_expected_paths(tmp_path):
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path))
    assert e.value.field == "dataset.root"
    msg = e.value.message
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert str(tmp_path / "cifar-10-batches-py" / "batches.meta") in msg
    assert "not found" in msg and "dataset.download: true" in msg and "cifar-10-python.tar.gz" in msg
    base = write_cifar100(tmp_path)
    (base / "meta").unlink()
    with pytest.raises(FieldError) as e:
        load("cifar100", root=str(tmp_path))
    assert str(base / "meta") in e.value.message and str(base / "train") not in e.value.message.split(" not found")[0]
    with pytest.raises(FieldError) as e:
        load("cifar10")
    assert e.value.field == "dataset.root"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path / "afile"))
    assert "not a directory" in e.value.message


# --------------------------------------------------------------------------- IDX writers
def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 2051 if arr.ndim == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, gz: bool, per_class: int = 3, size: int = 28) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, reps, seed in (("train", per_class, 1), ("t10k", 1, 2)):
        y = np.tile(np.arange(10), reps).astype(np.uint8)
        x = images(y, size * size, seed).reshape(-1, size, size)
        arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"] = x, y
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("layout, gz", [("MNIST/raw", True), ("MNIST/raw", False), ("", True), ("", False)])
def test_mnist_layouts(tmp_path, layout, gz):
    arrays = write_idx_set(tmp_path / layout if layout else tmp_path, gz)
    ds = load("mnist", root=str(tmp_path))
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.class_names == [str(i) for i in range(10)]
    assert len(ds.y_train) == 30 and len(ds.y_test) == 10
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    raw = (ds.x_train.astype(np.float64) * ds.std + ds.mean) * 255
    np.testing.assert_allclose(raw[:, 0], arrays["train-images-idx3-ubyte"], atol=1e-3)
    x = arrays["train-images-idx3-ubyte"] / 255.0
    assert ds.mean == pytest.approx(x.mean()) and ds.std == pytest.approx(x.std())


def test_fashion_mnist_names_and_mixed_files(tmp_path):
    write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    # a plain copy directly in root is ignored in favour of torchvision's layout, found first
    write_idx_set(tmp_path, gz=False, per_class=1)
    ds = load("fashion_mnist", root=str(tmp_path))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    assert len(ds.y_train) == 30
    # mnist does not look in FashionMNIST/raw: it finds the copy in root
    assert len(load("mnist", root=str(tmp_path)).y_train) == 10


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: (2049).to_bytes(4, "big") + d[4:], "magic number 2049, expected 2051"),
        (lambda d: d[:-5], "found 23515"),
        (lambda d: d + b"\x00", "more data than the header"),
        (lambda d: d[:6], "truncated IDX header"),
        (lambda d: b"\x00", "too short"),
    ],
)
def test_idx_header_validation(tmp_path, mutate, needle):
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert e.value.field == "dataset.root" and needle in e.value.message and str(path) in e.value.message


def test_idx_consistency_checks(tmp_path):
    write_idx_set(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(9, dtype=np.uint8))))
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert "10 images" in e.value.message and "9 labels" in e.value.message
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([0] * 9 + [11], np.uint8))))
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert "label 11 is outside 0..9" in e.value.message
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert "cannot read" in e.value.message


def test_mnist_missing_files_name_the_expected_paths(tmp_path):
    write_idx_set(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert e.value.field == "dataset.root"
    msg = e.value.message
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte[.gz]") in msg
    assert "train-images-idx3-ubyte[.gz]" not in msg.split(" not found")[0]
    assert "dataset.download: true" in msg


# --------------------------------------------------------------------------- downloads (no network)
def patch_cifar(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(formats.CIFAR, name, replace(formats.CIFAR[name], **changes))


def patch_idx(monkeypatch, name: str, **changes) -> None:
    monkeypatch.setitem(formats.IDX, name, replace(formats.IDX[name], **changes))


def make_tar(path: Path, source_root: Path, folder: str, extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(source_root / folder, arcname=folder)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_download_network_failure_is_a_clear_error(tmp_path, monkeypatch):
    patch_cifar(monkeypatch, "cifar10", url=CLOSED_PORT + "cifar-10-python.tar.gz")
    root = tmp_path / "data"
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(root), download=True)
    assert e.value.field == "dataset.download"
    msg = e.value.message
    assert msg.startswith(f"could not download {CLOSED_PORT}cifar-10-python.tar.gz")
    assert "refused" in msg.lower()
    assert str(root / "cifar-10-batches-py") in msg and "see docs/data.md" in msg and "check the network" in msg
    assert files_under(root) == []  # no partial or temporary file left behind

    patch_idx(monkeypatch, "mnist", mirrors=(CLOSED_PORT, CLOSED_PORT + "second/"))
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(root), download=True)
    assert e.value.field == "dataset.download"
    assert f"{CLOSED_PORT}second/train-images-idx3-ubyte.gz" in e.value.message  # every mirror was tried
    assert str(root / "MNIST" / "raw") in e.value.message
    assert [f for f in files_under(root) if "." in Path(f).name] == []


def test_download_checksum_mismatch_is_rejected_and_removed(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_cifar10(served)
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", served, "cifar-10-batches-py")
    patch_cifar(monkeypatch, "cifar10", url=archive.as_uri(), md5="0" * 32)  # url: file:// on this machine
    root = tmp_path / "data"
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(root), download=True)
    assert e.value.field == "dataset.download"
    assert "checksum mismatch" in e.value.message and md5(archive) in e.value.message and "0" * 32 in e.value.message
    assert files_under(root) == []

    gz_dir = tmp_path / "mirror"
    write_idx_set(gz_dir, gz=True)
    good = {f: md5(gz_dir / f"{f}.gz") for f in formats.IDX_FILES}
    bad = {**good, "t10k-images-idx3-ubyte": "f" * 32}
    patch_idx(monkeypatch, "mnist", mirrors=(gz_dir.as_uri() + "/",), md5=bad)
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(root), download=True)
    assert "checksum mismatch" in e.value.message and "t10k-images-idx3-ubyte.gz" in e.value.message
    assert not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists()
    assert not [f for f in files_under(root) if f.endswith(".part")]


def test_download_and_extract_from_a_local_url(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_cifar10(served)
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", served, "cifar-10-batches-py")
    patch_cifar(monkeypatch, "cifar10", url=archive.as_uri(), md5=md5(archive))
    root = tmp_path / "data"
    ds = load("cifar10", root=str(root), download=True)
    assert ds.class_names == CIFAR10_NAMES and len(ds.y_train) == 100
    assert files_under(root) == ["cifar-10-batches-py"] + sorted(
        f"cifar-10-batches-py/{f}" for f in formats.CIFAR["cifar10"].files()
    )
    # once there, nothing is fetched again (the URL now points nowhere)
    patch_cifar(monkeypatch, "cifar10", url=CLOSED_PORT + "x.tar.gz")
    assert len(load("cifar10", root=str(root), download=True).y_test) == 10

    gz_dir = tmp_path / "mirror"
    write_idx_set(gz_dir, gz=True)
    patch_idx(monkeypatch, "fashion_mnist", mirrors=(CLOSED_PORT, gz_dir.as_uri() + "/"),
              md5={f: md5(gz_dir / f"{f}.gz") for f in formats.IDX_FILES})
    ds = load("fashion_mnist", root=str(root), download=True)
    assert ds.class_names[9] == "Ankle boot" and ds.input_shape == (1, 28, 28)
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(f"{f}.gz" for f in formats.IDX_FILES)


def test_local_archive_in_root_is_extracted_without_download(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_cifar100(served)
    root = tmp_path / "data"
    root.mkdir()
    archive = make_tar(root / "cifar-100-python.tar.gz", served, "cifar-100-python")
    patch_cifar(monkeypatch, "cifar100", md5=md5(archive))
    assert load("cifar100", root=str(root)).num_classes == 100
    assert (root / "cifar-100-python" / "meta").is_file()
    # a damaged local archive is reported, not extracted
    other = tmp_path / "data2"
    other.mkdir()
    (other / "cifar-100-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(FieldError) as e:
        load("cifar100", root=str(other))
    assert "md5" in e.value.message and not (other / "cifar-100-python").exists()


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize(
    "member, needle",
    [
        (tar_info("../evil.txt"), "'..'"),
        (tar_info("cifar-10-batches-py/../../evil.txt"), "'..'"),
        (tar_info("/tmp/evil-protofed-test.txt"), "absolute path"),
        (tar_info("cifar-10-batches-py/link", tarfile.SYMTYPE, link="/etc/passwd"), "not a regular file"),
        (tar_info("cifar-10-batches-py/hard", tarfile.LNKTYPE, link="/etc/passwd"), "not a regular file"),
    ],
)
def test_unsafe_archive_members_are_refused(tmp_path, monkeypatch, member, needle):
    served = tmp_path / "served"
    write_cifar10(served)
    archive = make_tar(tmp_path / "a.tar.gz", served, "cifar-10-batches-py", [member])
    patch_cifar(monkeypatch, "cifar10", url=archive.as_uri(), md5=md5(archive))
    root = tmp_path / "deep" / "data"
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(root), download=True)
    assert e.value.field == "dataset.download" and needle in e.value.message
    assert files_under(root) == []  # nothing half-extracted, no staging folder, no archive
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil-protofed-test.txt").exists()


def test_partial_folder_with_download_asks_to_remove_it(tmp_path, monkeypatch):
    base = write_cifar10(tmp_path)
    (base / "data_batch_4").unlink()
    patch_cifar(monkeypatch, "cifar10", url=CLOSED_PORT + "x.tar.gz")
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(tmp_path), download=True)
    assert e.value.field == "dataset.root" and "data_batch_4" in e.value.message and "remove that folder" in e.value.message


def test_idx_lying_header_is_not_trusted(tmp_path):
    # a header announcing 10^6 huge images over a few bytes of data is reported, not allocated
    write_idx_set(tmp_path, gz=True)
    head = (2051).to_bytes(4, "big") + (10**6).to_bytes(4, "big") + (4096).to_bytes(4, "big") * 2
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head + b"\x00" * 100))
    with pytest.raises(FieldError) as e:
        load("mnist", root=str(tmp_path))
    assert "1000000 x 4096 x 4096" in e.value.message and "found 100" in e.value.message


def test_unsafe_local_archive_is_refused_on_dataset_root(tmp_path, monkeypatch):
    served = tmp_path / "served"
    write_cifar10(served)
    root = tmp_path / "data"
    root.mkdir()
    archive = make_tar(root / "cifar-10-python.tar.gz", served, "cifar-10-batches-py", [tar_info("../evil.txt")])
    patch_cifar(monkeypatch, "cifar10", md5=md5(archive))
    with pytest.raises(FieldError) as e:
        load("cifar10", root=str(root))
    assert e.value.field == "dataset.root" and "'..'" in e.value.message
    assert files_under(root) == ["cifar-10-python.tar.gz"] and not (tmp_path / "evil.txt").exists()
