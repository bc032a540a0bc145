"""``fedavg``: FedAvg of the whole model (backbone + linear head over all classes), trained with
cross-entropy over the classes seen so far and evaluated with the head's argmax over them.

The usual lower bound for federated class-incremental learning: nothing but the replay memory
(if ``continual.memory_per_class`` is set) protects old classes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from simulator.objective import ClientObjective

from .base import FederatedStrategy, StrategyParams, Upload


class Params(StrategyParams):
    pass


class HeadObjective(ClientObjective):
    train_loss: ClassVar[Literal["prototype", "head"]] = "head"
    inference: ClassVar[Literal["prototype", "head"]] = "head"
    uploads_prototypes: ClassVar[bool] = False  # the merge uses the weights alone

    @property
    def share_weights(self) -> bool:
        return True


class FedAvg(FederatedStrategy):
    name = "fedavg"
    description = "FedAvg of backbone + linear head, cross-entropy (lower bound)"
    Params = Params
    Objective = HeadObjective

    @classmethod
    def weight_sharing(cls, params) -> bool:
        return True

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        self.merge_weights(uploads)
