"""Continual-learning mechanisms as plugins on the one local training loop.

One module per mechanism (:mod:`.lwf`, :mod:`.ewc`, :mod:`.prd`, :mod:`.teen`, OnPro's OPE and
APF in :mod:`.onpro`; exemplar choice
in :mod:`.memory`), each a :class:`~.base.ContinualPlugin`. :func:`build_stack` composes the
mechanisms a scenario's ``continual:`` section turns on into a :class:`ContinualStack`, which is
the only thing the client handler talks to: it calls :meth:`ContinualStack.task_change` when the
client meets a new task, passes the stack to ``train_local`` as a loss hook, lets it change the
prototypes used for prediction at evaluation (:meth:`~ContinualStack.inference_prototypes`;
never the uploaded ones), and keeps its
:meth:`~ContinualStack.state_dict` in the client state store. Strategies whose objective has
``uses_continual = False`` (``finetune``) get an empty stack.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch

from ..backbones import ProtoModel
from ..prototypes import PrototypeSet
from ..training import head_loss, prototypical_loss
from .base import ContinualPlugin, OldOutputs, TaskData
from .ewc import EWC
from .lwf import LwF
from .memory import herding_order, select_memory
from .onpro import APF, OPE
from .prd import PRD
from .teen import TEEN

# scenario key under ``continual:`` -> plugin class (built with that section's fields as keywords)
MECHANISMS: dict[str, type[ContinualPlugin]] = {"lwf": LwF, "ewc": EWC, "prd": PRD, "ope": OPE, "apf": APF, "teen": TEEN}


class ContinualStack:
    """The mechanisms of one client, called in a fixed order, plus the task-start model that
    distilling mechanisms compare with (kept once for all of them)."""

    def __init__(self, plugins: Sequence[ContinualPlugin] = ()) -> None:
        self.plugins = list(plugins)
        self.old_state: dict[str, torch.Tensor] | None = None
        self._old_model: ProtoModel | None = None
        self._old: OldOutputs | None = None

    def __bool__(self) -> bool:
        return bool(self.plugins)

    @property
    def needs_old_model(self) -> bool:
        return any(p.needs_old_model for p in self.plugins)

    # ---- task boundaries
    def task_change(self, model: ProtoModel, ended: TaskData | None, started: TaskData) -> None:
        """``on_task_end`` of the task just left (if any), then ``on_task_start`` of the new one."""
        if ended is not None:
            for p in self.plugins:
                p.on_task_end(model, ended)
        self.old_state = None
        if self.needs_old_model and started.old_classes:
            self.old_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for p in self.plugins:
            p.on_task_start(model, started)

    # ---- the training loop's hooks
    def prepare(self, model: ProtoModel, device: str | torch.device, seed: int = 0) -> None:
        """Build the task-start model for this training call (before ``train_local``) and tell
        every mechanism that the call starts (``seed``: the call's own)."""
        for p in self.plugins:
            p.before_training(model, seed)
        self._old_model = None
        if self.old_state is not None:
            old = copy.deepcopy(model)
            old.load_state_dict(self.old_state)
            old.to(device).eval()
            for p in old.parameters():
                p.requires_grad_(False)
            self._old_model = old

    def before_batch(self, inputs: torch.Tensor) -> None:
        for p in self.plugins:
            p.before_batch(inputs)
        self._old = None
        if self._old_model is not None:
            with torch.no_grad():
                f = self._old_model(inputs)
                logits = self._old_model.head(f) if self._old_model.head is not None else None
            self._old = OldOutputs(f, logits)

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        if not self.plugins:
            return None
        logits = model.head(features) if model.head is not None else None
        total = None
        for p in self.plugins:
            extra = p.extra_loss(features, labels, logits, model, self._old)
            if extra is not None:
                total = extra if total is None else total + extra
        return total

    def inference_prototypes(self, protos: PrototypeSet | None, base_classes: Sequence[int]) -> PrototypeSet | None:
        """The prototypes prediction uses (post hoc, e.g. TEEN): ``protos`` changed by every
        mechanism in turn; ``base_classes``: the classes of the stream's first task."""
        if protos is None:
            return None
        base = [int(c) for c in base_classes]
        for p in self.plugins:
            protos = p.inference_prototypes(protos, base)
        return protos

    def replay(self, model: ProtoModel, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator,
               device: str | torch.device) -> tuple[np.ndarray, np.ndarray] | None:
        """The memory samples an online round replays, as the first mechanism that chooses them
        (APF) makes them from the memory ``(x, y)``; None: the uniform draw."""
        for p in self.plugins:
            chosen = p.replay(model, x, y, size, rng, device)
            if chosen is not None:
                return chosen
        return None

    def train_classes(self, seen: Sequence[int]) -> list[int]:
        """The classes the head's cross-entropy ranges over (the seen ones unless a mechanism narrows them)."""
        out = [int(c) for c in seen]
        for p in self.plugins:
            out = p.train_classes(out)
        return out

    # ---- client state store
    def state_dict(self) -> dict[str, Any]:
        return {"old_state": self.old_state, "plugins": {p.name: p.state_dict() for p in self.plugins}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.old_state = state.get("old_state")
        saved = state.get("plugins", {})
        for p in self.plugins:
            if p.name in saved:
                p.load_state_dict(saved[p.name])


def build_stack(cfg: Any, uses_continual: bool, state: dict[str, Any] | None = None) -> ContinualStack:
    """The mechanisms that ``cfg`` (the scenario's ``continual`` section) turns on, in the order
    of :data:`MECHANISMS`, with their saved state; empty for strategies that ignore them."""
    plugins: list[ContinualPlugin] = []
    if uses_continual:
        for key, cls in MECHANISMS.items():
            section = getattr(cfg, key, None)
            if section is not None:
                plugins.append(cls(**section.model_dump()))
    stack = ContinualStack(plugins)
    stack.load_state_dict(state)
    return stack


def task_loss(kind: str, seen_classes: Sequence[int], num_classes: int, known: PrototypeSet | None):
    """The client's task loss as a function of ``(features, labels, model)`` (for EWC's Fisher):
    the head's cross-entropy over ``seen_classes``, or the prototypical loss with ``known``."""

    def loss(features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor:
        if kind == "head":
            assert model.head is not None
            mask = torch.zeros(num_classes, dtype=torch.bool, device=features.device)
            mask[torch.as_tensor(list(seen_classes), dtype=torch.int64, device=features.device)] = True
            return head_loss(model.head(features), labels, mask)
        kv = kc = None
        if known is not None and len(known) > 0:
            kv = torch.as_tensor(known.vectors, device=features.device)
            kc = torch.as_tensor(known.classes, device=features.device)
        return prototypical_loss(features, labels, kv, kc)

    return loss


def task_data(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[int],
    seen_classes: Sequence[int],
    num_classes: int,
    prototypes: PrototypeSet | None,
    kind: str,
    device: str | torch.device,
    batch_size: int,
    memory_classes: Sequence[int] = (),
    task_classes: Sequence[Sequence[int]] = (),
) -> TaskData:
    """A :class:`TaskData` for one client and task: the old classes are the seen ones that are
    not the task's own, grouped by the task of ``task_classes`` (the stream's classes per task)
    that holds them (old classes in none of them: one last group; no ``task_classes``: one group)."""
    own = {int(c) for c in classes}
    seen = sorted({int(c) for c in seen_classes} | own)
    old = [c for c in seen if c not in own]
    groups = [[c for c in old if c in {int(k) for k in t}] for t in task_classes]
    rest = [c for c in old if not any(c in g for g in groups)]
    return TaskData(
        x=x,
        y=y,
        classes=sorted(own),
        old_classes=old,
        prototypes=prototypes,
        loss_fn=task_loss(kind, seen, num_classes, prototypes),
        device=device,
        batch_size=batch_size,
        head=kind == "head",
        memory_classes=sorted(int(c) for c in memory_classes),
        old_tasks=[g for g in groups if g] + ([rest] if rest else []),
    )


__all__ = [
    "MECHANISMS",
    "ContinualPlugin",
    "ContinualStack",
    "OldOutputs",
    "TaskData",
    "build_stack",
    "herding_order",
    "select_memory",
    "task_data",
    "task_loss",
]
