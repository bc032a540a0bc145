"""Dataset sources: a registry of loaders that turn a scenario's ``dataset`` section into arrays.

Every source returns an :class:`ArrayDataset` with float32 inputs standardised by one scalar
mean/std computed on the training split, and int64 labels ``0..C-1``. Each source owns a small
pydantic model for its own keys (``dataset.path`` for ``npz``, ...), which the scenario loader
uses to validate them. This module knows nothing of Flower, Ray or torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import seeding
from ..errors import FieldError
from ..paths import PathText
from ..plugins import SOURCE_GROUP, PluginError, Registry
from . import formats


class DatasetSettings(Protocol):
    """What :func:`load_dataset` reads of a scenario's ``dataset`` section (the scenario's
    ``DatasetConfig`` is one; data code does not import the scenario module)."""

    source: str
    test_fraction: float

    def params(self) -> dict[str, Any]: ...


IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm"})
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# --------------------------------------------------------------------------- containers
@dataclass
class ArrayDataset:
    """A whole dataset in memory: standardised float32 inputs, int64 labels ``0..C-1``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    mean: float = 0.0  # the scalar mean/std used to standardise (computed on the train split)
    std: float = 1.0
    # Each class's name in words, index = class id (``"zero"`` for digit 0, CIFAR's label names,
    # folder names, an npz file's ``class_names``); None when the source only numbers its classes
    # (synthetic, npz without names). Class ids are never renumbered by ``tasks.class_order`` (the
    # order only decides which task brings a class), so ``text_names[c]`` names class c in every run.
    text_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])


@dataclass(frozen=True)
class SourceSpec:
    """One registered dataset source."""

    name: str
    description: str
    params_model: type[BaseModel]
    load: Callable[[Any, float, int], ArrayDataset]  # (validated params, test_fraction, seed)
    downloadable: bool = False  # files under dataset.root that `download: true` can fetch


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- helpers
def _finish(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: list[str],
    text_names: list[str] | None = None,
) -> ArrayDataset:
    """Standardise with a scalar mean/std of the train split and fix dtypes."""
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    mean = float(x_train.mean()) if x_train.size else 0.0
    std = float(x_train.std()) if x_train.size else 1.0
    if not np.isfinite(std) or std <= 1e-12:
        std = 1.0
    return ArrayDataset(
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=np.asarray(y_test, dtype=np.int64),
        class_names=list(class_names),
        mean=mean,
        std=std,
        text_names=list(text_names) if text_names is not None else None,
    )


