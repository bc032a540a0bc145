"""The ServerApp main loop: for each task, for each round, the strategy configures training,
the grid delivers the messages, the strategy merges the replies; then evaluation."""

from __future__ import annotations

import time
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..errors import RunFailure
from ..records import CONFIG, METRICS, record_bytes, weights_to_arrays
from .recorder import RunRecorder, score_evaluation
from .runtime import RunSetup, runtime_for

NODE_WAIT_SECONDS = 120.0


def discover_partitions(grid: Grid, num_clients: int) -> dict[int, int]:
    """Wait for every node, then ask each one for its partition id (node ids are random)."""
    deadline = time.time() + NODE_WAIT_SECONDS
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.time() > deadline:
            raise RunFailure(f"only {len(node_ids)} of {num_clients} client nodes came up")
        time.sleep(0.02)
    msgs = [
        Message(RecordDict({CONFIG: ConfigRecord({"hello": 1})}), dst_node_id=n, message_type=MessageType.QUERY, group_id="0")
        for n in node_ids
    ]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(msgs):
        if reply.has_error():
            raise RunFailure(f"a client node failed to start: {reply.error.reason[:500]}")
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


TaskEndHook = Callable[[int, Any], None]


def server_loop(
    setup: RunSetup,
    recorder: RunRecorder,
    grid: Grid,
    *,
    start_task: int = 0,
    strategy_state: dict[str, Any] | None = None,
    on_task_end: TaskEndHook | None = None,
) -> None:
    """Run tasks ``start_task..T-1``; with ``strategy_state`` the strategy continues from a
    checkpoint taken at the end of task ``start_task - 1``. ``on_task_end(task, strategy)`` is
    called after each task's evaluation (the runner writes results and a checkpoint there)."""
    rt = runtime_for(setup)
    s = rt.scenario
    stream = rt.stream
    from strategies import RunInfo

    partitions = discover_partitions(grid, s.clients.num_clients)
    strategy = rt.strategy_cls(
        rt.params,
        RunInfo(
            seed=s.seed,
            participation=s.clients.participation,
            num_classes=stream.dataset.num_classes,
            embedding_dim=s.model.embedding_dim,
            partitions=partitions,
            eval_clients=None if s.evaluation.clients == "all" else int(s.evaluation.clients),
        ),
    )
    init_model = rt.new_model()
    arrays = strategy.initial_arrays(weights_to_arrays(init_model, include_head=rt.strategy_cls.Objective.inference == "head"))
    if strategy_state is not None:
        strategy.load_state_dict(strategy_state)
        arrays = strategy.global_arrays()
    server_round = start_task * s.training.rounds_per_task
    # ``task`` is the step of the federation: with a shared task order every client learns
    # global task ``task`` during it; otherwise the stream's schedule says which one each learns.
    for task in range(start_task, stream.num_tasks):
        seen = stream.seen_classes_at(task)
        eval_tasks = stream.seen_tasks(task)
        strategy.available = stream.present(task)
        for rnd in range(s.training.rounds_per_task):
            server_round += 1
            t0 = time.time()
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
            down = sum(record_bytes(m.content) for m in msgs)
            t_send = time.perf_counter()
            replies = list(grid.send_and_receive(msgs))
            train_seconds = time.perf_counter() - t_send
            up = sum(record_bytes(r.content) for r in replies if r.has_content())
            compute = [
                float(r.content[METRICS]["compute_seconds"])
                for r in replies
                if r.has_content() and METRICS in r.content and "compute_seconds" in r.content[METRICS]
            ]
            new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:
                arrays = new_arrays
            train = dict(train_metrics or MetricRecord())
            reason = _fatal_failure(replies)
            if reason is not None:
                raise RunFailure(reason)
            train.update(
                bytes_up=up,
                bytes_down=down,
                clients_sampled=len(msgs),
                train_seconds=train_seconds,
                client_seconds=sum(compute),
                max_client_seconds=max(compute, default=0.0),
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
                eval_replies = list(grid.send_and_receive(eval_msgs))
                train["eval_seconds"] = time.perf_counter() - t_eval
                train["clients_evaluated"] = len(eval_msgs)
                recorder.eval_bytes += sum(record_bytes(m.content) for m in eval_msgs)
                good = [r.content[METRICS] for r in eval_replies if r.has_content()]
                strategy.aggregate_evaluate(server_round, eval_replies)
                if not good:
                    raise RunFailure(
                        f"every client failed to evaluate after task {task}, round {rnd + 1}: "
                        + (eval_replies[0].error.reason[:300] if eval_replies else "no replies")
                    )
                scores = score_evaluation(good, stream.tasks, eval_tasks)
            recorder.record_round(task, rnd, server_round, train, scores, time.time() - t0)
        if on_task_end is not None:
            on_task_end(task, strategy)


def build_server_app(setup: RunSetup, recorder: RunRecorder, **loop_kwargs: Any) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_loop(setup, recorder, grid, **loop_kwargs)

    return app
