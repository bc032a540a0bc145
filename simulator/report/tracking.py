"""Experiment tracking (optional extras): TensorBoard event files and MLflow runs.

``output.tensorboard: true`` writes ``<run dir>/tensorboard/`` (``pip install 'protofed[tensorboard]'``;
``tensorboard --logdir results`` shows every run). ``output.mlflow: {tracking_uri, experiment}``
logs one MLflow run per protofed run (``pip install 'protofed[mlflow]'``; a local
``sqlite:///mlflow.db`` store needs no server).

Both receive the same things: the resolved scenario (TensorBoard: as text; MLflow: as
parameters, one per dotted key), per round (step = ``global_round``, counted from 1 like Flower's
server round) the average accuracy over the evaluated tasks under both protocols, the accuracy
on each task, the training loss and the bytes sent each way, and at the end the summary's numbers.
Rows are handed over at the end of every task (and when the run stops), from the recorder's
rows; the training loop itself knows nothing of either library.

MLflow also gets the run's files as artifacts when the run ends, after its plots are drawn:
every file under ``<run dir>/plots/`` (artifact path ``plots``, skipped when the run draws no
plots) and ``summary.json``, ``accuracy_matrix.csv`` and ``config.yaml`` (artifact root). They go
to the experiment's artifact location: with a ``sqlite:///`` store, MLflow's default is
``./mlruns`` of the working directory the experiment was created in. Each process of a run
(``--resume`` included) logs one MLflow run, so files are never logged twice into one; logging a
file again would replace it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..errors import UserError

PER_ROUND = ("train_loss", "bytes_up", "bytes_down")
FINAL_KEYS = (
    "final_avg_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt",
    "local_final_avg_accuracy", "local_avg_incremental_accuracy", "local_avg_forgetting", "local_bwt",
    "global_final_avg_accuracy", "global_avg_incremental_accuracy", "global_avg_forgetting", "global_bwt",
    "open_world_auroc", "open_world_fpr95",
    "bytes_up", "bytes_down", "bytes_per_round", "wall_seconds",
)
ROOT_ARTIFACTS = ("summary.json", "accuracy_matrix.csv", "config.yaml")  # MLflow artifacts besides plots/


def check_available(scenario: Any, source: str) -> None:
    """A clear error before anything runs when a requested tracker's package is missing."""
    import importlib.util

    out = scenario.output
    if out.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError.single(source, "output.tensorboard", "needs the tensorboard package: pip install 'protofed[tensorboard]'")
    if out.mlflow is not None and importlib.util.find_spec("mlflow") is None:
        raise UserError.single(source, "output.mlflow", "needs the mlflow package: pip install 'protofed[mlflow]'")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """A nested mapping as ``{"clients.partition.alpha": "0.5", ...}`` (lists as their text)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(data)
    return out


def round_metrics(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """Recorder rows (one per round and evaluated task) -> (global_round, {tag: value}) per round."""
    rounds: dict[int, dict[str, Any]] = {}
    for r in rows:
        step = int(r["global_round"])
        entry = rounds.setdefault(step, {"acc": [], "local": [], "row": r})
        acc = r.get("accuracy")
        if acc is not None and not (isinstance(acc, float) and math.isnan(acc)):
            entry["acc"].append((int(r["eval_task"]), float(acc)))
            loc = r.get("local_accuracy")
            if loc is not None and not math.isnan(float(loc)):
                entry["local"].append(float(loc))
    out = []
    for step in sorted(rounds):
        e = rounds[step]
        values: dict[str, float] = {}
        for key in PER_ROUND:
            v = e["row"].get(key)
            if v is not None and math.isfinite(float(v)):
                values[key if key != "train_loss" else "loss/train"] = float(v)
        if e["acc"]:
            values["accuracy/avg_seen_tasks"] = sum(a for _, a in e["acc"]) / len(e["acc"])
            for j, a in e["acc"]:
                values[f"accuracy/task_{j}"] = a
        if e["local"]:
            values["local_accuracy/avg_seen_tasks"] = sum(e["local"]) / len(e["local"])
        values = {k.replace("bytes_up", "bytes/up").replace("bytes_down", "bytes/down"): v for k, v in values.items()}
        out.append((step, values))
    return out


class Trackers:
    """The trackers a scenario asks for; ``log_rows`` takes the recorder's rows so far (only new
    rounds are sent), ``finish`` the summary."""

    def __init__(self, scenario: Any, resolved: dict[str, Any], run_dir: Path) -> None:
        self.sent = 0  # global rounds already logged
        self.run_dir = Path(run_dir)
        self.tb = None
        self.ml = None
        out = scenario.output
        if out.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            import yaml

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            text = yaml.safe_dump(resolved, sort_keys=False)
            self.tb.add_text("scenario", "```\n" + text + "\n```", global_step=0)
        if out.mlflow is not None:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            self.ml = MlflowClient(tracking_uri=out.mlflow.tracking_uri)
            name = out.mlflow.experiment or scenario.name
            exp = self.ml.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.ml.create_experiment(name)
            label = Path(run_dir).parent.name if Path(run_dir).name.startswith("seed-") else scenario.strategy.name
            run = self.ml.create_run(
                exp_id,
                run_name=f"{scenario.name}/{label}/seed-{scenario.seed}",
                tags={"protofed.run_dir": str(run_dir), "protofed.strategy": scenario.strategy.name, "protofed.label": label},
            )
            self.ml_run = run.info.run_id
            params = [Param(k, v[:6000]) for k, v in flatten(resolved).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.ml.log_batch(self.ml_run, params=params[i : i + 100])

    def log_rows(self, rows: list[dict[str, Any]]) -> None:
        new = [(s, v) for s, v in round_metrics(rows) if s > self.sent]
        if not new:
            return
        if self.tb is not None:
            for step, values in new:
                for tag, v in values.items():
                    self.tb.add_scalar(tag, v, global_step=step)
            self.tb.flush()
        if self.ml is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(tag, v, now, step) for step, values in new for tag, v in values.items()]
            for i in range(0, len(metrics), 1000):
                self.ml.log_batch(self.ml_run, metrics=metrics[i : i + 1000])
        self.sent = max(s for s, _ in new)

    def artifacts(self, plots: bool = True) -> list[tuple[Path, str | None]]:
        """(file, MLflow artifact path) for the run directory's files that MLflow gets: every
        file under ``plots/`` (with ``plots``) and the root files that exist."""
        out: list[tuple[Path, str | None]] = []
        folder = self.run_dir / "plots"
        if plots and folder.is_dir():
            for f in sorted(folder.rglob("*")):
                if f.is_file():
                    out.append((f, Path("plots", f.relative_to(folder)).parent.as_posix()))
        out += [(self.run_dir / name, None) for name in ROOT_ARTIFACTS if (self.run_dir / name).is_file()]
        return out

    def finish(self, summary: dict[str, Any], completed: bool, plots: bool = True) -> None:
        """The summary's numbers; MLflow also the run's files (the plots only with ``plots``: call
        this after they are drawn), then the MLflow run ends."""
        final = {}
        for k in FINAL_KEYS:
            v = summary.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                final[k] = float(v)
        if self.tb is not None:
            for k, v in final.items():
                self.tb.add_scalar(f"summary/{k}", v, global_step=0)
            self.tb.close()
        if self.ml is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            try:
                self.ml.log_batch(self.ml_run, metrics=[Metric(f"summary.{k}", v, now, 0) for k, v in final.items()])
                for path, artifact_path in self.artifacts(plots):
                    self.ml.log_artifact(self.ml_run, str(path), artifact_path)
            finally:  # a failed upload still ends the MLflow run (the caller reports the error)
                self.ml.set_terminated(self.ml_run, status="FINISHED" if completed else "FAILED")
