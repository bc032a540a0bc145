"""A finished run's last evaluation, repeated after the fact from what it saved (``output.save``,
see :mod:`simulator.engine.final_state`): the data stream rebuilt from ``config.yaml`` (the
same deterministic :func:`~simulator.data.stream.build_stream` the run used), each client's
final model and client-side state from ``final/clients/<id>.pt``, the global state from
``final/global.npz``, and the ClientApp's inference rule
(:func:`~simulator.learner.evaluation.client_predict`). The clients counted in each task's
mean and the averaging are those of the run's evaluation (:func:`server_app.evaluation_subset`,
``evaluation.population``, :func:`recorder.score_evaluation`), so the means equal the last row
of ``accuracy_matrix.csv``.

Behind ``RunResult.test_split``, ``RunResult.partitions`` and ``RunResult.evaluate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from flwr.app import Array, ArrayRecord

from ..data.stream import FederatedStream
from ..errors import UserError
from ..learner import continual as mechanisms
from ..learner.backbones import build_model
from ..learner.evaluation import client_predict, per_class_correct
from ..objective import ClientInfo, ClientObjective
from ..records import WEIGHT_PREFIX, frozen_views, protos_from_arrays, stats_from_arrays
from ..scenario import Scenario, validate_scenario
from ..seeding import derive_seed
from ..learner.frozen_features import FrozenFeatures
from .recorder import score_evaluation
from .runtime import classifier_projection

GIVEN_MODEL = -1  # the ``client`` of the rows that evaluate a model passed in


def recorded_scenario(run_dir: Path) -> Scenario:
    """The scenario a run directory recorded in ``config.yaml``, validated again."""
    from ..study.run_dirs import read_recorded

    path = Path(run_dir) / "config.yaml"
    return validate_scenario(read_recorded(path), str(path))


def global_record(run_dir: Path) -> ArrayRecord:
    """``final/global.npz`` as the record the server sent to the clients."""
    path = Path(run_dir) / "final" / "global.npz"
    if not path.is_file():
        raise UserError.single(str(path), "output.save",
                               "the final global state was not saved (the run used output.save: none, or did not finish)")
    with np.load(path) as z:
        return ArrayRecord({k: Array(np.ascontiguousarray(z[k])) for k in z.files})


def saved_client(run_dir: Path, client: int) -> dict[str, Any]:
    """``final/clients/<id>.pt`` (``output.save: clients``), read on the CPU."""
    path = Path(run_dir) / "final" / "clients" / f"{int(client)}.pt"
    if not path.is_file():
        raise UserError.single(str(path), "output.save",
                               "no saved client model: the run kept only the global state or nothing "
                               "(set output.save: clients in the scenario and run it again)")
    return torch.load(path, map_location="cpu", weights_only=False)


def model_from_saved(saved: dict[str, Any], norm: str):
    """The client's final model (eval mode, CPU), built as the run built it (``model.norm``)."""
    with_head = any(k.startswith("head.") for k in saved["model"])
    model = build_model(saved["backbone"], saved["input_shape"], saved["embedding_dim"], saved["num_classes"],
                        with_head, 0, norm=norm, aper=bool(saved.get("aper", False)))
    model.load_state_dict(saved["model"])
    model.eval()
    return model


