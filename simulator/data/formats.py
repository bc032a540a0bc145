"""Standard dataset files read without torchvision: CIFAR-10/100 pickles and MNIST-style IDX files.

Readers return raw ``uint8`` pixels and int64 labels; :mod:`simulator.data.sources` scales and
standardises them. With ``download: true`` missing files are fetched from their usual sources
(``urllib``, a timeout, a temporary file, an MD5 check, then an atomic move or a checked
extraction). Nothing here imports torch, torchvision, Flower or Ray.

Security: the CIFAR files are Python pickles, and unpickling can run arbitrary code. They are
read with :class:`RestrictedUnpickler`, whose ``find_class`` hands out only what NumPy array
reconstruction needs (a fixed table of objects, nothing is imported by name); any other global,
such as ``os.system``, makes the load fail with a :class:`FieldError`. Tar members are checked
before extraction: no absolute paths, no ``..``, no links or device files.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import http.client
import io
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import FieldError

DOWNLOAD_TIMEOUT = 60.0  # seconds without progress before a download is abandoned
CHUNK = 1 << 20


# --------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class CifarArchive:
    url: str
    md5: str
    folder: str  # top-level folder inside the archive and under root
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: dict[str, bytes]  # label_type -> key in the data pickles
    names_key: dict[str, bytes]  # label_type -> key in the meta pickle

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test, self.meta)


CIFAR: dict[str, CifarArchive] = {
    "cifar10": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        label_key={"fine": b"labels"},
        names_key={"fine": b"label_names"},
    ),
    "cifar100": CifarArchive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        label_key={"fine": b"fine_labels", "coarse": b"coarse_labels"},
        names_key={"fine": b"fine_label_names", "coarse": b"coarse_label_names"},
    ),
}


@dataclass(frozen=True)
class IdxSet:
    mirrors: tuple[str, ...]  # base URLs, tried in order; file names + ".gz" are appended
    md5: dict[str, str]  # file name (without .gz) -> md5 of the .gz file
    subdir: str  # torchvision's layout under root, where downloads go
    class_names: tuple[str, ...]
    text_names: tuple[str, ...] | None = None  # the names in words when class_names are not (digits)


IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (IDX_TRAIN_IMAGES, IDX_TRAIN_LABELS, IDX_TEST_IMAGES, IDX_TEST_LABELS)

IDX: dict[str, IdxSet] = {
    "mnist": IdxSet(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        md5={
            IDX_TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            IDX_TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
            IDX_TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
            IDX_TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
        },
        subdir="MNIST/raw",
        class_names=tuple(str(i) for i in range(10)),
        text_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    ),
    "fashion_mnist": IdxSet(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            IDX_TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            IDX_TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
            IDX_TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
            IDX_TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
        },
        subdir="FashionMNIST/raw",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}


@dataclass
class RawImages:
    """Raw uint8 images ``[N, C, H, W]`` and int64 labels, train and test, plus class names."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    text_names: list[str] | None = None  # each class's name in words (None: none known)


