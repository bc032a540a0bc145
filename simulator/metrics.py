"""Continual-learning metrics computed from the accuracy matrix (DESIGN.md section 5).

The accuracy matrix ``a`` is a ``T x T`` float array: ``a[k][j]`` is the accuracy on task ``j``'s
test set after training through task ``k``; entries above the diagonal (``j > k``) are NaN (any
value found there is ignored by every metric).

Definitions (exact):

- average accuracy after task k:  ``A_k = mean_{j<=k} a[k][j]``
- final average accuracy:         ``A_{T-1}``
- average incremental accuracy:   ``mean_k A_k``
- forgetting (Chaudhry et al. 2018): ``f_j = max_{j<=l<=T-2} a[l][j] - a[T-1][j]`` for ``j < T-1``
  (the maximum runs over EARLIER rows only, so ``f_j`` is negative when the last row is the best)
- average forgetting:             ``mean_j f_j`` (NaN when ``T == 1``)
- backward transfer (Lopez-Paz & Ranzato 2017): ``mean_{j<T-1} (a[T-1][j] - a[j][j])``
  (NaN when ``T == 1``)

Open-world metrics (one value per client and evaluation; the scores come from
:mod:`simulator.learner.open_world`, higher = more "known"):

- AUROC of the scores with the samples of learned classes as positives and those of classes not
  yet learned as negatives (``open_world_auroc``; 1 = every known sample outranks every unknown one)
- FPR95: the smallest false-positive rate (unknown samples taken for known) at which the
  true-positive rate reaches 0.95 (``open_world_fpr95``; lower is better)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "validate_matrix",
    "average_accuracy",
    "final_average_accuracy",
    "average_incremental_accuracy",
    "forgetting_per_task",
    "average_forgetting",
    "backward_transfer",
    "summarize",
    "select_protocol",
    "matrix_from_long",
    "SUMMARY_METRICS",
    "open_world_auroc",
    "open_world_fpr95",
    "open_world_metrics",
    "open_world_summary",
    "anytime_accuracy",
]

SUMMARY_METRICS = ("final_avg_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt")

_LONG_COLUMNS = ("task", "round", "eval_task", "accuracy")


def validate_matrix(matrix: Any) -> np.ndarray:
    """Return ``matrix`` as a float array after checking it is a valid accuracy matrix.

    Raises ``ValueError`` unless it is a non-empty square 2-D array, every value is in
    ``[0, 1]`` or NaN, and no entry on or below the diagonal is NaN.
    """
    try:
        a = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"accuracy matrix must be numeric: {exc}") from None
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T x T), got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("accuracy matrix is empty (T == 0)")
    finite = a[~np.isnan(a)]
    if np.isinf(finite).any() or ((finite < 0) | (finite > 1)).any():
        bad = finite[np.isinf(finite) | (finite < 0) | (finite > 1)]
        raise ValueError(
            "accuracy matrix values must be in [0, 1] or NaN "
            f"(got {bad[0]!r}; accuracies are fractions, not percentages)"
        )
    lower = np.tril(np.ones_like(a, dtype=bool))
    missing = np.argwhere(np.isnan(a) & lower)
    if len(missing):
        cells = ", ".join(f"a[{k}][{j}]" for k, j in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"accuracy matrix has NaN on or below the diagonal: {cells}{more} "
            "(every task j <= k must be evaluated after task k)"
        )
    return a


def _avg_acc(a: np.ndarray, k: int) -> float:
    return float(np.mean(a[k, : k + 1]))


def average_accuracy(matrix: Any, k: int) -> float:
    """``A_k``: mean accuracy over tasks ``0..k`` after training through task ``k``."""
    a = validate_matrix(matrix)
    t = a.shape[0]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < t:
        raise ValueError(f"k must be an integer in [0, {t - 1}], got {k!r}")
    return _avg_acc(a, int(k))


def final_average_accuracy(matrix: Any) -> float:
    """``A_{T-1}``: average accuracy over all tasks after the last one."""
    a = validate_matrix(matrix)
    return _avg_acc(a, a.shape[0] - 1)


def average_incremental_accuracy(matrix: Any) -> float:
    """Mean of ``A_k`` over ``k = 0..T-1``."""
    a = validate_matrix(matrix)
    return float(np.mean([_avg_acc(a, k) for k in range(a.shape[0])]))


def forgetting_per_task(matrix: Any) -> np.ndarray:
    """``f_j = max_{j<=l<=T-2} a[l][j] - a[T-1][j]`` for ``j < T-1`` (length ``T-1``; empty if T == 1)."""
    a = validate_matrix(matrix)
    t = a.shape[0]
    return np.array([np.max(a[j : t - 1, j]) - a[t - 1, j] for j in range(t - 1)], dtype=float)


def average_forgetting(matrix: Any) -> float:
    """Mean of :func:`forgetting_per_task`; NaN when ``T == 1``."""
    f = forgetting_per_task(matrix)
    return float(np.mean(f)) if f.size else math.nan


def backward_transfer(matrix: Any) -> float:
    """``mean_{j<T-1} (a[T-1][j] - a[j][j])``; NaN when ``T == 1``."""
    a = validate_matrix(matrix)
    t = a.shape[0]
    if t == 1:
        return math.nan
    return float(np.mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


def _ranking_inputs(known: Any, unknown: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Labels (1 = known) and scores, or None when either side is empty or a score is not finite."""
    k = np.asarray(known, dtype=np.float64).reshape(-1)
    u = np.asarray(unknown, dtype=np.float64).reshape(-1)
    if k.size == 0 or u.size == 0 or not (np.isfinite(k).all() and np.isfinite(u).all()):
        return None
    return np.concatenate([np.ones(k.size), np.zeros(u.size)]), np.concatenate([k, u])


