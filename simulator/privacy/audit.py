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
                 other_emb: np.ndarray, other_y: np.ndarray, seed: int) -> None:
    """Members and non-members of one release, subsampled to TRUTH_PER_CLASS per class."""
    gen = np.random.default_rng(seed)

    def cap(emb: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep: list[int] = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            keep.extend(gen.choice(idx, size=min(len(idx), TRUTH_PER_CLASS), replace=False).tolist())
        keep_arr = np.array(sorted(keep), dtype=np.int64)
        return emb[keep_arr].astype(np.float32), y[keep_arr].astype(np.int64)

    me, my = cap(member_emb, member_y)
    oe, oy = cap(other_emb, other_y)
    d = truth_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{pid}-{server_round}.npz"
    with open(tmp, "wb") as f:
        np.savez(f, member_emb=me, member_y=my, other_emb=oe, other_y=oy, meta=np.array([pid, server_round]))
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
    record_truth(setup.state_dir, pid, server_round, member, y, other, yt, derive_seed(s.seed, "audit", pid, server_round))


def write_uploads(path: Path, log: UploadLog, state_dir: str | Path) -> None:
    """``uploads.npz``: the server's view and the auditor's ground truth (see module doc)."""
    out = log.arrays()
    for f in sorted(truth_dir(state_dir).glob("[0-9]*-[0-9]*.npz")):
        with np.load(f) as z:
            pid, sr = (int(v) for v in z["meta"])
            for k in ("member_emb", "member_y", "other_emb", "other_y"):
                out[f"truth/{pid}/{sr}/{k}"] = z[k]
    tmp = path.with_name("." + path.name)
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **out)
    tmp.replace(path)
