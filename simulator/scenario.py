"""The scenario file: pydantic schema, YAML loading, ``--set`` overrides and clear errors.

A scenario is validated in two stages. The schema below checks every common key (unknown keys
are errors). Then the keys that belong to one dataset source (``dataset.path`` for ``npz``, ...)
and the strategy's ``strategy.params`` are validated by the source and the strategy themselves,
so that each plugin owns its parameters. All problems are collected and reported together as a
:class:`~simulator.errors.UserError` naming the file and the dotted field path.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Problem, UserError
from .paths import PathText
from .privacy.config import PrivacyConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


@dataclass(frozen=True)
class Meaning:
    """What the integers of a schema field stand for (``class id``, ``client id``): words for the
    scenario reference (:mod:`simulator.report.schema_doc`); pydantic ignores it when validating."""

    name: str


ClassId = Annotated[int, Meaning("class id")]
ClientId = Annotated[int, Meaning("client id")]


class Strict(BaseModel):
    # NaN and infinities are never meaningful settings (an open range such as grad_clip >= 0 took inf)
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


# --------------------------------------------------------------------------- dataset
class DatasetConfig(BaseModel):
    """Common dataset keys; source-specific keys are checked by the source's own schema."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    source: str = Field("mnist1d", description="dataset source (registry name; `protofed list`)")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each class held out for testing (sources without a test split)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from .data.sources import SOURCES

        if v not in SOURCES:
            raise ValueError(SOURCES.unknown(v))  # type: ignore[attr-defined]  # names a broken plugin too
        return v

    def params(self) -> dict[str, Any]:
        """The source-specific keys (everything except ``source`` and ``test_fraction``)."""
        return dict(self.model_extra or {})


# --------------------------------------------------------------------------- tasks
class OnlineConfig(Strict):
    batch_size: int = Field(10, ge=1, le=100_000, description="samples per step of the single pass (the stream's batch)")
    communicate_every: int = Field(5, ge=1, le=100_000, description="stream batches each client learns between two communications (one round)")


class TasksConfig(Strict):
    online: OnlineConfig | None = Field(
        None,
        description="online continual learning: each client sees its task data once, in a seeded order, batch_size samples per SGD step, "
        "communicate_every steps per round (training.rounds_per_task rounds; data left after them is never seen, a warning says how much); "
        "with a replay memory each round also trains on as many memory samples, drawn from it (ER); a client whose stream is spent takes no step. Needs training.local_epochs: 1",
    )
    initial_classes: int | None = Field(None, ge=1, description="size of a larger first (base) task; unset: same as the others")
    classes_per_task: int | None = Field(None, ge=1, description="classes per task after the first (default 2 when num_tasks is unset)")
    num_tasks: int | None = Field(None, ge=1, description="total number of tasks (instead of classes_per_task)")
    class_order: Literal["seeded", "sorted"] | list[ClassId] = Field("seeded", description="class order: seeded shuffle, sorted, or an explicit permutation of the class ids")
    blurry: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="blurry task boundaries: for every task t but the last, floor(blurry x n_c) training samples of each class c of task t+1 "
        "(n_c: its training samples; a seeded choice per class) move from task t+1 to task t, so they are learned one task early; "
        "test sets and the classes each task is evaluated on stay as they are, and predictions range over the classes of the tasks seen so far. "
        "0: sharp boundaries (no sample moves). Needs at least two tasks",
    )

    @model_validator(mode="after")
    def _one_size(self) -> "TasksConfig":
        if self.classes_per_task is not None and self.num_tasks is not None:
            raise ValueError("give either classes_per_task or num_tasks, not both")
        if self.classes_per_task is None and self.num_tasks is None:
            self.classes_per_task = 2
        return self


# --------------------------------------------------------------------------- clients
class IidPartition(Strict):
    scheme: Literal["iid"] = "iid"


class DirichletPartition(Strict):
    scheme: Literal["dirichlet"]
    alpha: float = Field(0.5, gt=0.0, le=1e6, description="Dirichlet concentration per task; smaller = more label skew")
    min_size: int = Field(1, ge=0, description="fewest training samples a client may get per task")


class PathologicalPartition(Strict):
    scheme: Literal["pathological"]
    classes_per_client: int = Field(1, ge=1, description="classes of each task that one client holds")


class ShardsPartition(Strict):
    scheme: Literal["shards"]
    shards_per_client: int = Field(
        2, ge=1, le=100_000,
        description="McMahan split: each task's samples sorted by label, cut into num_clients x shards_per_client equal shards; each client gets this many random shards",
    )


class QuantityPartition(Strict):
    scheme: Literal["quantity"]
    distribution: Literal["lognormal", "power_law"] = Field(
        "lognormal", description="quantity skew: client sizes ~ lognormal, or proportional to rank^-exponent (ranks in seeded order); labels iid within each client"
    )
    sigma: float = Field(1.0, gt=0.0, le=100.0, description="std of the log of the client sizes (lognormal)")
    exponent: float = Field(1.5, gt=0.0, le=100.0, description="decay of the sorted client sizes, size ~ rank^-exponent (power_law)")
    min_size: int = Field(1, ge=0, description="fewest training samples a client may get per task")


