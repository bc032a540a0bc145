"""``target``: TARGET (Zhang et al., ICCV 2023), federated class-incremental learning with
data-free replay: FedAvg of backbone + head, and from the second task on, distillation of the
previous task's global model on synthetic samples of the old classes.

Server (at the first round of every task after the first): the current global model (the
teacher) trains a generator by model inversion (:mod:`simulator.learner.generator`:
``oh * CE(T(x), y) + bn * BatchNorm statistics + adv * adversarial KL against a student``) over
the classes seen so far, then sends the generator's weights to each client once per task, with
the model. Merge rule: sample-weighted FedAvg, as ``fedavg``.

Client: ``CE`` on its data + ``kd_weight * KL_T(old(x_syn) || model(x_syn))`` on the old classes'
logits, ``x_syn`` a fresh batch of the generator (labels uniform over the old classes, as large as
the real batch unless ``syn_batch_size``), ``old`` the global model received at the task's first
round (kept in the objective's state, so a resumed run continues with it). Draws are seeded from
the run's seed, the server round and the client.

Where ours differs from the paper / official code (``methods/target.py``), and why:

* The generator (architecture, conditional on the label, no MAML, adversarial term active,
  iterations sized for a CPU): see :mod:`simulator.learner.generator`.
* What travels: the generator's weights (about 26,000 float32 for mnist1d, 104 KB), once per task
  and client, instead of a pool of synthetic images: smaller than a useful pool (a CIFAR pool of
  2,560 images is 31 MB as float32) and the client draws as many samples as it trains batches.
  A client that was not sampled in the task's first round also receives the teacher's weights
  (the global model it would have received then) with the generator; all of it is counted in the
  bytes. Synthesis runs on the server, on the CPU, at the start of the task (the official code
  runs it at the end of the previous task: the same model).
* KD: KL divergence instead of the official cross-entropy with soft targets (same gradients; zero
  when the model equals the old one), no ``T^2`` factor as the official ``_KD_loss``.
* ``new_classes_ce`` (default true, as the official code's ``cross_entropy(output[:, known:],
  ...)``): from the second task on, the cross-entropy ranges over the classes that are not old
  (plus any class present in the client's training data, e.g. its replay memory); ``false`` keeps
  ``fedavg``'s cross-entropy over every seen class.
* Local optimiser and schedule are the scenario's (``training.*``), not the official SGD 0.01 /
  5 epochs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, ClassVar, Iterable, Literal

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from pydantic import Field

from simulator import seeding
from simulator.learner.backbones import ProtoModel
from simulator.learner.continual.base import kl_distillation
from simulator.learner.generator import Generator, SynthesisConfig, kind_of, reinitialise, synthesize
from simulator.objective import ClientInfo
from simulator.records import GLOBAL, WEIGHT_PREFIX, load_weights

from .base import RunInfo, StrategyParams, Upload
from .fedavg import FedAvg, HeadObjective

log = logging.getLogger("protofed.target")

PREFIX = "target."
GEN = PREFIX + "g."  # generator parameters
TEACHER = PREFIX + "teacher."  # the teacher's weights, for clients absent from the task's first round
TASK, SEED, CLASSES, SPEC = PREFIX + "task", PREFIX + "seed", PREFIX + "classes", PREFIX + "spec"
KINDS = ("signal", "image")


class Params(StrategyParams):
    kd_weight: float = Field(25.0, ge=0.0, description="weight of the distillation on synthetic samples (paper: 25)")
    temperature: float = Field(2.0, gt=0.0, description="distillation temperature on the clients (paper: 2)")
    new_classes_ce: bool = Field(True, description="cross-entropy over the non-old classes from the second task on (official code)")
    syn_batch_size: int | None = Field(None, ge=2, description="synthetic samples per client batch (default: the real batch's size)")
    generator: Literal["auto", "signal", "image"] = Field(
        "auto", description="generator kind: 1-D convolutions for (L,) / (C, L) signals, 2-D for (C, H, W) images (auto: by the sample's shape)")
    nz: int = Field(32, ge=1, description="noise dimension of the generator")
    ngf: int = Field(16, ge=1, description="generator width (channels of its last block)")
    synthesis_rounds: int = Field(20, ge=1, description="server-side synthesis rounds per task boundary")
    warmup: int = Field(5, ge=0, description="synthesis rounds before the student trains and the adversarial term is used")
    generator_steps: int = Field(10, ge=1, description="generator steps per synthesis round")
    student_steps: int = Field(30, ge=0, description="student steps per synthesis round after warmup")
    synthesis_batch_size: int = Field(128, ge=2, description="synthetic samples per generator / student step on the server")
    oh: float = Field(0.5, ge=0.0, description="weight of CE(T(x), y) in the generator loss (paper: 0.5)")
    bn: float = Field(10.0, ge=0.0, description="weight of the BatchNorm statistics loss (paper: 10)")
    adv: float = Field(1.0, ge=0.0, description="weight of the adversarial teacher/student KL (paper: 1)")
    lr_g: float = Field(0.002, gt=0.0, description="generator Adam learning rate")

    def synthesis(self) -> SynthesisConfig:
        return SynthesisConfig(
            rounds=self.synthesis_rounds, warmup=self.warmup, generator_steps=self.generator_steps,
            student_steps=self.student_steps, batch_size=self.synthesis_batch_size,
            oh=self.oh, bn=self.bn, adv=self.adv, lr_g=self.lr_g,
        )


def _ints(values: Iterable[int]) -> Array:
    return Array(np.asarray(list(values), dtype=np.int64))


class TargetObjective(HeadObjective):
    """FedAvg's client (weights + head, CE) plus distillation of the old global model on samples
    of the generator received from the server."""

    def __init__(self, params: Params, info: ClientInfo) -> None:
        super().__init__(params, info)
        self.gen_task = -1
        self.classes: list[int] = []  # the old classes (those the generator was trained on)
        self.spec: list[int] = []  # nz, ngf, kind, *input_shape
        self.gen_state: dict[str, torch.Tensor] = {}
        self.old_state: dict[str, torch.Tensor] = {}
        self.round_seed = 0
        self.local_classes: set[int] = set()
        self._gen: Generator | None = None
        self._old: ProtoModel | None = None
        self._rng: torch.Generator | None = None

    # ---- receiving
    def receive(self, arrays: ArrayRecord, model: ProtoModel) -> None:
        super().receive(arrays, model)
        if SEED in arrays:
            self.round_seed = int(arrays[SEED].numpy()[0])
        if SPEC not in arrays:
            return  # nothing new: keep the generator and old model of this task
        self.gen_task = int(arrays[TASK].numpy()[0])
        self.classes = [int(c) for c in arrays[CLASSES].numpy()]
        self.spec = [int(v) for v in arrays[SPEC].numpy()]
        self.gen_state = {k[len(GEN):]: torch.as_tensor(arrays[k].numpy().copy()) for k in arrays.keys() if k.startswith(GEN)}
        # the old model: the global model of the task's first round, i.e. what was just loaded,
        # unless the server sent the teacher's weights (this client missed that round)
        old = copy.deepcopy(model)
        teacher = {WEIGHT_PREFIX + k[len(TEACHER):]: arrays[k] for k in arrays.keys() if k.startswith(TEACHER)}
        if teacher:
            load_weights(old, ArrayRecord(teacher))
        self.old_state = {k: v.detach().to("cpu", copy=True) for k, v in old.state_dict().items()}
        self._gen = self._old = None

    @property
    def active(self) -> bool:
        return self.gen_task >= 0 and bool(self.classes) and bool(self.gen_state)

    # ---- per-client state
    def state_dict(self) -> dict[str, Any]:
        return {"gen_task": self.gen_task, "classes": list(self.classes), "spec": list(self.spec),
                "gen_state": self.gen_state, "old_state": self.old_state, "round_seed": self.round_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen_task = int(state.get("gen_task", -1))
        self.classes = list(state.get("classes", []))
        self.spec = list(state.get("spec", []))
        self.gen_state = dict(state.get("gen_state", {}))
        self.old_state = dict(state.get("old_state", {}))
        self.round_seed = int(state.get("round_seed", 0))

    # ---- training
    def before_training(self, model: ProtoModel, x: np.ndarray, y: np.ndarray) -> None:
        self.local_classes = {int(c) for c in np.unique(y)}
        seed = seeding.derive_seed(self.round_seed, "target_samples", self.info.partition_id)
        self._rng = torch.Generator().manual_seed(seed)

    def train_classes(self, seen: list[int]) -> list[int]:
        if not (self.active and self.params.new_classes_ce):  # type: ignore[attr-defined]
            return seen
        old = set(self.classes)
        return [c for c in seen if c not in old or c in self.local_classes]

    def generator(self) -> Generator:
        if self._gen is None:
            nz, ngf, kind, *shape = self.spec
            gen = Generator(shape, self.info.num_classes, nz=nz, ngf=ngf, kind=KINDS[kind])
            gen.load_state_dict(self.gen_state)
            self._gen = gen.to(self.info.device).eval()
        return self._gen

    def old_model(self, model: ProtoModel) -> ProtoModel:
        if self._old is None:
            old = copy.deepcopy(model)
            old.load_state_dict(self.old_state)
            old.eval()
            for p in old.parameters():
                p.requires_grad_(False)
            self._old = old
        return self._old

    def distillation(self, model: ProtoModel, x_syn: torch.Tensor) -> torch.Tensor:
        """``KL_T(old || model)`` over the old classes' logits on synthetic samples."""
        cls = torch.as_tensor(self.classes, device=x_syn.device)
        with torch.no_grad():
            old = self.old_model(model)
            old_logits = old.head(old(x_syn))[:, cls]  # type: ignore[misc]
        new_logits = model.head(model(x_syn))[:, cls]  # type: ignore[misc]
        return kl_distillation(old_logits, new_logits, self.params.temperature)  # type: ignore[attr-defined]

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor, model: ProtoModel) -> torch.Tensor | None:
        weight = float(self.params.kd_weight)  # type: ignore[attr-defined]
        if not self.active or weight == 0:
            return None
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(seeding.derive_seed(self.round_seed, "target_samples", self.info.partition_id))
        n = self.params.syn_batch_size or max(int(features.shape[0]), 2)  # type: ignore[attr-defined]
        x_syn, _ = self.generator().sample(n, self.classes, self._rng)
        return weight * self.distillation(model, x_syn)


