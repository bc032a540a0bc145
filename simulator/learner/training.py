"""The one local training loop every strategy's client half plugs into.

Per batch: ``features = model(x)``; the task loss is either the prototypical loss (distances to
in-batch class means and to the known global prototypes of the other seen classes) or the
cross-entropy of the linear head over the classes seen so far; then the optional feature
distillation term and every hook's ``extra_loss`` are added (a hook with a ``before_batch(inputs)``
method sees each batch's inputs first). Nothing here knows Flower or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ProtoModel
from .prototypes import PrototypeSet, class_means, squared_distances

if TYPE_CHECKING:
    from .frozen_features import FrozenFeatures


class LossHook(Protocol):
    """What a strategy's client objective adds to the loss of every batch."""

    def extra_loss(
        self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel
    ) -> torch.Tensor | None: ...


class PrivateSteps(Protocol):
    """DP-SGD as the loop sees it (built in ``simulator.privacy.dp_sgd``; the loop knows no
    library): Poisson-sampled batches, per-sample clipping and noise inside the optimizer."""

    def batches(self, n: int, epochs: int) -> Iterator[torch.Tensor]: ...

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> torch.optim.Optimizer: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def empty_step(self) -> None: ...

    def detach(self) -> None: ...


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite during local training."""


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    classifier: Literal["prototype", "head", "none"] = "prototype"  # none: the hooks' losses alone
    freeze_backbone: bool = False
    distill_weight: float = 0.0
    grad_clip: float = 10.0  # max gradient norm per step; 0 disables


@dataclass
class TrainStats:
    loss: float
    steps: int
    samples: int


def prototypical_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    known_vectors: torch.Tensor | None = None,
    known_classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over negative squared distances to class prototypes.

    Candidates are the batch's class means (with gradients) and the known prototypes of every
    other class (fixed). A sample is compared with the mean of the *other* samples of its class
    (leave-one-out), so it cannot win by pulling its own class mean towards itself; a sample
    alone in its class uses the known prototype of its class, or is left out of the loss."""
    classes, target = torch.unique(labels, return_inverse=True)
    onehot = F.one_hot(target, len(classes)).to(features.dtype)
    n_c = onehot.sum(0)
    sums = onehot.T @ features
    means = sums / n_c.unsqueeze(1)
    candidates = means
    if known_vectors is not None and known_classes is not None and len(known_classes) > 0:
        others = ~torch.isin(known_classes, classes)
        if bool(others.any()):
            candidates = torch.cat([means, known_vectors[others]], dim=0)
    if candidates.shape[0] < 2:
        return features.sum() * 0.0
    dist = squared_distances(features, candidates)
    n_own = n_c[target]
    loo = (sums[target] - features) / (n_own - 1).clamp_min(1.0).unsqueeze(1)
    own = ((features - loo) ** 2).sum(1)
    valid = n_own > 1
    if known_vectors is not None and known_classes is not None and len(known_classes) > 0:
        match = known_classes.unsqueeze(0) == labels.unsqueeze(1)  # [B, K]
        has_known = match.any(1)
        single = (~valid) & has_known
        if bool(single.any()):
            kv = known_vectors[match.float().argmax(1)]
            own = torch.where(single, ((features - kv) ** 2).sum(1), own)
            valid = valid | single
    if not bool(valid.any()):
        return features.sum() * 0.0
    dist = dist.scatter(1, target.unsqueeze(1), own.unsqueeze(1))
    return F.cross_entropy(-dist[valid], target[valid])


