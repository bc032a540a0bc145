"""The plugin shape every continual mechanism follows (Avalanche-style hooks on the one loop).

A mechanism is an object with

* ``on_task_start(model, data)`` - the client meets a new task (``data``: its training data of
  that task, the classes learned before it, the prototypes known then, ...);
* ``extra_loss(features, labels, logits, model, old)`` - a term added to every batch's loss
  (``logits``: the head's outputs, None for head-less methods; ``old``: the outputs of the model
  as it was at the start of the task on the same batch, or None), may return None;
* ``on_task_end(model, data)`` - the client leaves a task (called with the data of that task
  when it meets the next one, and the model it has then: for weight-sharing strategies the
  global model after the last round of the finished task);
* ``inference_prototypes(protos, base_classes)`` - may change the prototypes used for prediction
  at evaluation (TEEN), never the ones uploaded or trained towards;
* ``train_classes(seen)`` - may narrow the classes the head's cross-entropy ranges over (LwF,
  EWC: :func:`narrowed_ce_classes`);
* ``before_training(model, seed)`` - a training call (one round) starts; ``seed`` is that call's
  own, for mechanisms that draw random numbers (OPE's second view);
* ``before_batch(inputs)`` - the inputs of the batch whose features ``extra_loss`` gets next (OPE
  runs the model on a second view of them);
* ``replay(model, x, y, size, rng, device)`` - may choose the memory samples an online round
  replays (APF): returns ``(x, y)`` of ``size`` rows made from the memory ``(x, y)``, or None to
  keep the uniform draw;
* ``state_dict()`` / ``load_state_dict()`` - kept in the client state store between rounds.

``old`` is the one deviation from DESIGN's four-argument ``extra_loss``: distillation needs the
previous model's outputs on the current batch, and computing them once for every mechanism that
needs them (LwF, PRD) is cheaper than letting each keep its own copy of the old model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..backbones import ProtoModel
from ..prototypes import PrototypeSet


@dataclass
class TaskData:
    """What a mechanism may look at when a task starts or ends on one client."""

    x: np.ndarray  # the client's training samples of the task
    y: np.ndarray
    classes: list[int]  # the classes of the task
    old_classes: list[int]  # classes learned by the federation before the task
    prototypes: PrototypeSet | None  # the prototypes the client knows at this moment (None: head-only methods)
    loss_fn: Callable[[torch.Tensor, torch.Tensor, ProtoModel], torch.Tensor]  # the client's task loss
    device: str | torch.device = "cpu"
    batch_size: int = 32
    head: bool = False  # the strategy trains a linear head with cross-entropy
    memory_classes: list[int] = field(default_factory=list)  # classes in the client's replay memory
    old_tasks: list[list[int]] = field(default_factory=list)  # old_classes grouped by the task that brought them
    extra: dict[str, Any] = field(default_factory=dict)

    def old_prototypes(self) -> PrototypeSet | None:
        """The known prototypes of the classes learned before this task (None if there are none)."""
        if self.prototypes is None or len(self.prototypes) == 0 or not self.old_classes:
            return None
        old = self.prototypes.select(self.old_classes)
        return old if len(old) else None


@dataclass
class OldOutputs:
    """The task-start model's outputs on the current batch (no gradients)."""

    features: torch.Tensor
    logits: torch.Tensor | None


class ContinualPlugin:
    """Base class: every hook does nothing."""

    name: ClassVar[str] = ""
    needs_old_model: ClassVar[bool] = False

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        return None

    def extra_loss(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor | None,
        model: ProtoModel,
        old: OldOutputs | None,
    ) -> torch.Tensor | None:
        return None

    def on_task_end(self, model: ProtoModel, data: TaskData) -> None:
        return None

    def before_training(self, model: ProtoModel, seed: int) -> None:
        return None

    def before_batch(self, inputs: torch.Tensor) -> None:
        return None

    def replay(self, model: ProtoModel, x: np.ndarray, y: np.ndarray, size: int, rng: np.random.Generator,
               device: str | torch.device) -> tuple[np.ndarray, np.ndarray] | None:
        return None

    def inference_prototypes(self, protos: PrototypeSet, base_classes: list[int]) -> PrototypeSet:
        return protos

    def train_classes(self, seen: list[int]) -> list[int]:
        return seen

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def narrowed_ce_classes(data: TaskData) -> list[int] | None:
    """The classes a head's cross-entropy keeps while old classes exist: the task's own plus
    those of the replay memory, as PyCIL's ``cross_entropy(logits[:, known:], targets - known)``
    (LwF, EWC); None (no narrowing) for head-less strategies and for the first task."""
    if not data.head or not data.old_classes:
        return None
    return sorted({int(c) for c in data.classes} | {int(c) for c in data.memory_classes})


def narrow(seen: list[int], ce_classes: list[int] | None) -> list[int]:
    """``seen`` restricted to ``ce_classes`` (unchanged when there is no narrowing)."""
    if ce_classes is None:
        return seen
    keep = set(ce_classes)
    return [c for c in seen if c in keep]


def kl_distillation(old_logits: torch.Tensor, new_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(old / T) || softmax(new / T))``, averaged over the batch.

    PyCIL's LwF uses the cross-entropy ``-sum softmax(old/T) log_softmax(new/T)`` (no T^2). The
    KL divergence differs from it by the teacher's entropy, a constant: the gradients are the
    same, and the loss is exactly zero when the model has not changed."""
    t = float(temperature)
    p_old = torch.softmax(old_logits / t, dim=1)
    return (p_old * (torch.log_softmax(old_logits / t, dim=1) - torch.log_softmax(new_logits / t, dim=1))).sum(1).mean()
