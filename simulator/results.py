"""The run directory (DESIGN.md section 6), written atomically and read back.

Every file is first written to a hidden temporary file in the same directory and then moved
into place with :func:`os.replace`, so a reader (or a crash) sees each file either complete or
absent, never half-written. Everything that can fail (validation, serialisation) happens
before the temporary file is created.

Layout::

    <run dir>/config.yaml          resolved scenario + ``versions``
    <run dir>/metrics.csv          long format: task, round, eval_task, accuracy, ...
    <run dir>/accuracy_matrix.csv  trained_through, task_0 .. task_{T-1}
    <run dir>/summary.json         SUMMARY_KEYS
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import yaml

__all__ = [
    "RUN_FILES",
    "SUMMARY_KEYS",
    "atomic_write_text",
    "atomic_write_bytes",
    "package_versions",
    "RunWriter",
    "RunResult",
    "read_matrix",
    "read_run",
    "is_run_dir",
]

RUN_FILES = ("config.yaml", "metrics.csv", "accuracy_matrix.csv", "summary.json")
SUMMARY_KEYS = (
    "scenario",
    "strategy",
    "seed",
    "engine",
    "num_tasks",
    "num_clients",
    "final_avg_accuracy",
    "avg_incremental_accuracy",
    "avg_forgetting",
    "bwt",
    "bytes_up",
    "bytes_down",
    "wall_seconds",
    "completed",
)
# summary keys that are floats and may be NaN (stored as null, read back as NaN)
_FLOAT_SUMMARY_KEYS = (
    "final_avg_accuracy",
    "avg_incremental_accuracy",
    "avg_forgetting",
    "bwt",
    "wall_seconds",
    "open_world_auroc",
    "anytime_accuracy",
    "open_world_fpr95",
)
METRICS_COLUMNS = ("task", "round", "eval_task", "accuracy")
_VERSION_DISTS = ("flwr", "torch", "ray", "numpy")
_MATRIX_COL = re.compile(r"^task_(\d+)$")


# --------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + ``os.replace``).

    Creates missing parent directories. The temporary file is removed if anything fails.
    The final file gets the usual permissions (0666 minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- helpers
def _plain_key(key: Any) -> str | int:
    if isinstance(key, np.integer):
        return int(key)
    return key if isinstance(key, (str, int)) else str(key)


def _plain(obj: Any, nan_to_none: bool) -> Any:
    """Convert numpy scalars/arrays, tuples and paths into plain YAML/JSON-safe values."""
    if isinstance(obj, Mapping):
        return {_plain_key(k): _plain(v, nan_to_none) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [_plain(v, nan_to_none) for v in items]
    if isinstance(obj, np.ndarray):
        return [_plain(v, nan_to_none) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if nan_to_none and not math.isfinite(f):
            return None
        return f
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot serialise value of type {type(obj).__name__}: {obj!r}")


def package_versions() -> dict[str, str]:
    """Versions of python, protofed and the main dependencies ("unknown" when not installed)."""
    import simulator

    versions = {"python": platform.python_version(), "protofed": getattr(simulator, "__version__", "unknown")}
    for dist in _VERSION_DISTS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def _as_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(rows, pd.DataFrame):
        return rows
    return pd.DataFrame(list(rows))


# --------------------------------------------------------------------------- writer
class RunWriter:
    """Writes the files of one run directory, each one atomically.

    The directory itself is created lazily, by the first write.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def _path(self, name: str) -> Path:
        return self.run_dir / name

    def write_config(self, resolved: dict) -> None:
        """``config.yaml``: the resolved scenario plus a ``versions`` mapping (unless present)."""
        data = _plain(dict(resolved), nan_to_none=False)
        if "versions" not in data:
            data["versions"] = package_versions()
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        atomic_write_text(self._path("config.yaml"), text)

    def write_metrics(self, rows: list[dict] | pd.DataFrame) -> None:
        """``metrics.csv``: long format with at least ``task, round, eval_task, accuracy``."""
        df = _as_frame(rows)
        if df.empty and len(df.columns) == 0:
            df = pd.DataFrame(columns=list(METRICS_COLUMNS))
        missing = [c for c in METRICS_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"metrics rows lack column(s) {missing}; metrics.csv needs {list(METRICS_COLUMNS)}")
        atomic_write_text(self._path("metrics.csv"), df.to_csv(index=False))

    def write_matrix(
        self, matrix: np.ndarray, task_names: list[str] | None = None, name: str = "accuracy_matrix.csv"
    ) -> None:
        """``accuracy_matrix.csv``: ``trained_through`` then ``task_0..task_{T-1}`` (6 decimals, empty = NaN).

        ``task_names`` (one per task, e.g. ``"classes 0,1"``) adds a last column ``task_name``
        naming the task of each row; readers that only know the contract columns ignore it.
        """
        a = np.asarray(matrix, dtype=float)
        if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
            raise ValueError(f"accuracy matrix must be a non-empty T x T array, got shape {a.shape}")
        t = a.shape[0]
        df = pd.DataFrame(a, columns=[f"task_{j}" for j in range(t)])
        df.insert(0, "trained_through", np.arange(t))
        if task_names is not None:
            names = [str(n) for n in task_names]
            if len(names) != t:
                raise ValueError(f"task_names has {len(names)} entries for {t} tasks")
            df["task_name"] = names
        atomic_write_text(self._path(name), df.to_csv(index=False, float_format="%.6f", na_rep=""))

    def write_summary(self, summary: dict) -> None:
        """``summary.json``: every ``SUMMARY_KEYS`` key required (extra keys kept); NaN -> null."""
        missing = [k for k in SUMMARY_KEYS if k not in summary]
        if missing:
            raise ValueError(f"summary lacks key(s): {', '.join(missing)}")
        ordered = {k: summary[k] for k in SUMMARY_KEYS}
        ordered.update({k: v for k, v in summary.items() if k not in ordered})
        text = json.dumps(_plain(ordered, nan_to_none=True), indent=2, allow_nan=False) + "\n"
        atomic_write_text(self._path("summary.json"), text)

    def write_table(self, name: str, df: pd.DataFrame | list[dict]) -> None:
        """Any other table, e.g. ``clients.csv`` (``.csv`` is appended when no suffix is given)."""
        if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise ValueError(f"table name must be a plain file name inside the run directory, got {name!r}")
        if not Path(name).suffix:
            name += ".csv"
        atomic_write_text(self._path(name), _as_frame(df).to_csv(index=False))


