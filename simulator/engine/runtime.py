"""What every process of a run (the driver and each Ray actor) needs, built once per process.

The driver builds the federated data stream once and pickles it into the run's private state
folder; actors load that file instead of regenerating data, so every process sees exactly the
same samples and partitions.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..data.stream import FederatedStream
from ..learner.backbones import ProtoModel, build_model
from ..scenario import Scenario
from ..seeding import derive_seed
from . import determinism
from .device import select_device
from .state_store import make_store

if TYPE_CHECKING:
    from ..learner.frozen_features import FrozenFeatures

STREAM_FILE = "stream.pkl"


@dataclass(frozen=True)
class RunSetup:
    """Small and picklable: shipped to every Ray actor inside the ClientApp closure."""

    scenario: dict[str, Any]  # resolved scenario (validated again on the other side)
    state_dir: str
    verbose: bool = False


def classifier_projection(scenario: Scenario) -> np.ndarray | None:
    """RanPAC's random projection (``model.classifier: ranpac``), a function of the run seed."""
    m = scenario.model
    if m.classifier != "ranpac":
        return None
    from ..learner.second_order import ranpac_projection

    return ranpac_projection(m.feature_dim, m.ranpac_dim, derive_seed(scenario.seed, "ranpac_projection"))


class Runtime:
    def __init__(self, setup: RunSetup) -> None:
        self._pretrained: dict[str, dict[str, torch.Tensor]] = {}  # model.pretrained per backbone
        from ..scenario import validate_scenario

        self.setup = setup
        self.scenario: Scenario = validate_scenario(setup.scenario)
        self.store = make_store(self.scenario.resources.state_store, Path(setup.state_dir) / "clients")
        from strategies import STRATEGIES

        self.strategy_cls = STRATEGIES[self.scenario.strategy.name]
        self.params = self.strategy_cls.Params.model_validate(self.scenario.strategy.params)
        determinism.apply(self.scenario.resources.deterministic)  # before anything touches CUDA here
        self.device = select_device(self.scenario.resources.num_gpus_per_client)
        self.threads = self.scenario.resources.num_cpus_per_client

    @cached_property
    def stream(self) -> FederatedStream:
        """The stream the driver wrote; rebuilt from the scenario (deterministic) where the file
        is not reachable, e.g. on a SuperNode of Flower's Deployment Engine."""
        if self.setup.state_dir in _STREAMS:  # this process wrote it (the driver; inline clients): no reload
            return _STREAMS[self.setup.state_dir]
        path = Path(self.setup.state_dir) / STREAM_FILE
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        from ..data.stream import build_stream

        return build_stream(self.scenario)

    @cached_property
    def all_train_indices(self) -> np.ndarray:
        """Every training sample of every task (the centralised upper bound trains on them)."""
        return np.sort(np.concatenate([i for per_task in self.stream.train_indices for i in per_task]))

    @cached_property
    def classifier_projection(self) -> np.ndarray | None:
        """``model.classifier: ranpac``: the random projection every process draws alike from the
        run seed (``None`` for the other classifiers)."""
        return classifier_projection(self.scenario)

    @cached_property
    def frozen_features(self) -> "FrozenFeatures | None":
        """``continual.backbone: frozen`` (and ``model.aper``, see :meth:`feature_cache`): every
        sample embedded once per backbone, shared through the run's state folder
        (:mod:`simulator.learner.frozen_features`); otherwise ``None``."""
        if self.scenario.continual.backbone != "frozen" and not self.scenario.model.aper:
            return None
        from ..learner.frozen_features import FrozenFeatures

        data = self.stream.dataset
        return FrozenFeatures(data.x_train, data.x_test, Path(self.setup.state_dir) / "features")

    def prepare_frozen_features(self) -> int:
        """The driver embeds the dataset once per distinct initial backbone before any client
        runs, so clients read the tables instead of computing them at once (or reads them from a
        study's shared folder, ``PROTOFED_FEATURE_CACHE``); how many it computed."""
        cache = self.frozen_features
        if cache is None or self.scenario.continual.backbone != "frozen":  # aper: the initial backbone is not the frozen one
            return 0
        from ..learner.frozen_features import SHARED_ENV

        shared = Path(os.environ[SHARED_ENV]) if os.environ.get(SHARED_ENV) else None
        before = cache.passes
        backbones = {self.scenario.model.backbone_of(p): p for p in range(self.scenario.clients.num_clients)}
        for pid in sorted(backbones.values()):
            cache.table(self.new_model(pid).to(self.device), self.device, shared=shared)
        return cache.passes - before

    def feature_cache(self, backbone_frozen: bool) -> "FrozenFeatures | None":
        """The feature table for a client whose backbone is ``backbone_frozen`` by the server
        (``share_weights: first_task``): always under ``continual.backbone: frozen``; under
        ``model.aper`` once the server froze it (every client then holds the same dual-branch
        backbone, embedded once per run instead of at every round: the first client to need the
        table computes it); never for a backbone that still moves (a new table per round)."""
        if self.scenario.continual.backbone == "frozen":
            return self.frozen_features
        if self.scenario.model.aper and backbone_frozen:
            return self.frozen_features
        return None

    @property
    def with_head(self) -> bool:
        return self.strategy_cls.Objective.needs_head()

    def new_model(self, partition_id: int = 0) -> ProtoModel:
        """A freshly initialised model for one client (its backbone under model
        heterogeneity); the initial weights depend only on the seed and the architecture."""
        s = self.scenario
        return build_model(
            s.model.backbone_of(partition_id),
            self.stream.dataset.input_shape,
            s.model.embedding_dim,
            self.stream.dataset.num_classes,
            self.with_head,
            derive_seed(s.seed, "model_init"),
            norm=s.model.norm,
            pretrained=self.pretrained(s.model.backbone_of(partition_id)),
            aper=s.model.aper,
        )

    def pretrained(self, backbone: str) -> dict[str, torch.Tensor] | None:
        """The ``model.pretrained`` state dict for ``backbone``, read once per process (checked by
        the driver before the run starts, see :func:`simulator.engine.runner.check_pretrained`)."""
        path = self.scenario.model.pretrained
        if path is None:
            return None
        if backbone not in self._pretrained:
            from ..learner.backbones import read_pretrained

            self._pretrained[backbone] = read_pretrained(path, backbone)
        return self._pretrained[backbone]

    def set_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)


_RUNTIMES: dict[str, Runtime] = {}


def runtime_for(setup: RunSetup) -> Runtime:
    rt = _RUNTIMES.get(setup.state_dir)
    if rt is None:
        rt = _RUNTIMES[setup.state_dir] = Runtime(setup)
    return rt


def release_runtime(setup: RunSetup) -> None:
    _RUNTIMES.pop(setup.state_dir, None)
    _STREAMS.pop(setup.state_dir, None)


#: the stream this process wrote, by state folder: the driver's Runtime (and inline clients) use
#: it as it is instead of reading the file back (28 s at 1,000,000 clients, whose stream holds
#: 5,000,000 index arrays); other processes (Ray actors) read the file
_STREAMS: dict[str, FederatedStream] = {}


def write_stream(stream: FederatedStream, state_dir: Path) -> None:
    with open(state_dir / STREAM_FILE, "wb") as fh:
        pickle.dump(stream, fh, protocol=pickle.HIGHEST_PROTOCOL)
    _STREAMS[str(state_dir)] = stream
