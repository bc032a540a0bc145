"""Shared server-side machinery for protofed strategies (Flower Message-API ``Strategy``).

A strategy module defines three things: ``Params`` (pydantic, its ``strategy.params``), an
``Objective`` (its client half, a :class:`simulator.objective.ClientObjective`) and a server
class derived from :class:`FederatedStrategy` that implements ``merge``.

The base class does what every method needs the same way: seeded client sampling over
partition ids (so runs are reproducible and independent of Flower's random node ids), message
creation, dropping failed replies, ordering replies by partition id before merging (so float
sums do not depend on arrival order), and holding the global prototypes and weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar, Iterable, Literal, Union

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from pydantic import BaseModel, ConfigDict, ValidationError, WrapValidator

from simulator import seeding
from simulator.learner.prototypes import PrototypeSet
from simulator.objective import ClientObjective
from simulator.records import (
    CONFIG,
    GLOBAL,
    METRICS,
    UPLOAD,
    frozen_views,
    protos_from_arrays,
    protos_to_arrays,
    stats_from_arrays,
    stats_to_arrays,
    weighted_average,
)
from simulator.learner.second_order import SecondOrderStats, merge_stats


class StrategyParams(BaseModel):
    """Base of every strategy's parameter schema: unknown keys, NaN and infinities are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ``share_weights`` of the prototype strategies: never, every round, or during the first task only