Partition = Annotated[
    Union[IidPartition, DirichletPartition, PathologicalPartition, ShardsPartition, QuantityPartition],
    Field(discriminator="scheme"),
]
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological", "shards", "quantity")


class FaultSpec(Strict):
    client: int = Field(ge=0, description="partition id of the client")
    round: int = Field(ge=1, description="global round (1-based) in which it fails")
    mode: Literal["raise", "exit"] = Field("raise", description="raise an exception, or kill the worker process (os._exit; on the inline engine: raise)")


class ArrivalConfig(Strict):
    initial_fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of clients present from the first task; the others join in equal groups at each later task")
    at_task: list[Annotated[int, Field(ge=0, le=1_000_000)]] | None = Field(None, description="explicit task (step) at which each client joins, one entry per client (overrides initial_fraction)")
    stale_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="at each new task, this fraction of the clients already present receives no new classes (keeps training on its memory)")


MAX_CLIENTS = 15_000_000  # Flower's paper simulated populations of up to 15 million clients


class ClientsConfig(Strict):
    num_clients: int = Field(
        10, ge=1, le=MAX_CLIENTS,
        description="number of clients (Flower SuperNodes); beyond about 100,000 use dataset.source: procedural, whose clients are derived when sampled",
    )
    partition: Partition = Field(default_factory=IidPartition, description="how each task's training samples are split among clients")
    participation: float = Field(1.0, gt=0.0, le=1.0, description="fraction of clients sampled each round (seeded)")
    task_order: Literal["shared", "per_client"] = Field("shared", description="every client meets the tasks in the same order, or each in its own seeded order (asynchronous)")
    arrival: ArrivalConfig = Field(default_factory=ArrivalConfig, description="late joiners and clients without new classes (churn)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a sampled client fails during a round (seeded); the round merges the survivors")
    fault_injection: list[FaultSpec] = Field(default_factory=list, description="chosen clients fail at chosen rounds (robustness studies, tests)")

    @model_validator(mode="after")
    def _arrival_matches_clients(self) -> "ClientsConfig":
        at = self.arrival.at_task
        if at is not None:
            if len(at) != self.num_clients:
                raise ValueError(f"arrival.at_task needs one entry per client ({self.num_clients}), got {len(at)}")
            if min(at) != 0 or any(a < 0 for a in at):
                raise ValueError("arrival.at_task: at least one client must be present from task 0, and no entry may be negative")
        return self

    @model_validator(mode="after")
    def _fault_clients_exist(self) -> "ClientsConfig":
        bad = sorted({f.client for f in self.fault_injection if f.client >= self.num_clients})
        if bad:
            raise ValueError(f"fault_injection names clients {bad}, but there are only {self.num_clients} (ids 0..{self.num_clients - 1})")
        return self


# --------------------------------------------------------------------------- training
class TrainingConfig(Strict):
    rounds_per_task: int = Field(3, ge=1, le=10_000, description="federated rounds per task")
    local_epochs: int = Field(1, ge=1, le=10_000, description="passes over the local data per round")
    batch_size: int = Field(32, ge=1, le=1_000_000, description="local mini-batch size")
    lr: float = Field(0.01, gt=0.0, le=100.0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="SGD weight decay")
    grad_clip: float = Field(10.0, ge=0.0, description="max gradient norm per step (0 = off)")


