"""Online Elastic Weight Consolidation (Kirkpatrick et al. 2017; online form of Schwarz et al.
2018), ``continual.ewc``.

At the end of each of its tasks the client estimates the diagonal empirical Fisher of its task
loss on its own data of that task and accumulates it: ``F <- F + F_task`` (online EWC with decay
1), and the anchor becomes the parameters at that moment: ``theta* <- theta``. Every batch of a
later task adds ``(weight / 2) * sum_i F_i (theta_i - theta*_i)^2``. ``fedavg`` + ``ewc`` is FedEWC.

While old classes exist, the head's cross-entropy ranges over the current task's classes only
(plus the replay memory's, if any), as PyCIL's ``cross_entropy(logits[:, known:], targets -
known)`` and as our LwF (:func:`.base.narrowed_ce_classes`): the old classes' logits are kept by
the penalty alone. With a cross-entropy over every seen class, the new data push every old logit
down, which a penalty on the weights cannot stop (fcil_baselines_mnist1d: forgetting 0.865 with it,
see docs/strategies.md "FCIL baselines").

Compared line by line with PyCIL ``models/ewc.py`` (``getFisherDiagonal``, ``compute_ewc``,
``_update_representation``). The same: the Fisher is the mean over the task's batches of the
squared gradient of the batch-mean cross-entropy over every class known at the end of the task
(not narrowed), with the true labels; clamped elementwise at ``fishermax`` 1e-4
(``torch.min``); penalty ``lamda * sum F (theta - theta*)^2 / 2`` with lamda 1000, added from the
second task on; the anchor is the parameters at the task's end. Deviations:

* merge: PyCIL averages the old and the new Fisher, ``alpha F_old + (1 - alpha) F_new`` with
  ``alpha = known / total`` classes (the new classes' head rows get ``F_new`` alone); here they are
  summed (online EWC, decay 1), so a parameter's Fisher can reach ``k * 1e-4`` after ``k`` tasks.
  Measured on fcil_baselines_mnist1d, seed 0, label fedewc, inline (PyCIL's merge patched into
  ``on_task_end`` for the measurement): final accuracy 0.221, forgetting 0.225 with PyCIL's
  average against 0.182, 0.237 with the sum;
* mode: PyCIL computes the Fisher in train mode (BatchNorm uses batch statistics and updates its
  running ones); here in eval mode (running statistics, left unchanged);
* data order: PyCIL's shuffled, augmented loader with batch 128; here the task's samples in order,
  no augmentation, the training batch size;
* when and which model: PyCIL right after training the task; here when the client meets its next
  task, with the model it holds then (for weight-sharing strategies the global model after the
  last round of the finished task: the federated anchor), on the client's own data of the task;
* one head of fixed size over every class of the stream (PyCIL grows it): rows of classes not yet
  seen get no gradient, so their Fisher is 0 and they are not held;
* the task loss is the client's own, so EWC also composes with prototype strategies (their
  prototypical loss); the narrowing applies to head-based ones.
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import ProtoModel
from .base import ContinualPlugin, OldOutputs, TaskData, narrow, narrowed_ce_classes

FISHER_MAX = 1e-4  # PyCIL's clamp


class EWC(ContinualPlugin):
    name = "ewc"

    def __init__(self, weight: float = 1000.0) -> None:
        self.weight = float(weight)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.ce_classes: list[int] | None = None  # head-based: the classes the cross-entropy keeps

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        self.ce_classes = narrowed_ce_classes(data)

    def train_classes(self, seen: list[int]) -> list[int]:
        return seen if self.weight == 0 else narrow(seen, self.ce_classes)

    def on_task_end(self, model: ProtoModel, data: TaskData) -> None:
        if len(data.y) == 0:
            return
        new = empirical_fisher(model, data)
        for k, f in new.items():
            self.fisher[k] = self.fisher[k] + f if k in self.fisher else f
        self.anchor = {k: p.detach().cpu().clone() for k, p in model.named_parameters()}

    def extra_loss(self, features, labels, logits, model, old: OldOutputs | None) -> torch.Tensor | None:
        if not self.fisher or self.weight == 0:
            return None
        total = features.new_zeros(())
        for k, p in model.named_parameters():
            f = self.fisher.get(k)
            if f is None or not p.requires_grad:
                continue
            a = self.anchor[k].to(p.device)
            total = total + (f.to(p.device) * (p - a) ** 2).sum()
        return 0.5 * self.weight * total

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor, "ce_classes": self.ce_classes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))
        self.ce_classes = state.get("ce_classes")


def empirical_fisher(model: ProtoModel, data: TaskData) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over batches (in order) of the squared gradient of the
    batch-mean task loss, clamped at :data:`FISHER_MAX`. Leaves the model's weights, gradients
    and running statistics as they were."""
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    fisher = {k: torch.zeros_like(p, device="cpu") for k, p in params.items()}
    x = torch.as_tensor(data.x, dtype=torch.float32, device=data.device)
    y = torch.as_tensor(data.y, dtype=torch.int64, device=data.device)
    batches = 0
    for start in range(0, len(y), data.batch_size):
        xb, yb = x[start : start + data.batch_size], y[start : start + data.batch_size]
        model.zero_grad(set_to_none=True)
        loss = data.loss_fn(model(xb), yb, model)
        if not loss.requires_grad:
            continue
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach().cpu() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    for k, p in params.items():
        p.requires_grad_(flags[k])
    model.train(was_training)
    return {k: (f / max(batches, 1)).clamp_max(FISHER_MAX) for k, f in fisher.items()}
