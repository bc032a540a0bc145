"""Online Elastic Weight Consolidation (Kirkpatrick et al. 2017; online form of Schwarz et al.
2018), ``continual.ewc``.

At the end of each of its tasks the client estimates the diagonal empirical Fisher of its task
loss on its own data of that task and accumulates it: ``F <- F + F_task`` (online EWC with decay
1), and the anchor becomes the parameters at that moment: ``theta* <- theta``. Every batch of a
later task adds ``(weight / 2) * sum_i F_i (theta_i - theta*_i)^2``. ``fedavg`` + ``ewc`` is FedEWC.

As PyCIL: empirical Fisher = squared gradients of the batch-mean loss with the true labels,
averaged over the batches, clamped at 1e-4 (which is what makes its default lamda 1000 sensible);
PyCIL averages old and new Fisher by task counts, here they are summed (online EWC, decay 1).
The task loss is the client's own (head cross-entropy over the classes seen then, or the
prototypical loss), so EWC composes with every strategy. Deviations: the Fisher is computed with
the model in eval mode (BatchNorm uses, and does not update, its running statistics), and with the
model the client holds when it meets its next task (for weight-sharing strategies, the global
model after the last round of the finished task: the federated anchor).
"""

from __future__ import annotations

from typing import Any

import torch

from ..backbones import ProtoModel
from .base import ContinualPlugin, OldOutputs, TaskData

FISHER_MAX = 1e-4  # PyCIL's clamp


class EWC(ContinualPlugin):
    name = "ewc"

    def __init__(self, weight: float = 1000.0) -> None:
        self.weight = float(weight)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

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
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))


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
