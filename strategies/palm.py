"""``palm``: a mixture of prototypes per class, PALM (Lu et al., ICLR 2024, "Learning with
mixture of prototypes for out-of-distribution detection"), federated.

Each class ``c`` is a mixture of ``k`` unit vectors ``p_c1 .. p_ck`` on the hypersphere (von
Mises-Fisher components of equal concentration ``1 / temperature``). On a batch of normalised
embeddings ``f_i`` with labels ``y_i`` (one training step):

1. **Assignment** (Sinkhorn-Knopp, :func:`sinkhorn`): ``Q = exp(f p^T / epsilon)``, scaled to sum
   to one, then ``iterations`` times each prototype's row normalised to ``1 / P`` and each
   sample's column to ``1 / B``; the result times ``B``. Entries of prototypes of other classes
   are masked out, each sample keeps its ``top_k`` largest components, and its weights are
   normalised to sum to one (:func:`class_assignment`, :func:`top_k_mask`).
2. **EMA update** (no gradient into the old prototypes): with the weights normalised per
   prototype over the batch as well (``W``), ``p <- normalise(ema p + (1 - ema) W^T f)``. A
   prototype no sample was assigned to keeps its direction.
3. **MLE loss** (:func:`mle_loss`): with the assignment recomputed on the updated prototypes,
   ``-(1/B) sum_i [ sum_j w_ij f_i.p_j / T - log sum_j exp(f_i.p_j / T) ]``, the sum over every
   prototype of every active class (the prototypes detached here).
4. **Prototype contrast** (:func:`prototype_contrast`): each prototype against all others with
   temperature 0.5, the other components of its own class as positives (mean log-probability);
   the updated prototypes carry the batch's gradient through their ``(1 - ema)`` share, as in the
   official code.

The loss is ``mle + proto_contrast_weight x contrast``; there is no other task loss (the official
training uses PALM's loss alone). Inference: nearest class mean (the class prototypes of
``proto_avg``, merged count-weighted); the mixture decides the open-world score (below).

Federated. Clients upload, besides their class means and counts, each class's ``k`` components as
they hold them after training and each component's assignment mass on the client's data
(``sum_i w_ij`` over the client's samples of the class, the weights of step 1 on the embedding
after training). The server merges component by component, by index:
``p_cj = normalise(sum_clients m_cj p_cj)`` (a plain mean when no client assigned any mass),
and sends the merged mixtures back; a client replaces its components of every class the server
knows by the merged ones. Components can be matched by index because every client starts the
components of class ``c`` from the same directions (drawn from a generator seeded with ``c``)
and receives the merged ones every round, as FedAvg matches weights by position. The server
keeps a class nobody uploads again.

Open-world score (``open_world_score: mixture``, default): ``max_{c seen, j} cos(f, p_cj)``, the
maximum similarity to the mixture's components, instead of to the class means that every other
prototype strategy is scored with (``class_means``).

Deviations from the official code (``jeff024/PALM``, ``util/loss_functions.py``):

* Class-incremental: the mixtures exist for the classes seen so far (a class's components are
  created when the client first meets it), and Sinkhorn, the MLE softmax and the prototype
  contrast range over those. As in the official code, Sinkhorn's equipartition includes the
  components of classes absent from the batch, which a class-incremental batch (one task's
  classes and some replay) has many more of than the official batches of 512 CIFAR samples.
  Restricting Sinkhorn to the batch's classes was measured (``scenarios/open_world_mnist1d.yaml``,
  3 seeds): final accuracy 0.795 against 0.803 and AUROC 0.656 against 0.663 with every
  component, within the seeds' spread, so the official rule is kept.
* One view per sample (the official code uses two augmented views; protofed's loop has no image
  augmentations) and the embedding itself, normalised (the official code adds a 2-layer MLP
  projection head of 128 dimensions and scores out-of-distribution samples with the encoder's
  features).
* Components are initialised as the official ones (uniform in ``[0, 1)``, normalised) but from a
  generator seeded with the class id instead of the global one, so that clients agree.
* The official evaluation script scores out-of-distribution samples with the Mahalanobis score
  of SSD+ (one Gaussian over the normalised training features); protofed's score is the
  maximum similarity to the components (no training features are kept at evaluation).
* Sinkhorn subtracts the largest score before ``exp`` (the official code divides by the sum after
  it and renormalises the prototypes when that overflows): the same matrix, without overflow.
* Federated merge and the per-component masses are protofed's: PALM is centralised.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord
from pydantic import Field

from simulator.learner.backbones import ProtoModel
from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientObjective

from .base import ShareWeights, StrategyParams, Upload
from .proto_avg import ProtoAvg

MIX_CLASSES = "palm.classes"
MIX_VECTORS = "palm.vectors"  # [n, k, D] float32
MIX_MASS = "palm.mass"  # [n, k] float32 (uploads only)
CONTRAST_TEMPERATURE = 0.5  # fixed in the official proto_contra


class Params(StrategyParams):
    k: int = Field(6, ge=1, le=256, description="components (prototypes) per class (official cache_size, default 6)")
    top_k: int = Field(5, ge=0, le=256, description="each sample is assigned to its top_k components of its class (official k, default 5; 0 = all)")
    ema: float = Field(0.999, ge=0.0, lt=1.0, description="momentum of the components' moving-average update (official proto_m, default 0.999)")
    temperature: float = Field(0.1, gt=0.0, le=100.0, description="temperature of the MLE loss (official temp, default 0.1)")
    epsilon: float = Field(0.05, gt=0.0, le=100.0, description="Sinkhorn-Knopp entropic temperature (official epsilon, default 0.05)")
    sinkhorn_iterations: int = Field(3, ge=1, le=1000, description="Sinkhorn-Knopp iterations (official: 3)")
    proto_contrast_weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the prototype-level contrastive loss (official lambda_pcon, default 1)")
    open_world_score: Literal["mixture", "class_means"] = Field(
        "mixture", description="open-world score: maximum cosine to the mixture's components (PALM's), or to the class means (every other strategy's)"
    )
    share_weights: ShareWeights = Field(True, description="also FedAvg the backbone weights each round (one feature space, in which components can be merged); first_task: only during the first task")


# --------------------------------------------------------------------------- the mathematics
def initial_components(cls: int, k: int, dim: int) -> torch.Tensor:
    """Class ``cls``'s ``k`` starting components: uniform in [0, 1), normalised (official init),
    from a generator seeded with the class id (the same on every client)."""
    g = torch.Generator().manual_seed(int(cls))
    return F.normalize(torch.rand(k, dim, generator=g), dim=1)


def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp on ``scores`` ``[B, P]`` (cosines): ``[B, P]``, each row summing to one
    after the last column step, each column to about ``B / P``."""
    b, p = scores.shape
    q = torch.exp((scores - scores.max()) / epsilon).T  # [P, B]
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(1, keepdim=True).clamp_min(1e-12) / p
        q = q / q.sum(0, keepdim=True).clamp_min(1e-12) / b
    return (q * b).T


