"""Vectorised local training: the models of a cohort of clients trained at once with ``torch.func``.

``train_cohort(models, xs, ys, cfg, ...)`` gives (within float tolerance) the same weights and
the same :class:`TrainStats` as calling :func:`train_local` on each member in turn without hooks,
teacher or DP: the same batch order per member (``_shuffled_batches`` with the member's seed,
one-sample batches skipped exactly as there), the same number of steps, and ``torch.optim.SGD``'s
update (weight decay added to the gradient, momentum buffer started as the first gradient, no
dampening, no Nesterov) after clipping each member's gradient norm over its own trainable
parameters. The members' parameters are stacked (``torch.func.stack_module_state``), the loss of
one member is written for one set of parameters (``functional_call``), and ``vmap`` of its
``grad_and_value`` computes every member's gradient in one batched call per step.

Where it differs from the sequential loop:

* Summation order: batched matrix products, the per-class sums of the dense prototypical loss and
  the loss averages add in another order, so weights agree to float tolerance (the tests use
  ``atol=1e-5`` after two epochs), not bit for bit.
* Batches of different lengths are padded to the longest batch of the step with a validity mask
  (padding repeats a real sample of the same batch, so every padded label is a real one and no
  padded value can be non-finite by itself); the loss only averages valid samples.
* Members are ordered by their number of steps (most first), so at step ``s`` the members still
  training are a prefix of the stack: the step runs on that slice (a view) and members that have
  finished simply stop changing (no parameter or momentum update on steps they do not have).
* The prototypical loss has no ``torch.unique`` (data-dependent shapes cannot be vmapped): it is
  the dense form :func:`dense_prototypical_loss` over all ``num_classes`` classes with masks, with
  the same candidate set as :func:`~simulator.learner.training.prototypical_loss`.
* A non-finite loss is found after the loop, not at its step: members are independent, so the
  first member (in cohort order) whose loss became non-finite is the one the sequential loop would
  have stopped at; :class:`NonFiniteLoss` names it (``member``) and no model is changed, so the
  caller can train the members one by one to get each member's own outcome.

Which cohorts fall back to the sequential loop (:func:`why_not_vectorizable` says why):
BatchNorm (or any layer with running statistics) and Dropout in a module trained in train mode
(running statistics are state updated inside the forward pass, dropout needs per-member random
streams, and batch statistics would include the padding); a backbone frozen by
``freeze_backbone`` runs in eval mode, so those layers are fine there. Feature distillation from a
teacher, DP-SGD (per-sample clipping and noise inside the optimiser) and any hook with its own
``extra_loss`` (strategy objectives, continual plugins: arbitrary code on one model at a time)
fall back too, as do cohorts of different architectures and cohorts of fewer than two members.
Nothing here knows Flower or Ray.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state

from .backbones import ProtoModel
from .prototypes import PrototypeSet
from .training import NonFiniteLoss, TrainConfig, TrainStats, _shuffled_batches, _trainable

__all__ = ["CohortNonFiniteLoss", "architecture", "dense_prototypical_loss", "train_cohort", "why_not_vectorizable"]


class CohortNonFiniteLoss(NonFiniteLoss):
    """A member's loss became NaN or infinite; ``member`` is its index in the cohort."""

    def __init__(self, message: str, member: int, step: int) -> None:
        super().__init__(message)
        self.member = member
        self.step = step


