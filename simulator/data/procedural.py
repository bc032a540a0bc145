"""Clients derived when they are sampled (``dataset.source: procedural``): cross-device scale.

A finite dataset partitioned up front costs memory and setup time in proportion to the
population (every client's sample indices exist before the first round). The procedural source
instead defines a client's data of a task as a pure function of the run seed, the client id and
the task, computed when the client is asked for it:

* the class means are Gaussian, as in the ``synthetic`` source (``dataset.data_seed``), and the
  test set is a finite draw around them (``test_samples_per_class``);
* client ``c`` holds ``samples_per_client`` training samples of each task it learns; their labels
  follow the client's own class mixture over the task's classes, drawn from a symmetric
  Dirichlet(``clients.partition.alpha``) (``iid``: uniform), and each sample is its class mean
  plus ``noise`` times standard normal noise. Mixture, labels and noise come from seeded streams
  keyed by ``(seed, data_seed, client, task)``, so a client's data are the same whether it is
  sampled first or last, on either engine, after a resume (``tests/test_procedural.py``).

This is the per-client form of the Dirichlet label skew (Hsu et al. 2019: each client's class
mixture ~ Dir(alpha)), not the finite-dataset ``dirichlet`` partition (each class's samples split
over the clients ~ Dir(alpha)); ``min_size`` does not apply (every client holds the same count).

Samples keep the index interface of a finite dataset: training sample ``j`` of client ``c`` in
task ``t`` has the virtual index ``(c * T + t) * S + j`` (``S = samples_per_client``), and
``x_train[idx]`` / ``y_train[idx]`` generate the rows asked for (:class:`ClientRows`). The inputs
are standardised with the closed-form scalar statistics of the source (mean 0, std
``sqrt(noise^2 + class_sep^2 / (2 dim))``) rather than measured on a training split that is never
materialised.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from .. import seeding
from .sources import ArrayDataset, ProceduralParams

_BLOCK_CACHE = 8  # (client, task) blocks kept: a client's x and y are asked for one after the other


@dataclass
class ClientBlocks:
    """How to generate any client's training block; bound to a stream's tasks by ``bind``."""

    params: ProceduralParams
    means: np.ndarray  # [C, d] float64
    scale: float  # the closed-form standardisation std
    seed: int
    alpha: float | None = None  # None: iid (uniform mixture)
    tasks: list[list[int]] = field(default_factory=list)
    _cache: "OrderedDict[int, tuple[np.ndarray, np.ndarray]]" = field(default_factory=OrderedDict, repr=False)

    @property
    def size(self) -> int:
        return int(self.params.samples_per_client)

    def labels(self, client: int, task: int) -> np.ndarray:
        """The labels of client ``client``'s block of ``task`` (no features drawn)."""
        classes = np.asarray(self.tasks[task], dtype=np.int64)
        keys = (int(self.params.data_seed), int(client), int(task))
        if self.alpha is None:
            mix = np.full(len(classes), 1.0 / len(classes))
        else:
            mix = seeding.rng(self.seed, "procedural_mixture", *keys).dirichlet(np.full(len(classes), self.alpha))
        return classes[seeding.rng(self.seed, "procedural_labels", *keys).choice(len(classes), size=self.size, p=mix)]

    def block(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` of block ``number = client * T + task`` (float32, int64)."""
        hit = self._cache.get(number)
        if hit is not None:
            self._cache.move_to_end(number)
            return hit
        client, task = divmod(int(number), len(self.tasks))
        y = self.labels(client, task)
        gen = seeding.rng(self.seed, "procedural_noise", int(self.params.data_seed), client, task)
        x = self.means[y] + self.params.noise * gen.standard_normal((self.size, self.means.shape[1]))
        out = ((x / self.scale).astype(np.float32), y)
        self._cache[number] = out
        if len(self._cache) > _BLOCK_CACHE:
            self._cache.popitem(last=False)
        return out

    def rows(self, idx: np.ndarray, column: int) -> np.ndarray:
        """Rows ``idx`` of x (``column`` 0) or y (1), generated block by block."""
        idx = np.asarray(idx, dtype=np.int64)
        flat = idx.reshape(-1)
        numbers, within = np.divmod(flat, self.size)
        width = (self.means.shape[1],) if column == 0 else ()
        out = np.empty((len(flat),) + width, dtype=np.float32 if column == 0 else np.int64)
        for number in np.unique(numbers):
            at = numbers == number
            out[at] = self.block(int(number))[column][within[at]]
        return out.reshape(idx.shape + width)

    def __getstate__(self) -> dict[str, Any]:  # the cache does not travel to Ray actors
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state


class ClientRows:
    """``x_train`` or ``y_train`` of a procedural dataset: rows generated when indexed."""

    def __init__(self, blocks: ClientBlocks, column: int, length: int) -> None:
        self.blocks, self.column, self.length = blocks, column, length
        self.dtype = np.dtype(np.float32 if column == 0 else np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.length, self.blocks.means.shape[1]) if self.column == 0 else (self.length,)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.length))
        return self.blocks.rows(np.asarray(idx), self.column)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "a procedural dataset's training rows are generated per client; the whole array is never "
            "materialised (index it with the client's sample indices)"
        )


@dataclass
class ProceduralDataset(ArrayDataset):
    """An :class:`ArrayDataset` whose training rows are :class:`ClientRows` once bound to a stream."""

    blocks: ClientBlocks | None = None

    def bind(self, tasks: list[list[int]], num_clients: int, alpha: float | None) -> None:
        """Fix the task layout (and the mixtures' alpha) the virtual indices refer to."""
        assert self.blocks is not None
        self.blocks.tasks, self.blocks.alpha = [list(map(int, t)) for t in tasks], alpha
        length = num_clients * len(tasks) * self.blocks.size
        self.x_train = ClientRows(self.blocks, 0, length)  # type: ignore[assignment]
        self.y_train = ClientRows(self.blocks, 1, length)  # type: ignore[assignment]


def load_procedural(params: ProceduralParams, test_fraction: float, seed: int) -> ProceduralDataset:
    """The class means and the test set; training rows come once the stream binds the tasks."""
    gen = np.random.default_rng(seeding.derive_seed(int(params.data_seed), "data", 1))
    c, d = params.num_classes, params.dim
    means = gen.standard_normal((c, d)) * (params.class_sep / np.sqrt(2.0 * d))  # as the synthetic source
    scale = float(np.sqrt(params.noise**2 + params.class_sep**2 / (2.0 * d)))
    y_test = np.repeat(np.arange(c, dtype=np.int64), params.test_samples_per_class)
    test_gen = seeding.rng(seed, "procedural_test", int(params.data_seed))
    x_test = means[y_test] + params.noise * test_gen.standard_normal((len(y_test), d))
    blocks = ClientBlocks(params, means, scale, int(seed))
    return ProceduralDataset(
        x_train=np.zeros((0, d), np.float32), y_train=np.zeros(0, np.int64),
        x_test=(x_test / scale).astype(np.float32), y_test=y_test,
        class_names=[str(i) for i in range(c)], mean=0.0, std=scale, blocks=blocks,
    )
