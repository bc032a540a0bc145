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
from .palm import PALM
from .proto_avg import ProtoAvg
from .target import Target

BUILTIN_STRATEGIES: dict[str, type[FederatedStrategy]] = {
    cls.name: cls for cls in (ProtoAvg, FedAvg, FedProto, Finetune, Local, Joint, FedTGP, FedSA, FPL, Target, PALM)
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


def nondefault_params(name: str, params: dict | None) -> str:
    """The parameters of a run that differ from its strategy's defaults, as a label reads them:
    ``share_weights`` (a flag turned on), ``no share_weights`` (turned off), ``lambda=0.5``;
    keys in order, ``""`` when every parameter is the default or the strategy is unknown."""
    cls = STRATEGIES.get(name)
    if cls is None or not params:
        return ""
    try:
        given = cls.Params(**params).model_dump(by_alias=True)
        defaults = cls.Params().model_dump(by_alias=True)
    except Exception:  # noqa: BLE001 - a label must never fail a run or a table; validation reports it elsewhere
        return ""
    parts = []
    for key in sorted(params):
        value, default = given.get(key), defaults.get(key)
        if value == default:
            continue
        if isinstance(value, bool):
            parts.append(key if value else f"no {key}")
        else:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def shown_label(label: str, params: object) -> str:
    """A run's label with its non-default parameters: ``proto_avg (share_weights)``."""
    text = "" if params is None or (isinstance(params, float) and params != params) else str(params).strip()
    return f"{label} ({text})" if text else str(label)


__all__ = ["nondefault_params", "shown_label", "STRATEGIES", "BUILTIN_STRATEGIES", "FederatedStrategy", "RunInfo", "StrategyParams", "strategy_registry"]
