"""``fedproto``: FedProto (Tan et al., AAAI 2022).

Server: each class's global prototype is the mean of the client prototypes of that class,
weighted by sample counts (``weighting: samples``, as the paper describes) or plain
(``uniform``, as the official code does). Classes not uploaded in a round keep their prototype,
so classes of earlier tasks stay known.

Client: cross-entropy of a local linear head (over the classes seen so far) plus
``lambda`` x MSE between each feature and the global prototype of its class. Inference: nearest
global prototype. Prototypes are computed after local training with the model in eval mode (the
official code averages them over batches while the model still changes).

``share_weights: true`` also FedAvg-averages the backbone (not the local head).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from pydantic import ConfigDict, Field

from simulator.learner.backbones import ProtoModel
from simulator.learner.prototypes import PrototypeSet, merge_class_means
from simulator.objective import ClientObjective

from .base import FederatedStrategy, ShareWeights, StrategyParams, Upload


class Params(StrategyParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(1.0, alias="lambda", ge=0.0, le=1e6, description="weight of the MSE pull to the global prototype")
    weighting: Literal["samples", "uniform"] = Field("samples", description="merge weighted by sample counts (paper) or uniform (official code)")
    share_weights: ShareWeights = Field(False, description="also FedAvg the backbone weights each round; first_task: only during the first task, then the backbone is frozen and only prototypes travel")


def prototype_lookup(objective: ClientObjective, device: str, protos: PrototypeSet | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A ``[num_classes, D]`` table of ``protos`` (default: the received global prototypes) and a
    mask of the classes that have one (None when there are none)."""
    protos = objective.global_protos if protos is None else protos
    if protos is None or len(protos) == 0:
        return None
    table = torch.zeros(objective.info.num_classes, protos.dim, device=device)
    mask = torch.zeros(objective.info.num_classes, dtype=torch.bool, device=device)
    idx = torch.as_tensor(protos.classes, device=device)
    table[idx] = torch.as_tensor(protos.vectors, device=device)
    mask[idx] = True
    return table, mask


def mse_to_prototypes(features: torch.Tensor, labels: torch.Tensor, lookup) -> torch.Tensor | None:
    """Mean squared error between each feature and the prototype of its class (samples whose
    class has no prototype yet are left out)."""
    if lookup is None:
        return None
    table, mask = lookup
    sel = mask[labels]
    if not bool(sel.any()):
        return None
    return F.mse_loss(features[sel], table[labels[sel]])


class Objective(ClientObjective):
    """Local head cross-entropy + ``lambda`` x MSE to the received prototype of each sample's
    class; inference by the nearest received prototype. Reused by methods that differ only on
    the server (FedTGP)."""

    train_loss: ClassVar[Literal["prototype", "head"]] = "head"
    inference: ClassVar[Literal["prototype", "head"]] = "prototype"

    def __init__(self, params, info) -> None:
        super().__init__(params, info)
        self._lookup = None

    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        super().receive(arrays, model)
        self._lookup = prototype_lookup(self, self.info.device)

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        mse = mse_to_prototypes(features, labels, self._lookup)
        return None if mse is None else self.params.lambda_ * mse


class FedProto(FederatedStrategy):
    name = "fedproto"
    description = "FedProto: mean of client prototypes; local head CE + lambda * MSE to global prototypes"
    Params = Params
    Objective = Objective

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        merged = merge_class_means([u.protos for u in uploads if u.protos is not None], self.params.weighting)
        self.global_protos = self.global_protos.updated_with(merged)
        if self.shares_weights:
            self.merge_weights(uploads)