class ModelConfig(Strict):
    backbone: str | list[str] | dict[str, list[ClientId]] = Field(
        "cnn1d",
        description="feature extractor (registry name; `protofed list`); a list is assigned to clients round-robin; "
        "a mapping gives each backbone its client ids (model heterogeneity: all share embedding_dim)",
    )
    embedding_dim: int = Field(64, ge=1, le=65_536, description="dimension of embeddings and prototypes (resnets: a linear projection of the pooled feature only when this differs from its width, 64 / 512); model.aper doubles the prototypes' width")
    norm: Literal["batch", "batch_local", "group", "none"] = Field(
        "batch",
        description="normalisation layers of cnn1d, cnn and the resnets; under weight sharing BatchNorm running mean/var are FedAvg-averaged with the weights; batch_local: BatchNorm kept local as in FedBN (its weights and statistics never travel); group/none keep no running statistics",
    )
    classifier: Literal["ncm", "nme", "mahalanobis", "fecam", "lda", "ranpac"] = Field(
        "ncm",
        description="prototype inference: nearest class mean (ncm); iCaRL's nearest mean of exemplars (nme: L2-normalised embeddings and class means); "
        "FeCAM's per-class Mahalanobis (fecam: Tukey-transformed features, shrinkage twice, correlation matrices, normalised means); "
        "protofed's own per-class Mahalanobis on normalised features (mahalanobis, not FeCAM's estimator); a shared shrunk covariance (lda); "
        "or RanPAC's ridge regression on randomly projected, rectified embeddings (ranpac: ridge chosen by generalised cross-validation, width model.ranpac_dim). "
        "The statistics are sums, merged exactly by the server from each client's latest upload (head-based strategies ignore it)",
    )
    ranpac_dim: int = Field(
        256, ge=1, le=4096,
        description="classifier ranpac: width M of the random projection; each client uploads M (M + 1) / 2 float64 per class (263 KB at 256; the paper uses 10,000 on 768-d ViT features)",
    )
    pretrained: PathText | None = Field(
        None, description="a PyTorch state dict of the backbone (torch.save) loaded into every client's initial model; strict key and shape check; never downloaded; "
        "or imagenet: the ImageNet weights a backbone ships in a package (efficientnet_lite0, extra protofed[pretrained])"
    )

    aper: bool = Field(
        False,
        description="APER (Zhou et al., IJCV 2024, APER-finetune): the backbone is two branches, a frozen copy of the initial (model.pretrained or "
        "as-initialised) backbone that never trains or travels, and the backbone that adapts during the first task only; the embedding, "
        "prototypes and head input are their concatenation [frozen(x), adapted(x)], 2 x embedding_dim wide. Needs a backbone that stops training "
        "after the first task: strategy.params.share_weights: first_task (federated fine-tuning; the first task's last round then computes its "
        "prototypes with the frozen averaged backbone, so training.rounds_per_task >= 2) or continual.backbone: freeze_after_first_task (each "
        "client adapts its own); a prototype strategy without loss terms of its own, no continual loss terms",
    )

    @property
    def feature_dim(self) -> int:
        """The width of embeddings, prototypes and the head's input: ``embedding_dim``, doubled by ``aper``."""
        return 2 * self.embedding_dim if self.aper else self.embedding_dim

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str | list[str] | dict[str, list[int]]) -> str | list[str] | dict[str, list[int]]:
        from .learner.backbones import BACKBONES

        names = [v] if isinstance(v, str) else list(v)
        if not names:
            raise ValueError("give at least one backbone")
        for name in names:
            if name not in BACKBONES:
                raise ValueError(BACKBONES.unknown(name))  # type: ignore[attr-defined]  # names a broken plugin too
        return v

    @model_validator(mode="after")
    def _norm_supported(self) -> "ModelConfig":
        from .learner.backbones import BACKBONES

        names = [self.backbone] if isinstance(self.backbone, str) else list(self.backbone)
        for name in names:
            norms = BACKBONES[name].norms
            if norms and layer_norm(self.norm) not in norms:
                raise ValueError(f"backbone {name!r} supports norm {', '.join(norms)}, not {self.norm!r}")
        return self

    def backbone_of(self, client: int) -> str:
        """The backbone of one client (partition id)."""
        b = self.backbone
        if isinstance(b, str):
            return b
        if isinstance(b, list):
            return b[client % len(b)]
        for name, clients in b.items():
            if client in clients:
                return name
        raise KeyError(client)

    @property
    def heterogeneous(self) -> bool:
        b = self.backbone
        return not isinstance(b, str) and len(set(b)) > 1


class LwfConfig(Strict):
    weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the KL distillation of the task-start model's outputs on the old classes")
    temperature: float = Field(2.0, gt=0.0, le=1e3, description="distillation temperature")


class EwcConfig(Strict):
    weight: float = Field(1000.0, ge=0.0, le=1e9, description="lambda of (lambda/2) sum F (theta - theta*)^2; Fisher accumulated over the client's tasks (online EWC)")


class PrdConfig(Strict):
    weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the supervised contrastive term (official: 1)")
    temperature: float = Field(0.2, gt=0.0, le=1e3, description="temperature of the supervised contrastive term (official supcon_temperature, default 0.2)")
    distill_weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the prototype-sample relation distillation (official distill_coef, default 1)")
    distill_temperature: float = Field(2.0, gt=0.0, le=1e3, description="temperature of the relation distillation, one softmax per old task (official distill_temp, default 2)")


class OpeConfig(Strict):
    weight: float = Field(1.0, ge=0.0, le=1e6, description="weight of the two prototype contrastive terms (new classes, old classes); officially 1")
    temperature: float = Field(0.5, gt=0.0, le=1e3, description="temperature of the contrastive loss between the batch's prototypes (official proto_t, default 0.5)")
    augment_noise: float = Field(0.1, ge=0.0, le=10.0, description="second view: Gaussian noise, as a share of the batch's input standard deviation (replaces the official image augmentations)")
    augment_scale: float = Field(0.2, ge=0.0, lt=1.0, description="second view: each sample multiplied by a factor drawn uniformly in [1 - augment_scale, 1 + augment_scale]")


