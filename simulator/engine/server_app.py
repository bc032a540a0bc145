"""The ServerApp main loop: for each task, for each round, the strategy configures training,
the grid delivers the messages, the strategy merges the replies; then evaluation."""

from __future__ import annotations

import time
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

import numpy as np

from .. import seeding
from ..errors import RunFailure
from ..privacy.run import count_releases
from ..privacy.secagg import SecureSum, exchange_securely
from ..records import CONFIG, METRICS, payload_bytes, weights_to_arrays
from . import failures
from .cohorts import CohortGrid, cohort_stats, wait_for_nodes
from .failures import (ERROR, INJECTED, KINDS, MAX_DELIVERIES, WORKER_DIED, Failure, InfrastructureFailure, injected_fault,
                       is_infrastructure, split_reason)
from .profile import RunProfile
from .recorder import RunRecorder, score_evaluation, slowest_client_seconds
from .runtime import RunSetup, runtime_for



def discover_partitions(grid: Grid, num_clients: int) -> dict[int, int]:
    """Wait for every node, then ask each one for its partition id (node ids are random).
    Under cohorts the grid knows the mapping (:meth:`CohortGrid.partitions`)."""
    if isinstance(grid, CohortGrid):
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

    def __init__(self, grid: Grid, scenario, recorder: RunRecorder, partitions: dict[int, int]) -> None:
        self.grid = grid
        self.scenario = scenario
        self.recorder = recorder
        self.pid_of = {node: pid for pid, node in partitions.items()}

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
    joins = np.array([int(np.flatnonzero(stream.schedule[c] != -1)[0]) if (stream.schedule[c] != -1).any() else stream.num_tasks
                      for c in range(num)])
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
    t_phase = time.perf_counter()
    rt = runtime_for(setup)
    s = rt.scenario
    stream = rt.stream
    from strategies import RunInfo

    if clients_per_call > 1:
        grid = CohortGrid(grid, s.clients.num_clients, clients_per_call, cohort_nodes)
    prof.add("strategy_setup", time.perf_counter() - t_phase)
    with prof.timed("discover_nodes"):
        partitions = discover_partitions(grid, s.clients.num_clients)
    t_phase = time.perf_counter()
    strategy = rt.strategy_cls(
        rt.params,
        RunInfo(
            seed=s.seed,
            participation=s.clients.participation,
            num_classes=stream.dataset.num_classes,
            embedding_dim=s.model.embedding_dim,
            partitions=partitions,
            eval_subset=evaluation_subset(s, stream),
            new_model=rt.new_model,
            input_shape=tuple(stream.dataset.input_shape),
            text_names=stream.dataset.text_names,
        ),
    )
    delivery = Delivery(grid, s, recorder, partitions)
    secure = SecureSum(s, stream.dataset.num_classes, None) if s.privacy.secure_aggregation else None
    learned_by = learned_tasks_of(s, stream, rt.strategy_cls.Objective.data_scope)
    init_model = rt.new_model()
    arrays = strategy.initial_arrays(weights_to_arrays(init_model, include_head=rt.strategy_cls.Objective.inference == "head"))
    if strategy_state is not None:
        strategy.load_state_dict(strategy_state)
        arrays = strategy.global_arrays()
    server_round = start_task * s.training.rounds_per_task
    prof.add("strategy_setup", time.perf_counter() - t_phase)
    # ``task`` is the step of the federation: with a shared task order every client learns
    # global task ``task`` during it; otherwise the stream's schedule says which one each learns.
    for task in range(start_task, stream.num_tasks):
        seen = stream.seen_classes_at(task)
        eval_tasks = stream.seen_tasks(task)
        strategy.available = stream.present(task)
        new = sorted(set(seen) - set(stream.seen_classes_at(task - 1))) if task else sorted(seen)
        # the console counts positions from 1, the files and plots use ids from 0: say which is which
        recorder.say(f"-- task {task + 1}/{stream.num_tasks} is task {task} in metrics.csv, the matrices and the plots "
                     f"(rounds likewise: round 1 is round 0) · new classes {new}")
        for rnd in range(s.training.rounds_per_task):
            server_round += 1
            t0 = time.time()
            t_round = time.perf_counter()
            config = ConfigRecord(
                {
                    "task": task,
                    "round": rnd,
                    "server_round": server_round,
                    "seen_classes": [int(c) for c in seen],
                    "eval_tasks": [int(t) for t in eval_tasks],
                }
            )
            msgs = list(strategy.configure_train(server_round, arrays, config, grid))
            t_send = time.perf_counter()
            phases = {"configure": t_send - t_round}
            if secure is not None:  # SecAgg+: the strategy receives only the sum (simulator/privacy/secagg.py)
                replies, failed = exchange_securely(secure, grid, msgs, delivery, task, rnd, server_round, recorder.privacy_releases)
                up, down = secure.last.bytes_up, secure.last.bytes_down
            else:
                down = sum(payload_bytes(m.content) for m in msgs)
                replies, failed = delivery.exchange(msgs, "train", task, rnd, server_round)
                up = sum(payload_bytes(r.content) for r in replies if r.has_content())
            train_seconds = time.perf_counter() - t_send
            phases["train_exchange"] = train_seconds
            prof.add_replies("train", replies)
            t_phase = time.perf_counter()
            compute = [
                float(r.content[METRICS]["compute_seconds"])
                for r in replies
                if r.has_content() and METRICS in r.content and "compute_seconds" in r.content[METRICS]
            ]
            if secure is not None:
                compute = secure.last.compute
            reason = _fatal_failure(replies)
            if reason is not None:
                raise RunFailure(reason)
            if msgs and failed[WORKER_DIED] == len(msgs):
                raise infrastructure_hint(recorder, server_round)
            count_releases(recorder.privacy_releases, replies, recorder.privacy_sgd_steps)
            if getattr(recorder, "upload_log", None) is not None:  # privacy.keep_uploads
                recorder.upload_log.observe(server_round, task, rnd, replies)
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            phases["merge"] = time.perf_counter() - t_phase
            train = dict(train_metrics or MetricRecord())
            if secure is not None:
                train["clients_ok"] = secure.last.clients_ok
            train.update(
                bytes_up=up,
                bytes_down=down,
                clients_sampled=len(msgs),
                clients_failed=sum(failed.values()),
                clients_failed_injected=failed[INJECTED],
                clients_failed_unexpected=failed[ERROR] + failed[WORKER_DIED],
                train_seconds=train_seconds,
                client_seconds=sum(compute),
                max_client_seconds=slowest_client_seconds(compute, replies),  # NaN in a vectorised round
                context_state_bytes=max(
                    (int(r.content[METRICS].get("context_state_bytes", 0)) for r in replies if r.has_content() and METRICS in r.content),
                    default=0,
                ),
            )
            recorder.bytes_up += up
            recorder.bytes_down += down
            last = rnd == s.training.rounds_per_task - 1
            scores = None
            if last or s.evaluation.every == "round":
                t_eval = time.perf_counter()
                eval_msgs = list(strategy.configure_evaluate(server_round, arrays, config, grid))
                t_eval_send = time.perf_counter()
                phases["configure"] += t_eval_send - t_eval
                eval_replies, eval_failed = delivery.exchange(eval_msgs, "evaluate", task, rnd, server_round)
                train["eval_seconds"] = time.perf_counter() - t_eval
                phases["evaluate_exchange"] = time.perf_counter() - t_eval_send
                prof.add_replies("evaluate", eval_replies)
                recorder.eval_bytes += sum(payload_bytes(m.content) for m in eval_msgs)
                good = [r.content[METRICS] for r in eval_replies if r.has_content() and not r.has_error()]
                train["clients_evaluated"] = len(good)
                train["clients_eval_failed"] = sum(eval_failed.values())
                strategy.aggregate_evaluate(server_round, eval_replies)
                if not good:
                    raise RunFailure(
                        f"every client failed to evaluate after task {task + 1}, round {rnd + 1}: "
                        + (split_reason(eval_replies[0].error.reason)[0] if eval_replies else "no client to evaluate")
                    )
                scores = score_evaluation(
                    good, stream.tasks, eval_tasks,
                    learned=None if s.evaluation.population == "all" else {p: learned_by(p, task) for p in range(s.clients.num_clients)},
                )
            recorder.record_round(task, rnd, server_round, train, scores, time.time() - t0)
            # scoring: everything else of the round (byte counts, the strategy's evaluation
            # merge, the accuracies, the recorder's row and progress line)
            phases["scoring"] = time.perf_counter() - t_round - sum(phases.values())
            for name, value in phases.items():
                prof.add(name, value)
            prof.rounds.append({"global_round": server_round, **phases})
        if on_task_end is not None:
            with prof.timed("task_end_writes"):
                on_task_end(task, strategy)
    prof.cohorts = cohort_stats(grid)
    prof.mark("loop_end")


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
