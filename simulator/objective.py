"""The client half of a strategy: what it receives, what it adds to the loss, what it uploads.

The engine's client handler runs the one local training loop
(:func:`simulator.learner.training.train_local`) and asks the strategy's objective for:

* ``receive(global_arrays, model)`` - read the server's knowledge (prototypes, anchors, weights);
* ``classifier`` - "prototype" (nearest prototype) or "head" (linear head over seen classes);
* ``known_prototypes()`` - prototypes of other classes used by the prototypical loss;
* ``extra_loss(features, labels, model)`` - the method's own loss terms, added each batch;
* ``upload(model, local_protos)`` - the ArrayRecord sent back (prototypes, weights, ...);
* ``inference_prototypes(local_protos)`` - the prototypes used at test time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from flwr.app import Array, ArrayRecord
from pydantic import BaseModel

from .learner.backbones import ProtoModel
from .learner.prototypes import PrototypeSet
from .records import has_weights, load_weights, protos_from_arrays, protos_to_arrays, weights_to_arrays


@dataclass(frozen=True)
class ClientInfo:
    partition_id: int
    num_classes: int
    embedding_dim: int
    device: str


class ClientObjective:
    """Default behaviour: prototype classifier, global prototypes received and used, local
    prototypes uploaded, backbone weights shared when ``share_weights`` is set."""

    classifier: ClassVar[Literal["prototype", "head"]] = "prototype"
    # whether continual mechanisms (replay, distillation, freezing) apply to this method
    uses_continual: ClassVar[bool] = True

    def __init__(self, params: BaseModel, info: ClientInfo) -> None:
        self.params = params
        self.info = info
        self.global_protos: PrototypeSet | None = None

    @property
    def share_weights(self) -> bool:
        return bool(getattr(self.params, "share_weights", False))

    # ---- receiving
    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        self.global_protos = protos_from_arrays(arrays)
        if has_weights(arrays):
            load_weights(model, arrays)

    # ---- training
    def known_prototypes(self) -> PrototypeSet | None:
        return self.global_protos

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        return None

    # ---- sending
    def upload(self, model: ProtoModel, local_protos: PrototypeSet) -> dict[str, Array]:
        out = dict(protos_to_arrays(local_protos))
        if self.share_weights:
            out.update(weights_to_arrays(model, include_head=self.classifier == "head"))
        return out

    # ---- inference
    def inference_prototypes(self, local_protos: PrototypeSet | None) -> PrototypeSet | None:
        """Global prototypes; a class the server does not know yet falls back to the local one."""
        if self.global_protos is None or len(self.global_protos) == 0:
            return local_protos
        if local_protos is None:
            return self.global_protos
        missing = local_protos.select([c for c in local_protos.classes if c not in set(self.global_protos.classes)])
        return self.global_protos.updated_with(missing)
