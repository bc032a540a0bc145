"""Collects what the server loop measures: per-round rows, the accuracy matrices (global and
local protocol), per-client accuracies, bytes, and prints progress."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
from flwr.app import MetricRecord

from ..records import METRICS
from .failures import INJECTED, KINDS, WORKER_DIED, Failure, error_signature


@dataclass
class EvalScores:
    """Accuracies of one evaluation pass on the global tasks ``eval_tasks``."""

    eval_tasks: list[int]
    global_acc: np.ndarray  # [len(eval_tasks)] mean over clients
    local_acc: np.ndarray  # [len(eval_tasks)] mean over clients holding the task's classes (NaN: nobody)
    per_client: list[dict[str, Any]]
    open_world: dict[str, float] = field(default_factory=dict)  # OPEN_WORLD_KEYS -> mean over clients (NaN: none)


#: open-world metrics a client's evaluate reply may carry (absent: it gives no value)
OPEN_WORLD_KEYS = ("open_world_auroc", "open_world_fpr95")


def open_world_means(replies: list[MetricRecord]) -> dict[str, float]:
    """Each open-world metric averaged over the clients that reported a finite value (NaN when
    none did: no evaluation of the open world, nothing left unknown, or no client could score)."""
    out = {}
    for key in OPEN_WORLD_KEYS:
        v = np.array([float(m[key]) for m in replies if key in m], dtype=np.float64)
        v = v[np.isfinite(v)]
        out[key] = float(v.mean()) if v.size else np.nan
    return out


def score_evaluation(
    replies: list[MetricRecord],
    tasks: list[list[int]],
    eval_tasks: list[int],
    learned: dict[int, set[int]] | None = None,
) -> EvalScores:
    """Turn per-client, per-class counts into the two protocols' accuracies (DESIGN §5 and the
    docs/metrics.md): global = each client on the global test set of every seen task, averaged over
    clients; local = each client on the test samples of the classes in its own training data so
    far, weighted by its own class frequencies, averaged over the clients that hold the task.

    ``learned`` (``evaluation.population: learned``): client -> the tasks it has learned; then
    column j averages only over the clients that have learned task j (per-client rows keep
    every client)."""
    replies = sorted(replies, key=lambda m: int(m["partition_id"]))
    g = np.zeros((len(replies), len(eval_tasks)))
    loc = np.full((len(replies), len(eval_tasks)), np.nan)
    rows = []
    for i, m in enumerate(replies):
        correct = np.asarray(m["correct"], dtype=np.float64)
        total = np.asarray(m["total"], dtype=np.float64)
        counts = np.asarray(m["train_counts"], dtype=np.float64)
        for col, j in enumerate(eval_tasks):
            cls = np.asarray(tasks[j])
            tot = total[cls].sum()
            g[i, col] = correct[cls].sum() / tot if tot > 0 else np.nan
            w = counts[cls]
            held = (w > 0) & (total[cls] > 0)
            if held.any():
                acc_c = correct[cls][held] / total[cls][held]
                loc[i, col] = float((w[held] * acc_c).sum() / w[held].sum())
            rows.append(
                {
                    "client": int(m["partition_id"]),
                    "eval_task": j,
                    "accuracy": g[i, col],
                    "local_accuracy": loc[i, col],
                }
            )
    if learned is not None:
        pids = [int(m["partition_id"]) for m in replies]
        for col, j in enumerate(eval_tasks):
            outside = np.array([j not in learned.get(p, set()) for p in pids], dtype=bool)
            g[outside, col] = np.nan
            loc[outside, col] = np.nan
    with np.errstate(all="ignore"):
        local_mean = np.array(
            [np.nanmean(loc[:, c]) if np.isfinite(loc[:, c]).any() else np.nan for c in range(len(eval_tasks))]
        )
        global_mean = np.array(
            [np.nanmean(g[:, c]) if np.isfinite(g[:, c]).any() else np.nan for c in range(len(eval_tasks))]
        )
    return EvalScores(list(eval_tasks), global_mean, local_mean, rows, open_world_means(replies))


def slowest_client_seconds(compute: list[float], replies: list[Any]) -> float:
    """``max_client_seconds`` of a round: the largest ``compute_seconds`` of the replies, or NaN
    when some client of the round trained vectorised (``resources.vectorize``: its cohort took
    one joint step and each member's ``compute_seconds`` holds an equal share of it, so no
    member's own time was measured). ``client_seconds``, their sum, stays the measured total."""
    vectorized = any(int(r.content[METRICS].get("vectorized", 0))  # client_app.VECTORIZED
                     for r in replies if r.has_content() and METRICS in r.content)
    return float("nan") if vectorized else max(compute, default=0.0)


@dataclass
class RunRecorder:
    num_tasks: int
    rounds_per_task: int
    num_clients: int
    out: TextIO | None = field(default_factory=lambda: sys.stdout)
    rows: list[dict[str, Any]] = field(default_factory=list)
    client_rows: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    eval_bytes: int = 0
    secagg_bytes_up: int = 0  # SecAgg+ protocol traffic (keys, shares), apart from the payload (bytes_up/down)
    secagg_bytes_down: int = 0
    privacy_releases: dict[int, int] = field(default_factory=dict)  # client -> rounds it released DP statistics
    privacy_sgd_steps: dict[int, int] = field(default_factory=dict)  # client -> DP-SGD steps it took
    tasks_done: int = 0
    started: float = field(default_factory=time.time)
    failures: list[Failure] = field(default_factory=list)
    shown_errors: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.matrix = np.full((self.num_tasks, self.num_tasks), np.nan)
        self.local_matrix = np.full((self.num_tasks, self.num_tasks), np.nan)
        self.open_world = np.full((self.num_tasks, len(OPEN_WORLD_KEYS)), np.nan)  # per task, after its last round

    _STATE_FIELDS = (
        "rows", "client_rows", "bytes_up", "bytes_down", "eval_bytes", "tasks_done", "matrix", "local_matrix",
        "failures", "shown_errors", "privacy_releases",
        "privacy_sgd_steps", "secagg_bytes_up", "secagg_bytes_down", "open_world",
    )

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._STATE_FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # fields a checkpoint of an earlier version lacks keep their fresh values
        for k in self._STATE_FIELDS:
            if k in state:
                setattr(self, k, state[k])

    def say(self, text: str) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)

    def record_failure(self, failure: Failure, traceback_text: str = "") -> None:
        """Keep a failed reply for ``failures.csv``; the first error of each kind of message is
        printed with its traceback (also without ``--verbose``): an unexpected failure is a
        finding, not noise."""
        self.failures.append(failure)
        if failure.kind == INJECTED:
            return
        sig = f"{failure.kind}:{error_signature(failure.message)}"
        if sig in self.shown_errors:
            return
        self.shown_errors.add(sig)
        what = "its worker process died" if failure.kind == WORKER_DIED else "an error that no fault injection caused"
        self.say(
            f"warning: client {failure.client} failed in the {failure.phase} phase of global round "
            f"{failure.global_round} ({what}; tried {failure.attempts}x): {failure.message}"
        )
        if traceback_text:
            self.say("  " + traceback_text.replace("\n", "\n  "))
        self.say("  (each failure is listed in failures.csv; later failures with this message are not printed)")

    def failure_counts(self) -> dict[str, int]:
        return {kind: sum(1 for f in self.failures if f.kind == kind) for kind in KINDS}

    def record_round(
        self,
        task: int,
        rnd: int,
        server_round: int,
        train: dict[str, Any],
        scores: EvalScores | None,
        seconds: float,
    ) -> None:
        base = {
            "task": task,
            "round": rnd,
            "global_round": server_round,
            "clients_trained": train.get("clients_ok", 0),
            "clients_failed": train.get("clients_failed", 0),
            "clients_failed_injected": train.get("clients_failed_injected", 0),
            "clients_failed_unexpected": train.get("clients_failed_unexpected", 0),
            "clients_idle": train.get("clients_idle", 0),
            "clients_evaluated": train.get("clients_evaluated", 0),
            "clients_eval_failed": train.get("clients_eval_failed", 0),
            "train_loss": train.get("train_loss", np.nan),
            "bytes_up": train.get("bytes_up", 0),
            "bytes_down": train.get("bytes_down", 0),
            "seconds": round(seconds, 4),
            "train_seconds": round(train.get("train_seconds", 0.0), 4),
            "client_seconds": round(train.get("client_seconds", 0.0), 4),
            "max_client_seconds": round(train.get("max_client_seconds", 0.0), 4),
            "eval_seconds": round(train.get("eval_seconds", 0.0), 4),
            "context_state_bytes": int(train.get("context_state_bytes", 0)),
        }
        no_open_world = dict.fromkeys(OPEN_WORLD_KEYS, np.nan)
        if scores is None:
            self.rows.append({**base, "eval_task": np.nan, "accuracy": np.nan, "local_accuracy": np.nan, **no_open_world})
        else:
            for col, j in enumerate(scores.eval_tasks):
                self.rows.append(
                    {
                        **base,
                        "eval_task": j,
                        "accuracy": float(scores.global_acc[col]),
                        "local_accuracy": float(scores.local_acc[col]),
                        **no_open_world, **scores.open_world,
                    }
                )
            for r in scores.per_client:
                self.client_rows.append({"task": task, "round": rnd, "global_round": server_round, **r})
            if rnd == self.rounds_per_task - 1:
                self.matrix[task, scores.eval_tasks] = scores.global_acc
                self.local_matrix[task, scores.eval_tasks] = scores.local_acc
                self.open_world[task] = [scores.open_world.get(k, np.nan) for k in OPEN_WORLD_KEYS]
        acc = f" · acc {np.nanmean(scores.global_acc):.3f}" if scores is not None else ""
        loss = train.get("train_loss")
        loss_s = f" · loss {loss:.3f}" if loss is not None and np.isfinite(loss) else ""
        notes = []
        if train.get("clients_failed_injected", 0):
            notes.append(f"{train['clients_failed_injected']} dropped out")
        if train.get("clients_failed_unexpected", 0):
            notes.append(f"{train['clients_failed_unexpected']} FAILED, see failures.csv")
        if train.get("clients_idle", 0):
            notes.append(f"{train['clients_idle']} took no training step")
        if train.get("clients_eval_failed", 0):
            notes.append(f"{train['clients_eval_failed']} FAILED to evaluate")
        fail_s = f" ({', '.join(notes)})" if notes else ""
        self.say(
            f"task {task + 1}/{self.num_tasks} · round {rnd + 1}/{self.rounds_per_task} · "
            f"{train.get('clients_ok', 0)}/{train.get('clients_sampled', 0)} clients{fail_s}{loss_s}{acc} · "
            f"{seconds:.1f}s"
        )
        if rnd == self.rounds_per_task - 1:
            self.tasks_done = task + 1