class Target(FedAvg):
    name = "target"
    description = "TARGET: FedAvg + distillation of the old global model on samples of a server-trained generator"
    Params = Params
    Objective = TargetObjective
    synthesis_log: ClassVar[logging.Logger] = log

    @classmethod
    def check_setup(cls, params: Params, run: RunInfo) -> list[tuple[str, str]]:
        """A generator kind that cannot make the dataset's samples is refused before the run,
        not at the first synthesis (after a whole task of training)."""
        if not run.input_shape:
            return []
        try:
            kind_of(run.input_shape, params.generator)
        except ValueError as exc:
            return [("generator", f"{exc}; use generator: auto")]
        return []

    def __init__(self, params: Params, run: RunInfo) -> None:
        super().__init__(params, run)
        self.gen_task = -1
        self.gen_classes: list[int] = []
        self.gen_spec: list[int] = []
        self.gen_state: dict[str, np.ndarray] = {}
        self.teacher: dict[str, np.ndarray] = {}
        self.holding_gen: set[int] = set()  # clients holding this task's generator
        self.last_seen: list[int] = []  # the seen classes of the last round configured
        self.reports: dict[int, dict[str, float]] = {}  # task -> synthesis report

    # ------------------------------------------------------------------ synthesis
    def _train_generator(self, task: int, old_classes: list[int]) -> None:
        p: Params = self.params  # type: ignore[assignment]
        if self.run.new_model is None or not self.run.input_shape:
            raise RuntimeError("target needs RunInfo.new_model and input_shape to train its generator")
        teacher = self.run.new_model()
        load_weights(teacher, ArrayRecord(self.global_weights))
        student = self.run.new_model()
        reinitialise(student, seeding.derive_seed(self.run.seed, "target_student", task))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeding.derive_seed(self.run.seed, "target_generator", task))
            gen = Generator(self.run.input_shape, self.run.num_classes, nz=p.nz, ngf=p.ngf, kind=p.generator)
        report = synthesize(gen, teacher, student, old_classes, p.synthesis(),
                            seeding.derive_seed(self.run.seed, "target_synthesis", task))
        self.gen_task = task
        self.gen_classes = sorted(old_classes)
        self.gen_spec = [gen.nz, gen.ngf, KINDS.index(gen.kind), *gen.input_shape]
        self.gen_state = {k: v.detach().cpu().numpy().copy() for k, v in gen.state_dict().items()}
        self.teacher = {k: v.numpy().copy() for k, v in self.global_weights.items()}
        self.holding_gen = set()
        self.reports[task] = report.as_dict()
        log.info("task %d: generator trained over %d classes in %.1f s (teacher accuracy on synthetic samples "
                 "%.3f -> %.3f, BN loss %.2f -> %.2f)", task, report.classes, report.seconds,
                 report.teacher_acc_before, report.teacher_acc_after, report.bn_before, report.bn_after)

    def _extra(self, pid: int, server_round: int, first_round: bool) -> dict[str, Array]:
        out = {TASK: _ints([self.gen_task]), SEED: _ints([seeding.derive_seed(self.run.seed, "target_round", server_round)])}
        if pid not in self.holding_gen:
            out[CLASSES] = _ints(self.gen_classes)
            out[SPEC] = _ints(self.gen_spec)
            out.update({GEN + k: Array(v) for k, v in self.gen_state.items()})
            if not first_round:
                out.update({TEACHER + k[len(WEIGHT_PREFIX):]: Array(v) for k, v in self.teacher.items()})
        return out

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        task = int(config["task"])  # type: ignore[arg-type]
        seen = [int(c) for c in config["seen_classes"]]  # type: ignore[union-attr]
        if task > 0 and self.gen_task != task:
            old = [c for c in self.last_seen if c in set(seen)] or []
            if old and self.global_weights:
                self._train_generator(task, old)
        self.last_seen = seen
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        if self.gen_task != task:
            return msgs
        first_round = int(config["round"]) == 0  # type: ignore[arg-type]
        pid_of = {node: pid for pid, node in self.run.partitions.items()}
        for msg in msgs:
            pid = pid_of[msg.metadata.dst_node_id]
            msg.content[GLOBAL] = ArrayRecord({**dict(msg.content[GLOBAL].items()), **self._extra(pid, server_round, first_round)})
        return msgs

    def decode(self, replies: Iterable[Message]) -> list[Upload]:
        uploads = super().decode(replies)
        if self.gen_task >= 0:  # a client that replied has saved the generator it received
            self.holding_gen.update(u.partition_id for u in uploads)
        return uploads

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["target"] = {
            "gen_task": self.gen_task, "gen_classes": list(self.gen_classes), "gen_spec": list(self.gen_spec),
            "gen_state": self.gen_state, "teacher": self.teacher, "holding_gen": sorted(self.holding_gen),
            "last_seen": list(self.last_seen), "reports": dict(self.reports),
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        t = state.get("target", {})
        self.gen_task = int(t.get("gen_task", -1))
        self.gen_classes = list(t.get("gen_classes", []))
        self.gen_spec = list(t.get("gen_spec", []))
        self.gen_state = dict(t.get("gen_state", {}))
        self.teacher = dict(t.get("teacher", {}))
        self.holding_gen = set(int(p) for p in t.get("holding_gen", []))
        self.last_seen = list(t.get("last_seen", []))
        self.reports = dict(t.get("reports", {}))