def class_assignment(f: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor, proto_classes: torch.Tensor,
                     epsilon: float, iterations: int) -> torch.Tensor:
    """Sinkhorn's ``Q`` ``[B, P]`` over every component, masked to each sample's own class
    (zero elsewhere)."""
    q = sinkhorn(f.detach() @ protos.detach().T, epsilon, iterations)
    return q * (labels.unsqueeze(1) == proto_classes.unsqueeze(0))


def top_k_mask(q: torch.Tensor, top_k: int) -> torch.Tensor:
    """1 at each row's ``top_k`` largest entries of ``q`` (all ones for 0, or ``top_k >= P``)."""
    if not 0 < top_k < q.shape[1]:
        return torch.ones_like(q)
    return torch.zeros_like(q).scatter_(1, q.topk(top_k, dim=1).indices, 1.0)


def row_normalised(q: torch.Tensor) -> torch.Tensor:
    return q / q.sum(1, keepdim=True).clamp_min(1e-12)


def ema_update(f: torch.Tensor, weights: torch.Tensor, protos: torch.Tensor, ema: float) -> torch.Tensor:
    """``normalise(ema p + (1 - ema) W^T f)`` with ``W`` the weights normalised per prototype
    over the batch; the result carries ``f``'s gradient through its ``(1 - ema)`` share."""
    w = weights / weights.sum(0, keepdim=True).clamp_min(1e-12)
    return F.normalize(ema * protos.detach() + (1 - ema) * (w.T @ f), dim=1)


