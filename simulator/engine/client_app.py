"""The ClientApp: Flower message handlers that drive the learner for one client.

train:    load client state -> strategy objective receives the global knowledge -> task change
          bookkeeping (replay memory, distillation teacher) -> local training -> prototypes
          recomputed in eval mode after training -> reply (upload + metrics) -> save state
evaluate: load client state -> receive global knowledge -> predict the test samples of every
          seen task -> reply per-class correct / total counts (and, at the evaluation that fills
          a row of the accuracy matrix, the open-world AUROC / FPR95 against the unseen tasks)
query:    reply this node's partition id (used once by the server to map nodes to clients)
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..data import online as online_data
from ..data.schedule import ABSENT, STALE
from ..learner import continual as mechanisms
from ..learner.evaluation import client_predict, client_prototypes, per_class_correct
from ..learner.open_world import usable_prototypes
from ..learner.prototypes import PrototypeSet, class_means
from ..learner.replay import memory_indices
from ..learner.second_order import client_statistics
from ..learner.training import NonFiniteLoss, TrainConfig, embed, train_local
from ..objective import ClientInfo
from ..records import CONFIG, GLOBAL, METRICS, OPEN_WORLD_TASKS, UPLOAD, protos_to_arrays, record_bytes, stats_from_arrays, stats_to_arrays
from ..privacy.client import RELEASED, SGD_STEPS, private_prototypes, private_training
from ..privacy.audit import client_truth
from ..privacy.secagg import secure_train_mod
from ..seeding import derive_seed, rng
from .cohorts import COHORT_ACTION, serve_cohort
from .failures import TRACEBACK_MARK, injected_fault
from .profile import GPU_PEAK, WORKER_PID, PhaseTimer, client_call, lap, phase, resumed_call, to_metrics
from . import determinism
from .runtime import RunSetup, Runtime, runtime_for
from .state_store import to_cpu


FATAL_MARK = "[protofed-fatal] "


class ClientFailure(RuntimeError):
    """A client could not finish its work in a way that must stop the run (e.g. a non-finite
    loss); the message names the client, task and round. The mark lets the server find it in
    an error reply whatever the engine wrapped around it."""

    def __init__(self, message: str) -> None:
        super().__init__(FATAL_MARK + message)


class ClientDropout(RuntimeError):
    """A simulated fault (``clients.dropout`` or ``clients.fault_injection``): the reply is an
    error and the round merges the other clients."""


def _maybe_fail(rt: Runtime, pid: int, server_round: int) -> None:
    fault = injected_fault(rt.scenario, pid, server_round)
    if fault is None:
        return
    mode, message = fault
    if mode == "exit" and rt.scenario.resources.engine != "inline":
        os._exit(17)  # the worker process dies mid-round
    raise ClientDropout(message)


class ClientError(RuntimeError):
    """An unexpected exception in a client handler, carrying its traceback in the message so
    the server can show it whichever engine (and process) ran the client."""


def _with_traceback(handler):
    """Re-raise unexpected exceptions with their traceback text attached (Flower's Ray engine
    passes only ``str(exception)`` back to the server). Injected faults and fatal failures pass
    through unchanged."""

    def run(setup: RunSetup, msg: Message, context: Context) -> Message:
        try:
            return handler(setup, msg, context)
        except (ClientDropout, ClientFailure):
            raise
        except Exception as exc:
            text = determinism.explain(exc) or f"{type(exc).__name__}: {exc}"
            raise ClientError(f"{text}{TRACEBACK_MARK}{traceback.format_exc()}") from exc

    return run


def _partition_id(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _fresh_state(rt: Runtime) -> dict[str, Any]:
    return {
        "model": None,
        "teacher": None,
        "memory": {},
        "task": None,
        "first_task": None,
        "class_counts": np.zeros(rt.stream.dataset.num_classes, dtype=np.int64),
        "objective": {},
    }


def _load(rt: Runtime, pid: int):
    with phase("state_load"):
        state = rt.store.load(pid) or _fresh_state(rt)
    model = rt.new_model(pid)
    if state["model"] is not None:
        model.load_state_dict(state["model"])
    model.to(rt.device)
    objective = rt.strategy_cls.Objective(
        rt.params,
        ClientInfo(pid, rt.stream.dataset.num_classes, rt.scenario.model.feature_dim, rt.device),
    )
    objective.load_state_dict(state.get("objective") or {})
    lap("model_build")
    return state, model, objective


def _task_indices(rt: Runtime, objective, task: int, pid: int) -> np.ndarray:
    """This client's training samples for ``task``; every sample of every task for methods
    whose data scope is "all" (the centralised upper bound)."""
    if objective.data_scope == "all":
        return rt.all_train_indices
    return rt.stream.train_indices[task][pid]


def _task_data(rt: Runtime, objective, pid: int, task: int, seen: list[int], memory_classes=()):
    idx = _task_indices(rt, objective, task, pid)
    d = rt.stream.dataset
    # the task's classes include those of the next task that leaked into it (tasks.blurry)
    return mechanisms.task_data(d.x_train[idx], d.y_train[idx], rt.stream.train_classes(task), seen, d.num_classes,
                                objective.inference_prototypes(None), objective.train_loss, rt.device,
                                rt.scenario.training.batch_size, memory_classes, rt.stream.tasks)


def _begin_task(rt: Runtime, pid: int, state: dict[str, Any], model, objective, task: int, stack=None, seen=()) -> None:
    """Bookkeeping when this client meets a new task: remember exemplars of the task it just
    finished, snapshot the model as the distillation teacher, count its classes, and tell the
    continual mechanisms (``stack``) that a task ended and another started."""
    prev = state["task"]
    cfg = rt.scenario.continual
    continual = objective.uses_continual
    if prev is not None and continual:
        _remember(rt, pid, state, prev, model, objective)
    if stack:
        new = [c for c in seen if c not in set(rt.stream.tasks[task])]
        ended = _task_data(rt, objective, pid, prev, new) if prev is not None else None
        stack.task_change(model, ended, _task_data(rt, objective, pid, task, list(seen), list(state["memory"]) if continual else []))
    if state["first_task"] is None:
        state["first_task"] = task
    state["tasks_learned"] = state.get("tasks_learned", 0) + 1
    state["teacher"] = None
    if continual and cfg.feature_distillation > 0 and state["tasks_learned"] > 1:
        state["teacher"] = to_cpu(model.state_dict())
    idx = _task_indices(rt, objective, task, pid)
    state["class_counts"] = state["class_counts"] + np.bincount(
        rt.stream.dataset.y_train[idx], minlength=rt.stream.dataset.num_classes
    )
    state["task"] = task


def _feature_cache(rt: Runtime, objective):
    """The feature table this client's embeddings may use now (:meth:`Runtime.feature_cache`)."""
    return rt.feature_cache(objective.backbone_frozen)