def open_world_auroc(known: Any, unknown: Any) -> float:
    """Area under the ROC curve with ``known`` scores as positives and ``unknown`` as negatives
    (``sklearn.metrics.roc_auc_score``; equals ``P(s_known > s_unknown) + 0.5 P(tie)``). NaN when
    either side is empty or a score is not finite."""
    from sklearn.metrics import roc_auc_score

    inputs = _ranking_inputs(known, unknown)
    return math.nan if inputs is None else float(roc_auc_score(*inputs))


def open_world_fpr95(known: Any, unknown: Any, tpr_level: float = 0.95) -> float:
    """The smallest false-positive rate at which the true-positive rate is at least
    ``tpr_level``, read off ``sklearn.metrics.roc_curve`` with every threshold kept. NaN when
    either side is empty or a score is not finite."""
    from sklearn.metrics import roc_curve

    inputs = _ranking_inputs(known, unknown)
    if inputs is None:
        return math.nan
    fpr, tpr, _ = roc_curve(*inputs, drop_intermediate=False)
    return float(fpr[tpr >= tpr_level].min())


def open_world_metrics(known: Any, unknown: Any) -> dict[str, float]:
    """``open_world_auroc`` and ``open_world_fpr95`` of one client's scores."""
    return {"open_world_auroc": open_world_auroc(known, unknown), "open_world_fpr95": open_world_fpr95(known, unknown)}


