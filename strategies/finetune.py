"""``finetune``: FedAvg of backbone + head with every continual mechanism switched off (no
replay, no distillation, no freezing): the lower bound that shows how much a federation forgets
when nothing protects old classes."""

from __future__ import annotations

from typing import ClassVar

from .fedavg import FedAvg, HeadObjective


class Objective(HeadObjective):
    uses_continual: ClassVar[bool] = False


class Finetune(FedAvg):
    name = "finetune"
    description = "FedAvg that ignores every continual mechanism (lower bound)"
    Objective = Objective