# (FedAvg of the backbone while the federation learns its first task; then every client freezes
# the backbone it received and only prototypes / statistics travel).
def _one_share_weights_error(value: Any, handler: Any) -> Any:
    """One clear message instead of one per branch of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise ValueError("expected a bool (true or false) or first_task") from None


ShareWeights = Annotated[Union[bool, Literal["first_task"]], WrapValidator(_one_share_weights_error)]


@dataclass
class RunInfo:
    """What the engine tells a strategy about the run."""

    seed: int
    participation: float
    num_classes: int
    embedding_dim: int  # the width of features and prototypes: model.feature_dim (2 x model.embedding_dim under model.aper)
    partitions: Mapping[int, int] = field(default_factory=dict)  # partition id -> node id (computed, not a dict, at scale)
    eval_subset: list[int] | None = None  # the clients evaluated all run long, drawn once by the engine (None: all)
    # for strategies that run the model on the server (target): a fresh model as the clients
    # build it, and the shape of one input sample
    new_model: Callable[[], Any] | None = None
    input_shape: tuple[int, ...] = ()
    text_names: list[str] | None = None  # each class's name in words (index = class id); None: the source has none
    classifier: str = "ncm"  # model.classifier (ranpac: the global statistics travel pooled)
    # model.aper with share_weights: first_task: the first task's last round is APER's prototype
    # pass (the averaged backbone frozen and sent, nothing trained, prototypes embedded by it)
    aper: bool = False
    rounds_per_task: int = 1


@dataclass
class Upload:
    """One successful client reply, decoded."""

    partition_id: int
    num_examples: int
    arrays: ArrayRecord
    metrics: MetricRecord
    protos: PrototypeSet | None


def _stats_state(s: SecondOrderStats) -> tuple:
    return (s.classes, s.counts, s.sums, s.squares, s.raw_sums)


def _present_ids(partitions: Mapping[int, int], available: list[int] | None) -> list[int]:
    """The partition ids that are ``available``, ascending. With ids ``0..n-1`` (the engine's
    computed node map) and ``available`` ascending, a filter of ``available`` gives the same list
    with array operations (the general path takes seconds at 15,000,000 clients)."""
    from simulator.engine.node_ids import OffsetIds

    if available is not None and isinstance(partitions, OffsetIds) and partitions.start == 0:
        avail = np.asarray(available, dtype=np.int64)
        if len(avail) < 2 or bool(np.all(np.diff(avail) > 0)):
            return avail[(avail >= 0) & (avail < partitions.n)].tolist()
    pids = sorted(partitions)
    if available is None:
        return pids
    present = set(available)  # once: rebuilding it per client made this quadratic (19 s a run at 10,000 clients)
    return [p for p in pids if p in present]


class FederatedStrategy(Strategy):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[StrategyParams]] = StrategyParams
    Objective: ClassVar[type[ClientObjective]] = ClientObjective

    def __init__(self, params: StrategyParams, run: RunInfo) -> None:
        self.params = params
        self.run = run
        self.global_protos = PrototypeSet.empty(run.embedding_dim)
        self.global_weights: dict[str, Array] = {}
        self.global_stats = SecondOrderStats.empty(run.embedding_dim)  # second-order prototypes, when clients send them
        self.client_stats: dict[int, SecondOrderStats] = {}  # each client's latest statistics per class (merge_second_order)
        self.last_failed = 0
        self.last_ok = 0
        self.available: list[int] | None = None  # clients present this step (None: all); set by the engine
        self._present_cache: tuple | None = None  # (available, population, ids, ids as an array): _present_pool
        self.step = 0  # the federation's current task (step), from the train config
        self.round_in_task = 0  # the round within the step, from the train config
        self.holding_frozen: set[int] = set()  # clients that hold the frozen backbone (share_weights: first_task)

    @classmethod
    def check_setup(cls, params: StrategyParams, run: RunInfo) -> list[tuple[str, str]]:
        """Problems only the loaded data or the installed packages reveal, found before the run
        starts: ``(field inside strategy.params, message)`` pairs; none by default."""
        return []

    @classmethod
    def weight_sharing(cls, params: StrategyParams) -> bool:
        """Whether the method averages model weights with these params."""
        return bool(getattr(params, "share_weights", False))

    @property
    def shares_weights(self) -> bool:
        return self.weight_sharing(self.params)

    @property
    def backbone_frozen(self) -> bool:
        """``share_weights: first_task`` after the first task: weights are no longer averaged. Under
        ``model.aper`` (:attr:`RunInfo.aper`) from the first task's last round on: that round
        sends the backbone averaged by the round before, frozen, and the clients embed their
        first-task data with it (APER computes the first task's prototypes with the final model)."""
        if getattr(self.params, "share_weights", False) != "first_task":
            return False
        if self.step > 0:
            return True
        return self.run.aper and self.round_in_task >= self.run.rounds_per_task - 1

    # ------------------------------------------------------------------ global state
    def initial_arrays(self, initial_weights: dict[str, Array]) -> ArrayRecord:
        """Global state before round 1; weight-sharing methods start every client from the
        same initial weights."""
        if self.shares_weights:
            self.global_weights = dict(initial_weights)
        return self.global_arrays()

    def global_arrays(self) -> ArrayRecord:
        content: dict[str, Array] = {}
        if len(self.global_protos):
            content.update(protos_to_arrays(self.global_protos, with_counts=True))
        if len(self.global_stats):
            # RanPAC's clients need only the Gram matrix summed over the classes: one D x D instead of C
            stats = self.global_stats.pooled() if self.run.classifier == "ranpac" else self.global_stats
            content.update(stats_to_arrays(stats))
        content.update(self.global_weights)
        return ArrayRecord(content)

    # ------------------------------------------------------------------ sampling
    def sample(self, server_round: int) -> list[int]:
        """Seeded sample of the present clients' partition ids for this round
        (``clients.participation``)."""
        pids, pool = self._present_pool()
        k = max(1, int(round(self.run.participation * len(pids))))
        if k >= len(pids):
            return pids
        rng = seeding.rng(self.run.seed, "sampling", server_round)
        return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))

    def _messages(
        self, pids: list[int], arrays: ArrayRecord, config: ConfigRecord, kind: str, server_round: int
    ) -> list[Message]:
        per_client = {p: arrays for p in pids}
        if self.backbone_frozen:
            # the frozen backbone goes only to clients that do not hold it yet (late joiners, and
            # every client in the first round after the first task); all get the frozen flag
            full, light = frozen_views(arrays)
            per_client = {p: light if p in self.holding_frozen else full for p in pids}
        return [
            Message(
                RecordDict({GLOBAL: per_client[p], CONFIG: config}),
                dst_node_id=self.run.partitions[p],
                message_type=kind,
                group_id=str(server_round),
            )
            for p in pids
        ]

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if "task" in config:
            self.step = int(config["task"])  # type: ignore[arg-type]
        if "round" in config:
            self.round_in_task = int(config["round"])  # type: ignore[arg-type]
        return self._messages(self.sample(server_round), arrays, config, MessageType.TRAIN, server_round)

    def present(self) -> list[int]:
        """Partition ids of the clients present now (late joiners are absent before they join). Do not mutate."""
        return self._present_pool()[0]

    def _present_pool(self) -> tuple[list[int], np.ndarray]:
        """:meth:`present` and the same ids as the array sampling draws from, computed once per
        step (the engine sets ``available`` per task): at 1,000,000 clients rebuilding them for
        every sampling and evaluation cost 0.1-0.2 s a round. The cache holds ``available``
        itself, so a new list cannot be mistaken for it."""
        cache = self._present_cache
        if cache is None or cache[0] is not self.available or cache[1] != len(self.run.partitions):
            pids = _present_ids(self.run.partitions, self.available)
            cache = self._present_cache = (self.available, len(self.run.partitions), pids, np.asarray(pids, dtype=np.int64))
        return cache[2], cache[3]

    def eval_partitions(self, server_round: int = 0) -> list[int]:
        """Clients evaluated after a round: every present client, or the present members of the
        one evaluation subset the engine drew for the whole run (``evaluation.clients``)."""
        pids = self.present()
        if self.run.eval_subset is None:
            return pids
        subset = set(self.run.eval_subset)
        return [p for p in pids if p in subset]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._messages(self.eval_partitions(server_round), arrays, config, MessageType.EVALUATE, server_round)

    def decode(self, replies: Iterable[Message]) -> list[Upload]:
        """Successful replies, decoded and ordered by partition id; failures are counted."""
        ok: list[Upload] = []
        failed = 0
        for msg in replies:
            if msg.has_error() or not msg.has_content() or UPLOAD not in msg.content:
                failed += 1
                continue
            arrays = msg.content[UPLOAD]
            metrics = msg.content[METRICS]
            counts = metrics["proto.counts"] if "proto.counts" in metrics else None
            ok.append(
                Upload(
                    partition_id=int(metrics["partition_id"]),
                    num_examples=int(metrics["num_examples"]),
                    arrays=arrays,
                    metrics=metrics,
                    protos=protos_from_arrays(arrays, counts=counts),
                )
            )
        ok.sort(key=lambda u: u.partition_id)
        self.last_failed, self.last_ok = failed, len(ok)
        return ok

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        uploads = self.decode(replies)
        if self.backbone_frozen:  # a client that trained this round saved the frozen backbone
            self.holding_frozen.update(u.partition_id for u in uploads)
        idle = sum(1 for u in uploads if int(u.metrics.get("steps", 1)) == 0)
        stats = MetricRecord({"clients_ok": len(uploads), "clients_failed": self.last_failed, "clients_idle": idle})
        if not uploads:
            return None, stats  # nothing to merge: the global state stays as it was
        self.merge(server_round, uploads)
        self.merge_second_order(uploads)
        n = sum(u.num_examples for u in uploads)
        with_loss = [u for u in uploads if "train_loss" in u.metrics]  # clients withhold it under DP
        n_loss = sum(u.num_examples for u in with_loss)
        if n_loss > 0:
            stats["train_loss"] = float(
                sum(float(u.metrics["train_loss"]) * u.num_examples for u in with_loss) / n_loss
            )
        stats["num_examples"] = n
        return self.global_arrays(), stats

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None  # accuracy is computed by the engine from the per-class counts

    def merge(self, server_round: int, uploads: list[Upload]) -> None:
        raise NotImplementedError

    def merge_weights(self, uploads: list[Upload]) -> None:
        """FedAvg: the sample-weighted mean of the uploaded weights becomes the global weights
        (kept unchanged when no upload carries samples, and once ``share_weights: first_task`` has
        frozen the backbone)."""
        if self.backbone_frozen:
            return
        avg = weighted_average([u.arrays for u in uploads], [float(u.num_examples) for u in uploads])
        if avg:
            self.global_weights = avg

    def merge_second_order(self, uploads: list[Upload]) -> None:
        """Second-order prototypes (``model.classifier: nme | mahalanobis | fecam | lda``), for
        every strategy whose clients send them. The server keeps each client's latest statistics
        of each class (a class a client uploads again replaces that client's earlier statistics of
        it; a client not sampled this round keeps its last contribution), and the global
        statistics are their class-wise sums over the clients, in client order: with one frozen
        backbone, exactly the statistics of every client's data pooled, under partial
        participation too. Memory: one ``D x D`` float64 matrix per (client, class) it ever sent.
        With backbones that still move, a contribution kept from an earlier round was embedded by
        an earlier backbone (so were the classes nobody uploads again)."""
        updated = False
        for u in uploads:
            s = stats_from_arrays(u.arrays)
            if s is not None and len(s):
                prev = self.client_stats.get(u.partition_id)
                self.client_stats[u.partition_id] = s if prev is None else prev.updated_with(s)
                updated = True
        if updated:
            self.global_stats = self._merged_client_stats()

    def _merged_client_stats(self):
        """Every client's latest statistics summed class by class, in client order."""
        return merge_stats([self.client_stats[p] for p in sorted(self.client_stats)])

    def summary(self) -> None:
        return None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "protos": (self.global_protos.classes, self.global_protos.vectors, self.global_protos.counts),
            "weights": {k: v.numpy() for k, v in self.global_weights.items()},
            "holding_frozen": sorted(self.holding_frozen),
            "second_order_clients": {p: _stats_state(s) for p, s in self.client_stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c, v, n = state["protos"]
        self.global_protos = PrototypeSet(c, v, n)
        self.global_weights = {k: Array(np.asarray(a)) for k, a in state["weights"].items()}
        self.holding_frozen = set(int(p) for p in state.get("holding_frozen", []))
        self.client_stats = {int(p): SecondOrderStats(*t) for p, t in state.get("second_order_clients", {}).items()}
        if self.client_stats:  # the merged statistics are derived from the clients' (as merge_second_order does)
            self.global_stats = self._merged_client_stats()
        elif "second_order" in state:  # a checkpoint written before the clients' statistics were kept
            self.global_stats = SecondOrderStats(*state["second_order"])