def open_world_summary(per_task: Any, num_tasks: int) -> float:
    """A run's open-world figure: the mean over tasks ``0..T-2`` of the per-task values that are
    finite (after the last task nothing is unknown); NaN when none is."""
    v = np.asarray(per_task, dtype=np.float64).reshape(-1)[: max(num_tasks - 1, 0)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def anytime_accuracy(rows: Any) -> float:
    """The mean, over every evaluation of a run, of the accuracy averaged over the tasks seen at
    that evaluation (``rows``: ``metrics.csv``'s rows or records with ``global_round``,
    ``eval_task``, ``accuracy``). With ``evaluation.every: round`` it follows learning during the
    stream (online continual learning's anytime accuracy); with ``every: task`` it is the average
    incremental accuracy. NaN without any evaluation."""
    df = pd.DataFrame(rows)
    if df.empty or "accuracy" not in df:
        return math.nan
    df = df[np.isfinite(pd.to_numeric(df["accuracy"], errors="coerce"))]
    if df.empty:
        return math.nan
    return float(df.groupby("global_round")["accuracy"].mean().mean())


def summarize(matrix: Any) -> dict[str, float]:
    """The four headline metrics, keyed as in ``summary.json``."""
    a = validate_matrix(matrix)
    return {
        "final_avg_accuracy": final_average_accuracy(a),
        "avg_incremental_accuracy": average_incremental_accuracy(a),
        "avg_forgetting": average_forgetting(a),
        "bwt": backward_transfer(a),
    }


def select_protocol(df: pd.DataFrame, protocol: str | None = None) -> pd.DataFrame:
    """Keep the rows of one evaluation protocol when ``df`` has a ``protocol`` column.

    ``protocol=None`` keeps everything if only one protocol is present, and otherwise picks
    ``"global"`` (the class-incremental default, DESIGN.md section 5). Without a ``protocol``
    column, ``df`` is returned unchanged (an explicit ``protocol`` is then an error).
    """
    if "protocol" not in df.columns:
        if protocol is not None:
            raise ValueError(f"protocol={protocol!r} requested but the table has no 'protocol' column")
        return df
    present = [p for p in pd.unique(df["protocol"].dropna())]
    if protocol is None:
        if len(present) <= 1:
            return df
        if "global" not in present:
            raise ValueError(
                f"metrics mix evaluation protocols {sorted(map(str, present))}; pass protocol=..."
            )
        protocol = "global"
    # rows without a protocol (e.g. training-only rows) are kept: they carry no accuracy
    keep = (df["protocol"] == protocol) | df["protocol"].isna()
    if not (df["protocol"] == protocol).any():
        raise ValueError(f"no rows with protocol {protocol!r} (present: {sorted(map(str, present))})")
    return df[keep]


def _as_int_column(values: pd.Series, name: str) -> np.ndarray:
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(v) | (v != np.round(v))
    if bad.any():
        raise ValueError(f"column '{name}' must hold integers (found {values.to_numpy()[bad][0]!r})")
    return v.astype(int)


def matrix_from_long(df: pd.DataFrame, num_tasks: int, protocol: str | None = None) -> np.ndarray:
    """Build the ``T x T`` accuracy matrix from ``metrics.csv``-style long rows.

    Uses columns ``task, round, eval_task, accuracy``. Rows whose ``eval_task`` is NaN (e.g.
    training-only rows) are ignored. For each task ``k`` the LAST round evaluated within task
    ``k`` (the largest ``round`` among its evaluation rows) gives row ``k``. Evaluations of
    tasks not yet trained (``eval_task > task``) are ignored. Cells never evaluated stay NaN
    (an unfinished run); :func:`validate_matrix` rejects such a matrix. See
    :func:`select_protocol` for ``protocol``. Raises ``ValueError`` on missing columns,
    task ids outside ``[0, num_tasks)``, accuracies outside ``[0, 1]`` and duplicate rows
    for one ``(task, round, eval_task)``.
    """
    if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    missing = [c for c in _LONG_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}; needs {list(_LONG_COLUMNS)}")
    df = select_protocol(df, protocol)
    ev = df[df["eval_task"].notna()]
    out = np.full((num_tasks, num_tasks), np.nan)
    if ev.empty:
        return out
    task = _as_int_column(ev["task"], "task")
    rnd = pd.to_numeric(ev["round"], errors="coerce").to_numpy(dtype=float)
    if np.isnan(rnd).any():
        raise ValueError("column 'round' has missing or non-numeric values in evaluation rows")
    eval_task = _as_int_column(ev["eval_task"], "eval_task")
    acc = pd.to_numeric(ev["accuracy"], errors="coerce").to_numpy(dtype=float)
    for name, ids in (("task", task), ("eval_task", eval_task)):
        bad = ids[(ids < 0) | (ids >= num_tasks)]
        if bad.size:
            raise ValueError(f"{name} {bad[0]} outside [0, {num_tasks - 1}] (num_tasks={num_tasks})")
    tidy = pd.DataFrame({"task": task, "round": rnd, "eval_task": eval_task, "accuracy": acc})
    tidy = tidy[tidy["eval_task"] <= tidy["task"]]
    last = tidy.groupby("task")["round"].transform("max")
    tidy = tidy[tidy["round"] == last]
    dup = tidy.duplicated(["task", "eval_task"], keep=False)
    if dup.any():
        r = tidy[dup].iloc[0]
        raise ValueError(
            f"several rows for task {int(r['task'])}, round {r['round']:g}, eval_task "
            f"{int(r['eval_task'])}; filter the table first (e.g. by protocol or client)"
        )
    vals = tidy["accuracy"].to_numpy()
    if np.isnan(vals).any():
        raise ValueError("accuracy is missing in an evaluation row of the last round of a task")
    if ((vals < 0) | (vals > 1)).any():
        raise ValueError(f"accuracy values must be in [0, 1], got {vals[(vals < 0) | (vals > 1)][0]!r}")
    out[tidy["task"].to_numpy(), tidy["eval_task"].to_numpy()] = vals
    return out


def summarize_asynchronous(matrix: Any) -> dict[str, float]:
    """The same four metrics for a matrix whose columns are global task ids and whose rows are
    federation steps, where a task enters the evaluation at the first step any client learns it
    (per-client task orders, late arrivals). NaN marks "not seen yet".

    ``A_k`` = mean of row k over the tasks seen by then; forgetting of task j = max of its
    accuracy over rows before the last (from its first evaluation on) minus the last row; BWT
    compares the last row with task j's first evaluation ``a[first_j][j]``. On a
    lower-triangular matrix these equal the standard definitions (``first_j = j``)."""
    a = np.asarray(matrix, dtype=float)
    t = a.shape[0]
    rows = [float(np.nanmean(a[k])) for k in range(t) if np.isfinite(a[k]).any()]
    last = a[t - 1]
    forget, bwt = [], []
    for j in range(a.shape[1]):
        col = a[: t - 1, j]
        if not np.isfinite(col).any() or not np.isfinite(last[j]):
            continue
        first = int(np.flatnonzero(np.isfinite(col))[0])
        forget.append(float(np.nanmax(col) - last[j]))
        bwt.append(float(last[j] - a[first, j]))
    return {
        "final_avg_accuracy": float(np.nanmean(last)) if np.isfinite(last).any() else math.nan,
        "avg_incremental_accuracy": float(np.mean(rows)) if rows else math.nan,
        "avg_forgetting": float(np.mean(forget)) if forget else math.nan,
        "bwt": float(np.mean(bwt)) if bwt else math.nan,
    }


def summarize_any(matrix: Any) -> dict[str, float]:
    """:func:`summarize` for the usual lower-triangular matrix, else :func:`summarize_asynchronous`."""
    a = np.asarray(matrix, dtype=float)
    lower = np.tril(np.ones_like(a, dtype=bool))
    if a.ndim == 2 and a.shape[0] == a.shape[1] and not np.isnan(a[lower]).any() and np.isnan(a[~lower]).all():
        return summarize(a)
    return summarize_asynchronous(a)


STANDARD = "standard"
FIRST_EVALUATION = "first_evaluation"


def metric_definitions(task_order: str) -> str:
    """Which definitions a run's metrics use, decided by the scenario (never by the values):
    ``standard`` (DESIGN §5, the diagonal a[j][j] is a task's first evaluation) for a shared
    task order, ``first_evaluation`` (:func:`summarize_asynchronous`) for per-client orders."""
    return FIRST_EVALUATION if task_order == "per_client" else STANDARD


def missing_cells(matrix: Any, definitions: str = STANDARD) -> list[tuple[int, int]]:
    """Cells the definitions need but the matrix lacks (NaN): on or below the diagonal for
    ``standard``; from a task's first evaluation on for ``first_evaluation``. E.g. under the
    local protocol, a task that no evaluated client holds yet."""
    a = np.asarray(matrix, dtype=float)
    if definitions == FIRST_EVALUATION:
        out = []
        for j in range(a.shape[1]):
            finite = np.flatnonzero(np.isfinite(a[:, j]))
            if finite.size:
                out += [(int(k), j) for k in range(int(finite[0]), a.shape[0]) if not np.isfinite(a[k, j])]
        return out
    lower = np.tril(np.ones_like(a, dtype=bool))
    return [(int(k), int(j)) for k, j in np.argwhere(np.isnan(a) & lower)]


def summarize_partial(matrix: Any, definitions: str = STANDARD) -> dict[str, float]:
    """The four metrics under the given definitions, computed over the cells that exist.

    A complete matrix gives exactly :func:`summarize` (or :func:`summarize_asynchronous`).
    Where cells are missing (:func:`missing_cells`), each metric keeps its definition and
    leaves out what it cannot compute: ``A_k`` averages the row's existing cells, ``f_j`` needs
    ``a[T-1][j]`` and one earlier value, BWT needs ``a[T-1][j]`` and ``a[j][j]``. The definitions
    are never switched because of a missing cell; the count is reported next to the metrics."""
    a = np.asarray(matrix, dtype=float)
    if definitions == FIRST_EVALUATION:
        return summarize_asynchronous(a)
    if not missing_cells(a, STANDARD):
        return summarize(a)
    t = a.shape[0]
    with np.errstate(all="ignore"):
        rows = [float(np.nanmean(a[k, : k + 1])) for k in range(t) if np.isfinite(a[k, : k + 1]).any()]
        last = a[t - 1]
        forget, bwt = [], []
        for j in range(t - 1):
            earlier = a[j : t - 1, j]
            if np.isfinite(last[j]) and np.isfinite(earlier).any():
                forget.append(float(np.nanmax(earlier) - last[j]))
            if np.isfinite(last[j]) and np.isfinite(a[j, j]):
                bwt.append(float(last[j] - a[j, j]))
        final = a[t - 1, :t]
    return {
        "final_avg_accuracy": float(np.nanmean(final)) if np.isfinite(final).any() else math.nan,
        "avg_incremental_accuracy": float(np.mean(rows)) if rows else math.nan,
        "avg_forgetting": float(np.mean(forget)) if forget else math.nan,
        "bwt": float(np.mean(bwt)) if bwt else math.nan,
    }


def average_accuracy_curve(matrix: Any, definitions: str = STANDARD) -> np.ndarray:
    """``A_k`` for every row k, as the summary computes it (NaN for rows not reached): the mean
    of row k over tasks ``j <= k`` (standard) or over every task evaluated by then
    (first_evaluation, where columns are global task ids and rows federation steps)."""
    a = np.asarray(matrix, dtype=float)
    out = np.full(a.shape[0], math.nan)
    with np.errstate(all="ignore"):
        for k in range(a.shape[0]):
            row = a[k] if definitions == FIRST_EVALUATION else a[k, : k + 1]
            if np.isfinite(row).any():
                out[k] = float(np.nanmean(row))
    return out
