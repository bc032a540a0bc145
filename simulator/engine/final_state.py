"""What stays after a run (``output.save``), written by the driver at the end of the last task.

``global``  (default) ``final/global.npz``: every array the strategy publishes as its global
            state (``proto.classes``, ``proto.vectors``, ``proto.counts`` for prototypes or
            anchors, and the server-side model weights of weight-sharing methods), exactly as it
            is sent to clients; ``final/client_prototypes.npz``: each client's final local
            prototypes (``client``, ``classes``, ``vectors``, ``counts``, one row per
            client-class), recomputed with its final model in eval mode on all of its training
            data, so that ``plots/prototypes.png`` can show whether the clients' feature spaces agree;
            ``final/evaluation.json``: the clients the last evaluation asked (``clients``).
``clients`` the above and ``final/clients/<id>.pt`` per client: its final model weights, backbone
            name, local prototypes and class counts (``protofed`` rebuilds the model:
            ``RunResult.client_model(id)``), and what its final evaluation needs besides the
            global state: the strategy's client-side state (``objective``: e.g. the local
            prototypes that ``local`` and ``joint`` classify with) and whether the client held
            the frozen backbone of ``share_weights: first_task`` (``frozen_backbone``: the server
            then sends it no weights), so that ``RunResult.evaluate()`` repeats that evaluation.
``none``    nothing.

The client state store is private to a run and removed at its end; this is the only copy kept.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..results import atomic_write_bytes, atomic_write_text
from .runtime import RunSetup, runtime_for

EVALUATION_FILE = "evaluation.json"


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def save_final(run_dir: Path, strategy: Any, setup: RunSetup, mode: str) -> None:
    if mode == "none":
        return
    from ..learner.training import compute_prototypes

    final = Path(run_dir) / "final"
    arrays = {k: np.asarray(v.numpy()) for k, v in strategy.global_arrays().items()}
    atomic_write_bytes(final / "global.npz", _npz(arrays))
    evaluated = [int(p) for p in strategy.eval_partitions()]  # the strategy may narrow them (joint: one client)
    atomic_write_text(final / EVALUATION_FILE, json.dumps({"clients": evaluated}) + "\n")

    rt = runtime_for(setup)
    stream, data = rt.stream, rt.stream.dataset
    rows_client, rows_class, rows_count, vectors = [], [], [], []
    for pid in rt.store.ids():  # the clients with a state, in order: not the whole population
        state = rt.store.load(pid)
        if state is None or state.get("model") is None:
            continue  # never trained (absent all run)
        model = rt.new_model(pid)
        model.load_state_dict(state["model"])
        idx = np.concatenate([np.asarray(per_client[pid]) for per_client in stream.train_indices])
        if len(idx) == 0:
            continue
        # on the clients' device: the driver recomputing every client's prototypes on the CPU was
        # most of a GPU run's end-of-run writes (issue "On GPUs": task_end_writes 45% of the GPU check)
        protos = compute_prototypes(model.to(rt.device), data.x_train[idx], data.y_train[idx], rt.device,
                                    cache=rt.feature_cache(bool(getattr(strategy, "backbone_frozen", False)
                                                                and pid in getattr(strategy, "holding_frozen", ()))))
        rows_client += [pid] * len(protos.classes)
        rows_class += list(protos.classes)
        rows_count += list(protos.counts)
        vectors.append(protos.vectors)
        if mode == "clients":
            buf = io.BytesIO()
            torch.save(
                {
                    "partition_id": pid,
                    "backbone": rt.scenario.model.backbone_of(pid),
                    "input_shape": tuple(int(d) for d in data.input_shape),
                    "embedding_dim": rt.scenario.model.embedding_dim,
                    "aper": rt.scenario.model.aper,
                    "num_classes": int(data.num_classes),
                    "model": state["model"],
                    "prototypes": {"classes": protos.classes, "vectors": protos.vectors, "counts": protos.counts},
                    "class_counts": np.asarray(state.get("class_counts")),
                    "objective": state.get("objective") or {},
                    "frozen_backbone": bool(getattr(strategy, "backbone_frozen", False)
                                            and pid in getattr(strategy, "holding_frozen", ())),
                },
                buf,
            )
            atomic_write_bytes(final / "clients" / f"{pid}.pt", buf.getvalue())
    dim = rt.scenario.model.feature_dim
    atomic_write_bytes(
        final / "client_prototypes.npz",
        _npz(
            {
                "client": np.asarray(rows_client, dtype=np.int64),
                "classes": np.asarray(rows_class, dtype=np.int64),
                "counts": np.asarray(rows_count, dtype=np.int64),
                "vectors": np.vstack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32),
            }
        ),
    )
