"""``local``: no communication. Each client trains alone with the prototypical loss on its own
stream (continual mechanisms apply) and classifies with its own prototypes; it is still tested
on the global test set of every class the federation has seen, so classes it never met count
as errors. The gap to the federated strategies is what federation buys."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord

from simulator.learner.backbones import ProtoModel
from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientObjective

from .base import FederatedStrategy, StrategyParams, Upload


class Params(StrategyParams):
    pass


class LocalObjective(ClientObjective):
    """Keeps its own prototypes in the client state and sends nothing."""

    def __init__(self, params, info) -> None:
        super().__init__(params, info)
        self.local: PrototypeSet | None = None

    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        self.global_protos = None

    def known_prototypes(self) -> PrototypeSet | None:
        return self.local

    def upload(self, model: ProtoModel, local_protos: PrototypeSet) -> dict[str, Array]:
        self.local = local_protos if self.local is None else self.local.updated_with(local_protos)
        return {}

    def inference_prototypes(self, local_protos: PrototypeSet | None) -> PrototypeSet | None:
        return self.local

    def state_dict(self) -> dict[str, Any]:
        if self.local is None:
            return {}
        return {"classes": self.local.classes, "vectors": self.local.vectors, "counts": self.local.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.local = PrototypeSet(state["classes"], state["vectors"], state["counts"])


class Local(FederatedStrategy):
    name = "local"
    description = "no communication: each client learns alone, tested on the global test set"
    Params = Params
    Objective = LocalObjective

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        return None