def _remember(rt: Runtime, pid: int, state: dict[str, Any], task: int, model, objective) -> None:
    """Keep exemplars of a finished task in the replay memory (``continual.memory_selection``;
    classes already held are kept as they are, so calling this again for the same task changes
    nothing)."""
    cfg = rt.scenario.continual
    if cfg.memory_per_class <= 0:
        return
    idx = rt.stream.train_indices[task][pid]
    if (online := rt.scenario.tasks.online) is not None:  # only what the stream delivered
        idx = online_data.seen_part(idx, rt.scenario.seed, pid, task, rt.scenario.training.rounds_per_task,
                                    online.batch_size, online.communicate_every)
    labels = rt.stream.dataset.y_train[idx]
    state["memory"] = mechanisms.select_memory(
        cfg.memory_selection, state["memory"], idx, labels, cfg.memory_per_class,
        rng(rt.scenario.seed, "memory", pid, task),
        lambda i: embed(model, rt.stream.dataset.x_train[i], rt.device, cache=_feature_cache(rt, objective)).cpu().numpy(),
    )


def _timed(handler):
    """Adds ``compute_seconds`` (time spent inside the handler) to the reply's metrics, so the
    server can tell client compute from engine overhead, and the handler's phases as
    ``profile.<phase>`` (simulator/engine/profile.py; they sum to at most ``compute_seconds``)."""

    def run(setup: RunSetup, msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        with client_call() as timer:
            reply = handler(setup, msg, context)
        _add_timing(setup, reply, time.perf_counter() - t0, timer)
        return reply

    return run


def _add_timing(setup: RunSetup, reply: Message, seconds: float, timer) -> None:
    if reply.has_content() and METRICS in reply.content:
        reply.content[METRICS]["compute_seconds"] = seconds
        reply.content[METRICS][determinism.METRIC] = int(determinism.state())  # bookkeeping, see profile.json
        for key, value in to_metrics(timer).items():
            reply.content[METRICS][key] = value
        if runtime_for(setup).device.startswith("cuda"):  # GPU memory of this actor (bench.json)
            import torch

            reply.content[METRICS][GPU_PEAK] = int(torch.cuda.max_memory_allocated())
            reply.content[METRICS][WORKER_PID] = os.getpid()


@dataclass
class TrainRequest:
    """What a client's training handler asks of the training step (``train_local``'s arguments):
    the sequential driver trains it at once, a cohort driver may train several together
    (``resources.vectorize``, :func:`_train_cohort_vectorized`)."""

    model: Any
    x: np.ndarray
    y: np.ndarray
    cfg: TrainConfig
    seen_classes: list[int]
    num_classes: int
    known: Any
    teacher: Any
    hooks: list
    seed: int
    device: str
    private: Any
    hooks_have_losses: bool

    def run(self):
        return train_local(self.model, self.x, self.y, self.cfg, seen_classes=self.seen_classes,
                           num_classes=self.num_classes, known=self.known, teacher=self.teacher, hooks=self.hooks,
                           seed=self.seed, device=self.device, private=self.private)


def _drive(body):
    """The sequential driver of a handler body that yields a :class:`TrainRequest`: train it with
    ``train_local`` right away and hand back its result (or its NonFiniteLoss)."""

    def run(setup: RunSetup, msg: Message, context: Context) -> Message:
        gen = body(setup, msg, context)
        try:
            request = next(gen)
            try:
                stats = request.run()
            except NonFiniteLoss as exc:
                gen.throw(exc)  # the body turns it into its ClientFailure
            gen.send(stats)
        except StopIteration as done:
            return done.value
        raise RuntimeError("a training handler body yielded twice")

    return run


def _train_body(setup: RunSetup, msg: Message, context: Context):
    """The train handler as a generator: it yields its :class:`TrainRequest` once (or returns
    before, with nothing to train) and returns the reply."""
    rt = runtime_for(setup)
    rt.set_threads()
    lap("runtime")  # the first call in a process builds the runtime (data stream, strategy imports)
    pid = _partition_id(context)
    config: ConfigRecord = msg.content[CONFIG]
    step, rnd, server_round = int(config["task"]), int(config["round"]), int(config["server_round"])
    seen = [int(c) for c in config["seen_classes"]]
    _maybe_fail(rt, pid, server_round)
    state, model, objective = _load(rt, pid)
    objective.receive(msg.content[GLOBAL], model)
    lap("receive")
    continual = objective.uses_continual
    # the global task this client learns now: its own under per-client task orders. A client
    # that gets no new classes at this step (STALE) keeps its current task but trains on its
    # replay memory only: the data of a finished task is gone in class-incremental learning.
    scheduled = step if objective.data_scope == "all" else rt.stream.task_at(pid, step)
    stale = scheduled in (STALE, ABSENT)
    task = state["task"] if stale else scheduled
    stack = mechanisms.build_stack(rt.scenario.continual, continual, state.get("continual"))
    if task is not None and state["task"] != task:
        _begin_task(rt, pid, state, model, objective, task, stack, seen)
    if stale and task is not None and continual:
        _remember(rt, pid, state, task, model, objective)  # its task is over: what it keeps of it is its memory

    no_data = np.zeros(0, np.int64)
    task_idx = _task_indices(rt, objective, task, pid) if task is not None and not stale else no_data
    mem_idx = memory_indices(state["memory"]) if continual else no_data
    x, y = _round_data(rt, pid, task, rnd, task_idx, mem_idx, stack, model)
    lap("task_bookkeeping")
    if len(y) == 0:
        return _empty_reply(rt, msg, context, pid, state, task, stale, rnd, server_round, model, objective, x, y)

    s = rt.scenario
    request = _train_request(rt, pid, task, rnd, state, model, objective, stack, x, y, seen)
    dp_sgd = request.private
    try:
        stats = yield request
    except NonFiniteLoss as exc:
        raise ClientFailure(
            f"client {pid} (task {task}, round {rnd} of the task, global round {server_round}): {exc}; "
            f"try a smaller training.lr "
            f"or smaller strategy loss weights"
        ) from None
    lap("train")
    private = (private_prototypes(s, rt.stream.num_tasks, model, x, y, _release_classes(rt, task, stale), pid=pid,
                                  task=task, rnd=rnd, device=rt.device)
               if objective.uploads_prototypes else None)
    client_truth(setup, rt, pid, task, rnd, server_round, model, x, y)  # privacy.keep_uploads only
    upload, local_protos = _upload(rt, model, objective, x, y, private)
    lap("upload")
    state["model"] = to_cpu(model.state_dict())
    state["objective"] = objective.state_dict()
    state["continual"] = stack.state_dict()
    lap("state_save")
    reply = _reply(msg, context, rt, pid, state, task, server_round, upload=upload,
                   counts=[int(c) for c in local_protos.counts] if objective.uploads_prototypes else [], loss=float(stats.loss), steps=int(stats.steps),
                   num_examples=int(len(y)))  # the samples it trained on: task + replay memory (a STALE client: its memory)
    return _withhold_under_dp(reply, s, released=private is not None,
                              sgd_steps=None if dp_sgd is None else int(stats.steps))


def _round_data(rt: Runtime, pid: int, task: int | None, rnd: int, task_idx: np.ndarray, mem_idx: np.ndarray,
                stack, model) -> tuple[np.ndarray, np.ndarray]:
    """The samples this round trains on: the task's and the replay memory's; under
    ``tasks.online`` this round's batches of the stream and as many replayed (drawn uniformly,
    or made by a mechanism that chooses them: ``continual.apf``). A client whose stream is spent
    (or that gets no new classes) takes no step."""
    data = rt.stream.dataset
    if (online := rt.scenario.tasks.online) is not None:
        seed = rt.scenario.seed
        task_idx = online_data.round_slice(task_idx, seed, pid, task or 0, rnd, online.batch_size,
                                           online.communicate_every)
        if stack and len(mem_idx) and len(task_idx):
            chosen = stack.replay(model, data.x_train[mem_idx], data.y_train[mem_idx], len(task_idx),
                                  rng(seed, "online_apf", pid, task or 0, rnd), rt.device)
            if chosen is not None:
                return (np.concatenate([data.x_train[task_idx], chosen[0]]),
                        np.concatenate([data.y_train[task_idx], chosen[1]]))
        mem_idx = online_data.replay_sample(mem_idx, seed, pid, task or 0, rnd, len(task_idx))
    all_idx = np.concatenate([task_idx, mem_idx])
    return data.x_train[all_idx], data.y_train[all_idx]


def _empty_reply(rt: Runtime, msg: Message, context: Context, pid: int, state: dict, task: int | None, stale: bool,
                 rnd: int, server_round: int, model, objective, x: np.ndarray, y: np.ndarray) -> Message:
    """Nothing to learn from (a STALE client without memory, a client given no samples): a
    valid empty reply, counted as trained on nothing, not as a failure. Under DP a prototype
    strategy's client still releases (noise only): an empty reply would tell."""
    public = _release_classes(rt, task, stale)
    empty = (private_prototypes(rt.scenario, rt.stream.num_tasks, model, x, y, public, pid=pid,
                                task=-1 if task is None else task, rnd=rnd, device=rt.device)
             if objective.uploads_prototypes and public else None)
    reply = _reply(msg, context, rt, pid, state, task, server_round,
                   upload=None if empty is None else objective.upload(model, empty),
                   counts=[] if empty is None else [int(c) for c in empty.counts], loss=0.0, steps=0, num_examples=0)
    return _withhold_under_dp(reply, rt.scenario, released=empty is not None, sgd_steps=None)


def _train_request(rt: Runtime, pid: int, task: int, rnd: int, state: dict, model, objective, stack,
                   x: np.ndarray, y: np.ndarray, seen: list[int]) -> TrainRequest:
    """What the local training loop gets: the data, the optimiser settings, what stays frozen,
    the distillation teacher, the hooks and (weight sharing under DP) the DP-SGD plan."""
    s = rt.scenario
    continual = objective.uses_continual
    teacher = None
    if state["teacher"] is not None:
        teacher = copy.deepcopy(model)
        teacher.load_state_dict(state["teacher"])
        teacher.to(rt.device)
    freeze = (
        continual
        and s.continual.backbone == "freeze_after_first_task"
        and state.get("tasks_learned", 0) > 1
    ) or getattr(objective, "backbone_frozen", False) or s.continual.backbone == "frozen"  # share_weights: first_task, after the first task; frozen: never trained
    tcfg = TrainConfig(
        epochs=s.training.local_epochs,
        batch_size=s.training.batch_size if s.tasks.online is None else s.tasks.online.batch_size,
        lr=s.training.lr,
        momentum=s.training.momentum,
        weight_decay=s.training.weight_decay,
        grad_clip=s.training.grad_clip,
        classifier=objective.train_loss,
        freeze_backbone=freeze,
        distill_weight=s.continual.feature_distillation if continual else 0.0,
    )
    objective.before_training(model, x, y)
    stack.prepare(model, rt.device, derive_seed(s.seed, "client_continual", pid, task, rnd))
    return TrainRequest(
        model, x, y, tcfg,
        seen_classes=objective.train_classes(stack.train_classes(with_leaked(rt.stream, seen, y))),
        num_classes=rt.stream.dataset.num_classes,
        known=objective.known_prototypes(),
        teacher=teacher,
        hooks=[objective, stack],
        seed=derive_seed(s.seed, "client_train", pid, task, rnd),
        device=rt.device,
        private=private_training(s, rt.stream.num_tasks, pid=pid, task=task, rnd=rnd),  # weight sharing under DP
        hooks_have_losses=type(objective).adds_own_loss() or bool(stack),
    )


def with_leaked(stream, seen: list[int], y: np.ndarray) -> list[int]:
    """``seen`` and, after it, every class of ``y`` that reached this client before its own task
    (``tasks.blurry``: samples of the next task's classes in the current task's data, or in a
    replay memory filled from it): those labels are trained on, so the head's cross-entropy must
    range over them. The classes the evaluation predicts among stay ``seen``. Unchanged without
    blurry boundaries."""
    early = stream.leaked_classes()
    if not early:
        return seen
    have = set(seen)
    return list(seen) + [int(c) for c in np.unique(y) if int(c) in early and int(c) not in have]


def _upload(rt: Runtime, model, objective, x: np.ndarray, y: np.ndarray, private: PrototypeSet | None):
    """``(upload, local prototypes)`` after training. A DP release is sent as released: no
    calibration or second-order statistics computed from the private data are added to it (the
    privacy check refuses those combinations), and the data is not embedded a second time."""
    s = rt.scenario
    feats = None if private is not None else embed(model, x, rt.device, cache=_feature_cache(rt, objective))
    local_protos = private if feats is None else class_means(feats, y)
    if feats is not None:
        objective.observe_embeddings(feats, y)
    upload = objective.upload(model, local_protos)
    if feats is not None and s.model.classifier != "ncm" and "proto.classes" in upload:  # second-order prototypes travel with the prototypes
        upload.update(stats_to_arrays(client_statistics(feats, y, s.model.classifier, rt.classifier_projection)))
    return upload, local_protos


def _release_classes(rt: Runtime, task: int | None, stale: bool) -> list[int]:
    """The classes a client's DP release covers this round, from the public schedule alone: its
    task's classes when it learns one (none for a STALE client: under DP it keeps no replay
    memory, so it holds nothing, and everyone knows it)."""
    return [] if task is None or stale else rt.stream.train_classes(task)


def _withhold_under_dp(reply: Message, scenario, *, released: bool, sgd_steps: int | None) -> Message:
    """Under differential privacy a training reply carries nothing exact about the client's
    data beyond its DP releases: ``num_examples`` is 1 for every reply that carries a release
    or weights (FedAvg then weights clients uniformly; 0 only for an empty reply without
    weights, which a weighted mean must skip), and ``train_loss`` and ``steps`` (a function of
    the sample count outside DP-SGD) are withheld. ``privacy.sgd_steps`` is data-independent
    (``local_epochs x int(1/q)``, empty Poisson batches included)."""
    if not scenario.privacy.dp:
        return reply
    m = reply.content[METRICS]
    carries = released or sgd_steps is not None
    kept = {k: v for k, v in m.items() if k not in ("train_loss", "steps", "num_examples")}
    reply.content[METRICS] = MetricRecord({**kept, "num_examples": 1 if carries else 0,
                                           **({RELEASED: 1} if released else {}),
                                           **({SGD_STEPS: sgd_steps} if sgd_steps is not None else {})})
    return reply


_train = _with_traceback(_timed(_drive(_train_body)))


def _reply(msg: Message, context: Context, rt: Runtime, pid: int, state: dict[str, Any], task: int | None,
           server_round: int, *, upload: dict | None, counts: list[int], loss: float, steps: int,
           num_examples: int) -> Message:
    """Save the client's state and build its training reply. Without ``upload`` (the client had
    nothing to train on) the upload holds zero prototypes and no weights."""
    if upload is None:
        upload = protos_to_arrays(PrototypeSet.empty(rt.scenario.model.feature_dim))
    with phase("state_save"):
        rt.store.save(pid, state)
    meta = context.state.config_records.get("meta", ConfigRecord({"rounds": 0}))
    meta["rounds"] = int(meta["rounds"]) + 1
    meta["task"] = -1 if task is None else task
    context.state["meta"] = meta
    state_bytes = record_bytes(context.state)
    metrics = MetricRecord(
        {
            "partition_id": pid,
            "num_examples": num_examples,
            # a client that took no step (nothing to train: e.g. a frozen backbone and no head) has no
            # loss; 0.0 would read as a perfect fit, and the server averages only the losses it gets
            **({"train_loss": loss} if steps > 0 else {}),
            "steps": steps,
            "proto.counts": counts,
            "server_round": server_round,
            "context_state_bytes": state_bytes,
        }
    )
    lap("reply")
    return Message(RecordDict({UPLOAD: ArrayRecord(upload), METRICS: metrics}), reply_to=msg)


@_with_traceback
@_timed
def _evaluate(setup: RunSetup, msg: Message, context: Context) -> Message:
    rt = runtime_for(setup)
    rt.set_threads()
    lap("runtime")  # the first call in a process builds the runtime (data stream, strategy imports)
    pid = _partition_id(context)
    config: ConfigRecord = msg.content[CONFIG]
    seen = [int(c) for c in config["seen_classes"]]
    state, model, objective = _load(rt, pid)
    objective.receive(msg.content[GLOBAL], model)
    lap("receive")
    data = rt.stream.dataset
    idx = np.concatenate([rt.stream.test_indices[int(t)] for t in config["eval_tasks"]])
    x, y = data.x_test[idx], data.y_test[idx]
    continual = mechanisms.build_stack(rt.scenario.continual, objective.uses_continual, state.get("continual"))
    protos = client_prototypes(objective, continual, rt.stream.tasks[0])  # post hoc (TEEN)
    unknown = [int(t) for t in config[OPEN_WORLD_TASKS]] if OPEN_WORLD_TASKS in config else []
    scoring = bool(unknown) and (objective.inference == "head" or usable_prototypes(protos, seen) is not None)
    # shared with the prediction: embedded once
    feats = embed(model, x, rt.device, cache=_feature_cache(rt, objective)) if scoring else None
    pred = client_predict(
        model,
        x,
        objective,
        seen_classes=seen,
        continual=continual,
        base_classes=rt.stream.tasks[0],
        device=rt.device,
        second_order=rt.scenario.model.classifier,
        stats=stats_from_arrays(msg.content[GLOBAL]),
        projection=rt.classifier_projection,
        cache=_feature_cache(rt, objective),
        features=feats,
        protos=protos,
    )
    lap("predict")
    open_world = _open_world(rt, pid, int(config["task"]), objective, model, protos, seen, feats, idx, unknown) if scoring else {}
    lap("open_world")
    correct, total = per_class_correct(pred, y, data.num_classes)
    metrics = MetricRecord(
        {
            "partition_id": pid,
            "correct": [int(v) for v in correct],
            "total": [int(v) for v in total],
            "train_counts": [int(v) for v in state["class_counts"]],
            **{k: v for k, v in open_world.items() if np.isfinite(v)},  # absent: this client gives no value
        }
    )
    lap("score")
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)