@dataclass
class FinalEvaluation:
    """What one repetition of the run's last evaluation needs, built once."""

    run_dir: Path
    scenario: Scenario
    stream: FederatedStream
    device: str = "cpu"

    def __post_init__(self) -> None:
        from strategies import STRATEGIES

        self.strategy_cls = STRATEGIES[self.scenario.strategy.name]
        self.params = self.strategy_cls.Params.model_validate(self.scenario.strategy.params)
        self.arrays = global_record(self.run_dir)
        last = self.stream.num_tasks - 1
        self.eval_tasks = self.stream.seen_tasks(last)
        self.seen = self.stream.seen_classes_at(last)
        idx = np.concatenate([self.stream.test_indices[t] for t in self.eval_tasks])
        self.x, self.y = self.stream.dataset.x_test[idx], self.stream.dataset.y_test[idx]
        self.projection = classifier_projection(self.scenario)
        # a frozen backbone's features as the run computed them (one canonical pass, bit for bit)
        self.cache = (FrozenFeatures(self.stream.dataset.x_train, self.stream.dataset.x_test)
                      if self.scenario.continual.backbone == "frozen" else None)

    # ------------------------------------------------------------------ who was evaluated
    def evaluated_clients(self) -> list[int]:
        """The clients the run evaluated after its last round, as ``final/evaluation.json``
        recorded them; for a run saved without that file, every present client or the subset
        ``evaluation.clients`` drew (refused for a strategy that chooses its own)."""
        import json

        from strategies.base import FederatedStrategy

        from .final_state import EVALUATION_FILE
        from .server_app import evaluation_subset

        path = self.run_dir / "final" / EVALUATION_FILE
        if path.is_file():
            return [int(c) for c in json.loads(path.read_text(encoding="utf-8"))["clients"]]
        if self.strategy_cls.eval_partitions is not FederatedStrategy.eval_partitions:
            raise UserError.single(str(path), "output.save",
                                   f"strategy {self.scenario.strategy.name!r} chooses the clients it evaluates, and this "
                                   "run (saved by an older protofed) did not record them; run it again to evaluate it")
        present = self.stream.present(self.stream.num_tasks - 1)
        subset = evaluation_subset(self.scenario, self.stream)
        keep = None if subset is None else set(subset)
        return [p for p in present if keep is None or p in keep]

    def saved_clients(self) -> list[int]:
        folder = self.run_dir / "final" / "clients"
        return sorted(int(p.stem) for p in folder.glob("*.pt")) if folder.is_dir() else []

    def learned(self) -> dict[int, set[int]] | None:
        """``evaluation.population: learned``: client -> the tasks it counts in (None: all)."""
        from .server_app import learned_tasks_of

        if self.scenario.evaluation.population == "all":
            return None
        f = learned_tasks_of(self.scenario, self.stream, self.strategy_cls.Objective.data_scope)
        last = self.stream.num_tasks - 1
        return {p: f(p, last) for p in range(self.scenario.clients.num_clients)}

    # ------------------------------------------------------------------ one client
    def _fresh_model(self, client: int):
        """The model of a client that never trained: the run's initial weights (as Runtime.new_model)."""
        s, data = self.scenario, self.stream.dataset
        backbone = s.model.backbone_of(client)
        pretrained = None
        if s.model.pretrained is not None:
            from ..learner.backbones import read_pretrained

            pretrained = read_pretrained(s.model.pretrained, backbone)
        return build_model(backbone, data.input_shape, s.model.embedding_dim, data.num_classes,
                           self.strategy_cls.Objective.needs_head(), derive_seed(s.seed, "model_init"),
                           norm=s.model.norm, pretrained=pretrained, aper=s.model.aper)

    def _objective(self, client: int, state: dict[str, Any]):
        info = ClientInfo(client, self.stream.dataset.num_classes, self.scenario.model.feature_dim, self.device)
        objective = self.strategy_cls.Objective(self.params, info)
        objective.load_state_dict(state)
        return objective

    def _counts(self, client: int, model, objective, arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray]:
        """Per-class correct and total counts on every seen task's test samples, as the
        ClientApp's ``evaluate`` handler computes them."""
        objective.receive(arrays, model)
        pred = client_predict(
            model, self.x, objective, seen_classes=self.seen,
            continual=mechanisms.build_stack(self.scenario.continual, self.strategy_cls.Objective.uses_continual),
            base_classes=self.stream.tasks[0], device=self.device,
            second_order=self.scenario.model.classifier, stats=stats_from_arrays(arrays),
            projection=self.projection, cache=self.cache,
        )
        return per_class_correct(pred, self.y, self.stream.dataset.num_classes)

    def client_reply(self, client: int, trained: bool) -> dict[str, Any]:
        """One client's evaluation reply (``partition_id``, ``correct``, ``total``, ``train_counts``)."""
        num_classes = self.stream.dataset.num_classes
        if trained:
            saved = saved_client(self.run_dir, client)
            self._check_state_saved(saved)
            model = model_from_saved(saved, self.scenario.model.norm)
            state, counts = saved.get("objective") or {}, np.asarray(saved["class_counts"])
            arrays = frozen_views(self.arrays)[1] if saved.get("frozen_backbone") else self.arrays
        else:  # evaluated by the run with its initial model and a fresh client state
            model, state, counts, arrays = self._fresh_model(client), {}, np.zeros(num_classes, np.int64), self.arrays
        correct, total = self._counts(client, model.to(self.device), self._objective(client, state), arrays)
        return {"partition_id": client, "correct": correct, "total": total, "train_counts": counts}

    def _check_state_saved(self, saved: dict[str, Any]) -> None:
        """Client files written before the client-side state was saved cannot repeat the
        evaluation of a method whose test-time prototypes live in that state."""
        obj = self.strategy_cls.Objective
        needs_state = obj.inference == "prototype" and obj.inference_prototypes is not ClientObjective.inference_prototypes
        if "objective" not in saved and needs_state:
            raise UserError.single(
                str(self.run_dir / "final" / "clients"), "output.save",
                f"strategy {self.scenario.strategy.name!r} classifies with prototypes kept in each client's own state, "
                "which this run's client files do not hold (they were written by an older protofed); run it again "
                "with output.save: clients to evaluate its clients",
            )

    # ------------------------------------------------------------------ tables
    def rows(self, replies: list[dict[str, Any]], counted: list[int]) -> pd.DataFrame:
        """Tidy rows (client, eval_task, correct, total, accuracy, in_mean) from the replies;
        ``in_mean``: the row counts in the run's mean of its task (``counted`` clients, and the
        ``evaluation.population`` rule)."""
        scores = score_evaluation(replies, self.stream.tasks, self.eval_tasks)
        learned = self.learned()
        by_client = {int(r["partition_id"]): r for r in replies}
        out = []
        for row in scores.per_client:
            c, j = int(row["client"]), int(row["eval_task"])
            cls = np.asarray(self.stream.tasks[j])
            r = by_client[c]
            out.append({
                "client": c, "eval_task": j,
                "correct": int(np.asarray(r["correct"])[cls].sum()), "total": int(np.asarray(r["total"])[cls].sum()),
                "accuracy": float(row["accuracy"]),
                "in_mean": c in counted and (learned is None or j in learned.get(c, set())),
            })
        return pd.DataFrame(out, columns=["client", "eval_task", "correct", "total", "accuracy", "in_mean"])

    def clients_table(self, clients: list[int] | None = None) -> pd.DataFrame:
        """The run's last evaluation, client by client: every client it evaluated (those that
        never trained with their initial model, as the run did) and every other saved client;
        ``clients`` narrows it."""
        evaluated, saved = self.evaluated_clients(), set(self.saved_clients())
        if not saved:
            saved_client(self.run_dir, evaluated[0] if evaluated else 0)  # raises: names output.save
        wanted = sorted(set(evaluated) | saved) if clients is None else list(clients)
        replies = [self.client_reply(c, c in saved) for c in wanted]
        return self.rows(replies, evaluated)

    def model_table(self, model: torch.nn.Module) -> pd.DataFrame:
        """A model given by the caller (inputs -> embeddings), classified with the run's final
        global prototypes (and its second-order classifier and continual calibration)."""
        protos = protos_from_arrays(self.arrays)
        if protos is None or len(protos) == 0:
            raise UserError.single(
                "model=", "model",
                f"the run's final global state holds no prototypes (strategy {self.scenario.strategy.name!r} "
                "shares none): give a client id to evaluate a saved client with the run's own rule",
            )
        arrays = ArrayRecord({k: v for k, v in self.arrays.items() if not k.startswith(WEIGHT_PREFIX)})
        params = next(iter(model.parameters()), None)
        device = params.device if params is not None else torch.device("cpu")
        with torch.no_grad():
            was_training = model.training
            out = model(torch.as_tensor(self.x[:1], dtype=torch.float32, device=device))
            model.train(was_training)
        dim = self.scenario.model.feature_dim
        if out.ndim != 2 or out.shape[1] != dim:
            raise UserError.single("model=", "model", f"the model maps an input to shape {tuple(out.shape[1:])}; "
                                   f"the run's prototypes have {dim} dimensions (model.embedding_dim, doubled by model.aper)")
        info = ClientInfo(GIVEN_MODEL, self.stream.dataset.num_classes, dim, str(device))
        objective = ClientObjective(self.params, info)
        objective.receive(arrays, model)
        pred = client_predict(
            model, self.x, objective, seen_classes=self.seen,
            continual=mechanisms.build_stack(self.scenario.continual, self.strategy_cls.Objective.uses_continual),
            base_classes=self.stream.tasks[0], device=device,
            second_order=self.scenario.model.classifier, stats=stats_from_arrays(arrays),
            projection=self.projection, cache=self.cache,
        )
        correct, total = per_class_correct(pred, self.y, self.stream.dataset.num_classes)
        reply = {"partition_id": GIVEN_MODEL, "correct": correct, "total": total,
                 "train_counts": np.zeros(self.stream.dataset.num_classes, np.int64)}
        return self.rows([reply], counted=[])


