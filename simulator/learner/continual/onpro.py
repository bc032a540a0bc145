"""OnPro's two mechanisms (Wei et al., "Online Prototype Learning for Online Continual Learning",
ICCV 2023), ``continual.ope`` and ``continual.apf``.

Official code read: ``weilllllls/OnPro`` (modules/OPE.py, modules/APF.py, train.py, main.py).

**Online Prototype Equilibrium** (``OPE``, an ``extra_loss``). For a set of samples with two views
``z1, z2`` (L2-normalised), the prototype of class ``c`` in view ``v`` is
``p_c^v = normalize(mean_{i: y_i = c} z_i^v)``; with the ``K`` classes present,
``Z = [p^1; p^2]`` (``2K`` rows) and ``s_ij = <Z_i, Z_j> / T``, the loss is

    L_OPE = -1/(2K) sum_i log( exp(s_{i,i+K mod 2K}) / sum_{j != i} exp(s_ij) ),

the supervised contrastive loss over prototypes whose positive is the same class's prototype in
the other view (``OPELoss.forward``; the official subtraction of the row maximum is numerical
only). One class gives 0. Officially ``loss = ce + ins_loss + OPE_new + OPE_seen``: ``OPE_new`` on
the incoming batch (its classes, ``is_new=True``), ``OPE_seen`` on a batch drawn from the buffer
(every class in it: ``only_old_proto`` is False), weight 1 each, ``proto_t = 0.5``.
protofed adds ``weight * (L_OPE(new) + L_OPE(old))`` to every batch of the one training loop:
"old" are the batch's samples of classes learned before the client's task (in the online mode:
the replayed memory), "new" the others (the stream).

**Adaptive Prototypical Feedback** (``APF``, the ``replay`` hook: which memory samples an online
round replays). Officially, each step draws ``buffer_batch_size`` samples from the buffer;
``int(bbs * mixup_base_rate)`` of them are kept and mixed (kornia ``RandomMixUpV2``: each sample,
with probability ``mixup_p``, mixed with a random partner of the same batch, weight ``lam ~
U(mixup_lower, mixup_upper)``); the rest come from class pairs: with the class prototypes
``mu_c`` (``classes_mean``: the mean over both views of the normalised projections of the
previous step's buffer batch) and the pairwise distances ``d_ab = ||mu_a - mu_b||`` (``torch.pdist``
order, a < b), pair ``(a, b)`` gets ``round(n * softmax(1 / d)_ab)`` samples, the rounding
difference given to (taken from) random pairs; each sample mixes a sample of ``a`` with one of
``b`` (drawn with replacement), ``lam ~ Beta(mixup_alpha, mixup_alpha)`` with probability
``mixup_p`` per pair, else 0; the cross-entropy is ``(1 - lam) CE(a) + lam CE(b)``. Defaults
(main.py): base rate 0.75, mixup_p 0.6, lower 0, upper 0.6, alpha 0.4.
protofed does the same once per online round, for the round's replayed samples (as many as stream
samples, as online ER), from the client's memory.

Deviations from the official code (each changes what is computed):

* no projection head: the contrastive terms and APF's prototypes use the L2-normalised embedding;
* the second view: no image augmentations (horizontal flip, random grey, random resized crop)
  and no rotations (OCM's ``Rotation``) exist for 1-D or tabular inputs; view 1 is the batch
  itself (officially the rotated batch, un-augmented), view 2 is ``x * s + augment_noise *
  std(x) * eps`` with ``s ~ U(1 - augment_scale, 1 + augment_scale)`` per sample and ``eps`` standard
  normal (``std``: of the whole batch);
* OCM's instance-wise contrastive loss (``ins_loss``), which the official total also contains, is
  not part of either mechanism and is left out; so is the official cross-entropy, which is taken
  on an augmented view of the incoming batch in the first task and, after it, on the (APF-mixed)
  buffer samples only: here the strategy's own task loss covers the stream and the replayed
  samples alike, un-augmented;
* the memory is protofed's (filled at the end of a task, ``continual.memory_per_class``), not a
  reservoir buffer updated every step, so during the first task there is nothing to replay and
  OPE has no "seen" term (officially the buffer batch gives one from the second step on);
* OPE's two groups: officially the incoming batch and a separate buffer batch (which, filled by
  reservoir sampling, holds current-task samples too); here the one mixed batch of the loop split
  by class (old classes vs the rest), so current-task classes never enter the "seen" term;
* APF runs once per round (every ``communicate_every`` steps), not every step; its prototypes are
  the class means of the normalised embeddings of the whole memory under the model the client has
  when the round starts (the global one for weight-sharing strategies), one view, eval mode (no
  gradient), not those of the previous step's buffer batch in train mode;
* APF's pairs are among the memory's classes only: protofed's memory is filled at the end of a
  task, so the current task's classes are never in it (officially the reservoir buffer holds them);
* mixup labels are hard: a mixed sample is labelled with its dominant component (the first when
  ``lam <= 0.5``), since the loop's losses (the head's cross-entropy, the prototypical loss) take one
  label per sample; officially the cross-entropy is the ``lam``-weighted pair of cross-entropies;
* kornia is not used: the uniform part's mixing is our own code, as we read ``RandomMixUpV2``
  (per sample, probability ``mixup_p``, partner from a random permutation of the uniform part);
* with fewer than two classes in the memory the pair part is drawn uniformly (officially pdist
  is empty); the replay size is ``min(stream samples of the round, memory size)`` (officially
  ``min(buffer_batch_size, 7 x seen classes)`` per step);
* everything is per client (memory, prototypes, pairs); nothing of either mechanism is uploaded.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import ProtoModel
from ..training import embed
from .base import ContinualPlugin, OldOutputs, TaskData


def ope_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss between the class prototypes of two views (see the module docstring)."""
    classes, inv = torch.unique(labels, return_inverse=True)
    k = len(classes)
    onehot = F.one_hot(inv, k).to(z1.dtype)
    p1 = F.normalize(onehot.T @ F.normalize(z1, dim=1), dim=1)  # the class sums: normalising removes the count
    p2 = F.normalize(onehot.T @ F.normalize(z2, dim=1), dim=1)
    z = torch.cat([p1, p2])
    logits = (z @ z.T / float(temperature)).masked_fill(torch.eye(2 * k, dtype=torch.bool, device=z.device),
                                                        float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    rows = torch.arange(2 * k, device=z.device)
    return -log_prob[rows, (rows + k) % (2 * k)].mean()


class OPE(ContinualPlugin):
    name = "ope"

    def __init__(self, weight: float = 1.0, temperature: float = 0.5, augment_noise: float = 0.1,
                 augment_scale: float = 0.2) -> None:
        if temperature <= 0:
            raise ValueError(f"continual.ope.temperature must be > 0, not {temperature}")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.augment_noise = float(augment_noise)
        self.augment_scale = float(augment_scale)
        self.old_classes: list[int] = []
        self._gen = torch.Generator().manual_seed(0)
        self._inputs: torch.Tensor | None = None

    def on_task_start(self, model: ProtoModel, data: TaskData) -> None:
        self.old_classes = sorted(int(c) for c in data.old_classes)

    def before_training(self, model: ProtoModel, seed: int) -> None:
        self._gen = torch.Generator().manual_seed(int(seed) % (2**63))

    def before_batch(self, inputs: torch.Tensor) -> None:
        self._inputs = inputs

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The second view: per-sample amplitude scaling and Gaussian noise."""
        shape = (len(x),) + (1,) * (x.dim() - 1)
        u = torch.rand(shape, generator=self._gen).to(x.device, x.dtype)
        eps = torch.randn(x.shape, generator=self._gen).to(x.device, x.dtype)
        std = x.detach().std() if x.numel() > 1 else x.new_zeros(())
        return x * (1.0 + self.augment_scale * (2.0 * u - 1.0)) + self.augment_noise * std * eps

    def extra_loss(self, features, labels, logits, model, old: OldOutputs | None) -> torch.Tensor | None:
        inputs, self._inputs = self._inputs, None
        if self.weight == 0 or inputs is None or len(labels) == 0:
            return None
        view2 = model(self.augment(inputs))
        is_old = torch.isin(labels, torch.as_tensor(self.old_classes, dtype=labels.dtype, device=labels.device))
        total = features.sum() * 0.0
        for part in (~is_old, is_old):
            if bool(part.any()):
                total = total + ope_loss(features[part], view2[part], labels[part], self.temperature)
        return self.weight * total

    def state_dict(self) -> dict[str, Any]:
        return {"old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_classes = [int(c) for c in state.get("old_classes", [])]


def pair_probabilities(protos: np.ndarray) -> np.ndarray:
    """``softmax(1 / d)`` over the class pairs ``(a, b)``, ``a < b`` in row order (``torch.pdist``
    order); a zero distance is taken as 1e-12."""
    protos = np.asarray(protos, dtype=np.float64)
    a, b = np.triu_indices(len(protos), k=1)
    inv = 1.0 / np.maximum(np.linalg.norm(protos[a] - protos[b], axis=1), 1e-12)
    e = np.exp(inv - inv.max())
    return e / e.sum()


def pair_counts(probs: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``round(n p)`` per pair (half to even, as ``torch.round``), the difference to ``n`` added to
    random pairs or taken from random pairs that have samples, one each (as the official code)."""
    counts = np.round(np.asarray(probs) * n).astype(np.int64)
    diff = int(n - counts.sum())
    if diff > 0:
        counts[rng.permutation(len(counts))[:diff]] += 1
    elif diff < 0:
        nonzero = np.flatnonzero(counts)
        counts[nonzero[rng.permutation(len(nonzero))[:-diff]]] -= 1
    assert counts.sum() == n and (counts >= 0).all()
    return counts


def mix(x: np.ndarray, y: np.ndarray, partner_x: np.ndarray, partner_y: np.ndarray,
        lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(1 - lam) x + lam x'``, labelled with the dominant component (``y`` when ``lam <= 0.5``)."""
    w = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    return ((1.0 - w) * x + w * partner_x).astype(x.dtype), np.where(lam <= 0.5, y, partner_y).astype(np.int64)


class APF(ContinualPlugin):
    name = "apf"

    def __init__(self, base_rate: float = 0.75, mixup_p: float = 0.6, mixup_lower: float = 0.0,
                 mixup_upper: float = 0.6, mixup_alpha: float = 0.4) -> None:
        self.base_rate = float(base_rate)
        self.mixup_p = float(mixup_p)
        self.mixup_lower = float(mixup_lower)
        self.mixup_upper = float(mixup_upper)
        self.mixup_alpha = float(mixup_alpha)

    def replay(self, model, x, y, size, rng, device) -> tuple[np.ndarray, np.ndarray] | None:
        y = np.asarray(y, dtype=np.int64)
        total = min(int(size), len(y))
        n_base = int(total * self.base_rate)
        order = rng.permutation(len(y))
        base, rest = order[:n_base], order[n_base:]
        lam = rng.uniform(self.mixup_lower, self.mixup_upper, n_base) * (rng.random(n_base) < self.mixup_p)
        partner = base[rng.permutation(n_base)]
        xs, ys = mix(x[base], y[base], x[partner], y[partner], lam)
        n_prob = total - n_base
        classes = np.unique(y)
        if n_prob == 0:
            return xs, ys
        if len(classes) < 2:
            pick = np.sort(rest[:n_prob])
            return np.concatenate([xs, x[pick]]), np.concatenate([ys, y[pick]])
        px, py = self.pair_samples(model, x, y, classes, n_prob, rng, device)
        return np.concatenate([xs, px]), np.concatenate([ys, py])

    def prototypes(self, model: ProtoModel, x: np.ndarray, y: np.ndarray, classes: np.ndarray,
                   device: str | torch.device) -> np.ndarray:
        """Class means of the normalised embeddings of the memory (not normalised again, as
        ``classes_mean``)."""
        z = F.normalize(embed(model, x, device), dim=1).cpu().double().numpy()
        return np.stack([z[y == c].mean(0) for c in classes])

    def pair_samples(self, model, x, y, classes, n, rng, device) -> tuple[np.ndarray, np.ndarray]:
        counts = pair_counts(pair_probabilities(self.prototypes(model, x, y, classes, device)), n, rng)
        xs, ys = [], []
        for (a, b), k in zip(combinations(classes.tolist(), 2), counts):
            if k == 0:
                continue
            ia = rng.choice(np.flatnonzero(y == a), k)
            ib = rng.choice(np.flatnonzero(y == b), k)
            lam = rng.beta(self.mixup_alpha, self.mixup_alpha, k) if rng.random() <= self.mixup_p else np.zeros(k)
            mx, my = mix(x[ia], y[ia], x[ib], y[ib], lam)
            xs.append(mx)
            ys.append(my)
        return np.concatenate(xs), np.concatenate(ys)