def _open_world(rt: Runtime, pid: int, step: int, objective, model, protos, seen: list[int], feats, idx: np.ndarray,
                unknown: list[int]) -> dict[str, float]:
    """``open_world_auroc`` / ``open_world_fpr95`` of this client (docs/metrics.md): the scores
    of the seen tasks' test samples (``feats``, embedded already; under ``evaluation.population:
    learned`` only the tasks this client has learned) against those of the ``unknown`` tasks."""
    from ..learner.open_world import open_world_scores
    from ..metrics import open_world_metrics

    stream = rt.stream
    known = np.ones(len(idx), dtype=bool)
    if rt.scenario.evaluation.population == "learned" and objective.data_scope != "all":
        row = stream.schedule[pid, : step + 1]
        learned = np.concatenate([stream.test_indices[int(t)] for t in set(row[row >= 0].tolist())] or [np.zeros(0, np.int64)])
        known = np.isin(idx, learned)
    unknown_idx = np.concatenate([stream.test_indices[t] for t in unknown])
    if not known.any() or len(unknown_idx) == 0:
        return open_world_metrics([], [])  # nothing to rank: no value

    def score(f):
        own = objective.open_world_score(f, seen)
        if own is not None:
            return own
        return open_world_scores(model, f, inference=objective.inference, seen_classes=seen, protos=protos)

    others = embed(model, stream.dataset.x_test[unknown_idx], rt.device, cache=_feature_cache(rt, objective))
    return open_world_metrics(score(feats)[known], score(others))


