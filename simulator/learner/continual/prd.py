"""Prototype-Sample Relation Distillation (Asadi et al., ICML 2023), ``continual.prd``.

Official recipe (``naderAsadi/Probing-Continual-Learning`` methods/repe.py): supervised
contrastive representation learning (two augmented views, temperature tau), prototypes learned
for the current task's classes (``mean(1 - cos(h.detach(), p_y))``), and the distillation of the
relation between the current samples and the old prototypes:
``sum KL(softmax(s_old / T) || softmax(s_new / T))`` with ``s_c = <h, p_c> / ||p_c||``; no replay.

protofed's version, on the one training loop of every strategy:

* ``weight * SupCon_tau(features, labels)`` with ``tau = temperature`` on L2-normalised features.
  Deviation: one view (the other samples of the class in the batch are the positives; an anchor
  without a positive is left out) - protofed has no augmentation pipeline for 1-D signals;
* ``weight * KL(softmax(s_old / tau) || softmax(s_new / tau))`` with ``s_c = cos(h, p_c)`` over the
  prototypes of the old classes the client knows when the task starts (the global prototypes for
  federated strategies), ``h_old`` from the model at the start of the task. Deviations: cosine
  (both sides normalised) and the same temperature as SupCon instead of T 1 on unnormalised
  ``h``; one weight for both terms (the recipe's distill_coef 4, supcon 1);
* the prototype term is the strategy's own task loss: protofed's prototypes are class means (the
  prototypical loss pulls features towards them), not separately learned vectors.
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

    def __init__(self, weight: float = 1.0, temperature: float = 0.1) -> None:
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.old_protos: torch.Tensor | None = None

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        old = data.old_prototypes()
        self.old_protos = None if old is None else torch.as_tensor(old.vectors, dtype=torch.float32)

    def relation_loss(self, features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor | None:
        if self.old_protos is None or len(self.old_protos) < 2:
            return None
        p = F.normalize(self.old_protos.to(features.device), dim=1)
        s_new = F.normalize(features, dim=1) @ p.T
        s_old = F.normalize(old_features, dim=1) @ p.T
        return kl_distillation(s_old, s_new, self.temperature)

    def extra_loss(self, features, labels, logits, model, old: OldOutputs | None) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        loss = supcon_loss(features, labels, self.temperature)
        if old is not None:
            rel = self.relation_loss(features, old.features)
            if rel is not None:
                loss = loss + rel
        return self.weight * loss

    def state_dict(self) -> dict[str, Any]:
        return {"old_protos": self.old_protos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_protos = state.get("old_protos")