# ----------------------------------------------------------------------------- eligibility
def architecture(model: nn.Module) -> tuple:
    """What must be equal for models to be stacked: module types, parameter and buffer shapes."""
    mods = tuple((name, type(m).__qualname__) for name, m in model.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    bufs = tuple((n, tuple(b.shape), b.dtype) for n, b in model.named_buffers())
    return mods, params, bufs


def _stateful_in_train(model: nn.Module, cfg: TrainConfig) -> str | None:
    """The first layer that would run in train mode with running statistics or randomness."""
    frozen = cfg.freeze_backbone and isinstance(model, ProtoModel)
    for name, m in model.named_modules():
        if frozen and (name == "backbone" or name.startswith("backbone.")):
            continue  # train_local puts a frozen backbone in eval mode: running stats are read only
        if isinstance(m, nn.modules.batchnorm._BatchNorm) or (
            isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        ):
            return f"{name} ({type(m).__name__}) keeps running statistics in train mode"
        if isinstance(m, (nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)) and m.p > 0:
            return f"{name} ({type(m).__name__}) is random in train mode"
    return None


def why_not_vectorizable(
    models: Sequence[nn.Module],
    cfg: TrainConfig,
    *,
    hooks_have_losses: bool,
    teacher: nn.Module | None,
    private: object | None,
) -> str | None:
    """None when :func:`train_cohort` can train ``models`` together, else a short reason (the
    caller then trains them one by one with ``train_local`` and may record the reason)."""
    if len(models) < 2:
        return "fewer than 2 clients in the cohort"
    if private is not None:
        return "DP-SGD (per-sample clipping and noise in the optimiser)"
    if hooks_have_losses:
        return "a strategy objective or continual plugin adds its own loss"
    if teacher is not None and cfg.distill_weight > 0:
        return "feature distillation from a teacher model"
    if not all(isinstance(m, ProtoModel) for m in models):
        return "not a ProtoModel"
    if models[0].aper and not cfg.freeze_backbone:
        return "APER's dual-branch backbone (its adapted branch trains on its own features)"
    first = architecture(models[0])
    for i, m in enumerate(models[1:], start=1):
        if architecture(m) != first:
            return f"different architectures in the cohort (member 0 and member {i})"
    devices = {p.device for m in models for p in m.parameters()}
    if len(devices) > 1:
        return f"parameters on several devices ({', '.join(sorted(map(str, devices)))})"
    if any(p.dtype != torch.float32 for p in models[0].parameters()):
        return "parameters that are not float32"
    if cfg.classifier == "head" and models[0].head is None:
        return "the head classifier needs a model with a head"
    stateful = _stateful_in_train(models[0], cfg)
    if stateful is not None:
        return stateful
    return None


# ----------------------------------------------------------------------------- losses
def dense_prototypical_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    known_vectors: torch.Tensor,
    known_mask: torch.Tensor,
) -> torch.Tensor:
    """:func:`~simulator.learner.training.prototypical_loss` without data-dependent shapes.

    ``features [B, D]``, ``labels [B]`` (in ``0..C-1``), ``valid [B]`` (False for padding),
    ``known_vectors [C, D]`` (any value where ``known_mask [C]`` is False). Every class of the
    dataset is a column: the candidates are the classes present among the valid samples (their
    means) and the known classes absent from the batch (their known prototypes); a sample is scored
    against the leave-one-out mean of its class, or against its class's known prototype when it is
    alone in its class, or is left out when neither exists. Cross-entropy over the candidate
    columns only, averaged over the samples kept; 0 (with a zero gradient) when fewer than two
    candidates or no sample is kept. Works under ``vmap``."""
    dtype = features.dtype
    n_classes = known_vectors.shape[0]
    classes = torch.arange(n_classes, device=labels.device)
    onehot = (labels.unsqueeze(1) == classes.unsqueeze(0)).to(dtype)  # [B, C]
    onehot_v = onehot * valid.unsqueeze(1).to(dtype)
    n_c = onehot_v.sum(0)  # [C]
    sums = onehot_v.T @ features  # [C, D]
    present = n_c > 0
    means = sums / n_c.clamp_min(1.0).unsqueeze(1)
    cand_mask = present | known_mask
    cand = torch.where(present.unsqueeze(1), means, known_vectors)
    f2 = (features * features).sum(1, keepdim=True)
    p2 = (cand * cand).sum(1).unsqueeze(0)
    dist = (f2 - 2.0 * features @ cand.T + p2).clamp_min(0.0)  # as squared_distances
    n_own = onehot @ n_c  # [B]: how many valid samples share the sample's class
    loo = (onehot @ sums - features) / (n_own - 1).clamp_min(1.0).unsqueeze(1)
    own = ((features - loo) ** 2).sum(1)
    many = n_own > 1
    own_known = (onehot @ known_mask.to(dtype)) > 0
    single = (~many) & own_known
    kv = onehot @ known_vectors
    own = torch.where(single, ((features - kv) ** 2).sum(1), own)
    keep = valid & (many | single)
    dist = torch.where(onehot > 0, own.unsqueeze(1), dist)
    # A finite fill (not -inf) keeps the softmax finite even when no column is a candidate (then
    # the result is discarded below); exp(fill - lse) is exactly 0, as for an excluded column.
    fill = torch.finfo(dtype).min
    logits = torch.where(cand_mask.unsqueeze(0), -dist, torch.full_like(dist, fill))
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - (logits * onehot).sum(1)
    kept = keep.to(dtype)
    n_keep = kept.sum()
    per = torch.where(keep, ce, torch.zeros_like(ce)).sum() / n_keep.clamp_min(1.0)
    ok = (cand_mask.sum() >= 2) & (n_keep > 0)
    return torch.where(ok, per, features.sum() * 0.0)


