"""``fpl``: FPL, Federated Prototypes Learning (Huang et al., CVPR 2023, "Rethinking Federated
Learning with Domain Shift: A Prototype View").

Server: for every class uploaded this round, the client prototypes of that class are clustered
with FINCH (cosine, :mod:`strategies.finch`). FINCH returns a hierarchy of partitions; we use
the coarsest partition that still has more than one cluster, or the single cluster when the
first partition already joins everything (e.g. two clients). That is the partition the official
code (``WenkeHuang/RethinkFL``) uses: it takes the last column of the original FINCH, which
drops a final single-cluster step. A cluster prototype is the plain mean of its members' client
prototypes; the unbiased prototype of the class is the plain mean of its cluster prototypes
(so a cluster of many similar clients counts once, not once per client). Classes not uploaded
in a round keep their cluster and unbiased prototypes, so classes of earlier tasks stay known.
``share_weights`` (default true, as in FPL) also FedAvg-averages the backbone.

What travels: the unbiased prototypes as ``proto.*`` (``global_protos``), and every cluster
prototype as one ``[K, D]`` array ``fpl.cluster.vectors`` with ``fpl.cluster.classes`` giving
the class of each row (a class appears once per cluster).

Client: cross-entropy of a local linear head over the seen classes (FPL's task loss) plus

* ``infonce_weight`` x InfoNCE over the cluster prototypes: with ``s`` the cosine similarity,
  ``t`` the temperature, ``P+`` the clusters of the sample's class and ``P`` all cluster
  prototypes, ``mean over p in P+ of -log(exp(s(f,p)/t) / sum_{q in P} exp(s(f,q)/t))``
  (``infonce_positives: mean_log``, the default), or the official code's form
  ``-log(sum_{p in P+} exp(s(f,p)/t) / sum_{q in P} exp(s(f,q)/t))`` (``log_sum``); averaged
  over the batch samples whose class has clusters;
* ``mse_weight`` x MSE between each feature and the unbiased prototype of its class.

Inference: nearest unbiased global prototype (the paper classifies with the FedAvg'd model's
head; here the head stays local, as in ``fedproto``).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord
from pydantic import Field

from simulator.learner.backbones import ProtoModel
from simulator.learner.prototypes import PrototypeSet

from .base import FederatedStrategy, ShareWeights, StrategyParams, Upload
from .fedproto import Objective as PullToPrototypes
from .fedproto import mse_to_prototypes
from .finch import coarsest_multi_cluster, finch

CLUSTER_PREFIX = "fpl.cluster"
CLUSTER_CLASSES = f"{CLUSTER_PREFIX}.classes"
CLUSTER_VECTORS = f"{CLUSTER_PREFIX}.vectors"


class Params(StrategyParams):
    temperature: float = Field(0.02, gt=0.0, le=100.0, description="InfoNCE temperature on cosine similarities")
    infonce_weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the InfoNCE term over cluster prototypes")
    mse_weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the MSE pull to the unbiased prototype")
    infonce_positives: Literal["mean_log", "log_sum"] = Field(
        "mean_log",
        description="several positive clusters: mean of per-positive -log terms, or -log of their summed mass (official code)",
    )
    share_weights: ShareWeights = Field(True, description="also FedAvg the backbone weights each round (FPL does); first_task: only during the first task, then the backbone is frozen and only prototypes travel")


# --------------------------------------------------------------------------- server side
def cluster_class_prototypes(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPL's per-class merge: ``(cluster prototypes [k, D], unbiased prototype [D])`` of the
    client prototypes ``vectors`` (``[n, D]``, one row per client), in float64."""
    x = np.asarray(vectors, dtype=np.float64)
    labels = coarsest_multi_cluster(finch(x))
    k = int(labels.max()) + 1
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    clusters = sums / np.bincount(labels, minlength=k)[:, None]
    return clusters, clusters.mean(0)


def clusters_to_arrays(clusters: dict[int, np.ndarray], dim: int) -> dict[str, Array]:
    classes = sorted(clusters)
    if classes:
        vectors = np.concatenate([clusters[c] for c in classes]).astype(np.float32)
        rows = np.concatenate([np.full(len(clusters[c]), c, dtype=np.int64) for c in classes])
    else:
        vectors, rows = np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return {
        CLUSTER_CLASSES: Array(np.ascontiguousarray(rows)),
        CLUSTER_VECTORS: Array(np.ascontiguousarray(vectors)),
    }