@dataclass(frozen=True)
class TestSplit:
    """Test samples of some tasks, in task order, as the run's evaluation reads them: inputs
    ``x``, labels ``y``, the ``task`` that introduced each label, and ``index``, each sample's
    row in the dataset's test arrays."""

    x: np.ndarray
    y: np.ndarray
    task: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def test_split_of(stream: FederatedStream, tasks: list[int]) -> TestSplit:
    """The test samples of ``tasks`` (the stream's ``test_indices``)."""
    idx = [np.asarray(stream.test_indices[t], dtype=np.int64) for t in tasks]
    flat = np.concatenate(idx) if idx else np.zeros(0, np.int64)
    task = np.concatenate([np.full(len(i), t, np.int64) for t, i in zip(tasks, idx)]) if idx else flat
    return TestSplit(stream.dataset.x_test[flat], stream.dataset.y_test[flat].astype(np.int64), task, flat)


def partitions_frame(stream: FederatedStream, tasks: list[int]) -> pd.DataFrame:
    """One row per training sample a client receives: ``task, client, index, label``."""
    rows = []
    for t in tasks:
        for client, idx in enumerate(stream.train_indices[t]):
            idx = np.asarray(idx, dtype=np.int64)
            rows.append(pd.DataFrame({"task": t, "client": client, "index": idx,
                                      "label": stream.dataset.y_train[idx].astype(np.int64)}))
    cols = ["task", "client", "index", "label"]
    return pd.concat(rows, ignore_index=True)[cols] if rows else pd.DataFrame(columns=cols)
