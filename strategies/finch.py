"""FINCH: parameter-free hierarchical clustering by first-neighbour relations.

Sarfraz, Sharma and Stiefelhagen, "Efficient Parameter-free Clustering Using First Neighbor
Relations", CVPR 2019. Written here from the paper's definition:

* every point links to its first neighbour ``nn(i)`` (the most cosine-similar other point);
* points ``i`` and ``j`` are in one cluster when ``j = nn(i)``, ``i = nn(j)`` or
  ``nn(i) = nn(j)``; the clusters are the connected components of that adjacency (the third
  condition adds no component the first two do not already join: ``i`` and ``j`` both link to
  ``nn(i)``, so the components of the undirected graph ``i -- nn(i)`` are the same);
* the step is repeated on the cluster means (means of the original points of each cluster)
  until one cluster remains or a step merges nothing.

:func:`finch` returns every partition found, finest first, each as an int label array over the
original points (labels ``0 .. k-1``). A partition is only appended when it merged something,
so the list ends with a single-cluster partition when the hierarchy collapses that far.

Pure numpy plus ``scipy.sparse.csgraph.connected_components``; the original's optional
approximate nearest-neighbour search and its "min_sim" early-exit check are left out (FPL's
official code calls FINCH with that check switched off).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def first_neighbours(points: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row (ties: the lowest index).

    Zero rows have similarity 0 to everything. Needs at least two rows."""
    x = np.asarray(points, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def _first_neighbour_partition(points: np.ndarray) -> np.ndarray:
    """One FINCH step: labels (0 .. k-1) of the connected components of ``i -- nn(i)``."""
    n = len(points)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    nn = first_neighbours(points)
    graph = coo_matrix((np.ones(n), (np.arange(n), nn)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return labels.astype(np.int64)


def _group_means(points: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, points.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, points)
    return sums / np.bincount(labels, minlength=k)[:, None]


def finch(points: np.ndarray) -> list[np.ndarray]:
    """FINCH partitions of ``points`` (``[N, D]``, cosine), finest first.

    Each entry is an ``int64`` label array of length N. One point gives ``[[0]]``; an empty
    input gives ``[]``.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError("finch expects a [N, D] array")
    n = len(x)
    if n == 0:
        return []
    labels = _first_neighbour_partition(x)
    partitions = [labels]
    k = int(labels.max()) + 1
    while k > 1:
        means = _group_means(x, labels, k)
        merged = _first_neighbour_partition(means)  # labels of the current clusters
        k_new = int(merged.max()) + 1
        if k_new >= k:
            break  # no merge: the hierarchy stops here
        labels = merged[labels]
        partitions.append(labels)
        k = k_new
    return partitions


def num_clusters(labels: np.ndarray) -> int:
    return int(len(np.unique(labels)))


def coarsest_multi_cluster(partitions: list[np.ndarray]) -> np.ndarray:
    """The partition FPL uses: the coarsest one that still has more than one cluster, or the
    first partition when even that is a single cluster.

    This is what the official FPL code gets from the last column of the original FINCH, which
    drops a final single-cluster (or non-merging) step before returning."""
    if not partitions:
        raise ValueError("no partitions")
    for labels in reversed(partitions):
        if num_clusters(labels) > 1:
            return labels
    return partitions[0]