def clusters_from_arrays(arrays: ArrayRecord) -> tuple[np.ndarray, np.ndarray] | None:
    """``(classes [K], vectors [K, D])`` of the cluster table, or None if absent or empty."""
    if CLUSTER_CLASSES not in arrays:
        return None
    classes = arrays[CLUSTER_CLASSES].numpy().astype(np.int64).reshape(-1)
    if len(classes) == 0:
        return None
    vectors = arrays[CLUSTER_VECTORS].numpy().astype(np.float32).reshape(len(classes), -1)
    return classes, vectors


# --------------------------------------------------------------------------- client side
def cluster_infonce(
    features: torch.Tensor,
    labels: torch.Tensor,
    cluster_classes: torch.Tensor,
    cluster_vectors: torch.Tensor,
    temperature: float,
    positives: str = "mean_log",
) -> torch.Tensor | None:
    """InfoNCE of each feature against all cluster prototypes, its own class's clusters being
    the positives; averaged over the samples whose class has clusters (None if none has)."""
    pos = labels.unsqueeze(1) == cluster_classes.unsqueeze(0)  # [B, K]
    has = pos.any(1)
    if not bool(has.any()):
        return None
    f, pos = features[has], pos[has]
    logits = F.normalize(f, dim=1) @ F.normalize(cluster_vectors, dim=1).T / temperature
    log_norm = torch.logsumexp(logits, dim=1)
    if positives == "log_sum":
        log_pos = torch.logsumexp(logits.masked_fill(~pos, float("-inf")), dim=1)
        per_sample = log_norm - log_pos
    else:
        log_prob = logits - log_norm.unsqueeze(1)
        per_sample = -(log_prob * pos).sum(1) / pos.sum(1)
    return per_sample.mean()


class Objective(PullToPrototypes):
    """Head cross-entropy for training, nearest received prototype for inference (as FedProto),
    with this method's own loss terms."""

    def __init__(self, params, info) -> None:
        super().__init__(params, info)
        self._clusters: tuple[torch.Tensor, torch.Tensor] | None = None

    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        super().receive(arrays, model)  # unbiased prototypes (proto.*), shared weights, lookup table
        table = clusters_from_arrays(arrays)
        self._clusters = None
        if table is not None:
            classes, vectors = table
            self._clusters = (
                torch.as_tensor(classes, device=self.info.device),
                torch.as_tensor(vectors, device=self.info.device),
            )

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        total = None
        p = self.params
        if self._clusters is not None and p.infonce_weight > 0:
            nce = cluster_infonce(features, labels, *self._clusters, p.temperature, p.infonce_positives)
            if nce is not None:
                total = p.infonce_weight * nce
        if p.mse_weight > 0:
            mse = mse_to_prototypes(features, labels, self._lookup)
            if mse is not None:
                total = p.mse_weight * mse if total is None else total + p.mse_weight * mse
        return total


class FPL(FederatedStrategy):
    name = "fpl"
    description = "FPL: FINCH cluster prototypes + their mean (unbiased); head CE + InfoNCE to clusters + MSE to unbiased"
    Params = Params
    Objective = Objective

    def __init__(self, params: StrategyParams, run) -> None:
        super().__init__(params, run)
        self.cluster_protos: dict[int, np.ndarray] = {}  # class -> [k, D] float32

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        per_class: dict[int, list[np.ndarray]] = {}
        counts: dict[int, int] = {}
        for u in uploads:  # ordered by partition id
            if u.protos is None:
                continue
            for c, v, n in zip(u.protos.classes, u.protos.vectors, u.protos.counts):
                if n <= 0:
                    continue
                per_class.setdefault(int(c), []).append(v)
                counts[int(c)] = counts.get(int(c), 0) + int(n)
        if per_class:
            classes = sorted(per_class)
            unbiased = []
            for c in classes:
                clusters, mean = cluster_class_prototypes(np.stack(per_class[c]))
                self.cluster_protos[c] = clusters.astype(np.float32)
                unbiased.append(mean)
            merged = PrototypeSet(
                np.array(classes, dtype=np.int64),
                np.stack(unbiased).astype(np.float32),
                np.array([counts[c] for c in classes], dtype=np.int64),
            )
            self.global_protos = self.global_protos.updated_with(merged)
        if self.shares_weights:
            self.merge_weights(uploads)

    def global_arrays(self) -> ArrayRecord:
        record = super().global_arrays()
        if self.cluster_protos:
            for key, value in clusters_to_arrays(self.cluster_protos, self.run.embedding_dim).items():
                record[key] = value
        return record

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["fpl_clusters"] = {int(c): np.array(v) for c, v in self.cluster_protos.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cluster_protos = {
            int(c): np.asarray(v, dtype=np.float32) for c, v in (state.get("fpl_clusters") or {}).items()
        }
