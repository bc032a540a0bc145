"""``proto_median``: a template for a protofed strategy with both of its halves.

Server half (:class:`ProtoMedian`): each class's global prototype is the coordinate-wise median
of the prototypes the clients uploaded for that class (robust to a few outlying clients); a
class that nobody uploaded this round keeps its prototype.

Client half (:class:`Objective`): the cross-entropy of a local head plus ``pull`` x the mean
squared distance between each feature and the received prototype of its class; prediction by the
nearest received prototype.

A strategy module defines three things: ``Params`` (its ``strategy.params``, validated), an
``Objective`` (what a client adds to the one training loop) and the server class with ``merge``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientObjective
from strategies.base import FederatedStrategy, StrategyParams, Upload


class Params(StrategyParams):
    pull: float = Field(1.0, ge=0.0, le=100.0, description="weight of the pull towards the received prototypes")


class Objective(ClientObjective):
    """Local head cross-entropy + ``pull`` x MSE to the received prototype of each sample's class."""

    train_loss: ClassVar[Literal["prototype", "head"]] = "head"
    inference: ClassVar[Literal["prototype", "head"]] = "prototype"

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model) -> torch.Tensor | None:
        protos = self.global_protos
        if protos is None or len(protos) == 0:
            return None
        table = torch.zeros(self.info.num_classes, protos.dim, device=features.device)
        known = torch.zeros(self.info.num_classes, dtype=torch.bool, device=features.device)
        idx = torch.as_tensor(protos.classes, device=features.device)
        table[idx] = torch.as_tensor(protos.vectors, device=features.device)
        known[idx] = True
        sel = known[labels]
        if not bool(sel.any()):
            return None
        return self.params.pull * F.mse_loss(features[sel], table[labels[sel]])


def median_prototypes(sets: list[PrototypeSet]) -> PrototypeSet | None:
    """Per class, the coordinate-wise median of the clients' prototypes; counts are summed."""
    by_class: dict[int, list[tuple[np.ndarray, int]]] = {}
    for s in sets:
        if s is None:
            continue
        for c, v, n in zip(s.classes, s.vectors, s.counts):
            by_class.setdefault(int(c), []).append((v, int(n)))
    if not by_class:
        return None
    classes = sorted(by_class)
    vectors = np.stack([np.median(np.stack([v for v, _ in by_class[c]]), axis=0) for c in classes])
    counts = [sum(n for _, n in by_class[c]) for c in classes]
    return PrototypeSet(np.asarray(classes, dtype=np.int64), vectors.astype(np.float32), np.asarray(counts, dtype=np.int64))


class ProtoMedian(FederatedStrategy):
    name = "proto_median"
    description = "template plugin: coordinate-wise median of client prototypes; head CE + pull to them"
    Params = Params
    Objective = Objective

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        merged = median_prototypes([u.protos for u in uploads])
        if merged is not None:
            self.global_protos = self.global_protos.updated_with(merged)