def _dense_head_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, seen_mask: torch.Tensor) -> torch.Tensor:
    """``head_loss`` averaged over the valid samples only."""
    masked = logits.masked_fill(~seen_mask.unsqueeze(0), float("-inf"))
    ce = F.cross_entropy(masked, labels, reduction="none")
    n = valid.to(logits.dtype).sum()
    return torch.where(valid, ce, torch.zeros_like(ce)).sum() / n.clamp_min(1.0)


# ----------------------------------------------------------------------------- training
def _schedule(ns: list[int], cfg: TrainConfig, seeds: list[int]) -> list[list[np.ndarray]]:
    """Each member's batches as index arrays, in the order ``train_local`` draws them."""
    out = []
    for n, seed in zip(ns, seeds):
        rng = np.random.default_rng(seed)
        out.append([idx.numpy() for idx in _shuffled_batches(rng, n, cfg, "cpu")])
    return out


def train_cohort(
    models: Sequence[ProtoModel],
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    cfg: TrainConfig,
    *,
    seen_classes: Sequence[Sequence[int]],
    num_classes: int,
    knowns: Sequence[PrototypeSet | None],
    seeds: Sequence[int],
    device: str | torch.device = "cpu",
) -> list[TrainStats]:
    """Train every ``models[i]`` in place on ``(xs[i], ys[i])`` at once; see the module docstring.

    The caller checks :func:`why_not_vectorizable` first. Raises :class:`CohortNonFiniteLoss`
    (a :class:`NonFiniteLoss` with ``member``) without changing any model when a member's loss
    becomes non-finite. Phases: which members train and which parameters move, their batch plan
    (members with the most steps first, so the members still training are a prefix), the data
    and class tables packed for all members, the steps, then the losses checked and the weights
    copied back."""
    k_all = len(models)
    if not (len(xs) == len(ys) == len(seen_classes) == len(knowns) == len(seeds) == k_all):
        raise ValueError("models, xs, ys, seen_classes, knowns and seeds must have one entry per member")
    stats: list[TrainStats | None] = [TrainStats(0.0, 0, 0) if len(ys[i]) == 0 else None for i in range(k_all)]
    members = [i for i in range(k_all) if len(ys[i])]
    if not members:
        return [s for s in stats if s is not None]
    device = torch.device(device)
    updated = _updated_parameters(models, members, cfg)
    if updated is None:  # frozen backbone and no head: train_local returns before any step
        for i in members:
            stats[i] = TrainStats(0.0, 0, len(ys[i]))
        return [s for s in stats if s is not None]
    members, plans = _plan_members(members, ys, cfg, seeds)
    steps = [len(p) for p in plans]
    batches = _pack_batches(members, plans, xs, ys, num_classes, device)
    tables = _class_tables(members, seen_classes, knowns, num_classes, device)
    params, buffers = stack_module_state([models[i] for i in members])
    params = {n: p.detach().to(device) for n, p in params.items()}
    buffers = {n: b.detach().to(device) for n, b in buffers.items()}
    train_p = {n: params[n] for n in updated}
    fixed_p = {n: p for n, p in params.items() if n not in train_p}
    losses = _run_steps(models[members[0]], cfg, batches, tables, train_p, fixed_p, buffers, bool(updated))
    _check_losses(losses, members)
    totals = losses.sum(0).cpu().numpy()
    for m, i in enumerate(members):
        stats[i] = TrainStats(float(totals[m]) / max(steps[m], 1), steps[m], len(ys[i]))
    with torch.no_grad():
        for m, i in enumerate(members):
            own = dict(models[i].named_parameters())
            for n in updated:
                own[n].copy_(train_p[n][m].to(own[n].device))
    return [s for s in stats if s is not None]


