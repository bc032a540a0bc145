"""How prototypes, weights and settings travel in Flower records, and how bytes are counted.

Conventions (a contract between the engine and the strategies):

* server -> client: ``RecordDict({"global": ArrayRecord, "config": ConfigRecord})``
* client -> server after training: ``RecordDict({"upload": ArrayRecord, "metrics": MetricRecord})``
* client -> server after evaluation: ``RecordDict({"metrics": MetricRecord})``

Prototypes travel as one ``[classes x dim]`` float32 array (``proto.vectors``) plus the class
ids (``proto.classes``); their sample counts go in the MetricRecord (``proto.counts``) of
uploads and in ``proto.counts`` arrays of global state. Weights travel as ``w.<state_dict key>``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .learner.prototypes import PrototypeSet
from .learner.second_order import SecondOrderStats

GLOBAL = "global"
CONFIG = "config"
UPLOAD = "upload"
METRICS = "metrics"
#: evaluate config key: the global tasks nobody in the federation has learned yet, sent (non-empty)
#: only with the evaluation that fills a row of the accuracy matrix (open-world scoring)
OPEN_WORLD_TASKS = "open_world_tasks"
WEIGHT_PREFIX = "w."
FROZEN_FLAG = "share.frozen"  # global record: share_weights first_task has frozen the backbone (weights no longer averaged)


# --------------------------------------------------------------------------- prototypes
def protos_to_arrays(protos: PrototypeSet, prefix: str = "proto", with_counts: bool = False) -> dict[str, Array]:
    out = {
        f"{prefix}.classes": Array(np.ascontiguousarray(protos.classes, dtype=np.int64)),
        f"{prefix}.vectors": Array(np.ascontiguousarray(protos.vectors, dtype=np.float32)),
    }
    if with_counts:
        out[f"{prefix}.counts"] = Array(np.ascontiguousarray(protos.counts, dtype=np.int64))
    return out


def protos_from_arrays(
    arrays: ArrayRecord, prefix: str = "proto", counts: Iterable[int] | None = None
) -> PrototypeSet | None:
    """Read a PrototypeSet; counts from ``counts`` (an upload's MetricRecord) or from the
    ``<prefix>.counts`` array of global state. None if the record holds no prototypes."""
    key = f"{prefix}.classes"
    if key not in arrays:
        return None
    classes = arrays[key].numpy()
    vectors = arrays[f"{prefix}.vectors"].numpy()
    if len(classes) == 0:  # an empty upload (a client that had nothing to learn from)
        return PrototypeSet.empty(int(vectors.shape[1]) if vectors.ndim == 2 else 0)
    if counts is not None:
        cnt = np.asarray(list(counts), dtype=np.int64)
    elif f"{prefix}.counts" in arrays:
        cnt = arrays[f"{prefix}.counts"].numpy()
    else:
        cnt = np.ones(len(classes), dtype=np.int64)
    return PrototypeSet(classes, vectors.reshape(len(classes), -1), cnt)


# --------------------------------------------------------------------------- second-order statistics
SECOND_ORDER = "so"


def stats_to_arrays(stats: SecondOrderStats) -> dict[str, Array]:
    """Per-class counts, feature sums and sums of outer products (float64: they are summed).
    The outer-product sums are symmetric, so only their upper triangles travel (``squares_upper``,
    ``[C, D (D + 1) / 2]``): half the bytes, nothing lost. A first-order classifier (``nme``) sends
    no outer products; ``fecam`` also sends the sums of the untransformed embeddings (``raw_sums``);
    pooled statistics (``ranpac``'s global message) send one summed Gram matrix (``gram_upper``)."""
    rows, cols = np.triu_indices(stats.dim)
    out = {
        f"{SECOND_ORDER}.classes": Array(np.ascontiguousarray(stats.classes, dtype=np.int64)),
        f"{SECOND_ORDER}.counts": Array(np.ascontiguousarray(stats.counts, dtype=np.int64)),
        f"{SECOND_ORDER}.sums": Array(np.ascontiguousarray(stats.sums, dtype=np.float64)),
    }
    if stats.squares is not None:
        out[f"{SECOND_ORDER}.squares_upper"] = Array(np.ascontiguousarray(stats.squares[:, rows, cols], dtype=np.float64))
    if stats.gram is not None:  # ranpac: the classes' outer products summed (SecondOrderStats.pooled)
        out[f"{SECOND_ORDER}.gram_upper"] = Array(np.ascontiguousarray(stats.gram[rows, cols], dtype=np.float64))
    if stats.raw_sums is not None:
        out[f"{SECOND_ORDER}.raw_sums"] = Array(np.ascontiguousarray(stats.raw_sums, dtype=np.float64))
    return out


def stats_from_arrays(arrays: ArrayRecord) -> SecondOrderStats | None:
    if f"{SECOND_ORDER}.classes" not in arrays:
        return None
    classes, counts, sums = (arrays[f"{SECOND_ORDER}.{k}"].numpy() for k in ("classes", "counts", "sums"))
    c = len(np.asarray(classes).reshape(-1))
    d = int(sums.shape[-1]) if sums.ndim == 2 else int(sums.size // max(c, 1))
    squares = None
    if f"{SECOND_ORDER}.squares_upper" in arrays:
        rows, cols = np.triu_indices(d)
        squares = np.zeros((c, d, d), dtype=np.float64)
        upper = arrays[f"{SECOND_ORDER}.squares_upper"].numpy().reshape(c, len(rows))
        squares[:, rows, cols] = upper
        squares[:, cols, rows] = upper
    gram = None
    if f"{SECOND_ORDER}.gram_upper" in arrays:
        rows, cols = np.triu_indices(d)
        gram = np.zeros((d, d), dtype=np.float64)
        gram[rows, cols] = arrays[f"{SECOND_ORDER}.gram_upper"].numpy().reshape(-1)
        gram[cols, rows] = gram[rows, cols]
    raw = arrays[f"{SECOND_ORDER}.raw_sums"].numpy() if f"{SECOND_ORDER}.raw_sums" in arrays else None
    return SecondOrderStats(classes, counts, sums, squares, raw, gram)


# --------------------------------------------------------------------------- weights
def shared_state(model: torch.nn.Module, include_head: bool) -> dict[str, torch.Tensor]:
    """The tensors of a model that weight-sharing strategies average (float tensors only:
    BatchNorm's integer step counter stays local; with ``model.norm: batch_local`` (FedBN) every
    BatchNorm layer stays local; APER's frozen branch (``model.aper``) never travels: every party
    builds it alike from the run's seed and ``model.pretrained``)."""
    local: tuple[str, ...] = tuple(getattr(model, "never_shared", ()))
    if getattr(model, "local_norm", False):
        local += tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    out = {}
    for k, v in model.state_dict().items():
        if not include_head and k.startswith("head."):
            continue
        if not torch.is_floating_point(v):
            continue
        if local and k.startswith(local):
            continue
        out[k] = v
    return out


def weights_to_arrays(model: torch.nn.Module, include_head: bool) -> dict[str, Array]:
    return {
        WEIGHT_PREFIX + k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
        for k, v in shared_state(model, include_head).items()
    }


def frozen_views(arrays: ArrayRecord) -> tuple[ArrayRecord, ArrayRecord]:
    """The global state once ``share_weights: first_task`` has frozen the backbone, as the server
    sends it: ``(full, light)``, both flagged with :data:`FROZEN_FLAG`; ``light`` (for a client
    that already holds the frozen backbone) carries no weights."""
    flag = {FROZEN_FLAG: Array(np.ones(1, dtype=np.int8))}
    full = ArrayRecord({**dict(arrays.items()), **flag})
    light = ArrayRecord({**{k: v for k, v in arrays.items() if not k.startswith(WEIGHT_PREFIX)}, **flag})
    return full, light


def has_weights(arrays: ArrayRecord) -> bool:
    return any(k.startswith(WEIGHT_PREFIX) for k in arrays.keys())


def load_weights(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy every ``w.*`` array of ``arrays`` into the model (other tensors stay)."""
    state = model.state_dict()
    with torch.no_grad():
        for key in arrays.keys():
            if not key.startswith(WEIGHT_PREFIX):
                continue
            name = key[len(WEIGHT_PREFIX) :]
            if name not in state:
                raise KeyError(f"received weights for {name!r}, which this model does not have")
            state[name].copy_(torch.as_tensor(arrays[key].numpy()))


def weighted_average(records: list[ArrayRecord], weights: list[float], prefix: str = WEIGHT_PREFIX) -> dict[str, Array]:
    """Sample-weighted mean of the ``prefix`` arrays of several records (FedAvg), in a fixed order."""
    total = float(sum(weights))
    if not records or total <= 0:
        return {}
    acc: dict[str, np.ndarray] = {}
    for rec, w in zip(records, weights):
        factor = w / total
        for key in rec.keys():
            if not key.startswith(prefix):
                continue
            value = rec[key].numpy().astype(np.float64) * factor
            if key in acc:
                acc[key] += value
            else:
                acc[key] = value
    return {k: Array(v.astype(np.float32)) for k, v in acc.items()}


# --------------------------------------------------------------------------- bytes
#: metric keys that carry a method's payload (what a real deployment would have to send);
#: every other metric (partition id, loss, timings, state sizes) is bookkeeping of the simulator
PAYLOAD_METRIC_PREFIXES = ("proto.",)
PAYLOAD_METRIC_KEYS = ("num_examples",)


def array_nbytes(array: Array) -> int:
    """Bytes of an array's values (shape x item size), without the serialisation header."""
    return int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize


def payload_bytes(content: RecordDict) -> int:
    """Bytes a method actually communicates in a message: the values of every array (no
    per-array serialisation header) and 8 bytes per number of the payload metrics
    (``num_examples``, ``proto.*``), those only in a message whose arrays carry at least one value. Config records (task ids, seen classes: orchestration the
    simulator adds) and bookkeeping metrics are not counted."""
    arrays = [a for rec in content.values() if isinstance(rec, ArrayRecord) for a in rec.values()]
    total = sum(array_nbytes(a) for a in arrays)
    if total == 0:  # nothing sent (local, joint, a client with nothing to train on): nothing to weight or count either
        return 0
    for rec in content.values():
        if isinstance(rec, MetricRecord):
            for key, v in rec.items():
                if key in PAYLOAD_METRIC_KEYS or key.startswith(PAYLOAD_METRIC_PREFIXES):
                    total += 8 * (len(v) if isinstance(v, list) else 1)
    return total


def record_bytes(content: RecordDict) -> int:
    """Bytes of payload in a RecordDict: array buffers, 8 bytes per metric/config number,
    the UTF-8 length of strings and bytes values."""
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += sum(len(a.data) for a in rec.values())
        elif isinstance(rec, (MetricRecord, ConfigRecord)):
            for v in rec.values():
                items = v if isinstance(v, list) else [v]
                for item in items:
                    if isinstance(item, (bytes, bytearray)):
                        total += len(item)
                    elif isinstance(item, str):
                        total += len(item.encode())
                    else:
                        total += 8
    return total