class ApfConfig(Strict):
    base_rate: float = Field(0.75, ge=0.0, le=1.0, description="share of the replayed samples drawn uniformly from the memory (official mixup_base_rate, default 0.75); the rest comes from class pairs chosen by softmax(1 / prototype distance)")
    mixup_p: float = Field(0.6, ge=0.0, le=1.0, description="probability of mixing a uniformly drawn sample with another one, and a pair's samples with each other (official mixup_p, default 0.6)")
    mixup_lower: float = Field(0.0, ge=0.0, le=1.0, description="lower bound of the uniform mixing weight of the uniformly drawn samples (official mixup_lower, default 0)")
    mixup_upper: float = Field(0.6, ge=0.0, le=1.0, description="upper bound of that weight (official mixup_upper, default 0.6)")
    mixup_alpha: float = Field(0.4, gt=0.0, le=1e3, description="Beta(alpha, alpha) mixing weight of the pairs' samples (official mixup_alpha, default 0.4)")

    @model_validator(mode="after")
    def _bounds(self) -> "ApfConfig":
        if self.mixup_lower > self.mixup_upper:
            raise ValueError(f"mixup_lower ({self.mixup_lower}) is above mixup_upper ({self.mixup_upper})")
        return self


class TeenConfig(Strict):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="share of the calibration towards the base classes' prototypes")
    tau: float = Field(16.0, gt=0.0, le=1e4, description="scale of the cosine similarities in the softmax weights")


def layer_norm(norm: str) -> str:
    """The layers a ``model.norm`` value builds (``batch_local`` builds BatchNorm, kept local)."""
    return "batch" if norm == "batch_local" else norm


class ContinualConfig(Strict):
    backbone: Literal["train", "freeze_after_first_task", "frozen"] = Field("train", description="keep training the backbone, freeze it after the client's first task, or never train it (frozen: it stays as initialised or as model.pretrained loaded it; what differential privacy on prototype uploads needs)")
    feature_distillation: float = Field(0.0, ge=0.0, le=1e6, description="weight of an MSE pull towards the features of the model at task start")
    memory_per_class: int = Field(0, ge=0, le=1_000_000, description="exemplars kept per class per client for replay (0 = exemplar-free)")
    memory_selection: Literal["random", "herding"] = Field("random", description="how exemplars are chosen: seeded random, or iCaRL herding on normalised features")
    lwf: LwfConfig | None = Field(None, description="Learning without Forgetting, e.g. {weight: 1.0, temperature: 2.0} (fedavg + lwf = FedLwF)")
    ewc: EwcConfig | None = Field(None, description="online EWC with the diagonal empirical Fisher, e.g. {weight: 1000.0} (fedavg + ewc = FedEWC)")
    prd: PrdConfig | None = Field(None, description="prototype-sample relation distillation (Asadi et al. 2023), e.g. {weight: 1.0, temperature: 0.2, distill_weight: 1.0, distill_temperature: 2.0}")
    ope: OpeConfig | None = Field(None, description="OnPro's online prototype equilibrium (Wei et al. 2023): a contrastive loss between the prototypes of the batch's classes in two views, new and old classes apart, e.g. {weight: 1.0, temperature: 0.5}")
    apf: ApfConfig | None = Field(None, description="OnPro's adaptive prototypical feedback: the replayed memory samples of an online round drawn partly from pairs of classes whose prototypes are close, with mixup; needs tasks.online and a memory, e.g. {base_rate: 0.75}")
    teen: TeenConfig | None = Field(None, description="TEEN calibration, at inference only, of the non-base classes' prototypes towards the base (first task's) ones, e.g. {alpha: 0.5, tau: 16}")


class StrategyConfig(Strict):
    name: str = Field("proto_avg", description="merging strategy (registry name; `protofed list`)")
    params: dict[str, Any] = Field(default_factory=dict, description="the strategy's own parameters (validated by the strategy)")

    @field_validator("name")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from strategies import STRATEGIES

        if v not in STRATEGIES:
            raise ValueError(STRATEGIES.unknown(v))  # type: ignore[attr-defined]  # names a broken plugin too
        return v


# scenario keys that a compare label's ``set:`` or a sweep's grid may not change: the strategy is
# the label's own, the seed is the run's, and the rest names or drives the study itself
FIXED_KEYS = ("name", "seed", "strategy", "compare", "sweep")
DOTTED_KEY = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