def _updated_parameters(models: Sequence[ProtoModel], members: list[int], cfg: TrainConfig) -> list[str] | None:
    """The parameter names that get a gradient in train_local (the head only under the head
    classifier), with every member's flags and modes as train_local leaves them (requires_grad of
    a frozen backbone, eval mode); None when nothing trains at all."""
    trainable_names: set[str] = set()
    for i in members:
        ids = {id(p) for p in _trainable(models[i], cfg)}
        if i == members[0]:
            trainable_names = {n for n, p in models[i].named_parameters() if id(p) in ids}
        models[i].train()
        if cfg.freeze_backbone:
            models[i].backbone.eval()
    if not trainable_names:
        return None
    if cfg.classifier == "head" and models[members[0]].head is None:
        raise ValueError("the head classifier needs a model with a head")
    return sorted(n for n in trainable_names if cfg.classifier == "head" or not n.startswith("head."))


def _plan_members(members: list[int], ys: Sequence[np.ndarray], cfg: TrainConfig,
                  seeds: Sequence[int]) -> tuple[list[int], list[list[np.ndarray]]]:
    """The members and their batch plans, most steps first (the members still training at any
    step are then a prefix)."""
    plans = _schedule([len(ys[i]) for i in members], cfg, [int(seeds[i]) for i in members])
    order = sorted(range(len(members)), key=lambda j: -len(plans[j]))
    return [members[j] for j in order], [plans[j] for j in order]


@dataclass
class _Batches:
    """All members' data in one tensor and every step's batches as global indices, padded."""

    x_all: torch.Tensor
    y_all: torch.Tensor
    idx: torch.Tensor  # [step, member, width] indices into x_all / y_all
    valid: torch.Tensor  # [step, member, width] False on padding
    active: np.ndarray  # members training at each step (a prefix)
    batch_len: np.ndarray  # the longest batch at each step


def _pack_batches(members: list[int], plans: list[list[np.ndarray]], xs: Sequence[np.ndarray], ys: Sequence[np.ndarray],
                  num_classes: int, device: torch.device) -> _Batches:
    offsets = np.cumsum([0] + [len(ys[i]) for i in members])
    x_all = torch.as_tensor(np.concatenate([np.asarray(xs[i], dtype=np.float32) for i in members]), device=device)
    y_cat = np.concatenate([np.asarray(ys[i], dtype=np.int64) for i in members])
    if y_cat.min() < 0 or y_cat.max() >= num_classes:  # the dense loss has one column per class
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(y_cat.min())}..{int(y_cat.max())}")
    n_steps, k = len(plans[0]), len(members)
    width = max(len(b) for p in plans for b in p)
    idx = np.zeros((n_steps, k, width), dtype=np.int64)
    valid = np.zeros((n_steps, k, width), dtype=bool)
    active = np.zeros(n_steps, dtype=np.int64)
    batch_len = np.zeros(n_steps, dtype=np.int64)
    for m, plan in enumerate(plans):
        for s, b in enumerate(plan):
            idx[s, m, : len(b)] = b + offsets[m]
            idx[s, m, len(b) :] = b[0] + offsets[m]  # padding repeats a real sample (masked out)
            valid[s, m, : len(b)] = True
            active[s] = m + 1
            batch_len[s] = max(batch_len[s], len(b))
    return _Batches(x_all, torch.as_tensor(y_cat, device=device), torch.as_tensor(idx, device=device),
                    torch.as_tensor(valid, device=device), active, batch_len)


