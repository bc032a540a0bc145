"""Merging strategies, one module each (server merge rule + the client objective it needs).

``STRATEGIES`` maps a registry name to its strategy class; the class carries ``Params`` (the
pydantic schema of ``strategy.params``) and ``Objective`` (its client half). Other installed
packages add strategies through the ``protofed.strategies`` entry-point group (see
:mod:`simulator.plugins`); they join ``STRATEGIES`` the first time it is read.
"""

from __future__ import annotations

from simulator.plugins import STRATEGY_GROUP, PluginError, Registry

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
from .target import Target

BUILTIN_STRATEGIES: dict[str, type[FederatedStrategy]] = {
    cls.name: cls for cls in (ProtoAvg, FedAvg, FedProto, Finetune, Local, Joint, FedTGP, FedSA, FPL, Target)
}


def _check_plugin(name: str, obj: object) -> type[FederatedStrategy]:
    """A ``protofed.strategies`` entry point must load a FederatedStrategy subclass named like it."""
    from pydantic import BaseModel

    from simulator.objective import ClientObjective

    if not (isinstance(obj, type) and issubclass(obj, FederatedStrategy)):
        raise PluginError(f"expected a subclass of strategies.base.FederatedStrategy, got {obj!r}")
    if obj.name != name:
        raise PluginError(f"its class attribute name is {obj.name!r}; it must equal the entry point name {name!r}")
    if not (isinstance(obj.Params, type) and issubclass(obj.Params, BaseModel)):
        raise PluginError(f"{obj.__name__}.Params must be a pydantic model (e.g. a StrategyParams subclass)")
    if not (isinstance(obj.Objective, type) and issubclass(obj.Objective, ClientObjective)):
        raise PluginError(f"{obj.__name__}.Objective must be a simulator.objective.ClientObjective subclass")
    return obj


STRATEGIES: dict[str, type[FederatedStrategy]] = Registry(BUILTIN_STRATEGIES, STRATEGY_GROUP, "strategy", _check_plugin)


def strategy_registry() -> dict[str, type[FederatedStrategy]]:
    """``STRATEGIES`` with the installed plugin strategies loaded (once per process)."""
    return STRATEGIES.load_plugins()  # type: ignore[attr-defined]


__all__ = ["STRATEGIES", "BUILTIN_STRATEGIES", "FederatedStrategy", "RunInfo", "StrategyParams", "strategy_registry"]