def _query(setup: RunSetup, msg: Message, context: Context) -> Message:
    return Message(RecordDict({METRICS: MetricRecord({"partition_id": _partition_id(context)})}), reply_to=msg)


#: smallest group of a cohort trained vectorised, per device kind: measured on CPU, the vmapped
#: step beats the sequential loop from about 10 clients (docs/bench_vectorized.py: 1.03-1.11x at
#: 10, 1.5-2.0x at 50, 2.3-2.5x at 100; 0.5x at 2); on a GPU batching pays from 2
VECTORIZE_MIN_MEMBERS = {"cpu": 10, "cuda": 2}
VECTORIZED = "vectorized"  # reply metric: 1 when this client's local training ran vectorised


class _Member:
    """One cohort member's training handler, run in stretches (see _train_cohort_vectorized)."""

    def __init__(self, setup: RunSetup, msg: Message, context: Context) -> None:
        self.setup = setup
        self.gen = _train_body(setup, msg, context)
        self.timer = PhaseTimer()
        self.seconds = 0.0
        self.request: TrainRequest | None = None
        self.outcome: Message | Exception | None = None
        self.vectorized = False

    def step(self, action) -> None:
        """Run the body until it yields its request or ends (its reply, or its exception)."""
        t0 = time.perf_counter()
        with resumed_call(self.timer):
            try:
                self.request = action(self.gen)
            except StopIteration as done:
                self.request, self.outcome = None, done.value
            except Exception as exc:  # this member failed; the others carry on
                self.request, self.outcome = None, exc
        self.seconds += time.perf_counter() - t0

    def trained(self, result, seconds: float) -> None:
        """Hand the training result (TrainStats or its NonFiniteLoss) back and finish the call."""
        self.timer.seconds["train"] = self.timer.seconds.get("train", 0.0) + seconds
        self.seconds += seconds
        if isinstance(result, Exception):
            self.step(lambda g: g.throw(result))
        else:
            self.step(lambda g: g.send(result))
        if isinstance(self.outcome, Message):
            _add_timing(self.setup, self.outcome, self.seconds, self.timer)
            if self.outcome.has_content() and METRICS in self.outcome.content:
                self.outcome.content[METRICS][VECTORIZED] = int(self.vectorized)