def overridable_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be varied by a compare label's ``set:`` or a sweep grid (None if it can)."""
    if not re.fullmatch(DOTTED_KEY, key):
        return "not a dotted key path such as clients.partition.alpha"
    if key.split(".")[0] in FIXED_KEYS:
        return f"{key.split('.')[0]} cannot be varied here (strategies are chosen by label, seeds by the seed list)"
    return None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with the dotted ``key`` set to ``value`` (missing mappings created)."""
    data = copy.deepcopy(raw)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return data


class CompareEntry(Strict):
    """One labelled entry of the ``compare:`` section: a strategy name, its params, and scenario
    keys this label changes."""

    name: str = Field(description="strategy registry name")
    params: dict[str, Any] = Field(default_factory=dict, description="that strategy's params")
    set: dict[str, Any] = Field(default_factory=dict, description="scenario keys this label overrides (dotted key -> value)")

    _known_strategy = field_validator("name")(StrategyConfig._known_strategy.__func__)  # type: ignore[attr-defined]

    @field_validator("set")
    @classmethod
    def _keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            problem = overridable_key_problem(str(key))
            if problem:
                raise ValueError(f"{key!r}: {problem}")
        return v


class SweepConfig(Strict):
    """The ``sweep:`` section: what ``protofed sweep SCENARIO`` runs without --grid/--strategies/--seeds."""

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted scenario key -> list of values; every combination of values is one cell")
    strategies: list[str] = Field(default_factory=list, description="strategy names or compare: labels run in every cell (empty: the scenario's strategy)")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(default_factory=lambda: [0], description="seeds run for every cell and strategy")

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            problem = overridable_key_problem(str(key))
            if problem:
                raise ValueError(f"{key!r}: {problem}")
            if not values:
                raise ValueError(f"{key!r}: give at least one value")
        return v


class EvaluationConfig(Strict):
    protocol: Literal["global", "local"] = Field("global", description="which protocol fills the standard summary keys (both are recorded)")
    clients: Literal["all"] | Annotated[int, Field(ge=1)] = Field(
        "all",
        description="evaluate every present client, or N clients drawn once per run (seeded; late joiners enter in proportion to their arrival group)",
    )
    population: Literal["all", "learned"] = Field(
        "all",
        description="clients averaged in column j of the accuracy matrix: every evaluated client, or only those that have learned task j (separates forgetting from newcomers' ignorance)",
    )
    every: Literal["round", "task"] = Field(
        "round", description="evaluate after every round (smooth curves) or only at task ends"
    )
    open_world: bool = Field(
        True,
        description="at each task end also score the test samples of the classes no client has learned yet against the learned ones "
        "(open_world_auroc, open_world_fpr95; docs/metrics.md): one more embedding of the future tasks' test samples per evaluated client "
        "(scale_10000_clients: evaluation 4.6 -> 10.0 s of a 26 s run)",
    )


class ResourcesConfig(Strict):
    engine: Literal["ray", "inline"] = Field("ray", description="Ray actors through Flower's simulation engine, or in-process and sequential")
    num_cpus_per_client: int = Field(1, ge=1, le=1024, description="CPUs per Ray actor (and torch threads per client)")
    num_gpus_per_client: float = Field(0.0, ge=0.0, le=64.0, description="GPU share per Ray actor (fractional allowed); >0 trains on cuda")
    ray_address: str | None = Field(None, description="connect to an existing Ray cluster (e.g. 127.0.0.1:6379 or auto) instead of starting a local one")
    state_dir: PathText | None = Field(None, description="folder for the per-run client state store; on a multi-node Ray cluster it must be on a filesystem every node reaches (default: a private temp folder)")
    state_store: Literal["files", "sqlite"] = Field(
        "files",
        description="how client state is kept: one file per client, or one SQLite database (a transaction per save, one per cohort; "
        "checkpoints are snapshots through SQLite's backup API): no file per client for large populations. "
        "SQLite is for one machine: its WAL journal needs every process on the same host, so on a multi-node Ray cluster use files, "
        "with resources.state_dir on a filesystem every node reaches",
    )
    clients_per_call: Annotated[int, Field(ge=1, le=100_000)] | Literal["auto"] = Field(
        "auto",
        description="simulated clients per engine call (a cohort, run one after the other by one actor; results are identical): "
        "the engine starts one SuperNode per cohort of a round (at most ceil(num_clients / K)). auto: 1 on the inline engine and up to 100 clients, else "
        "about 4 calls per Ray actor for a round's sampled clients. Simulation engines only (ray, inline)",
    )
    vectorize: bool = Field(
        False,
        description="train the clients of a cohort at once (torch.func vmap; same results within float tolerance) when "
        "they share one architecture and their method adds no loss of its own; others train one by one (a warning "
        "says why). Groups of at least 10 clients on CPU, 2 on a GPU",
    )
    retries: int = Field(
        2, ge=0, le=100,
        description="how often a run is resumed from its last finished task when its engine's infrastructure dies under it "
        "(Ray's GCS, raylet or workers; not an error of the method's code), each retry a row of failures.csv; then the run fails",
    )
    deterministic: bool = Field(
        True,
        description="deterministic PyTorch kernels in every process (use_deterministic_algorithms, cuDNN deterministic "
        "without benchmark, CUBLAS_WORKSPACE_CONFIG): the same seed gives the same numbers on a GPU too; an operation "
        "without a deterministic implementation then fails naming this key. No cost measured on the CPU",
    )


class MlflowConfig(Strict):
    tracking_uri: str = Field(description="MLflow tracking URI: a server (http://...) or a local store such as sqlite:///mlflow.db")
    experiment: str | None = Field(None, description="MLflow experiment name (unset: the scenario name)")


class OutputConfig(Strict):
    dir: PathText = Field("results", description="results go to <dir>/<name>/<strategy>/seed-<seed>/")
    plot_formats: list[Literal["png", "pdf", "svg"]] = Field(
        default_factory=lambda: ["png"], min_length=1,
        description="file formats of every plot (pdf and svg keep text as text, for papers)",
    )
    save: Literal["none", "global", "clients"] = Field(
        "global",
        description="what stays after the run: nothing, final/global.npz (the server's prototypes/anchors, counts, weights) "
        "and final/client_prototypes.npz, or also each client's model and prototypes (final/clients/<id>.pt)",
    )
    tensorboard: bool = Field(False, description="write TensorBoard event files to <run dir>/tensorboard/ (extra: protofed[tensorboard])")
    mlflow: MlflowConfig | None = Field(None, description="log the run to MLflow: {tracking_uri, experiment} (extra: protofed[mlflow])")


class Scenario(Strict):
    name: str = Field("scenario", pattern=NAME_PATTERN, description="run name (letters, digits, . _ -); part of the results path")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the one seed every random stream is derived from")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    clients: ClientsConfig = Field(default_factory=ClientsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    compare: dict[str, CompareEntry] = Field(
        default_factory=dict,
        description="labels -> {name, params, set} usable in `protofed compare --strategies` (one strategy may appear under several labels; set: overrides scenario keys for that label)",
    )
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="grid, strategies and seeds of `protofed sweep`")

    @field_validator("compare")
    @classmethod
    def _labels(cls, v: dict[str, CompareEntry]) -> dict[str, CompareEntry]:
        for label in v:
            if not re.fullmatch(NAME_PATTERN, str(label)):
                raise ValueError(f"label {label!r} must use letters, digits, . _ - only")
        return v

    def resolved(self) -> dict[str, Any]:
        """The fully resolved scenario as plain data (what ``config.yaml`` records)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- errors