def stratified_split(
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    class_names: list[str] | None = None,
    field: str = "dataset.path",
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class train/test split of labels ``y`` (ints ``0..C-1``).

    Per class with ``n`` samples: ``n_test = max(1, round(n * test_fraction))``, capped so that
    at least one sample stays in train. Returns sorted ``(train_idx, test_idx)`` (int64).
    Raises :class:`FieldError` on ``field`` if a class has fewer than 2 samples.
    """
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    small = present[counts[present] < 2]
    if len(small):
        c = int(small[0])
        name = class_names[c] if class_names is not None else str(c)
        raise FieldError(
            field,
            f"class {name!r} has only {int(counts[c])} sample; the train/test split "
            f"(dataset.test_fraction) needs at least 2 per class so that train and test both get one",
        )
    gen = seeding.rng(seed, "data")
    keys = gen.random(n)
    order = np.lexsort((keys, y))  # grouped by class, random order inside each class
    n_test = np.maximum(1, np.round(counts * test_fraction)).astype(np.int64)
    n_test = np.minimum(n_test, counts - 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sorted_labels = y[order]
    rank = np.arange(n) - starts[sorted_labels]
    is_test = rank < n_test[sorted_labels]
    return np.sort(order[~is_test]), np.sort(order[is_test])


def _split_and_finish(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, names: list[str], field: str,
    text_names: list[str] | None = None,
) -> ArrayDataset:
    train, test = stratified_split(y, test_fraction, seed, names, field)
    return _finish(x[train], y[train], x[test], y[test], names, text_names)


# --------------------------------------------------------------------------- mnist1d
class Mnist1dParams(_Params):
    num_samples: int = Field(4000, ge=100, le=10_000_000, description="total samples (train + test)")
    data_seed: int = Field(42, ge=0, le=2**32 - 1, description="seed of the mnist1d generator")


def _mnist1d_cache_path(num_samples: int, data_seed: int, train_split: float) -> Path | None:
    """Generated mnist1d arrays are cached (generation takes seconds; a comparison generates the
    same data for every run). ``PROTOFED_CACHE`` sets the folder (default ``~/.cache/protofed``;
    ``off`` disables the cache)."""
    import os

    root = os.environ.get("PROTOFED_CACHE", str(Path.home() / ".cache" / "protofed"))
    if root.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(root) / f"mnist1d-n{num_samples}-s{data_seed}-split{train_split:.6f}.npz"


def _read_cache(path: Path | None) -> dict[str, np.ndarray] | None:
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is regenerated


def _write_cache(path: Path | None, arrays: dict[str, np.ndarray]) -> None:
    if path is None:
        return
    import os
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation only


def _load_mnist1d(params: Mnist1dParams, test_fraction: float, seed: int) -> ArrayDataset:
    """Generate MNIST-1D offline with its own generator (never the download path)."""
    from mnist1d.data import get_dataset_args, make_dataset  # imported lazily: pulls in matplotlib

    args = get_dataset_args()
    args.num_samples = int(params.num_samples)
    args.seed = int(params.data_seed)
    args.train_split = 1.0 - float(test_fraction)
    cache = _mnist1d_cache_path(args.num_samples, args.seed, args.train_split)
    data = _read_cache(cache)
    if data is None:
        # make_dataset seeds the global numpy / random generators; leave them as we found them
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        _write_cache(cache, {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")})
    x_tr, y_tr = np.asarray(data["x"])[:, None, :], np.asarray(data["y"], dtype=np.int64)
    x_te, y_te = np.asarray(data["x_test"])[:, None, :], np.asarray(data["y_test"], dtype=np.int64)
    for split, ys in (("train", y_tr), ("test", y_te)):
        missing = sorted(set(range(10)) - set(np.unique(ys).tolist()))
        if missing:
            raise FieldError(
                "dataset.num_samples",
                f"the mnist1d {split} split has no sample of class(es) {missing}; "
                f"raise dataset.num_samples or adjust dataset.test_fraction",
            )
    return _finish(x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)], list(DIGIT_NAMES))


# --------------------------------------------------------------------------- digits
class DigitsParams(_Params):
    pass


def _load_digits(params: DigitsParams, test_fraction: float, seed: int) -> ArrayDataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with the package)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[:, None, :, :]
    y = np.asarray(bunch.target, dtype=np.int64)
    return _split_and_finish(x, y, test_fraction, seed, [str(i) for i in range(10)], "dataset.test_fraction", list(DIGIT_NAMES))


# --------------------------------------------------------------------------- synthetic
class SyntheticParams(_Params):
    num_classes: int = Field(10, ge=2, le=100_000, description="number of classes")
    dim: int = Field(32, ge=1, le=100_000, description="feature dimension of each sample")
    samples_per_class: int = Field(200, ge=2, le=10_000_000, description="samples per class (train + test)")
    noise: float = Field(1.0, gt=0.0, le=1e6, description="per-dimension std of the samples around their class mean")
    class_sep: float = Field(3.0, gt=0.0, le=1e6, description="typical (RMS) distance between two class means")
    data_seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the class means and the samples")

    @model_validator(mode="after")
    def _fits_in_memory(self) -> "SyntheticParams":
        total = self.num_classes * self.samples_per_class * self.dim
        if total > MAX_SYNTHETIC_VALUES:
            raise ValueError(
                f"num_classes x samples_per_class x dim = {total:,} values, more than the "
                f"{MAX_SYNTHETIC_VALUES:,} (about {MAX_SYNTHETIC_VALUES * 8 / 1e9:.1f} GB as float64) a synthetic dataset may have"
            )
        return self


MAX_SYNTHETIC_VALUES = 100_000_000


def _load_synthetic(params: SyntheticParams, test_fraction: float, seed: int) -> ArrayDataset:
    """Gaussian blobs: class means ~ N(0, class_sep^2 / (2 dim) I), samples = mean + noise * N(0, I).

    The scale of the means makes the expected distance between two class means ``class_sep``
    whatever ``dim`` is, so ``class_sep / noise`` sets the difficulty. The data depend on
    ``data_seed`` only; the train/test split on the scenario seed.
    """
    gen = np.random.default_rng(seeding.derive_seed(int(params.data_seed), "data", 1))
    c, d, m = params.num_classes, params.dim, params.samples_per_class
    means = gen.standard_normal((c, d)) * (params.class_sep / np.sqrt(2.0 * d))
    y = np.repeat(np.arange(c, dtype=np.int64), m)
    x = means[y] + params.noise * gen.standard_normal((c * m, d))
    return _split_and_finish(x, y, test_fraction, seed, [str(i) for i in range(c)], "dataset.samples_per_class")


# --------------------------------------------------------------------------- procedural
class ProceduralParams(_Params):
    num_classes: int = Field(20, ge=2, le=100_000, description="number of classes")
    dim: int = Field(32, ge=1, le=100_000, description="feature dimension of each sample")
    samples_per_client: int = Field(
        50, ge=1, le=1_000_000,
        description="training samples each client holds of each task it learns (labels from its own Dirichlet mixture)",
    )
    test_samples_per_class: int = Field(500, ge=1, le=1_000_000, description="test samples per class (one finite test set)")
    noise: float = Field(1.0, gt=0.0, le=1e6, description="per-dimension std of the samples around their class mean")
    class_sep: float = Field(4.0, gt=0.0, le=1e6, description="typical (RMS) distance between two class means")
    data_seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the class means and the test set")


def _load_procedural(params: ProceduralParams, test_fraction: float, seed: int) -> ArrayDataset:
    from .procedural import load_procedural  # clients derived when sampled (simulator/data/procedural.py)

    return load_procedural(params, test_fraction, seed)


# --------------------------------------------------------------------------- npz
class NpzParams(_Params):
    path: PathText = Field(..., min_length=1, description="a .npz file with arrays x, y (and optionally x_test, y_test, and class_names: one string per label, in sorted label order)")


def _labels(arr: np.ndarray, name: str) -> np.ndarray:
    """Integer labels as int64 (integral floats accepted), 1-D."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise FieldError("dataset.path", f"array {name!r} must be 1-D (one label per sample), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating) and arr.size and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating) and arr.size == 0:
        return arr.astype(np.int64)
    raise FieldError("dataset.path", f"array {name!r} must hold integer class labels, got dtype {arr.dtype}")