def head_loss(logits: torch.Tensor, labels: torch.Tensor, seen_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the linear head restricted to the classes seen so far."""
    masked = logits.masked_fill(~seen_mask.unsqueeze(0), float("-inf"))
    return F.cross_entropy(masked, labels)


def _trainable(model: ProtoModel, cfg: TrainConfig) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for p in model.adaptable_parameters():  # APER: never the frozen branch
        p.requires_grad_(not cfg.freeze_backbone)
        if not cfg.freeze_backbone:
            params.append(p)
    if model.head is not None:
        params += list(model.head.parameters())
    return params


def train_local(
    model: ProtoModel,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    *,
    seen_classes: Sequence[int],
    num_classes: int,
    known: PrototypeSet | None = None,
    teacher: nn.Module | None = None,
    hooks: Sequence[LossHook] = (),
    seed: int = 0,
    device: str | torch.device = "cpu",
    private: PrivateSteps | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``(x, y)``; returns the mean loss over steps.

    With ``private`` (DP-SGD) the batches are Poisson samples drawn by it and every one is
    used (empty and one-sample batches too: each step must release), the optimizer clips
    per-sample gradients and adds noise, and ``cfg.grad_clip`` (a clip of the batch gradient)
    is not applied: the per-sample clip replaces it."""
    if len(y) == 0:
        return TrainStats(0.0, 0, 0)
    params = _trainable(model, cfg)
    if not params:
        return TrainStats(0.0, 0, len(y))
    model.train()
    if cfg.freeze_backbone:
        model.backbone.eval()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.int64, device=device)
    seen_mask = torch.zeros(num_classes, dtype=torch.bool, device=device)
    seen_mask[torch.as_tensor(list(seen_classes), dtype=torch.int64, device=device)] = True
    known_v = known_c = None
    if known is not None and len(known) > 0:
        known_v = torch.as_tensor(known.vectors, device=device)
        known_c = torch.as_tensor(known.classes, device=device)
        if getattr(model, "aper", False) and not cfg.freeze_backbone:  # APER: the loss sees the adapted half
            known_v = known_v[:, model.train_columns]
    if teacher is not None:
        teacher.eval()
    n = len(y)
    if private is not None:
        opt = private.attach(model, opt, n)
        try:
            return _train_steps(model, xt, yt, cfg, opt, _private_batches(private, n, cfg.epochs, device), seen_mask,
                                known_v, known_c, teacher, hooks, private)
        finally:
            private.detach()
    return _train_steps(model, xt, yt, cfg, opt, _shuffled_batches(np.random.default_rng(seed), n, cfg, device),
                        seen_mask, known_v, known_c, teacher, hooks, None, params)


def _shuffled_batches(order_rng: np.random.Generator, n: int, cfg: TrainConfig, device) -> Iterator[torch.Tensor]:
    for _ in range(cfg.epochs):
        perm = torch.as_tensor(order_rng.permutation(n), device=device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            if len(idx) < 2 and n > 1:
                continue  # a single-sample batch carries no class structure (and breaks batch norm)
            yield idx


def _private_batches(private: PrivateSteps, n: int, epochs: int, device) -> Iterator[torch.Tensor]:
    for idx in private.batches(n, epochs):
        yield idx.to(device)


def _train_steps(model, xt, yt, cfg: TrainConfig, opt, batches: Iterator[torch.Tensor], seen_mask, known_v, known_c,
                 teacher, hooks: Sequence[LossHook], private: PrivateSteps | None,
                 params: list[nn.Parameter] | None = None) -> TrainStats:
    total, steps = 0.0, 0
    adapting = getattr(model, "aper", False) and not cfg.freeze_backbone  # APER's first-task fine-tuning
    for idx in batches:
        if private is not None and len(idx) == 0:
            private.empty_step()  # nothing sampled: the update is the noise alone
            steps += 1
            continue
        xb, yb = xt[idx], yt[idx]
        for hook in hooks:  # e.g. continual mechanisms that run the task-start model on the batch
            before = getattr(hook, "before_batch", None)
            if before is not None:
                before(xb)
        # APER's adapted branch trains on its own features; a frozen backbone gives the whole embedding
        feats = model.train_features(xb) if adapting else model(xb)
        if cfg.classifier == "head":
            assert model.head is not None, "the head classifier needs a model with a head"
            loss = head_loss(model.head(feats), yb, seen_mask)
        elif cfg.classifier == "none":
            loss = feats.sum() * 0.0  # the hooks' extra losses are the whole loss (PALM)
        else:
            loss = prototypical_loss(feats, yb, known_v, known_c)
        if teacher is not None and cfg.distill_weight > 0:
            with torch.no_grad():
                target = teacher(xb)
            loss = loss + cfg.distill_weight * F.mse_loss(feats, target)
        for hook in hooks:
            extra = hook.extra_loss(feats, yb, model)
            if extra is not None:
                loss = loss + extra
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"loss became {value} at step {steps + 1}")
        if private is not None:
            opt.zero_grad(set_to_none=True)
            private.backward(loss)
            opt.step()
        elif loss.requires_grad:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
        total += value
        steps += 1
    return TrainStats(total / max(steps, 1), steps, len(yt))


@torch.no_grad()
def embed(model: nn.Module, x: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 1024,
          cache: FrozenFeatures | None = None) -> torch.Tensor:
    """Features of ``x`` with the model in eval mode, computed in batches, or looked up in a
    frozen backbone's ``cache`` (:mod:`simulator.learner.frozen_features`)."""
    if cache is not None and (found := cache.lookup(model, x, device)) is not None:
        return found
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[start : start + batch_size], dtype=torch.float32, device=device)
        out.append(model(xb))
    if not out:
        return torch.zeros(0, 0, device=device)
    return torch.cat(out)


def compute_prototypes(
    model: nn.Module, x: np.ndarray, y: np.ndarray, device: str | torch.device = "cpu",
    cache: FrozenFeatures | None = None,
) -> PrototypeSet:
    """Class means of the features of ``x``, with the model frozen (eval mode, no grad)."""
    return class_means(embed(model, x, device, cache=cache), y)