def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in PARTITION_SCHEMES and parts and parts[-1].endswith("partition"):
            continue  # discriminator tag inserted by pydantic, not a user key
        elif isinstance(item, str) and (item.startswith("function-") or "[" in item):
            continue
        else:
            parts.append(("." if parts else "") + _shown(str(item)))  # a key may be any text
    return "".join(parts)


def _explain(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    got = err.get("input")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling; see `protofed schema` or docs/scenario-reference.md)"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown value {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"missing key 'scheme'; allowed schemes: {', '.join(PARTITION_SCHEMES)}"
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys (got {shown})"
    return f"{msg} (got {shown})"


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field's annotation (through Union, list, dict, Annotated)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _submodels(arg)
    return out


def _known_keys(root: type[BaseModel], loc: tuple[Any, ...], extra: tuple[str, ...] = ()) -> list[str]:
    """The keys allowed next to the last element of ``loc`` (a pydantic error location)."""
    models = [root]
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        nxt: list[type[BaseModel]] = []
        for m in models:
            if item in m.model_fields:
                nxt += _submodels(m.model_fields[item].annotation)
        if not nxt:  # a discriminator tag (the partition scheme) or a dict key: narrow, not descend
            tagged = [m for m in models if "scheme" in m.model_fields and item in getattr(m.model_fields["scheme"].annotation, "__args__", ())]
            if tagged:
                models = tagged
            continue
        models = nxt
    # aliases (fedproto's lambda) are what users write
    keys = {f.alias or k for m in models for k, f in m.model_fields.items()} | set(extra)
    return sorted(keys)


def did_you_mean(word: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def problems_from_validation(
    exc: ValidationError, prefix: tuple[str, ...] = (), model: type[BaseModel] | None = None, extra: tuple[str, ...] = ()
) -> list[Problem]:
    """``model``: the schema that was validated, for "did you mean" on unknown keys."""
    out: list[Problem] = []
    for err in exc.errors():
        message = _explain(err)
        if err.get("type") == "extra_forbidden" and model is not None and err["loc"]:
            path = _loc_to_path(prefix + tuple(err["loc"]))
            command = "protofed schema" + (" " + path.rsplit(".", 1)[0] if "." in path else "")
            hint = did_you_mean(str(err["loc"][-1]), _known_keys(model, tuple(err["loc"]), extra))
            message = f"unknown key{hint} (`{command}` lists the keys)" if hint else (
                f"unknown key (`{command}` lists the keys; check the spelling)"
            )
        out.append(Problem(_loc_to_path(prefix + tuple(err["loc"])), message))
    return out


# --------------------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw scenario mapping."""
    data = copy.deepcopy(raw)
    problems: list[Problem] = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(_shown(item), "expected KEY=VALUE, e.g. --set clients.num_clients=20"))
            continue
        key, text = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            problems.append(Problem(_shown(key or item), "not a dotted key path such as training.lr"))
            continue
        try:
            value = load_yaml_text(text) if text.strip() else ""
        except YamlTooDeep as exc:
            problems.append(Problem(key, f"the value {exc.problem}"))
            continue
        except yaml.YAMLError:
            value = text
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. an int beyond 4300 digits, 2001-02-30
            problems.append(Problem(key, f"not a valid YAML value: {exc}"))
            continue
        shape = shape_problem(value)
        if shape:
            problems.append(Problem(key, f"the value {shape}"))
            continue
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(Problem(key, f"{part!r} is not a mapping in the scenario"))
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise UserError("--set", problems)
    return data


def _shown(text: str, limit: int = 60) -> str:
    """User text as one short line for an error message (repr when it holds odd characters)."""
    shown = text if text.isprintable() else repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --------------------------------------------------------------------------- loading
