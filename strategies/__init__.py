"""Merging strategies, one module each (server merge rule + the client objective it needs).

``STRATEGIES`` maps a registry name to its strategy class; the class carries ``Params`` (the
pydantic schema of ``strategy.params``) and ``Objective`` (its client half).
"""

from __future__ import annotations

from .base import FederatedStrategy, RunInfo, StrategyParams
from .fedavg import FedAvg
from .fedproto import FedProto
from .fedsa import FedSA
from .fedtgp import FedTGP
from .finetune import Finetune
from .fpl import FPL
from .joint import Joint
from .local import Local
from .proto_avg import ProtoAvg

STRATEGIES: dict[str, type[FederatedStrategy]] = {
    cls.name: cls for cls in (ProtoAvg, FedAvg, FedProto, Finetune, Local, Joint, FedTGP, FedSA, FPL)
}

__all__ = ["STRATEGIES", "FederatedStrategy", "RunInfo", "StrategyParams"]