def _train_cohort_vectorized(setup: RunSetup):
    """The cohort runner for ``resources.vectorize``: every member's handler runs up to its
    training step; members whose requests can be trained together (same training settings and
    architecture, no loss of their own: :func:`why_not_vectorizable`) train at once with
    :func:`train_cohort`, the others one by one; then every handler finishes. Each member's
    ``compute_seconds`` holds its own stretches plus an equal share of the shared training."""
    from ..learner.vectorized import architecture, train_cohort, why_not_vectorizable

    def run(members: list[Message], contexts: list[Context], order: list[int]) -> list[Message | Exception]:
        rt = runtime_for(setup)
        rt.set_threads()
        runs = [_Member(setup, members[j], contexts[j]) for j in range(len(members))]
        for j in order:  # members with an injected exit fault come first
            runs[j].step(next)
        groups: dict[tuple, list[_Member]] = {}
        for m in (runs[j] for j in order):
            if m.request is not None:
                key = (dataclasses.astuple(m.request.cfg), architecture(m.request.model))
                groups.setdefault(key, []).append(m)
        minimum = VECTORIZE_MIN_MEMBERS["cuda" if rt.device.startswith("cuda") else "cpu"]
        for group in groups.values():
            reqs = [m.request for m in group]
            results = None
            if len(group) >= minimum and why_not_vectorizable(
                [r.model for r in reqs], reqs[0].cfg, hooks_have_losses=any(r.hooks_have_losses for r in reqs),
                teacher=next((r.teacher for r in reqs if r.teacher is not None), None),
                private=next((r.private for r in reqs if r.private is not None), None),
            ) is None:
                t0 = time.perf_counter()
                try:
                    results = train_cohort([r.model for r in reqs], [r.x for r in reqs], [r.y for r in reqs], reqs[0].cfg,
                                           seen_classes=[r.seen_classes for r in reqs], num_classes=reqs[0].num_classes,
                                           knowns=[r.known for r in reqs], seeds=[r.seed for r in reqs], device=rt.device)
                except NonFiniteLoss:
                    results = None  # no model changed: train one by one, so only the failing client fails
                share = (time.perf_counter() - t0) / len(group)
                if results is not None:
                    for m, stats in zip(group, results):
                        m.vectorized = True
                        m.trained(stats, share)
                    continue
            for m in group:
                t0 = time.perf_counter()
                try:
                    result = m.request.run()
                except NonFiniteLoss as exc:
                    result = exc
                m.trained(result, time.perf_counter() - t0)
        return [m.outcome for m in runs]

    return run