def mle_loss(f: torch.Tensor, weights: torch.Tensor, protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-(1/B) sum_i [sum_j w_ij s_ij - logsumexp_j s_ij]`` with ``s = f p^T / T`` (``p`` detached)."""
    logits = f @ protos.detach().T / temperature
    return -((weights * logits).sum(1) - torch.logsumexp(logits, dim=1)).mean()


def prototype_contrast(protos: torch.Tensor, proto_classes: torch.Tensor,
                       temperature: float = CONTRAST_TEMPERATURE) -> torch.Tensor | None:
    """Each prototype against every other (cosine / T), the other components of its class as
    positives, mean log-probability over them; averaged over the prototypes (None: no positives,
    i.e. one component per class)."""
    p = F.normalize(protos, dim=1)
    logits = p @ p.T / temperature
    n = len(p)
    not_self = ~torch.eye(n, dtype=torch.bool, device=p.device)
    pos = (proto_classes.unsqueeze(1) == proto_classes.unsqueeze(0)) & not_self
    if not bool(pos.any()):
        return None
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    per = (log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)
    return -per.mean()


def mixture_scores(features: torch.Tensor | np.ndarray, components: np.ndarray) -> np.ndarray:
    """``max_j cos(f, p_j)`` over the rows of ``components`` (PALM's open-world score)."""
    f = F.normalize(torch.as_tensor(np.asarray(features, dtype=np.float64)), dim=1)
    p = F.normalize(torch.as_tensor(np.asarray(components, dtype=np.float64)), dim=1)
    return (f @ p.T).max(1).values.numpy()


def merge_mixtures(vectors: list[np.ndarray], masses: list[np.ndarray]) -> np.ndarray:
    """One class's merged components ``[k, D]`` from the clients' ``[k, D]`` components and
    ``[k]`` masses: ``normalise(sum m p)`` per component (a plain mean where no mass)."""
    v = np.stack([np.asarray(a, dtype=np.float64) for a in vectors])  # [n, k, D]
    m = np.stack([np.asarray(a, dtype=np.float64) for a in masses])  # [n, k]
    total = m.sum(0)
    weights = np.where(total[None, :] > 0, m, 1.0)
    merged = (weights[:, :, None] * v).sum(0)
    return merged / np.maximum(np.linalg.norm(merged, axis=1, keepdims=True), 1e-12)


def mixtures_to_arrays(mixtures: dict[int, np.ndarray], dim: int, k: int,
                       masses: dict[int, np.ndarray] | None = None) -> dict[str, Array]:
    classes = sorted(mixtures)
    vectors = np.stack([mixtures[c] for c in classes]) if classes else np.zeros((0, k, dim))
    out = {
        MIX_CLASSES: Array(np.asarray(classes, dtype=np.int64)),
        MIX_VECTORS: Array(np.ascontiguousarray(vectors, dtype=np.float32)),
    }
    if masses is not None:
        mass = np.stack([masses[c] for c in classes]) if classes else np.zeros((0, k))
        out[MIX_MASS] = Array(np.ascontiguousarray(mass, dtype=np.float32))
    return out


def mixtures_from_arrays(arrays: ArrayRecord) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None]:
    """``(class -> [k, D] components, class -> [k] masses or None)`` of a record (empty if absent)."""
    if MIX_CLASSES not in arrays:
        return {}, None
    classes = arrays[MIX_CLASSES].numpy().astype(np.int64).reshape(-1)
    vectors = arrays[MIX_VECTORS].numpy()
    mixtures = {int(c): np.asarray(vectors[i], dtype=np.float32) for i, c in enumerate(classes)}
    if MIX_MASS not in arrays:
        return mixtures, None
    mass = arrays[MIX_MASS].numpy()
    return mixtures, {int(c): np.asarray(mass[i], dtype=np.float64) for i, c in enumerate(classes)}


# --------------------------------------------------------------------------- client side
class Objective(ClientObjective):
    """PALM's loss alone for training, nearest class mean for inference, the mixture's maximum
    similarity as the open-world score."""

    train_loss: ClassVar[Literal["prototype", "head", "none"]] = "none"

    def __init__(self, params, info) -> None:
        super().__init__(params, info)
        self.mixtures: dict[int, torch.Tensor] = {}  # class -> [k, D] unit components
        self._masses: dict[int, np.ndarray] = {}  # this round's masses, for the upload

    def _components(self, classes) -> torch.Tensor:
        for c in classes:
            if int(c) not in self.mixtures:
                self.mixtures[int(c)] = initial_components(int(c), self.params.k, self.info.embedding_dim).to(self.info.device)
        return torch.cat([self.mixtures[int(c)] for c in classes]) if len(classes) else torch.zeros(0, self.info.embedding_dim)

    def _table(self, extra_classes=()) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        classes = sorted(set(self.mixtures) | {int(c) for c in extra_classes})
        protos = self._components(classes)
        owner = torch.as_tensor(np.repeat(classes, self.params.k), device=protos.device)
        return classes, protos, owner

    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        super().receive(arrays, model)
        merged, _ = mixtures_from_arrays(arrays)
        for c, v in merged.items():
            self.mixtures[c] = torch.as_tensor(v, device=self.info.device)

    def train_classes(self, seen: list[int]) -> list[int]:
        self._components(sorted(int(c) for c in seen))  # every seen class has its components
        return seen

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        p = self.params
        classes, protos, owner = self._table(torch.unique(labels).tolist())
        f = F.normalize(features, dim=1)
        q = class_assignment(f, labels, protos, owner, p.epsilon, p.sinkhorn_iterations)
        keep = top_k_mask(q, p.top_k)
        updated = ema_update(f, row_normalised(q * keep), protos, p.ema)
        for i, c in enumerate(classes):
            self.mixtures[c] = updated[i * p.k:(i + 1) * p.k].detach()
        q2 = class_assignment(f, labels, updated, owner, p.epsilon, p.sinkhorn_iterations)
        loss = mle_loss(f, row_normalised(q2 * keep), updated, p.temperature)
        if p.proto_contrast_weight > 0:
            contrast = prototype_contrast(updated, owner)
            if contrast is not None:
                loss = loss + p.proto_contrast_weight * contrast
        return loss

    def observe_embeddings(self, features: torch.Tensor, labels: np.ndarray) -> None:
        """The masses of this round's upload: each component's summed weight over the client's
        samples of its class, embedded after training."""
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=features.device)
        classes, protos, owner = self._table(torch.unique(y).tolist())
        f = F.normalize(features.to(protos.dtype), dim=1)
        q = class_assignment(f, y, protos, owner, self.params.epsilon, self.params.sinkhorn_iterations)
        mass = row_normalised(q * top_k_mask(q, self.params.top_k)).sum(0).cpu().numpy()
        present = set(torch.unique(y).tolist())
        self._masses = {c: mass[i * self.params.k:(i + 1) * self.params.k] for i, c in enumerate(classes) if c in present}

    def upload(self, model: ProtoModel, local_protos: PrototypeSet) -> dict[str, Array]:
        out = super().upload(model, local_protos)
        sent = {c: self.mixtures[c].cpu().numpy() for c in self._masses}
        out.update(mixtures_to_arrays(sent, self.info.embedding_dim, self.params.k, self._masses))
        return out

    def open_world_score(self, features: torch.Tensor, seen_classes: list[int]) -> np.ndarray | None:
        if self.params.open_world_score != "mixture":
            return None
        have = [int(c) for c in seen_classes if int(c) in self.mixtures]
        if not have:
            return None
        return mixture_scores(features.detach().cpu(), torch.cat([self.mixtures[c] for c in have]).cpu().numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"mixtures": {c: v.cpu().numpy() for c, v in self.mixtures.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixtures = {int(c): torch.as_tensor(v, device=self.info.device) for c, v in (state.get("mixtures") or {}).items()}


# --------------------------------------------------------------------------- server side
class PALM(ProtoAvg):
    name = "palm"
    description = "PALM: a mixture of k vMF prototypes per class (Sinkhorn assignment, EMA, MLE + prototype contrast), components merged by assignment mass"
    Params = Params
    Objective = Objective
    merge_is_sum = False  # the components' merge normalises a weighted sum: not a plain sum

    def __init__(self, params: StrategyParams, run) -> None:
        super().__init__(params, run)
        self.mixtures: dict[int, np.ndarray] = {}  # class -> [k, D] float32

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        super().merge(server_round, uploads)  # class means (count-weighted), FedAvg of the weights
        per_class: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for u in uploads:  # ordered by partition id
            mixtures, masses = mixtures_from_arrays(u.arrays)
            for c, v in mixtures.items():
                vs, ms = per_class.setdefault(c, ([], []))
                vs.append(v)
                ms.append(masses[c] if masses is not None else np.zeros(len(v)))
        for c, (vs, ms) in per_class.items():
            self.mixtures[c] = merge_mixtures(vs, ms).astype(np.float32)

    def global_arrays(self) -> ArrayRecord:
        record = super().global_arrays()
        if self.mixtures:
            for key, value in mixtures_to_arrays(self.mixtures, self.run.embedding_dim, self.params.k).items():
                record[key] = value
        return record

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["palm_mixtures"] = {int(c): np.array(v) for c, v in self.mixtures.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mixtures = {int(c): np.asarray(v, dtype=np.float32) for c, v in (state.get("palm_mixtures") or {}).items()}
