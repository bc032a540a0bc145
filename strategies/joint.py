"""``joint``: the upper bound. One model is trained centrally on every task's training data at
once (all clients' samples pooled), with the same backbone, the same prototypical loss, the same
number of rounds and local epochs, and the same evaluation (nearest prototype over the classes
seen so far after each task). It runs as a single client (partition 0) that holds all the data;
nothing is communicated."""

from __future__ import annotations

from typing import ClassVar, Literal

from .base import FederatedStrategy, StrategyParams, Upload
from .local import LocalObjective


class Params(StrategyParams):
    pass


class JointObjective(LocalObjective):
    uses_continual: ClassVar[bool] = False
    data_scope: ClassVar[Literal["task", "all"]] = "all"


class Joint(FederatedStrategy):
    name = "joint"
    description = "upper bound: one model trained centrally on all tasks' data at once"
    Params = Params
    Objective = JointObjective

    def sample(self, server_round: int) -> list[int]:
        return [min(self.run.partitions)]

    def eval_partitions(self, server_round: int = 0) -> list[int]:
        return [min(self.run.partitions)]

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        return None