# --------------------------------------------------------------------------- restricted unpickling
def _numpy_attr(*candidates: str) -> Any:
    """The first of ``module:name`` that exists (NumPy 2 moved ``numpy.core`` to ``numpy._core``)."""
    import importlib

    for cand in candidates:
        mod, name = cand.split(":")
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What protocol-2 pickles written by Python 3 use for ``bytes``; any other codec is refused."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
    scalar = _numpy_attr("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
    frombuffer = _numpy_attr("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    table: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = reconstruct
        table[(mod, "scalar")] = scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        table[(mod, "_frombuffer")] = frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    table[("_codecs", "encode")] = _latin1_encode
    for mod in ("builtins", "__builtin__"):
        for name, obj in (("list", list), ("dict", dict), ("tuple", tuple), ("set", set), ("frozenset", frozenset),
                          ("bytearray", bytearray), ("bytes", bytes), ("str", str), ("int", int), ("float", float),
                          ("complex", complex), ("bool", bool)):
            table[(mod, name)] = obj
    return {k: v for k, v in table.items() if v is not None}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only a fixed table of globals (NumPy arrays, plain builtins).

    ``find_class`` never imports: it looks ``(module, name)`` up in the table, so a pickle that
    reduces to ``os.system``, ``subprocess.Popen``, ``builtins.eval`` ... raises
    :class:`pickle.UnpicklingError` before anything runs.
    """

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load global {module}.{name}: only NumPy arrays and plain Python data are allowed"
            ) from None


def restricted_load(path: Path, field: str = "dataset.root") -> Any:
    """Unpickle ``path`` (``encoding="bytes"``, as the CIFAR files need) with the restricted unpickler."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise FieldError(field, f"{path} was not loaded: {exc} (a pickle can run code; this one is not a plain data file)") from None
    except Exception as exc:  # noqa: BLE001 - whatever else goes wrong, this is not a readable data pickle
        raise FieldError(field, f"{path} is not a readable CIFAR pickle: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- download helpers
def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _say(message: str) -> None:
    print(f"protofed: {message}", file=sys.stderr, flush=True)


def fetch(url: str, dest: Path, md5: str, hint: str) -> None:
    """Download ``url`` to ``dest``: into a temporary file beside it, MD5-checked, then moved.

    On a network failure or a checksum mismatch nothing is left at ``dest`` (nor a temporary
    file) and a :class:`FieldError` on ``dataset.download`` says what happened and ``hint``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        _say(f"downloading {url} into {dest.parent}")
        h = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    h.update(block)
                    out.write(block)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError) or not isinstance(exc, urllib.error.URLError):
                reason: Any = exc
            else:
                reason = exc.reason
            raise FieldError("dataset.download", f"could not download {url}: {reason}; {hint}") from None
        got = h.hexdigest()
        if got != md5:
            raise FieldError(
                "dataset.download",
                f"checksum mismatch for {url}: expected md5 {md5}, got {got} (a corrupted or changed download; "
                f"it was deleted); try again, or {hint}",
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_member(member: tarfile.TarInfo, field: str) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or (parts and ":" in parts[0]):
        raise FieldError(field, f"refused to extract {name!r}: absolute path in the archive")
    if ".." in parts or ".." in name.replace("\\", "/").split("/"):
        raise FieldError(field, f"refused to extract {name!r}: '..' in the path")
    if not (member.isfile() or member.isdir()):
        raise FieldError(field, f"refused to extract {name!r}: not a regular file or folder (links, devices are not allowed)")


def safe_extract(archive: Path, root: Path, folder: str, field: str = "dataset.download") -> None:
    """Extract ``folder`` from a tar archive into ``root``, refusing unsafe members.

    Everything is extracted into a temporary folder under ``root`` first and ``folder`` is moved
    into place at the end, so an interrupted or refused extraction leaves nothing half-written.
    """
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m, field)
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **kwargs)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise FieldError(field, f"cannot extract {archive}: {exc}") from None
        src = staging / folder
        if not src.is_dir():
            raise FieldError("dataset.root", f"{archive} has no folder {folder!r}; is it the right archive?")
        target = root / folder
        try:
            os.replace(src, target)
        except OSError:
            if not target.is_dir():  # another process may have put it there first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise FieldError("dataset.root", f"{root} is not a directory")


# --------------------------------------------------------------------------- CIFAR
def cifar_paths(root: Path, name: str) -> list[Path]:
    spec = CIFAR[name]
    return [root / spec.folder / f for f in spec.files()]


def _cifar_ensure(root: Path, name: str, download: bool) -> None:
    spec = CIFAR[name]
    paths = cifar_paths(root, name)
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    local_archive = root / spec.archive_name
    base = root / spec.folder
    where = (
        f"{base}/ ({', '.join(spec.files())}): extract the 'python version' archive {spec.url} into {root}, "
        f"or put the archive itself at {local_archive}"
    )
    if (root / spec.folder).exists() and not (root / spec.folder).is_dir():
        raise FieldError("dataset.root", f"{root / spec.folder} is not a directory")
    if local_archive.is_file() and not (root / spec.folder).exists():
        got = _md5(local_archive)
        if got != spec.md5:
            raise FieldError("dataset.root", f"{local_archive} has md5 {got}, expected {spec.md5}: not the official archive or damaged; delete it")
        _say(f"extracting {local_archive}")
        safe_extract(local_archive, root, spec.folder, "dataset.root")
    elif download:
        if (root / spec.folder).exists():
            raise FieldError(
                "dataset.root",
                f"{root / spec.folder} exists but lacks {', '.join(p.name for p in missing)}; "
                f"remove that folder so that it can be downloaded again",
            )
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.archive_name}.", suffix=".part", dir=root)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            fetch(spec.url, tmp, spec.md5, f"put the files at {where} (see docs/data.md) or check the network")
            _say(f"extracting {spec.archive_name}")
            safe_extract(tmp, root, spec.folder)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        raise FieldError(
            "dataset.root",
            f"{_listing(missing)} not found; set dataset.download: true to fetch them, or place the files there "
            f"(extract the 'python version' archive {spec.url} into {root}, or put the archive itself at {local_archive})",
        )
    still = [p for p in paths if not p.is_file()]
    if still:
        raise FieldError("dataset.root", f"{_listing(still)} not found after extraction; expected {where}")


def _listing(paths: list[Path], limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def _cifar_part(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = restricted_load(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in d) if isinstance(d, dict) else []
        raise FieldError(
            "dataset.root",
            f"{path} is not a CIFAR batch: expected a dict with keys 'data' and {label_key.decode()!r}"
            + (f" (found {', '.join(keys)})" if keys else f" (found a {type(d).__name__})"),
        )
    data = d[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise FieldError("dataset.root", f"{path}: 'data' must be a uint8 array [N, 3072], got {dtype} {shape}")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise FieldError("dataset.root", f"{path}: {label_key.decode()!r} must be a list of integer labels") from None
    if len(labels) != len(data):
        raise FieldError("dataset.root", f"{path}: {len(data)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise FieldError("dataset.root", f"{path}: label {int(bad[0])} is outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(root: str | Path, name: str, download: bool, label_type: str = "fine") -> RawImages:
    """CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine or coarse labels)."""
    spec = CIFAR[name]
    root = Path(root).expanduser().absolute()
    _check_root(root)
    try:
        _cifar_ensure(root, name, download)
    except OSError as exc:
        raise FieldError("dataset.root", f"cannot prepare the files under {root}: {exc}") from None
    base = root / spec.folder
    meta = restricted_load(base / spec.meta)
    names_key = spec.names_key[label_type]
    if not isinstance(meta, dict) or names_key not in meta or not isinstance(meta[names_key], (list, tuple)):
        raise FieldError("dataset.root", f"{base / spec.meta} has no list {names_key.decode()!r} of class names")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    if len(names) < 2:
        raise FieldError("dataset.root", f"{base / spec.meta} lists {len(names)} class name(s); at least 2 are needed")
    key = spec.label_key[label_type]
    parts = [_cifar_part(base / f, key, len(names)) for f in spec.train]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _cifar_part(base / spec.test, key, len(names))
    _all_classes_present(y_train, y_test, names, str(base))
    return RawImages(x_train, y_train, x_test, y_test, names, list(names))  # the meta file's names are words


def _all_classes_present(y_train: np.ndarray, y_test: np.ndarray, names: list[str], where: str) -> None:
    for split, y in (("training", y_train), ("test", y_test)):
        absent = np.flatnonzero(np.bincount(y, minlength=len(names)) == 0)
        if len(absent):
            listed = ", ".join(repr(names[i]) for i in absent[:5]) + (" ..." if len(absent) > 5 else "")
            raise FieldError(
                "dataset.root", f"the {split} files in {where} have no sample of class(es) {listed}; are they complete?"
            )


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)
IDX_MAGIC = {2049: 1, 2051: 3}  # unsigned byte data with 1 (labels) or 3 (images) dimensions


def idx_candidates(root: Path, name: str) -> list[Path]:
    """Where an IDX file is looked for, in order: torchvision's ``<root>/<Set>/raw/`` then ``<root>``."""
    spec = IDX[name]
    return [root / spec.subdir, root]


def _find_idx(root: Path, name: str, fname: str) -> Path | None:
    for folder in idx_candidates(root, name):
        for cand in (folder / fname, folder / f"{fname}.gz"):
            if cand.is_file():
                return cand
    return None


def _open_maybe_gz(path: Path) -> io.BufferedIOBase:
    fh = open(path, "rb")
    head = fh.read(2)
    fh.seek(0)
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh  # type: ignore[return-value]


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """An IDX file (plain or gzipped) as a uint8 array; the header's sizes are checked against the data."""
    ndim = IDX_MAGIC[expect_magic]
    try:
        with _open_maybe_gz(path) as fh:
            head = fh.read(4 + 4 * ndim)
            if len(head) < 4:
                raise FieldError("dataset.root", f"{path} is too short to be an IDX file")
            magic = int.from_bytes(head[:4], "big")
            if magic != expect_magic:
                what = "image" if expect_magic == 2051 else "label"
                raise FieldError(
                    "dataset.root", f"{path} is not an IDX {what} file: magic number {magic}, expected {expect_magic}"
                )
            if len(head) < 4 + 4 * ndim:
                raise FieldError("dataset.root", f"{path}: truncated IDX header")
            dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
            count = int(np.prod(dims, dtype=np.int64))
            buf = bytearray()
            while len(buf) < count:  # in chunks: a lying header must not make us allocate its size
                block = fh.read(min(CHUNK, count - len(buf)))
                if not block:
                    break
                buf += block
            data = buf
            if len(data) != count:
                raise FieldError(
                    "dataset.root", f"{path}: the header announces {' x '.join(map(str, dims))} = {count} bytes, found {len(data)}"
                )
            if fh.read(1):
                raise FieldError("dataset.root", f"{path}: more data than the header's {' x '.join(map(str, dims))} announces")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FieldError("dataset.root", f"cannot read {path}: {exc}") from None
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _idx_ensure(root: Path, name: str, download: bool) -> dict[str, Path]:
    spec = IDX[name]
    found = {f: _find_idx(root, name, f) for f in IDX_FILES}
    missing = [f for f, p in found.items() if p is None]
    if not missing:
        return found  # type: ignore[return-value]
    target = root / spec.subdir
    where = f"{target}/ or {root}/ ({', '.join(IDX_FILES)}, plain or .gz, as served at {spec.mirrors[0]})"
    if not download:
        expected = [target / f"{f}[.gz]" for f in missing]
        raise FieldError(
            "dataset.root",
            f"{_listing(expected)} not found (nor directly in {root}); set dataset.download: true to fetch them, "
            f"or place the files there (plain or .gz, as served at {spec.mirrors[0]})",
        )
    hint = f"put the files at {where} (see docs/data.md) or check the network"
    for f in missing:
        dest = target / f"{f}.gz"
        last: FieldError | None = None
        for base in spec.mirrors:
            try:
                fetch(base + f"{f}.gz", dest, spec.md5[f], hint)
                last = None
                break
            except FieldError as exc:
                last = exc
        if last is not None:
            raise last
        found[f] = dest
    return found  # type: ignore[return-value]


def load_idx(root: str | Path, name: str, download: bool) -> RawImages:
    """MNIST (``name="mnist"``) or Fashion-MNIST (``"fashion_mnist"``) from IDX files."""
    spec = IDX[name]
    root = Path(root).expanduser().absolute()
    _check_root(root)
    try:
        files = _idx_ensure(root, name, download)
    except OSError as exc:
        raise FieldError("dataset.root", f"cannot prepare the files under {root}: {exc}") from None
    out: dict[str, np.ndarray] = {}
    for split, img, lab in (("train", IDX_TRAIN_IMAGES, IDX_TRAIN_LABELS), ("test", IDX_TEST_IMAGES, IDX_TEST_LABELS)):
        x = read_idx(files[img], 2051)
        y = read_idx(files[lab], 2049).astype(np.int64)
        if len(x) != len(y):
            raise FieldError("dataset.root", f"{files[img]} has {len(x)} images but {files[lab]} has {len(y)} labels")
        bad = y[y >= len(spec.class_names)]
        if len(bad):
            raise FieldError("dataset.root", f"{files[lab]}: label {int(bad[0])} is outside 0..{len(spec.class_names) - 1}")
        out[f"x_{split}"], out[f"y_{split}"] = x[:, None, :, :], y
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise FieldError(
            "dataset.root",
            f"train images are {out['x_train'].shape[2]}x{out['x_train'].shape[3]} but test images "
            f"{out['x_test'].shape[2]}x{out['x_test'].shape[3]}",
        )
    names = list(spec.class_names)
    _all_classes_present(out["y_train"], out["y_test"], names, str(files[IDX_TRAIN_IMAGES].parent))
    return RawImages(out["x_train"], out["y_train"], out["x_test"], out["y_test"], names,
                     list(spec.text_names) if spec.text_names is not None else list(names))

