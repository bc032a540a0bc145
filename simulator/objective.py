"""The client half of a strategy: what it receives, what it adds to the loss, what it uploads.

The engine's client handler runs the one local training loop
(:func:`simulator.learner.training.train_local`) and asks the strategy's objective for:

* ``receive(global_arrays, model)`` - read the server's knowledge (prototypes, anchors, weights);
* ``train_loss`` - the task loss: "prototype" (prototypical loss), "head" (cross-entropy of a
  linear head over the seen classes) or "none" (the method's ``extra_loss`` alone); ``inference`` - "prototype" (nearest prototype) or "head";
* ``before_training(model, x, y)`` - look at the local data before training (e.g. local gaps);
* ``train_classes(seen)`` - the classes the head's cross-entropy ranges over (default: ``seen``);
* ``known_prototypes()`` - prototypes of other classes used by the prototypical loss;
* ``extra_loss(features, labels, model)`` - the method's own loss terms, added each batch;
* ``observe_embeddings(features, labels)`` - the client's training data embedded after training
  (not under a DP release), before ``upload``;
* ``upload(model, local_protos)`` - the ArrayRecord sent back (prototypes, weights, ...);
* ``inference_prototypes(local_protos)`` - the prototypes used at test time;
* ``open_world_score(features, seen_classes)`` - the method's own open-world score of embedded
  test samples (None: the engine's, :mod:`simulator.learner.open_world`);
* ``state_dict()`` / ``load_state_dict()`` - per-client state kept between rounds (in the client
  state store, next to the model weights).

Class attributes say how the engine treats the method: ``uses_continual`` (replay, distillation
and freezing apply), ``data_scope`` ("task": the client's data of its current task; "all": every
training sample of every task, for the centralised upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from pydantic import BaseModel

from .learner.backbones import ProtoModel
from .learner.prototypes import PrototypeSet
from .records import FROZEN_FLAG, has_weights, load_weights, protos_from_arrays, protos_to_arrays, weights_to_arrays


@dataclass(frozen=True)
class ClientInfo:
    partition_id: int
    num_classes: int
    embedding_dim: int  # the width of features and prototypes: model.feature_dim (2 x model.embedding_dim under model.aper)
    device: str


class ClientObjective:
    """Default behaviour: prototype classifier, global prototypes received and used, local
    prototypes uploaded, backbone weights shared when ``share_weights`` is set."""

    train_loss: ClassVar[Literal["prototype", "head", "none"]] = "prototype"
    inference: ClassVar[Literal["prototype", "head"]] = "prototype"
    uses_continual: ClassVar[bool] = True
    #: whether the client uploads prototypes (a head-only method such as FedAvg sends an empty
    #: prototype set: nothing its merge would ignore, and nothing a DP budget must pay for)
    uploads_prototypes: ClassVar[bool] = True
    data_scope: ClassVar[Literal["task", "all"]] = "task"

    def __init__(self, params: BaseModel, info: ClientInfo) -> None:
        self.params = params
        self.info = info
        self.global_protos: PrototypeSet | None = None
        self.backbone_frozen = False  # share_weights: first_task, after the first task

    @property
    def share_weights(self) -> bool:
        """Whether the client uploads its weights now (``first_task``: until the server freezes them)."""
        return bool(getattr(self.params, "share_weights", False)) and not self.backbone_frozen

    # ---- receiving
    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        self.global_protos = protos_from_arrays(arrays)
        self.backbone_frozen = FROZEN_FLAG in arrays
        if has_weights(arrays):
            load_weights(model, arrays)

    @classmethod
    def needs_head(cls) -> bool:
        return cls.train_loss == "head" or cls.inference == "head"

    @classmethod
    def adds_own_loss(cls) -> bool:
        """Whether the method adds loss terms of its own (``extra_loss`` or a ``before_batch``
        hook): arbitrary code on one model at a time, so its clients never train vectorised."""
        return cls.extra_loss is not ClientObjective.extra_loss or hasattr(cls, "before_batch")

    # ---- per-client state (kept in the client state store between rounds)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    # ---- training
    def before_training(self, model: ProtoModel, x: np.ndarray, y: np.ndarray) -> None:
        return None

    def train_classes(self, seen: list[int]) -> list[int]:
        """The classes the head's cross-entropy ranges over (after the continual mechanisms')."""
        return seen

    def known_prototypes(self) -> PrototypeSet | None:
        return self.global_protos

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        return None

    # ---- sending
    def observe_embeddings(self, features: torch.Tensor, labels: np.ndarray) -> None:
        return None

    def upload(self, model: ProtoModel, local_protos: PrototypeSet) -> dict[str, Array]:
        sent = local_protos if self.uploads_prototypes else PrototypeSet.empty(self.info.embedding_dim)
        out = dict(protos_to_arrays(sent))
        if self.share_weights:
            out.update(weights_to_arrays(model, include_head=self.inference == "head"))
        return out

    # ---- inference
    def open_world_score(self, features: torch.Tensor, seen_classes: list[int]) -> np.ndarray | None:
        return None

    def inference_prototypes(self, local_protos: PrototypeSet | None) -> PrototypeSet | None:
        """Global prototypes; a class the server does not know yet falls back to the local one."""
        if self.global_protos is None or len(self.global_protos) == 0:
            return local_protos
        if local_protos is None:
            return self.global_protos
        missing = local_protos.select([c for c in local_protos.classes if c not in set(self.global_protos.classes)])
        return self.global_protos.updated_with(missing)