def _class_tables(members: list[int], seen_classes: Sequence[Sequence[int]], knowns: Sequence[PrototypeSet | None],
                  num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per member: the classes seen so far, and the known prototypes (vectors and a mask)."""
    k = len(members)
    seen = torch.zeros(k, num_classes, dtype=torch.bool, device=device)
    dim = None
    for m, i in enumerate(members):
        seen[m, torch.as_tensor(list(seen_classes[i]), dtype=torch.int64, device=device)] = True
        kn = knowns[i]
        if kn is not None and len(kn) > 0:
            dim = kn.dim
    # without any known prototype a [.., 1] block broadcasts against the features and is masked out
    known_v = torch.zeros(k, num_classes, dim or 1, device=device)
    known_m = torch.zeros(k, num_classes, dtype=torch.bool, device=device)
    for m, i in enumerate(members):
        kn = knowns[i]
        if kn is not None and len(kn) > 0:
            c = torch.as_tensor(kn.classes, dtype=torch.int64, device=device)
            known_v[m, c] = torch.as_tensor(kn.vectors, dtype=torch.float32, device=device)
            known_m[m, c] = True
    return seen, known_v, known_m


def _run_steps(model: ProtoModel, cfg: TrainConfig, batches: _Batches, tables, train_p: dict[str, torch.Tensor],
               fixed_p: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], trains: bool) -> torch.Tensor:
    """Every step for the members still training, ``train_p`` updated in place by SGD; returns
    the losses [step, member] (float64)."""
    seen, known_v, known_m = tables
    base = copy.deepcopy(model).to("meta")
    base.train()
    if cfg.freeze_backbone:
        base.backbone.eval()
    use_head = cfg.classifier == "head"

    def member_loss(tp, fp, bufs, xb, yb, vb, seen_m, kv, km):
        both = {**tp, **fp}
        feats = functional_call(base, (both, bufs), (xb,))
        if use_head:
            logits = F.linear(feats, both["head.weight"], both["head.bias"])
            return _dense_head_loss(logits, yb, vb, seen_m)
        return dense_prototypical_loss(feats, yb, vb, kv, km)

    step_fn = torch.vmap(grad_and_value(member_loss)) if trains else None
    loss_fn = torch.vmap(member_loss)
    momentum_buf: dict[str, torch.Tensor] = {}
    n_steps, k = batches.idx.shape[0], batches.idx.shape[1]
    losses = torch.zeros(n_steps, k, dtype=torch.float64, device=batches.x_all.device)
    for s in range(n_steps):
        a, w = int(batches.active[s]), int(batches.batch_len[s])
        ib = batches.idx[s, :a, :w]
        tp = {n: p[:a] for n, p in train_p.items()}
        fp = {n: p[:a] for n, p in fixed_p.items()}
        bf = {n: b[:a] for n, b in buffers.items()}
        args = (tp, fp, bf, batches.x_all[ib], batches.y_all[ib], batches.valid[s, :a, :w], seen[:a], known_v[:a], known_m[:a])
        if step_fn is None:  # frozen backbone + prototype loss: nothing to train (as train_local)
            with torch.no_grad():
                losses[s, :a] = loss_fn(*args).detach().to(torch.float64)
            continue
        grads, loss = step_fn(*args)
        losses[s, :a] = loss.detach().to(torch.float64)
        with torch.no_grad():
            _sgd_step(train_p, grads, momentum_buf, a, cfg, first=s == 0)
    return losses


def _check_losses(losses: torch.Tensor, members: list[int]) -> None:
    """The first member (cohort order) with a non-finite loss is where train_local stops."""
    bad = ~torch.isfinite(losses)
    if not bool(bad.any()):
        return
    bad_cpu = bad.cpu().numpy()
    culprits = sorted((members[m], int(np.argmax(bad_cpu[:, m]))) for m in range(len(members)) if bad_cpu[:, m].any())
    member, step = culprits[0]
    value = float(losses[step, members.index(member)])
    raise CohortNonFiniteLoss(f"member {member} of the cohort: loss became {value} at step {step + 1}", member, step + 1)


def _sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor],
              a: int, cfg: TrainConfig, *, first: bool) -> None:
    """``clip_grad_norm_`` per member then ``torch.optim.SGD.step`` on the first ``a`` members."""
    names = list(params)
    if cfg.grad_clip > 0:
        # As clip_grad_norm_: the 2-norm of the per-tensor norms, coefficient max/(norm + 1e-6)
        # clamped at 1 and always applied.
        norms = torch.stack([torch.linalg.vector_norm(grads[n].reshape(a, -1), dim=1) for n in names], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)
        coef = (cfg.grad_clip / (total + 1e-6)).clamp(max=1.0)
    for n in names:
        p = params[n][:a]
        g = grads[n]  # a fresh result of vmap: updated in place (a copy if it is a broadcast view)
        if not g.is_contiguous():
            g = g.contiguous()
        if cfg.grad_clip > 0:
            g.mul_(coef.view(a, *([1] * (g.dim() - 1))))
        if cfg.weight_decay != 0:
            g.add_(p, alpha=cfg.weight_decay)
        if cfg.momentum != 0:
            if first:  # the buffer starts as the first gradient (every member is active at step 0)
                if a == params[n].shape[0]:
                    bufs[n] = g
                else:
                    bufs[n] = torch.zeros_like(params[n])
                    bufs[n][:a] = g
            else:
                bufs[n][:a].mul_(cfg.momentum).add_(g)
                g = bufs[n][:a]
        p.add_(g, alpha=-cfg.lr)
