"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017), ``continual.lwf``.

``L = L_task + weight * KD_T(old model, new model)`` on the current task's data, where the KD
compares the distributions over the **old classes** (learned before the task) only:

* head-based strategies (fedavg, ...): the head's logits restricted to the old classes;
  ``fedavg`` + ``lwf`` is FedLwF;
* prototype-based strategies: the "logits" are the negative squared distances of the features
  to the old classes' prototypes (the prototypes the client knows when the task starts, kept fixed
  for the task), i.e. the classifier the prototype loss trains; "similarity to old prototypes".

While LwF is on and old classes exist, the cross-entropy of head-based strategies ranges over the
current task's classes only (plus the classes of the replay memory, if any), as in the original
method and PyCIL (``cross_entropy(logits[:, known:], targets - known)``): the old classes are kept
by the distillation alone. With a cross-entropy over every seen class, the new data push every old
logit down while the distillation (which only sees the old classes' relative logits) cannot
stop it, and LwF does nothing in class-incremental learning (measured: identical to finetune).

The old model is the client's model when it meets the task (for weight-sharing strategies, the
global model after the previous task), as in FedLwF implementations. Defaults (weight 1,
temperature 2) are the original paper's; PyCIL uses lamda 3. Deviation: KL divergence instead of
PyCIL's cross-entropy (same gradients; zero when the model has not changed); one shared head over
all classes (as PyCIL) rather than the paper's multi-head setting.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import ProtoModel
from ..prototypes import squared_distances
from .base import ContinualPlugin, OldOutputs, TaskData, kl_distillation, narrow, narrowed_ce_classes


class LwF(ContinualPlugin):
    name = "lwf"
    needs_old_model = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0) -> None:
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.old_classes: list[int] = []
        self.old_protos: torch.Tensor | None = None
        self.ce_classes: list[int] | None = None  # head-based: the classes the cross-entropy keeps

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        self.old_classes = sorted(int(c) for c in data.old_classes)
        self.ce_classes = narrowed_ce_classes(data)
        old = data.old_prototypes()
        self.old_protos = None if old is None else torch.as_tensor(old.vectors, dtype=torch.float32)

    def extra_loss(self, features, labels, logits, model, old: OldOutputs | None) -> torch.Tensor | None:
        if old is None or not self.old_classes or self.weight == 0:
            return None
        if logits is not None and old.logits is not None:
            idx = torch.as_tensor(self.old_classes, device=logits.device)
            return self.weight * kl_distillation(old.logits[:, idx], logits[:, idx], self.temperature)
        if self.old_protos is None or len(self.old_protos) < 2:
            return None  # one old class: a distribution over one class carries nothing
        p = self.old_protos.to(features.device)
        return self.weight * kl_distillation(-squared_distances(old.features, p), -squared_distances(features, p), self.temperature)

    def train_classes(self, seen: list[int]) -> list[int]:
        return seen if self.weight == 0 else narrow(seen, self.ce_classes)

    def state_dict(self) -> dict[str, Any]:
        return {"old_classes": list(self.old_classes), "old_protos": self.old_protos, "ce_classes": self.ce_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_classes = list(state.get("old_classes", []))
        self.old_protos = state.get("old_protos")
        self.ce_classes = state.get("ce_classes")
