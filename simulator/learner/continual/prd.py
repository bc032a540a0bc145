"""Prototype-Sample Relation Distillation (Asadi et al., ICML 2023), ``continual.prd``.

Official code (``naderAsadi/Probing-Continual-Learning`` methods/repe.py, ``RePE.process_inc``):
``SupCon_tau(two augmented views) + prototypes_coef * L_p + distill_coef * L_d``, where ``L_p =
mean(1 - cos(h.detach(), p_y))`` learns the current task's prototypes and
``L_d = sum over old tasks t of KL(softmax(s_old^t / T) || softmax(s_new^t / T))``
(``relation_distillation_loss``: one softmax and one ``KLDivLoss(batchmean)`` per old task, summed),
``s_c = <h, p_c> / ||p_c||`` (features not normalised) over the prototypes of task ``t``; no
replay. Official parser defaults (utils/parser.py): supcon_temperature 0.2, distill_temp 2,
distill_coef 1, prototypes_coef 1, prototypes_lr 0.01. The command in docs/strategies.md for the paper's
Figure 2 uses supcon_temperature 0.1, distill_coef 4, prototypes_coef 2, distill_temp 1.

protofed's version, on the one training loop of every strategy:

* ``weight * SupCon_tau(features, labels)``, ``tau = temperature`` (default 0.2), on L2-normalised
  features;
* ``distill_weight * sum_t KL(softmax(s_old^t / T) || softmax(s_new^t / T))``, ``T =
  distill_temperature`` (default 2), ``s_c = <h, p_c> / ||p_c||`` as the official code, one
  softmax per old task over the prototypes of that task's classes (the old classes grouped by the
  stream's tasks, :attr:`.base.TaskData.old_tasks`; a task with one class adds 0, as officially);
* the prototype term is the strategy's own task loss.

Deviations from the official code:

* one view (the other samples of the class in the batch are the positives; an anchor without a
  positive is left out), and SupCon on the embedding itself: protofed has no augmentation
  pipeline for 1-D signals and no projection head;
* prototypes: protofed's are class means (the strategy's prototypes, federated), not vectors
  learned with ``L_p``; the old prototypes are the ones the client knows when the task starts and
  are the same on both sides of the KL (officially, the new side uses the current, still trainable,
  prototypes of old tasks and the old side the copy saved at the end of the previous task);
* the old model (the client's model when it meets the task: for weight-sharing strategies the
  global model) runs in eval mode; the official copy runs in train mode (BatchNorm batch
  statistics);
* the coefficient of SupCon is a parameter (``weight``, officially fixed at 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backbones import ProtoModel
from .base import ContinualPlugin, OldOutputs, TaskData, kl_distillation


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "L_out") with one view per sample."""
    z = F.normalize(features, dim=1)
    sim = z @ z.T / float(temperature)
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    n_pos = pos.sum(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return features.sum() * 0.0
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(1)[valid] / n_pos[valid]
    return -mean_log_prob_pos.mean()


class PRD(ContinualPlugin):
    name = "prd"
    needs_old_model = True

    def __init__(self, weight: float = 1.0, temperature: float = 0.2, distill_weight: float = 1.0,
                 distill_temperature: float = 2.0) -> None:
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        self.old_protos: torch.Tensor | None = None
        self.groups: list[list[int]] = []  # rows of old_protos, one list per old task
        self._fixed: tuple | None = None  # (device, old_protos / their norms, group index tensors): per task

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        old = data.old_prototypes()
        self.old_protos = None if old is None else torch.as_tensor(old.vectors, dtype=torch.float32)
        self.groups = []
        if old is not None:
            row = {int(c): i for i, c in enumerate(old.classes)}
            self.groups = [[row[c] for c in t if c in row] for t in data.old_tasks]
            self.groups = [g for g in self.groups if g]
        self._fixed = None

    def relation_loss(self, features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor | None:
        """``sum_t KL(softmax(s_old^t / T) || softmax(s_new^t / T))`` over the old tasks."""
        if self.old_protos is None or not self.groups:
            return None
        if self._fixed is None or self._fixed[0] != features.device:  # the same for every batch of a task
            p = self.old_protos.to(features.device)
            scaled = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self._fixed = (features.device, scaled, [torch.as_tensor(g, device=features.device) for g in self.groups])
        _, scaled, groups = self._fixed
        s_new, s_old = features @ scaled.T, old_features @ scaled.T
        total = features.new_zeros(())
        for idx in groups:
            total = total + kl_distillation(s_old[:, idx], s_new[:, idx], self.distill_temperature)
        return total

    def extra_loss(self, features, labels, logits, model, old: OldOutputs | None) -> torch.Tensor | None:
        loss = None
        if self.weight != 0:
            loss = self.weight * supcon_loss(features, labels, self.temperature)
        if old is not None and self.distill_weight != 0:
            rel = self.relation_loss(features, old.features)
            if rel is not None:
                loss = self.distill_weight * rel if loss is None else loss + self.distill_weight * rel
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"old_protos": self.old_protos, "groups": self.groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_protos = state.get("old_protos")
        self.groups = list(state.get("groups", []))
        self._fixed = None