def _inputs(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 0:
        raise FieldError("dataset.path", f"array {name!r} must have one row per sample, got a scalar")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(arr.dtype, np.complexfloating):
        raise FieldError("dataset.path", f"array {name!r} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise FieldError("dataset.path", f"array {name!r} contains NaN or infinite values")
    return arr


def _load_npz(params: NpzParams, test_fraction: float, seed: int) -> ArrayDataset:
    """Arrays from a NumPy ``.npz`` file; labels remapped to ``0..C-1`` in sorted order."""
    path = Path(params.path).expanduser()
    if not path.exists():
        raise FieldError("dataset.path", f"file not found: {path} (relative paths start at the current directory {Path.cwd()})")
    if not path.is_file():
        raise FieldError("dataset.path", f"not a file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a readable .npz"
        raise FieldError("dataset.path", f"{path} is not a valid .npz file: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise FieldError("dataset.path", f"{path} is not a valid .npz file: it holds a single array, not arrays x, y")
    with archive:
        names = set(archive.files)
        for key in ("x", "y"):
            if key not in names:
                raise FieldError(
                    "dataset.path",
                    f"{path} has no array {key!r} (found: {', '.join(sorted(names)) or 'none'}); "
                    "expected arrays x, y and optionally x_test, y_test",
                )
        if ("x_test" in names) != ("y_test" in names):
            have, lack = ("x_test", "y_test") if "x_test" in names else ("y_test", "x_test")
            raise FieldError("dataset.path", f"{path} has {have!r} but no {lack!r}; give both or neither")
        try:
            arrays = {k: archive[k] for k in ("x", "y", "x_test", "y_test", "class_names") if k in names}
        except Exception as exc:  # noqa: BLE001
            raise FieldError("dataset.path", f"{path} is not a valid .npz file: {exc}") from None

    x, y = _inputs(arrays["x"], "x"), _labels(arrays["y"], "y")
    if len(x) != len(y):
        raise FieldError("dataset.path", f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    classes = np.unique(y)
    if len(classes) < 2:
        raise FieldError("dataset.path", f"{path}: y holds {len(classes)} distinct label(s); at least 2 classes are needed")
    names_ = [str(int(c)) for c in classes]
    text_names = _npz_class_names(arrays["class_names"], len(classes), path) if "class_names" in arrays else None
    if text_names is not None:
        names_ = text_names
    y = np.searchsorted(classes, y).astype(np.int64)
    if "x_test" not in arrays:
        return _split_and_finish(x, y, test_fraction, seed, names_, "dataset.path", text_names)

    x_te, y_te = _inputs(arrays["x_test"], "x_test"), _labels(arrays["y_test"], "y_test")
    if len(x_te) != len(y_te):
        raise FieldError("dataset.path", f"{path}: x_test has {len(x_te)} samples but y_test has {len(y_te)} labels")
    if x_te.shape[1:] != x.shape[1:]:
        raise FieldError(
            "dataset.path", f"{path}: x_test samples have shape {x_te.shape[1:]} but x samples have shape {x.shape[1:]}"
        )
    unknown = np.setdiff1d(np.unique(y_te), classes)
    if len(unknown):
        raise FieldError("dataset.path", f"{path}: y_test has labels that never occur in y: {_short(unknown)}")
    untested = np.setdiff1d(classes, y_te)
    if len(untested):
        raise FieldError(
            "dataset.path", f"{path}: y_test has no sample of label(s) {_short(untested)}; every class needs test samples"
        )
    return _finish(x, y, x_te, np.searchsorted(classes, y_te).astype(np.int64), names_, text_names)


def _npz_class_names(arr: np.ndarray, num_classes: int, path: Path) -> list[str]:
    """An npz file's optional ``class_names``: one non-empty string per class, in the order of the
    sorted label values (for labels 0..C-1, ``class_names[i]`` names label i)."""
    if arr.ndim != 1 or arr.dtype.kind not in ("U", "S"):
        raise FieldError("dataset.path", f"{path}: array 'class_names' must be a 1-D array of strings, "
                         f"got shape {arr.shape} and dtype {arr.dtype}")
    out = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.tolist()]
    if len(out) != num_classes:
        raise FieldError("dataset.path", f"{path}: 'class_names' has {len(out)} names but y has {num_classes} distinct "
                         "labels; give one name per label, in the order of the sorted label values")
    blank = [i for i, n in enumerate(out) if not n.strip()]
    if blank:
        raise FieldError("dataset.path", f"{path}: 'class_names' has an empty name at position {blank[0]}")
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        if n in seen:
            raise FieldError("dataset.path", f"{path}: 'class_names' names two classes {n!r} (positions {seen[n]} and {i})")
        seen[n] = i
    return out


def _short(values: Any, limit: int = 10) -> str:
    vals = [int(v) for v in values]
    text = ", ".join(str(v) for v in vals[:limit])
    return f"[{text}{f', ... ({len(vals) - limit} more)' if len(vals) > limit else ''}]"


# --------------------------------------------------------------------------- folder
class FolderParams(_Params):
    path: PathText = Field(..., min_length=1, description="root folder with one sub-folder of images per class")
    image_size: int = Field(28, ge=1, le=4096, description="images are resized to image_size x image_size")
    grayscale: bool = Field(True, description="convert to one channel (else RGB, three channels)")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _load_folder(params: FolderParams, test_fraction: float, seed: int) -> ArrayDataset:
    """Images in an ImageFolder layout: ``root/<class name>/<image files>``."""
    from PIL import Image

    root = Path(params.path).expanduser()
    if not root.exists():
        raise FieldError("dataset.path", f"folder not found: {root} (relative paths start at the current directory {Path.cwd()})")
    if not root.is_dir():
        raise FieldError("dataset.path", f"not a directory: {root}; expected a folder with one sub-folder per class")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not class_dirs:
        raise FieldError("dataset.path", f"{root} has no class sub-folders; expected one sub-folder of images per class")
    if len(class_dirs) < 2:
        raise FieldError("dataset.path", f"{root} has only one class sub-folder ({class_dirs[0].name!r}); at least 2 classes are needed")

    mode = "L" if params.grayscale else "RGB"
    size = (params.image_size, params.image_size)
    xs: list[np.ndarray] = []
    ys: list[int] = []
    names = [d.name for d in class_dirs]
    for label, cdir in enumerate(class_dirs):
        files = _image_files(cdir)
        if not files:
            raise FieldError(
                "dataset.path",
                f"class folder {cdir} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})",
            )
        if len(files) < 2:
            raise FieldError(
                "dataset.path",
                f"class {cdir.name!r} has only 1 image; the train/test split (dataset.test_fraction) "
                "needs at least 2 per class so that train and test both get one",
            )
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize(size, Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise FieldError("dataset.path", f"cannot read image {f}: {exc}") from None
            xs.append(arr[None, :, :] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1)))
            ys.append(label)
    x = np.stack(xs)
    y = np.asarray(ys, dtype=np.int64)
    return _split_and_finish(x, y, test_fraction, seed, names, "dataset.path", names)  # folder names are the names


# --------------------------------------------------------------------------- standard formats
def finish_uint8(raw: "formats.RawImages") -> ArrayDataset:
    """Scale uint8 pixels to [0, 1], then standardise with the train split's scalar mean/std.

    Same result as :func:`_finish` on ``x / 255``, but the statistics come exactly from a
    256-bin histogram and the float32 output from a lookup table, so a 50 000-image dataset
    needs no float64 copy.
    """
    flat = raw.x_train.reshape(-1)
    hist = np.zeros(256, dtype=np.float64)
    for start in range(0, len(flat), 1 << 22):  # in chunks: bincount converts its input to int64
        hist += np.bincount(flat[start : start + (1 << 22)], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = hist.sum()
    mean = float((hist * values).sum() / total) if total else 0.0
    std = float(np.sqrt((hist * (values - mean) ** 2).sum() / total)) if total else 1.0
    if not np.isfinite(std) or std <= 1e-12:
        std = 1.0
    lut = ((values - mean) / std).astype(np.float32)
    return ArrayDataset(
        x_train=lut[raw.x_train],
        y_train=np.asarray(raw.y_train, dtype=np.int64),
        x_test=lut[raw.x_test],
        y_test=np.asarray(raw.y_test, dtype=np.int64),
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
        text_names=list(raw.text_names) if raw.text_names is not None else None,
    )


_OWN_SPLIT = "; the dataset has its own test split, so dataset.test_fraction is not used"


class CifarParams(_Params):
    root: PathText = Field(
        ..., min_length=1,
        description="folder holding cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta) or the archive cifar-10-python.tar.gz" + _OWN_SPLIT,
    )
    download: bool = Field(False, description="fetch the official archive into root when files are missing (md5-checked)")


class Cifar100Params(_Params):
    root: PathText = Field(
        ..., min_length=1,
        description="folder holding cifar-100-python/ (train, test, meta) or the archive cifar-100-python.tar.gz" + _OWN_SPLIT,
    )
    download: bool = Field(False, description="fetch the official archive into root when files are missing (md5-checked)")
    label_type: Literal["fine", "coarse"] = Field("fine", description="100 fine classes or 20 coarse superclasses")


class MnistParams(_Params):
    root: PathText = Field(
        ..., min_length=1,
        description="folder with the four IDX files (train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte, "
        "optionally .gz) in root/MNIST/raw/ or root itself" + _OWN_SPLIT,
    )
    download: bool = Field(False, description="fetch missing files into root/MNIST/raw/ (md5-checked)")


class FashionMnistParams(_Params):
    root: PathText = Field(
        ..., min_length=1,
        description="folder with the four IDX files (train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte, "
        "optionally .gz) in root/FashionMNIST/raw/ or root itself" + _OWN_SPLIT,
    )
    download: bool = Field(False, description="fetch missing files into root/FashionMNIST/raw/ (md5-checked)")


def _load_cifar10(params: CifarParams, test_fraction: float, seed: int) -> ArrayDataset:
    return finish_uint8(formats.load_cifar(params.root, "cifar10", params.download))


def _load_cifar100(params: Cifar100Params, test_fraction: float, seed: int) -> ArrayDataset:
    return finish_uint8(formats.load_cifar(params.root, "cifar100", params.download, params.label_type))


def _load_mnist(params: MnistParams, test_fraction: float, seed: int) -> ArrayDataset:
    return finish_uint8(formats.load_idx(params.root, "mnist", params.download))


def _load_fashion_mnist(params: FashionMnistParams, test_fraction: float, seed: int) -> ArrayDataset:
    return finish_uint8(formats.load_idx(params.root, "fashion_mnist", params.download))


# --------------------------------------------------------------------------- registry
BUILTIN_SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec("mnist1d", "MNIST-1D, generated offline (10 classes, 1x40 signals)", Mnist1dParams, _load_mnist1d),
        SourceSpec("digits", "scikit-learn 8x8 handwritten digits (10 classes, 1797 images)", DigitsParams, _load_digits),
        SourceSpec(
            "synthetic", "Gaussian class blobs (num_classes, dim, samples_per_class, noise, class_sep)",
            SyntheticParams, _load_synthetic,
        ),
        SourceSpec(
            "procedural", "Gaussian class blobs, each client's samples generated from its id when it is sampled "
            "(samples_per_client per task, labels from its own Dirichlet mixture; cross-device scale)",
            ProceduralParams, _load_procedural,
        ),
        SourceSpec("npz", "NumPy .npz file with arrays x, y (and optionally x_test, y_test, class_names)", NpzParams, _load_npz),
        SourceSpec("folder", "image folder, one sub-folder per class (ImageFolder layout)", FolderParams, _load_folder),
        SourceSpec(
            "cifar10", "CIFAR-10 python pickles under root (10 classes, 3x32x32; own test split, test_fraction unused)",
            CifarParams, _load_cifar10, True,
        ),
        SourceSpec(
            "cifar100",
            "CIFAR-100 python pickles under root (100 fine or 20 coarse classes, 3x32x32; own test split, test_fraction unused)",
            Cifar100Params, _load_cifar100, True,
        ),
        SourceSpec(
            "mnist", "MNIST IDX files under root (10 classes, 1x28x28; own test split, test_fraction unused)",
            MnistParams, _load_mnist, True,
        ),
        SourceSpec(
            "fashion_mnist", "Fashion-MNIST IDX files under root (10 classes, 1x28x28; own test split, test_fraction unused)",
            FashionMnistParams, _load_fashion_mnist, True,
        ),
    )
}


def _check_plugin(name: str, obj: Any) -> SourceSpec:
    """A ``protofed.datasets`` entry point must load a SourceSpec (or a function returning one)
    whose name equals the entry point's name."""
    spec = obj() if callable(obj) and not isinstance(obj, (type, SourceSpec)) else obj
    if not isinstance(spec, SourceSpec):
        raise PluginError(f"expected a simulator.data.sources.SourceSpec (or a function returning one), got {obj!r}")
    if spec.name != name:
        raise PluginError(f"its SourceSpec is named {spec.name!r}; it must equal the entry point name {name!r}")
    if not (isinstance(spec.params_model, type) and issubclass(spec.params_model, BaseModel)):
        raise PluginError("SourceSpec.params_model must be a pydantic model class")
    if not callable(spec.load):
        raise PluginError("SourceSpec.load must be a function (params, test_fraction, seed) -> ArrayDataset")
    return spec


# the built-in sources, plus those of installed packages (entry-point group protofed.datasets), loaded on first read
SOURCES: dict[str, SourceSpec] = Registry(BUILTIN_SOURCES, SOURCE_GROUP, "dataset source", _check_plugin)


def source_registry() -> dict[str, SourceSpec]:
    """``SOURCES`` with the installed plugin sources loaded (once per process)."""
    return SOURCES.load_plugins()  # type: ignore[attr-defined]


def load_dataset(cfg: DatasetSettings, seed: int) -> ArrayDataset:
    """Load the dataset a scenario's ``dataset`` section describes (split seeded by ``seed``)."""
    spec = SOURCES.get(cfg.source)
    if spec is None:
        raise FieldError("dataset.source", SOURCES.unknown(cfg.source))  # type: ignore[attr-defined]
    try:
        params = spec.params_model.model_validate(cfg.params())
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise FieldError(f"dataset.{loc}" if loc else "dataset", f"{err['msg']}{more}") from None
    return spec.load(params, float(cfg.test_fraction), int(seed))