def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        if not p.exists():
            raise UserError.single(str(path), "", "file not found")
        if p.is_dir():
            raise UserError.single(str(path), "", "is a directory, expected a YAML scenario file")
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise UserError.single(str(path), "", f"cannot read the file: {exc.strerror or exc}") from None
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError.single(str(path), "", f"cannot read the file: {exc}") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError.single(str(path), where, problem if isinstance(exc, YamlTooDeep) else f"not valid YAML: {problem}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. an int beyond 4300 digits, a date 2001-02-30
        raise UserError.single(str(path), "", f"not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError.single(str(path), "", f"expected a mapping of keys at the top level, got {type(data).__name__}")
    for key, value in data.items():
        shape = shape_problem(value)
        if shape:
            raise UserError.single(str(path), str(key), shape)
    return data


MAX_DEPTH = 50  # a real scenario nests about 5 levels
MAX_VALUES = 1_000_000  # a large scenario (clients.arrival.at_task for 100,000 clients) holds ~100,000


class YamlTooDeep(yaml.MarkedYAMLError):
    """YAML text that nests deeper than :data:`MAX_DEPTH` (found before it is built)."""


class _DepthLimitedSafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (plain data only: no tag can import or run code) whose recursive
    composer refuses to go deeper than ``MAX_DEPTH`` levels, at the line where it happens,
    instead of exhausting the Python stack."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth > MAX_DEPTH and self.check_event(yaml.CollectionStartEvent):  # the top level is depth 0
            raise YamlTooDeep(problem=f"nests deeper than {MAX_DEPTH} levels", problem_mark=self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load`` with a nesting limit (see :class:`_DepthLimitedSafeLoader`)."""
    loader = _DepthLimitedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def shape_problem(value: Any) -> str | None:
    """Why a loaded YAML value is too deep or too large to be a scenario (None if it is not).

    Iterative, so it cannot overflow the stack itself; YAML aliases are followed, so a
    self-referencing alias counts as too deep and a "billion laughs" expansion as too large.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            return f"holds more than {MAX_VALUES:,} values (YAML aliases expanded); a scenario is far smaller"
        if isinstance(node, (dict, list)):
            if depth >= MAX_DEPTH:
                return f"nests deeper than {MAX_DEPTH} levels (or a YAML alias refers to itself)"
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return None


def validate_scenario(data: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a raw mapping into a :class:`Scenario`, with source and strategy params resolved."""
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise UserError(source, problems_from_validation(exc, model=Scenario)) from None
    except RecursionError:
        raise UserError.single(source, "", "the file nests too deeply") from None

    problems: list[Problem] = []
    from strategies import STRATEGIES

    from .data.sources import SOURCES

    src = SOURCES[scenario.dataset.source]
    try:
        params = src.params_model.model_validate(scenario.dataset.params())
        scenario.dataset = DatasetConfig(
            source=scenario.dataset.source,
            test_fraction=scenario.dataset.test_fraction,
            **params.model_dump(mode="json"),
        )
    except ValidationError as exc:
        problems += problems_from_validation(exc, ("dataset",), src.params_model, ("source", "test_fraction"))

    spec = STRATEGIES[scenario.strategy.name]
    try:
        sparams = spec.Params.model_validate(scenario.strategy.params)
        scenario.strategy.params = sparams.model_dump(mode="json", by_alias=True)
    except ValidationError as exc:
        problems += problems_from_validation(exc, ("strategy", "params"), spec.Params)
    for label, entry in scenario.compare.items():
        try:
            entry.params = STRATEGIES[entry.name].Params.model_validate(entry.params).model_dump(mode="json", by_alias=True)
        except ValidationError as exc:
            problems += problems_from_validation(exc, ("compare", label, "params"), STRATEGIES[entry.name].Params)
    for label, entry in scenario.compare.items():
        if entry.set and not problems:  # the label's whole scenario must be valid too
            own = {k: v for k, v in data.items() if k not in ("compare", "sweep")}
            own["strategy"] = {"name": entry.name, "params": entry.params}
            for key, value in entry.set.items():
                own = set_dotted(own, str(key), value)
            try:
                validate_scenario(own, source)
            except UserError as exc:
                problems += [Problem(f"compare.{label}.set: {p.field}", p.message) for p in exc.problems]
    problems += _model_problems(scenario)
    problems += _aper_problems(scenario)
    if problems:
        raise UserError(source, problems)
    return scenario


def _model_problems(scenario: Scenario) -> list[Problem]:
    """Cross-field checks of model heterogeneity: a backbone mapping must cover every client
    once, and weight-averaging strategies need one architecture."""
    from strategies import STRATEGIES

    out: list[Problem] = []
    b = scenario.model.backbone
    if isinstance(b, dict):
        ids = sorted(c for clients in b.values() for c in clients)
        expected = list(range(scenario.clients.num_clients))
        if ids != expected:
            counts = Counter(ids)  # not ids.count(c) per id: quadratic for 100,000 clients
            missing = sorted(set(expected) - set(ids))
            extra = sorted(c for c, k in counts.items() if k > 1 or not 0 <= c < scenario.clients.num_clients)
            out.append(
                Problem(
                    "model.backbone",
                    f"the mapping must give each of the {scenario.clients.num_clients} client ids exactly once"
                    + (f"; missing {missing[:10]}" if missing else "")
                    + (f"; repeated or out of range {extra[:10]}" if extra else ""),
                )
            )
    if scenario.model.heterogeneous:
        entries = [("strategy", scenario.strategy.name, scenario.strategy.params)]
        entries += [(f"compare.{label}", e.name, e.params) for label, e in scenario.compare.items()]
        for where, name, params in entries:
            cls = STRATEGIES[name]
            try:
                validated = cls.Params.model_validate(params)
            except ValidationError:
                continue  # bad params are reported on their own field already
            if cls.weight_sharing(validated):
                out.append(
                    Problem(
                        where,
                        f"{name} averages model weights, which needs one architecture, but model.backbone "
                        f"assigns several ({', '.join(sorted(set(b)))}); use one backbone, or a prototype "
                        "strategy with share_weights: false",
                    )
                )
    return out


def _aper_problems(scenario: Scenario) -> list[Problem]:
    """``model.aper`` needs an adapted branch that trains during the first task and then stops
    (APER trains nothing after it), and a client objective whose loss sees only the features
    (the adapted branch trains on its own half: loss terms of a strategy or a continual mechanism,
    or a head, would meet features of two widths)."""
    if not scenario.model.aper:
        return []
    from strategies import STRATEGIES

    cls = STRATEGIES[scenario.strategy.name]
    try:
        share = getattr(cls.Params.model_validate(scenario.strategy.params), "share_weights", False)
    except ValidationError:
        return []  # reported on its own field already
    c, out = scenario.continual, []
    if c.backbone == "frozen":
        out.append(Problem("model.aper", "continual.backbone is frozen, so the adapted branch would never adapt (a copy of the "
                           "frozen one); use continual.backbone: train with strategy.params.share_weights: first_task, or "
                           "continual.backbone: freeze_after_first_task"))
    elif c.backbone == "train" and share != "first_task":
        out.append(Problem("model.aper", "the adapted branch must stop training after the first task: set "
                           "strategy.params.share_weights: first_task (a strategy that has it) or continual.backbone: "
                           f"freeze_after_first_task (now {scenario.strategy.name} with share_weights: {share})"))
    if share == "first_task" and scenario.training.rounds_per_task < 2:
        out.append(Problem("training.rounds_per_task", "model.aper with share_weights: first_task spends the first task's last "
                           "round on prototypes of the frozen averaged backbone, so it needs at least 2 rounds per task"))
    obj = cls.Objective
    if obj.needs_head() or obj.adds_own_loss() or obj.train_loss != "prototype":
        out.append(Problem("model.aper", f"{scenario.strategy.name} trains a head or adds loss terms of its own; model.aper "
                           "supports prototype strategies whose loss sees only the features (e.g. proto_avg)"))
    mechanisms = [k for k in ("lwf", "ewc", "prd", "ope", "apf") if getattr(c, k) is not None]
    if c.feature_distillation > 0:
        mechanisms.append("feature_distillation")
    if mechanisms:
        out.append(Problem("model.aper", f"continual.{', continual.'.join(mechanisms)} add loss terms on the features; "
                           "APER trains its adapted branch on the first task only, without them"))
    return out


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    raw = read_yaml(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    try:
        return validate_scenario(raw, str(path))
    except UserError as exc:
        raise blame_overrides(exc, str(path), overrides or []) from None


def blame_overrides(
    exc: UserError,
    path: str,
    overrides: list[str],
    before: dict[str, str] | None = None,
    after: dict[str, str] | None = None,
    word: str = "--set",
) -> UserError:
    """The same problems, naming the override a problem comes from instead of the file
    (``--set clients.num_clientz=3`` is not a mistake in quickstart.yaml).

    ``overrides``: the ``KEY=VALUE`` texts, each named ``{word} KEY=VALUE`` (``word`` is
    ``overrides=`` in the Python API). ``before`` / ``after``: overrides of one key each applied
    before / after those texts, dotted key -> how to name it (``{"seed": "--seed -1"}``).
    """
    origins = dict(before or {})
    origins.update({item.split("=", 1)[0].strip(): f"{word} {item}" for item in overrides if "=" in item})
    origins.update(after or {})

    def origin(field: str) -> str | None:
        for key, shown in origins.items():
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                return shown
        return None

    blamed = [origin(p.field) for p in exc.problems]
    if not any(blamed):
        return exc
    if all(blamed):
        return UserError(f"{', '.join(dict.fromkeys(b for b in blamed if b))} (applied to {path})", exc.problems)
    problems = [Problem(p.field, f"{p.message} (from {b})" if b else p.message) for p, b in zip(exc.problems, blamed)]
    flags = dict.fromkeys(b.split(" ", 1)[0] for b in blamed if b)
    return UserError(f"{path} (with {', '.join(flags)})", problems)
