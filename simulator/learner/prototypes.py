"""Prototype memory: class id -> mean embedding and the number of samples behind it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PrototypeSet:
    """Prototypes of some classes. Rows of ``vectors`` follow ``classes`` (kept sorted)."""

    classes: np.ndarray  # int64 [C]
    vectors: np.ndarray  # float32 [C, D]
    counts: np.ndarray  # int64 [C]

    def __post_init__(self) -> None:
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        if self.vectors.ndim != 2 and self.classes.size == 0:
            self.vectors = self.vectors.reshape(0, 0)
        if not (len(self.classes) == len(self.vectors) == len(self.counts)):
            raise ValueError("classes, vectors and counts must have the same length")
        order = np.argsort(self.classes, kind="stable")
        if np.any(order != np.arange(len(order))):
            self.classes, self.vectors, self.counts = self.classes[order], self.vectors[order], self.counts[order]
        if len(np.unique(self.classes)) != len(self.classes):
            raise ValueError("a class appears twice in a PrototypeSet")

    @classmethod
    def empty(cls, dim: int = 0) -> "PrototypeSet":
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) if self.vectors.ndim == 2 else 0

    def as_dict(self) -> dict[int, np.ndarray]:
        return {int(c): v for c, v in zip(self.classes, self.vectors)}

    def select(self, classes: list[int] | np.ndarray) -> "PrototypeSet":
        """The prototypes of ``classes`` that this set holds."""
        mask = np.isin(self.classes, np.asarray(classes, dtype=np.int64))
        return PrototypeSet(self.classes[mask], self.vectors[mask], self.counts[mask])

    def updated_with(self, other: "PrototypeSet") -> "PrototypeSet":
        """This set with the classes of ``other`` replaced or added."""
        keep = ~np.isin(self.classes, other.classes)
        if len(other) == 0:
            return self
        if keep.sum() == 0:
            return other
        return PrototypeSet(
            np.concatenate([self.classes[keep], other.classes]),
            np.concatenate([self.vectors[keep], other.vectors]),
            np.concatenate([self.counts[keep], other.counts]),
        )


def class_means(features: torch.Tensor | np.ndarray, labels: np.ndarray) -> PrototypeSet:
    """Per-class mean of ``features`` (one row per sample) and per-class counts."""
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return PrototypeSet.empty(feats.shape[1] if feats.ndim == 2 else 0)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((len(classes), feats.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, feats.astype(np.float64))
    return PrototypeSet(classes, (sums / counts[:, None]).astype(np.float32), counts)


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` squared Euclidean distances between rows of ``features`` and ``prototypes``."""
    f2 = (features * features).sum(1, keepdim=True)
    p2 = (prototypes * prototypes).sum(1).unsqueeze(0)
    return (f2 - 2.0 * features @ prototypes.T + p2).clamp_min(0.0)


def nearest_prototype(features: torch.Tensor, protos: PrototypeSet) -> np.ndarray:
    """Predicted class id of each row: the class of the nearest prototype."""
    if len(protos) == 0:
        raise ValueError("no prototypes to classify with")
    p = torch.as_tensor(protos.vectors, device=features.device, dtype=features.dtype)
    idx = squared_distances(features, p).argmin(dim=1).cpu().numpy()
    return protos.classes[idx]


def merge_class_means(sets: list[PrototypeSet], weighting: str = "samples") -> PrototypeSet:
    """Merge several clients' prototypes class by class.

    ``samples``: the count-weighted mean, i.e. exactly the mean of all the clients' samples
    pooled (Federated Reconnaissance's running mean ``N += n; p += n / N (p_i - p)`` gives the
    same value in any order). ``uniform``: the plain mean over the clients holding the class.
    The merged count is the total count. Computed in float64, in the order given.
    """
    sums: dict[int, np.ndarray] = {}
    weights: dict[int, float] = {}
    counts: dict[int, int] = {}
    for s in sets:
        for c, v, n in zip(s.classes, s.vectors, s.counts):
            c = int(c)
            w = float(n) if weighting == "samples" else 1.0
            if w <= 0:
                continue
            sums[c] = sums.get(c, 0.0) + w * v.astype(np.float64)
            weights[c] = weights.get(c, 0.0) + w
            counts[c] = counts.get(c, 0) + int(n)
    if not sums:
        dim = sets[0].dim if sets else 0
        return PrototypeSet.empty(dim)
    classes = sorted(sums)
    return PrototypeSet(
        np.array(classes, dtype=np.int64),
        np.stack([sums[c] / weights[c] for c in classes]).astype(np.float32),
        np.array([counts[c] for c in classes], dtype=np.int64),
    )
