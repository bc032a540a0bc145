"""Embeddings under a frozen backbone, computed once per run instead of at every round.

With ``continual.backbone: frozen`` a client's features are a pure function of its input: the
same backbone weights embed the same samples in every round, every evaluation and every client.
:class:`FrozenFeatures` embeds every sample of the dataset (training split, then test split, in
batches of a fixed size) the first time it meets a backbone, keyed by a hash of that backbone's
weights and buffers, and afterwards answers :func:`~simulator.learner.training.embed` by looking
the samples up by the hash of their bytes. A prototype study on a pre-trained backbone then costs
one forward pass over the data.

* Exactness: a lookup returns what the one canonical pass computed, so every process (the
  driver, each Ray actor) and both engines see identical features. They may differ in the last
  bits from embedding a client's own samples in its own batches (a batch's composition can change
  a convolution's rounding), which is why the cache is used by every call of a run or by none.
* Safety: a model whose backbone weights differ (a backbone that trains, a head-only change does
  not count) has another key; samples not in the dataset (anything transformed) fall back to a
  plain forward pass.
* Sharing: with a folder (the run's private state folder) the table is written there once,
  atomically, and read by the other processes; the driver prepares it before clients start
  (``simulator/engine/runner.py``).
* Across the runs of a study: with a shared folder (``compare`` and ``sweep`` use
  ``<study dir>/features``; ``PROTOFED_FEATURE_CACHE`` names one for any run) the driver first
  looks there for a table of the same data, backbone and machine (the key adds a hash of every
  sample, torch's version, the device type and the CPU's instruction set, so a table is only
  reused where it would be computed bit for bit alike), so a study of several strategies on one
  pre-trained backbone embeds its data once.
* Memory: ``(train + test samples) x embedding_dim`` float32 per backbone and process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

BATCH = 256  # the canonical pass's batch size (any fixed value: it only has to be the same everywhere)
SHARED_ENV = "PROTOFED_FEATURE_CACHE"  # a folder shared by the runs of a study (module docstring)


def backbone_key(model: nn.Module) -> str:
    """A hash of everything the embedding depends on: the backbone's class and every tensor of
    its state (parameters and buffers, e.g. BatchNorm's running statistics), except BatchNorm's
    step counters (``num_batches_tracked``): an embedding is computed in eval mode, which reads
    the running statistics only, and the counters stay local under weight sharing (they count
    each client's own steps), so clients holding one averaged, frozen backbone (``model.aper``
    with ``share_weights: first_task``) share one table."""
    net = getattr(model, "backbone", model)
    h = hashlib.blake2b(type(net).__qualname__.encode(), digest_size=16)
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _save(table: torch.Tensor, path: Path | None) -> None:
    """Write atomically (runs of a parallel study may write the same table at once)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)


def _row_digests(x: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    tag = f"{rows.dtype}:{rows.shape[1]}".encode()
    return [hashlib.blake2b(r.tobytes(), digest_size=16, key=tag[:64]).digest() for r in rows]


class FrozenFeatures:
    """Every sample of ``x_train`` and ``x_test`` embedded once per backbone (module docstring)."""

    def __init__(self, x_train: np.ndarray, x_test: np.ndarray, folder: Path | None = None) -> None:
        self.x = (x_train, x_test)
        self.folder = folder
        self._tables: dict[str, torch.Tensor] = {}
        self._index: dict[bytes, int] | None = None
        self._rows: list[tuple[int, int]] = []  # (split, row) of each table row
        self.passes = 0  # canonical passes this process computed (tests and the profile read it)

    def _build_index(self) -> dict[bytes, int]:
        """Row digest -> row of the table; the table's rows are the distinct samples of the
        training split, then of the test split, in their order (a repeated sample keeps its first)."""
        if self._index is None:
            self._index, self._rows = {}, []
            for split, arr in enumerate(self.x):
                for i, d in enumerate(_row_digests(np.asarray(arr))):
                    if d not in self._index:
                        self._index[d] = len(self._rows)
                        self._rows.append((split, i))
        return self._index

    def _positions(self, x: np.ndarray) -> np.ndarray | None:
        x = np.asarray(x)
        if x.dtype != np.asarray(self.x[0]).dtype or len(x) == 0:
            return None
        index = self._build_index()
        pos = [index.get(d) for d in _row_digests(x)]
        return None if any(p is None for p in pos) else np.asarray(pos, dtype=np.int64)

    def table(self, model: nn.Module, device: str | torch.device = "cpu", shared: Path | None = None) -> torch.Tensor:
        """The embeddings of every sample under ``model``'s backbone: kept, read from the run's
        folder, read from the ``shared`` folder of a study, or computed (and written to both)."""
        key = backbone_key(model)
        if key in self._tables:
            return self._tables[key]
        path = None if self.folder is None else self.folder / f"features-{key}.pt"
        if path is not None and path.is_file():
            table = torch.load(path, map_location="cpu", weights_only=True)
        else:
            other = None if shared is None else shared / f"features-{self._shared_key(key, device)}.pt"
            if other is not None and other.is_file():
                table = torch.load(other, map_location="cpu", weights_only=True)
            else:
                table = self._embed_all(model, device)
                _save(table, other)
            _save(table, path)
        self._tables[key] = table
        return table

    def _shared_key(self, backbone: str, device: str | torch.device) -> str:
        """What a table computed by another run depends on: the samples, the backbone, and the
        software and hardware that embed them."""
        h = hashlib.blake2b(backbone.encode(), digest_size=16)
        for arr in self.x:
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
        kind = torch.device(device).type
        cpu = torch.backends.cpu.get_cpu_capability()
        h.update(f"{BATCH}:{torch.__version__}:{kind}:{cpu}".encode())
        return h.hexdigest()

    @torch.no_grad()
    def _embed_all(self, model: nn.Module, device: str | torch.device) -> torch.Tensor:
        model.eval()
        self._build_index()
        out = []
        for s in range(0, len(self._rows), BATCH):
            batch = np.stack([np.asarray(self.x[split][i]) for split, i in self._rows[s : s + BATCH]])
            out.append(model(torch.as_tensor(batch, dtype=torch.float32, device=device)).cpu())
        self.passes += 1
        return torch.cat(out).float()

    def lookup(self, model: nn.Module, x: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor | None:
        """``model``'s embeddings of ``x`` from the table, on ``device``; ``None`` when a sample
        of ``x`` is not one of the dataset's."""
        pos = self._positions(x)
        if pos is None:
            return None
        return self.table(model, device)[torch.as_tensor(pos)].to(device)