# --------------------------------------------------------------------------- reading
@dataclass
class RunResult:
    """Everything a finished run directory holds."""

    run_dir: Path
    config: dict
    metrics: pd.DataFrame
    matrix: np.ndarray
    summary: dict


def read_matrix(path: Path | str) -> np.ndarray:
    """Read ``accuracy_matrix.csv`` back into a ``T x T`` float array (empty cells -> NaN)."""
    df = pd.read_csv(path)
    cols = sorted(
        ((int(m.group(1)), c) for c in df.columns if (m := _MATRIX_COL.match(str(c)))),
        key=lambda x: x[0],
    )
    if "trained_through" in df.columns:
        df = df.sort_values("trained_through")
    t = len(df)
    if [j for j, _ in cols] != list(range(t)):
        raise ValueError(f"{path}: expected columns task_0..task_{t - 1} for {t} rows, got {[c for _, c in cols]}")
    return df[[c for _, c in cols]].to_numpy(dtype=float)


def _read_summary(path: Path) -> dict:
    summary = json.loads(path.read_text(encoding="utf-8"))
    for k in _FLOAT_SUMMARY_KEYS:
        if k in summary and summary[k] is None:
            summary[k] = math.nan
    return summary


def read_run(run_dir: Path) -> RunResult:
    """Read a complete run directory; ``FileNotFoundError`` names the first missing file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(2, f"run directory not found: {run_dir}", str(run_dir))
    for name in RUN_FILES:
        if not (run_dir / name).is_file():
            raise FileNotFoundError(2, f"run directory {run_dir} has no {name}", str(run_dir / name))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    return RunResult(
        run_dir=run_dir,
        config=config,
        metrics=pd.read_csv(run_dir / "metrics.csv"),
        matrix=read_matrix(run_dir / "accuracy_matrix.csv"),
        summary=_read_summary(run_dir / "summary.json"),
    )


def is_run_dir(path: Path | str) -> bool:
    """True when ``path`` is a directory holding ``summary.json`` or ``metrics.csv``."""
    p = Path(path)
    return p.is_dir() and ((p / "summary.json").is_file() or (p / "metrics.csv").is_file())
