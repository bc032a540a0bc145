"""``fedtgp``: FedTGP, trainable global prototypes (Zhang et al., AAAI 2024).

Server: the global prototypes are the output of a small generator, ``P = MLP(Embedding(c))``
(``Embedding(num_classes, D) -> Linear(D, hidden) -> ReLU -> Linear(hidden, D)``), trained each
round for ``server_epochs`` steps with an adaptive-margin contrastive loss over the uploaded
client prototypes ``q_i`` of class ``y_i``::

    loss = CE(-(d(q_i, P) + delta * onehot(y_i)), y_i)        d = Euclidean distance
    delta = min(max_c min_{c' != c} ||Q_c - Q_c'||, margin_cap)

where ``Q_c`` is the plain mean of the client prototypes of class ``c`` (see
:func:`adaptive_margin`). The margin asks every uploaded prototype to be nearer to its own
class's trained prototype than to any other class's by ``delta``, so the trained prototypes
keep the classes at least as far apart as the best separated pair of merged prototypes.

Client: cross-entropy of a local linear head (over the classes seen so far) plus ``lambda`` x
MSE between each feature and the trained prototype of its class. Inference: nearest trained
global prototype. ``share_weights: true`` also FedAvg-averages the backbone (not the head).

Where ours differs from the paper and its code:

* Class-incremental learning: the server keeps the latest uploaded prototype of every
  (client, class) pair, replaced when that client uploads the class again, and trains the
  generator on all of them, so classes of earlier tasks (no longer uploaded) keep their
  place in the loss and their trained prototype. The loss's columns are the classes stored so
  far, not every class of the dataset (classes not seen yet do not compete). The paper trains
  on the current round's uploads only, with all classes known from the start.
* ``server_epochs`` defaults to 100, the value the paper reports (the code's argparse default
  is 1000). An epoch is one pass of plain SGD (lr ``server_lr``, no momentum, as the code's
  SGD) over the stored prototypes in mini-batches of ``server_batch_size`` (10, the code's
  batch size), shuffled by a permutation drawn from the run seed and the server round (the
  stored pairs first sorted by (class, client)), on the CPU with one thread: the server's
  result is deterministic and independent of reply order. ``server_batch_size: 0`` takes one
  full-batch step per epoch, which at lr 0.01 and 100 epochs is too few steps to separate
  the classes in one round (measured: toy prototypes 5.7 apart stay confused); mini-batches
  give the code's number of steps (about ``server_epochs`` x stored prototypes / 10).
* ``hidden_dim: 0`` (the default) makes the hidden width the embedding dimension (the code's
  default hidden width equals its 512-dimensional features).
* The generator is initialised from the run seed (purpose ``fedtgp_server``) without
  touching the global torch random state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from simulator import seeding
from simulator.learner.prototypes import PrototypeSet, squared_distances
from simulator.seeding import derive_seed

from .base import FederatedStrategy, RunInfo, ShareWeights, StrategyParams, Upload
from .fedproto import Objective as PullToPrototypes


class Params(StrategyParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(10.0, alias="lambda", ge=0.0, le=1e6, description="weight of the MSE pull to the trained global prototype")
    margin_cap: float = Field(100.0, ge=0.0, le=1e6, description="tau: upper bound of the adaptive margin delta")
    server_epochs: int = Field(100, ge=0, le=100000, description="passes of generator training over the stored client prototypes per round (paper 100, code default 1000)")
    server_lr: float = Field(0.01, gt=0.0, le=10.0, description="learning rate of the server's SGD on the prototype generator")
    server_batch_size: int = Field(10, ge=0, le=1000000, description="stored prototypes per generator step, seeded shuffle each epoch (paper: the client batch size, 10); 0: full batch")
    hidden_dim: int = Field(0, ge=0, le=65536, description="hidden width of the generator MLP (0: the embedding dimension)")
    share_weights: ShareWeights = Field(False, description="also FedAvg the backbone weights each round; first_task: only during the first task, then the backbone is frozen and only prototypes travel")


def adaptive_margin(merged: np.ndarray, cap: float) -> float:
    """FedTGP's margin: the largest distance from a merged class prototype to its nearest other
    class's prototype, capped at ``cap``; 0 with fewer than two classes. ``merged`` is
    ``[classes, D]``."""
    q = np.asarray(merged, dtype=np.float64)
    if q.ndim != 2 or len(q) < 2:
        return 0.0
    diff = q[:, None, :] - q[None, :, :]
    dist = np.sqrt((diff * diff).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return float(min(dist.min(axis=1).max(), cap))


class PrototypeGenerator(nn.Module):
    """``P = MLP(Embedding(c))``: one trainable prototype per class id."""

    def __init__(self, num_classes: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, dim)
        self.middle = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, dim)

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(self.embedding(classes)))


class Objective(PullToPrototypes):
    """The FedProto client objective: head CE + ``lambda`` x MSE to the trained prototypes."""


class FedTGP(FederatedStrategy):
    name = "fedtgp"
    description = "FedTGP: server-trained prototypes (adaptive-margin contrastive); local head CE + lambda * MSE"
    Params = Params
    Objective = Objective

    def __init__(self, params: Params, run: RunInfo) -> None:
        super().__init__(params, run)
        hidden = params.hidden_dim or run.embedding_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(run.seed, "fedtgp_server"))
            self.generator = PrototypeGenerator(run.num_classes, run.embedding_dim, hidden)
        # (client, class) -> (latest uploaded prototype, its sample count)
        self.stored: dict[tuple[int, int], tuple[np.ndarray, int]] = {}
        self.last_margin = 0.0
        self.last_server_loss = float("nan")

    # ------------------------------------------------------------------ server training
    def _store(self, uploads: list[Upload]) -> None:
        for u in uploads:
            if u.protos is None:
                continue
            for c, v, n in zip(u.protos.classes, u.protos.vectors, u.protos.counts):
                self.stored[(u.partition_id, int(c))] = (np.asarray(v, dtype=np.float32).copy(), int(n))

    def _train_generator(self, server_round: int) -> None:
        keys = sorted(self.stored, key=lambda k: (k[1], k[0]))  # by (class, client)
        if not keys:
            return
        seen = sorted({c for _, c in keys})
        column = {c: i for i, c in enumerate(seen)}
        q = torch.as_tensor(np.stack([self.stored[k][0] for k in keys]), dtype=torch.float32)
        target = torch.as_tensor([column[c] for _, c in keys], dtype=torch.long)
        merged = np.stack([q[target == column[c]].double().mean(0).numpy() for c in seen])
        delta = adaptive_margin(merged, self.params.margin_cap)
        self.last_margin = delta
        ids = torch.as_tensor(seen, dtype=torch.long)
        margin = delta * F.one_hot(target, len(seen)).to(torch.float32)
        gen = self.generator
        gen.train()
        opt = torch.optim.SGD(gen.parameters(), lr=self.params.server_lr)
        n = len(keys)
        bs = self.params.server_batch_size or n
        order = seeding.rng(self.run.seed, "fedtgp_batches", server_round)
        for _ in range(self.params.server_epochs):
            perm = torch.as_tensor(order.permutation(n)) if bs < n else torch.arange(n)
            total = 0.0
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                opt.zero_grad(set_to_none=True)
                protos = gen(ids)
                dist = squared_distances(q[idx], protos).clamp_min(1e-12).sqrt()
                loss = F.cross_entropy(-(dist + margin[idx]), target[idx])
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.last_server_loss = total / n  # mean loss of the last epoch
        gen.eval()
        with torch.no_grad():
            vectors = gen(ids).detach().to(torch.float32).numpy().copy()
        counts = np.array([sum(self.stored[k][1] for k in keys if k[1] == c) for c in seen], dtype=np.int64)
        self.global_protos = PrototypeSet(np.array(seen, dtype=np.int64), vectors, counts)

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        self._store(uploads)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is fastest and order-stable
        try:
            self._train_generator(server_round)
        finally:
            torch.set_num_threads(threads)
        if self.shares_weights:
            self.merge_weights(uploads)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = {k: v.detach().cpu().numpy().copy() for k, v in self.generator.state_dict().items()}
        state["stored"] = {k: (v.copy(), n) for k, (v, n) in self.stored.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state["generator"].items()})
        self.stored = {
            (int(k[0]), int(k[1])): (np.asarray(v, dtype=np.float32).copy(), int(n))
            for k, (v, n) in state["stored"].items()
        }