def _exits_now(setup: RunSetup):
    """``first`` for :func:`serve_cohort`: members whose injected fault kills the process run
    first in their cohort, so the rest of the cohort has not trained when it dies."""

    def check(pid: int, msg: Message) -> bool:
        config = msg.content.config_records.get(CONFIG)
        if config is None or "server_round" not in config or msg.metadata.message_type != "train":
            return False
        rt = runtime_for(setup)
        fault = injected_fault(rt.scenario, pid, int(config["server_round"]))
        return fault is not None and fault[0] == "exit"

    return check


def setup_vectorizes(setup: RunSetup) -> bool:
    """``resources.vectorize`` of the run (read from the scenario mapping: no runtime is built)."""
    return bool(setup.scenario.get("resources", {}).get("vectorize", False))


def build_client_app(setup: RunSetup) -> ClientApp:
    app = ClientApp()
    first = _exits_now(setup)

    # cohorts (resources.clients_per_call, simulator/engine/cohorts.py): a packed message runs
    # each of its members through this same app, as an ordinary per-client message
    together = _train_cohort_vectorized(setup) if setup_vectorizes(setup) else None

    def hold():
        return runtime_for(setup).store.deferred()

    @app.train(COHORT_ACTION)
    def train_cohort(msg: Message, context: Context) -> Message:
        return serve_cohort(app, msg, context, first, together, hold)

    @app.evaluate(COHORT_ACTION)
    def evaluate_cohort(msg: Message, context: Context) -> Message:
        return serve_cohort(app, msg, context)

    @app.query(COHORT_ACTION)
    def query_cohort(msg: Message, context: Context) -> Message:
        return serve_cohort(app, msg, context)

    @app.train(mods=[secure_train_mod(setup)])  # routes SecAgg+ messages only (simulator/privacy/secagg.py)
    def train(msg: Message, context: Context) -> Message:
        return _train(setup, msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _evaluate(setup, msg, context)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _query(setup, msg, context)

    return app
