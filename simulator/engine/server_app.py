"""The ServerApp main loop: for each task, for each round, the strategy configures training,
the grid delivers the messages, the strategy merges the replies; then evaluation."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

import numpy as np

from .. import seeding
from ..errors import RunFailure
from ..privacy.run import count_releases
from ..privacy.secagg import SecureSum, exchange_securely
from ..records import CONFIG, METRICS, OPEN_WORLD_TASKS, payload_bytes, weights_to_arrays
from . import failures
from .cohorts import CohortGrid, cohort_stats, wait_for_nodes
from .inline import InlineGrid
from .failures import (ERROR, INJECTED, KINDS, MAX_DELIVERIES, WORKER_DIED, Failure, InfrastructureFailure, injected_fault,
                       is_infrastructure, split_reason)
from .profile import RunProfile
from .recorder import RunRecorder, score_evaluation, slowest_client_seconds
from .runtime import RunSetup, runtime_for



def discover_partitions(grid: Grid, num_clients: int) -> Mapping[int, int]:
    """Wait for every node, then ask each one for its partition id (node ids are random).
    Under cohorts and on the inline engine the grid knows the mapping
    (:meth:`CohortGrid.partitions`, :meth:`InlineGrid.partitions`)."""
    if isinstance(grid, (CohortGrid, InlineGrid)):
        return grid.partitions()
    node_ids = wait_for_nodes(grid, num_clients)
    msgs = [
        Message(RecordDict({CONFIG: ConfigRecord({"hello": 1})}), dst_node_id=n, message_type=MessageType.QUERY, group_id="0")
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs):
        if reply.has_error():
            code, reason = int(reply.error.code), str(reply.error.reason)
            if is_infrastructure(code, reason):  # e.g. "ActorDiedError ... Owner's node has crashed": retried
                raise InfrastructureFailure(f"a client node failed to start, Ray lost it ({split_reason(reason)[0]})")
            raise RunFailure(f"a client node failed to start: {reason[:500]}")
        mapping[int(reply.content[METRICS]["partition_id"])] = reply.metadata.src_node_id
    if sorted(mapping) != list(range(num_clients)):
        raise RunFailure(f"client nodes reported partitions {sorted(mapping)}, expected 0..{num_clients - 1}")
    return mapping


def _fatal_failure(replies: list[Message]) -> str | None:
    """The first reply whose error must stop the run (a ClientFailure: e.g. a non-finite loss)."""
    from .client_app import FATAL_MARK

    for r in replies:
        if r.has_error() and FATAL_MARK in r.error.reason:
            text = r.error.reason
            return text[text.index(FATAL_MARK) + len(FATAL_MARK) :].split("\n")[0].rstrip("'\" ")[:500]
    return None


class Delivery:
    """Sends one batch of messages and accounts for every reply that is an error: injected
    faults are recognised from the scenario, messages lost to the infrastructure are sent
    again (up to ``MAX_DELIVERIES`` times), everything else is an unexpected error whose first
    traceback is shown once. Each failure becomes a row of ``failures.csv``."""

    def __init__(self, grid: Grid, scenario, recorder: RunRecorder, partitions: Mapping[int, int]) -> None:
        self.grid = grid
        self.scenario = scenario
        self.recorder = recorder
        inverse = getattr(partitions, "inverse", None)  # computed under the inline grid and cohorts
        self.pid_of = inverse() if inverse is not None else {node: pid for pid, node in partitions.items()}

    def exchange(self, msgs: list[Message], phase: str, task: int, rnd: int, server_round: int) -> tuple[list[Message], dict[str, int]]:
        pending = msgs
        final: list[Message] = []
        attempts: dict[int, int] = {}
        counts = dict.fromkeys(KINDS, 0)
        for delivery in range(MAX_DELIVERIES):
            if not pending:
                break
            if delivery:
                time.sleep(failures.retry_pause(delivery))
            replies = list(self.grid.send_and_receive(pending))
            # one message per node and exchange: a reply finds its request by the node it came from
            by_node = {m.metadata.dst_node_id: m for m in pending}
            pending = []
            for reply in replies:
                node = reply.metadata.src_node_id
                pid = self.pid_of.get(node, -1)
                attempts[pid] = attempts.get(pid, 0) + 1
                if not reply.has_error():
                    final.append(reply)
                    continue
                code, reason = int(reply.error.code), str(reply.error.reason)
                injected = phase == "train" and injected_fault(self.scenario, pid, server_round) is not None
                if not injected and is_infrastructure(code, reason) and attempts[pid] < MAX_DELIVERIES:
                    original = by_node.get(node)
                    if original is not None:  # the message was lost, not refused: send it again
                        pending.append(
                            Message(original.content, dst_node_id=original.metadata.dst_node_id,
                                    message_type=original.metadata.message_type, group_id=original.metadata.group_id)
                        )
                        continue
                kind = INJECTED if injected else (WORKER_DIED if is_infrastructure(code, reason) else ERROR)
                message, tb = split_reason(reason)
                counts[kind] += 1
                self.recorder.record_failure(
                    Failure(phase, task, rnd, server_round, pid, kind, message, attempts[pid]), traceback_text=tb
                )
                final.append(reply)
        return final, counts


TaskEndHook = Callable[[int, Any], None]


def evaluation_subset(scenario, stream) -> list[int] | None:
    """The clients evaluated throughout the run when ``evaluation.clients`` is N: drawn once
    per run (seeded), so the accuracy of a task is followed on the same clients from round to
    round and forgetting does not pick up sampling noise. Clients that join late are drawn in
    proportion to their arrival group (largest remainders), so a group enters the subset when
    it joins and the subset holds N clients once everyone is present."""
    n = scenario.evaluation.clients
    num = scenario.clients.num_clients
    if n == "all" or int(n) >= num:
        return None
    here = np.asarray(stream.schedule)[:num] != -1
    joins = np.where(here.any(axis=1), here.argmax(axis=1), stream.num_tasks)  # each client's first step
    groups = sorted(set(joins.tolist()))
    sizes = np.array([(joins == g).sum() for g in groups], dtype=np.float64)
    quota = int(n) * sizes / num
    take = np.floor(quota).astype(int)
    order = np.argsort(-(quota - take), kind="stable")
    for i in order[: int(n) - int(take.sum())]:
        take[i] += 1
    gen = seeding.rng(scenario.seed, "eval_subset")
    chosen: list[int] = []
    for g, k in zip(groups, take):
        members = np.flatnonzero(joins == g)
        k = max(int(k), 1 if g == groups[0] else 0)  # never an empty first evaluation
        chosen.extend(int(c) for c in gen.choice(members, size=min(k, len(members)), replace=False))
    return sorted(chosen)


def server_loop(
    setup: RunSetup,
    recorder: RunRecorder,
    grid: Grid,
    *,
    start_task: int = 0,
    strategy_state: dict[str, Any] | None = None,
    on_task_end: TaskEndHook | None = None,
    clients_per_call: int = 1,
    cohort_nodes: int | None = None,
) -> None:
    """Run tasks ``start_task..T-1``; with ``strategy_state`` the strategy continues from a
    checkpoint taken at the end of task ``start_task - 1``. ``on_task_end(task, strategy)`` is
    called after each task's evaluation (the runner writes results and a checkpoint there).
    With ``clients_per_call`` K > 1 the engine's grid holds ``cohort_nodes`` nodes (one per cohort
    of a round) and messages travel packed by cohort (:class:`~simulator.engine.cohorts.CohortGrid`); nothing below sees it."""
    prof: RunProfile = getattr(recorder, "profile", None) or RunProfile()  # simulator/engine/profile.py
    prof.add("engine_start", prof.since("launch"))  # engine start-up until this loop runs
    loop = _ServerLoop(setup, recorder, grid, prof, clients_per_call, cohort_nodes, start_task, strategy_state)
    # ``task`` is the step of the federation: with a shared task order every client learns
    # global task ``task`` during it; otherwise the stream's schedule says which one each learns.
    for task in range(start_task, loop.stream.num_tasks):
        loop.begin_task(task)
        for rnd in range(loop.s.training.rounds_per_task):
            loop.play_round(task, rnd)
        if on_task_end is not None:
            with prof.timed("task_end_writes"):
                on_task_end(task, loop.strategy)
    prof.cohorts = cohort_stats(loop.grid)
    prof.mark("loop_end")


class _ServerLoop:
    """The server's side of one run: the strategy, the global arrays and the round counter, and
    one method per phase of a round (train exchange, merge, evaluation, record)."""

    def __init__(self, setup: RunSetup, recorder: RunRecorder, grid: Grid, prof: RunProfile, clients_per_call: int,
                 cohort_nodes: int | None, start_task: int, strategy_state: dict[str, Any] | None) -> None:
        from strategies import RunInfo

        t_phase = time.perf_counter()
        self.recorder, self.prof = recorder, prof
        rt = runtime_for(setup)
        self.s = s = rt.scenario
        self.stream = stream = rt.stream
        if clients_per_call > 1:
            grid = CohortGrid(grid, s.clients.num_clients, clients_per_call, cohort_nodes)
        self.grid = grid
        prof.add("strategy_setup", time.perf_counter() - t_phase)
        with prof.timed("discover_nodes"):
            partitions = discover_partitions(grid, s.clients.num_clients)
        t_phase = time.perf_counter()
        self.strategy = strategy = rt.strategy_cls(rt.params, RunInfo(
            seed=s.seed, participation=s.clients.participation, num_classes=stream.dataset.num_classes,
            embedding_dim=s.model.feature_dim, partitions=partitions, eval_subset=evaluation_subset(s, stream),
            new_model=rt.new_model, input_shape=tuple(stream.dataset.input_shape), text_names=stream.dataset.text_names,
            classifier=s.model.classifier, aper=s.model.aper,
            rounds_per_task=s.training.rounds_per_task,
        ))
        self.delivery = Delivery(grid, s, recorder, partitions)
        self.secure = SecureSum(s, stream.dataset.num_classes, None) if s.privacy.secure_aggregation else None
        self.data_scope = rt.strategy_cls.Objective.data_scope
        self.learned_by = learned_tasks_of(s, stream, self.data_scope)
        init_model = rt.new_model()
        with_head = rt.strategy_cls.Objective.inference == "head"
        self.arrays = strategy.initial_arrays(weights_to_arrays(init_model, include_head=with_head))
        if strategy_state is not None:
            strategy.load_state_dict(strategy_state)
            self.arrays = strategy.global_arrays()
        self.server_round = start_task * s.training.rounds_per_task
        prof.add("strategy_setup", time.perf_counter() - t_phase)

    def begin_task(self, task: int) -> None:
        stream = self.stream
        self.seen = stream.seen_classes_at(task)
        self.eval_tasks = stream.seen_tasks(task)
        self.strategy.available = stream.present(task)
        new = sorted(set(self.seen) - set(stream.seen_classes_at(task - 1))) if task else sorted(self.seen)
        # the console counts positions from 1, the files and plots use ids from 0: say which is which
        self.recorder.say(f"-- task {task + 1}/{stream.num_tasks} is task {task} in metrics.csv, the matrices and the plots "
                          f"(rounds likewise: round 1 is round 0) · new classes {new}")

    def unknown_tasks(self, task: int) -> list[int]:
        """The global tasks no client has learned by the end of step ``task`` (the open world's
        negatives); none for a method that trains on every task's data from the start (joint)."""
        if self.data_scope == "all":
            return []
        seen = set(self.stream.seen_tasks(task))
        return [t for t in range(self.stream.num_tasks) if t not in seen]

    def play_round(self, task: int, rnd: int) -> None:
        self.server_round += 1
        t0, t_round = time.time(), time.perf_counter()
        config = ConfigRecord({
            "task": task, "round": rnd, "server_round": self.server_round,
            "seen_classes": [int(c) for c in self.seen], "eval_tasks": [int(t) for t in self.eval_tasks],
        })
        msgs = list(self.strategy.configure_train(self.server_round, self.arrays, config, self.grid))
        phases = {"configure": time.perf_counter() - t_round}
        train = self._train(msgs, task, rnd, phases)
        scores = None
        if rnd == self.s.training.rounds_per_task - 1 or self.s.evaluation.every == "round":
            scores = self._evaluate(task, rnd, config, train, phases)
        self.recorder.record_round(task, rnd, self.server_round, train, scores, time.time() - t0)
        # scoring: everything else of the round (byte counts, the strategy's evaluation
        # merge, the accuracies, the recorder's row and progress line)
        phases["scoring"] = time.perf_counter() - t_round - sum(phases.values())
        for name, value in phases.items():
            self.prof.add(name, value)
        self.prof.rounds.append({"global_round": self.server_round, **phases})

    def _exchange_train(self, msgs: list, task: int, rnd: int):
        """The training messages out and the replies in (through SecAgg+ when it is on: the
        strategy then receives only the sum, simulator/privacy/secagg.py); with the bytes."""
        secure = self.secure
        if secure is not None:
            replies, failed = exchange_securely(secure, self.grid, msgs, self.delivery, task, rnd, self.server_round,
                                                self.recorder.privacy_releases)
            return replies, failed, secure.last.bytes_up, secure.last.bytes_down
        down = sum(payload_bytes(m.content) for m in msgs)
        replies, failed = self.delivery.exchange(msgs, "train", task, rnd, self.server_round)
        return replies, failed, sum(payload_bytes(r.content) for r in replies if r.has_content()), down

    def _train(self, msgs: list, task: int, rnd: int, phases: dict[str, float]) -> dict[str, Any]:
        """Train exchange and merge; returns the round's training metrics."""
        recorder, secure = self.recorder, self.secure
        t_send = time.perf_counter()
        replies, failed, up, down = self._exchange_train(msgs, task, rnd)
        train_seconds = phases["train_exchange"] = time.perf_counter() - t_send
        self.prof.add_replies("train", replies)
        t_phase = time.perf_counter()
        compute = [float(r.content[METRICS]["compute_seconds"]) for r in replies
                   if r.has_content() and METRICS in r.content and "compute_seconds" in r.content[METRICS]]
        if secure is not None:
            compute = secure.last.compute
        reason = _fatal_failure(replies)
        if reason is not None:
            raise RunFailure(reason)
        if msgs and failed[WORKER_DIED] == len(msgs):
            raise infrastructure_hint(recorder, self.server_round)
        count_releases(recorder.privacy_releases, replies, recorder.privacy_sgd_steps)
        if getattr(recorder, "upload_log", None) is not None:  # privacy.keep_uploads
            recorder.upload_log.observe(self.server_round, task, rnd, replies)
        new_arrays, train_metrics = self.strategy.aggregate_train(self.server_round, replies)
        if new_arrays is not None:
            self.arrays = new_arrays
        phases["merge"] = time.perf_counter() - t_phase
        train = dict(train_metrics or MetricRecord())
        if secure is not None:
            train["clients_ok"] = secure.last.clients_ok
        train.update(
            bytes_up=up, bytes_down=down, clients_sampled=len(msgs), clients_failed=sum(failed.values()),
            clients_failed_injected=failed[INJECTED], clients_failed_unexpected=failed[ERROR] + failed[WORKER_DIED],
            train_seconds=train_seconds, client_seconds=sum(compute),
            max_client_seconds=slowest_client_seconds(compute, replies),  # NaN in a vectorised round
            context_state_bytes=max((int(r.content[METRICS].get("context_state_bytes", 0))
                                     for r in replies if r.has_content() and METRICS in r.content), default=0),
        )
        recorder.bytes_up += up
        recorder.bytes_down += down
        return train

    def _evaluate(self, task: int, rnd: int, config: ConfigRecord, train: dict[str, Any], phases: dict[str, float]):
        """Evaluation exchange and scoring; adds its counts to ``train``; returns the scores."""
        s, recorder = self.s, self.recorder
        t_eval = time.perf_counter()
        unknown = self.unknown_tasks(task) if rnd == s.training.rounds_per_task - 1 and s.evaluation.open_world else []
        if unknown:  # the evaluation that fills row ``task`` of the matrix also scores the open world
            config = ConfigRecord({**dict(config), OPEN_WORLD_TASKS: unknown})
        eval_msgs = list(self.strategy.configure_evaluate(self.server_round, self.arrays, config, self.grid))
        t_eval_send = time.perf_counter()
        phases["configure"] += t_eval_send - t_eval
        eval_replies, eval_failed = self.delivery.exchange(eval_msgs, "evaluate", task, rnd, self.server_round)
        train["eval_seconds"] = time.perf_counter() - t_eval
        phases["evaluate_exchange"] = time.perf_counter() - t_eval_send
        self.prof.add_replies("evaluate", eval_replies)
        recorder.eval_bytes += sum(payload_bytes(m.content) for m in eval_msgs)
        good = [r.content[METRICS] for r in eval_replies if r.has_content() and not r.has_error()]
        train["clients_evaluated"] = len(good)
        train["clients_eval_failed"] = sum(eval_failed.values())
        self.strategy.aggregate_evaluate(self.server_round, eval_replies)
        if not good:
            raise RunFailure(
                f"every client failed to evaluate after task {task + 1}, round {rnd + 1}: "
                + (split_reason(eval_replies[0].error.reason)[0] if eval_replies else "no client to evaluate")
            )
        learned = None if s.evaluation.population == "all" else {
            p: self.learned_by(p, task) for p in range(s.clients.num_clients)}
        return score_evaluation(good, self.stream.tasks, self.eval_tasks, learned=learned)


def learned_tasks_of(scenario, stream, data_scope: str) -> Callable[[int, int], set[int]]:
    """``f(client, step)``: the global tasks a client has learned by the end of ``step`` (every
    task for the centralised upper bound, which trains on all data)."""
    if data_scope == "all":
        return lambda client, step: set(range(stream.num_tasks))
    sched = stream.schedule

    def learned(client: int, step: int) -> set[int]:
        row = sched[client, : step + 1]
        return {int(t) for t in row[row >= 0]}

    return learned


def infrastructure_hint(recorder: RunRecorder, server_round: int) -> InfrastructureFailure:
    """Every message of a round was lost: the workers died. The runner resumes the run from its
    last finished task (simulator/engine/retry.py) or, once the retries are spent, names the run
    directory and what to try."""
    last = recorder.failures[-1].message if recorder.failures else "no reply"
    return InfrastructureFailure(f"every client message of global round {server_round} was lost: Ray's workers died ({last[:120]})")


def build_server_app(setup: RunSetup, recorder: RunRecorder, **loop_kwargs: Any) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_loop(setup, recorder, grid, **loop_kwargs)

    return app
