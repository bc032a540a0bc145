"""What ``protofed attack`` needs, recorded when ``privacy.keep_uploads`` is on.

Two records, kept apart because they belong to different parties:

* the server's view (:class:`UploadLog`): every training reply the strategy received, as the
  strategy received it (one aggregate under secure aggregation), per global round: the
  sender (partition id, -1 for an aggregate), the class ids, the prototype vectors, the counts;
* the auditor's ground truth (:func:`record_truth`, written by each client into the run's
  private state folder, never sent in a message, no bytes counted): at the last round of each
  task, the embeddings of the samples the upload was computed from (members, up to
  ``TRUTH_PER_CLASS`` per class) and of held-out test samples of the same classes
  (non-members), both under the client's model at upload time.

Both end up in ``<run dir>/uploads.npz``. The attack's threat model (documented in
:mod:`.attack`) is a server that knows the client's feature extractor and holds reference data
of each class; the ground truth only scores the attack, it never feeds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from ..records import METRICS, UPLOAD, protos_from_arrays

TRUTH_PER_CLASS = 100


class UploadLog:
    """The uploads the server received, in order."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, np.ndarray, np.ndarray, np.ndarray]] = []

    def observe(self, server_round: int, task: int, rnd: int, replies: Iterable) -> None:
        for r in replies:
            if r.has_error() or not r.has_content() or UPLOAD not in r.content:
                continue
            m = r.content[METRICS]
            counts = m["proto.counts"] if "proto.counts" in m else None
            p = protos_from_arrays(r.content[UPLOAD], counts=counts)
            if p is None or len(p) == 0:
                continue
            self.rows.append((server_round, task, rnd, int(m["partition_id"]), p.classes, p.vectors, p.counts))

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, (sr, task, rnd, pid, classes, vectors, counts) in enumerate(self.rows):
            key = f"upload/{i}"
            out[f"{key}/meta"] = np.array([sr, task, rnd, pid], dtype=np.int64)
            out[f"{key}/classes"] = classes
            out[f"{key}/vectors"] = vectors
            out[f"{key}/counts"] = counts
        return out


def truth_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "audit"


def record_truth(state_dir: str | Path, pid: int, server_round: int, member_emb: np.ndarray, member_y: np.ndarray,
                 other_emb: np.ndarray, other_y: np.ndarray, seed: int, member_x: np.ndarray | None = None,
                 other_x: np.ndarray | None = None, model: dict[str, np.ndarray] | None = None) -> None:
    """Members and non-members of one release, subsampled to TRUTH_PER_CLASS per class (their
    embeddings, and their inputs and the client's model for feature inversion)."""
    gen = np.random.default_rng(seed)

    def cap(y: np.ndarray) -> np.ndarray:
        keep: list[int] = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            keep.extend(gen.choice(idx, size=min(len(idx), TRUTH_PER_CLASS), replace=False).tolist())
        return np.array(sorted(keep), dtype=np.int64)

    km, ko = cap(member_y), cap(other_y)
    out = {"member_emb": member_emb[km].astype(np.float32), "member_y": member_y[km].astype(np.int64),
           "other_emb": other_emb[ko].astype(np.float32), "other_y": other_y[ko].astype(np.int64),
           "meta": np.array([pid, server_round])}
    if member_x is not None and other_x is not None:
        out["member_x"] = member_x[km].astype(np.float32)
        out["other_x"] = other_x[ko].astype(np.float32)
    for k, v in (model or {}).items():
        out[f"model.{k}"] = v
    d = truth_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{pid}-{server_round}.npz"
    with open(tmp, "wb") as f:
        np.savez(f, **out)
    tmp.replace(d / f"{pid}-{server_round}.npz")


def client_truth(setup, rt, pid: int, task: int, rnd: int, server_round: int, model, x: np.ndarray, y: np.ndarray) -> None:
    """Called by the client handler after its upload is formed (only with keep_uploads, only at
    the last round of a task)."""
    s = rt.scenario
    if not s.privacy.keep_uploads or rnd != s.training.rounds_per_task - 1 or len(y) == 0:
        return
    from ..learner.training import embed
    from ..seeding import derive_seed

    data = rt.stream.dataset
    test_mask = np.isin(data.y_test, np.unique(y))
    xt, yt = data.x_test[test_mask], data.y_test[test_mask]
    member = embed(model, x, rt.device).detach().cpu().numpy()
    other = embed(model, xt, rt.device).detach().cpu().numpy() if len(yt) else np.zeros((0, member.shape[1]), np.float32)
    spec = {  # what rebuilds the client's model for feature inversion (simulator.learner.backbones.build_model)
        "spec.backbone": np.array(s.model.backbone_of(pid)),
        "spec.input_shape": np.array(data.input_shape, dtype=np.int64),
        "spec.embedding_dim": np.array(s.model.embedding_dim),
        "spec.num_classes": np.array(data.num_classes),
        "spec.with_head": np.array(bool(rt.with_head)),
        "spec.norm": np.array(s.model.norm),
        "spec.aper": np.array(bool(s.model.aper)),
    }
    weights = {f"w.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    record_truth(setup.state_dir, pid, server_round, member, y, other, yt, derive_seed(s.seed, "audit", pid, server_round),
                 member_x=np.asarray(x, dtype=np.float32), other_x=np.asarray(xt, dtype=np.float32), model={**spec, **weights})


def write_uploads(path: Path, log: UploadLog, state_dir: str | Path) -> None:
    """``uploads.npz``: the server's view and the auditor's ground truth (see module doc)."""
    out = log.arrays()
    for f in sorted(truth_dir(state_dir).glob("[0-9]*-[0-9]*.npz")):
        with np.load(f) as z:
            pid, sr = (int(v) for v in z["meta"])
            for k in z.files:
                if k != "meta":
                    out[f"truth/{pid}/{sr}/{k}"] = z[k]
    tmp = path.with_name("." + path.name)
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **out)
    tmp.replace(path)
