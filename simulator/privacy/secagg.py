"""Secure aggregation of per-class sums and counts through Flower's own SecAgg+.

Prototype averaging needs only, per class, the sum of the clients' embeddings and their count.
With ``privacy.secure_aggregation: true`` each sampled client turns its upload into ONE fixed
vector ``[S_0 .. S_{K-1}, n_0 .. n_{K-1}]`` over every class of the dataset (``S_c = count x
prototype``; under DP that is the noisy sum), and the round's training step runs Flower's
``SecAggPlusWorkflow`` (server) with ``secaggplus_mod`` (client): pairwise masks agreed by
Diffie-Hellman that cancel in the sum, self masks, Shamir shares of both so that clients that
drop out after sending their keys are unmasked by their neighbours. The server learns the sum
over the surviving clients and nothing else of the vectors; what reaches the strategy's
``merge`` is ONE upload holding that sum (partition id -1).

How it is combined with our Message-API loop (Flower 1.42 offers SecAgg+ only for the legacy
strategy API):

* server: the workflow needs a ``LegacyContext`` holding a legacy ``Strategy``; we give it a
  small legacy strategy (:class:`_SumOnly`) whose ``configure_fit`` returns the nodes our
  strategy sampled with our global state as ``FitIns`` and whose ``aggregate_fit`` keeps the
  unmasked aggregate. Everything else of the round (sampling, merge, evaluation) stays ours.
* client: ``secaggplus_mod`` handles TRAIN messages in the legacy ``fitins``/``fitres`` shape;
  :func:`secure_train_mod` routes only messages carrying SecAgg+ settings to it and adapts
  our train handler to that shape (global arrays by name, our config, the fixed vector back).
  The handler itself does not change.
* what Flower still sends in clear: ``num_examples`` (we send 1, and max_weight 1, so the
  workflow's weighted mean is the plain mean; the sum is the mean times the number of
  survivors) and the reply metrics (partition id, steps, timings: no counts, no vectors, no
  loss). The client's ``num_examples`` and ``train_loss x num_examples`` travel inside the
  masked vector, so the server gets the plain run's num_examples-weighted mean loss and total
  count, never one client's.
* bytes, defined as in a plain run (docs/metrics.md): ``bytes_down`` is the payload of the
  global state sent to the sampled clients, ``bytes_up`` the values of the masked vectors the
  survivors send (``K x (D + 1) + 3`` numbers and Flower's weight factor, int64 each, for K
  classes of dimension D: dense over every class, where a plain upload holds the client's
  classes only). The SecAgg+ protocol's own traffic (stage settings, public keys, encrypted
  shares, node lists, unmasking shares) is reported apart, as ``secagg_bytes_up`` /
  ``secagg_bytes_down`` in ``summary.json``; our config text and the metrics in clear are
  bookkeeping, counted nowhere.
* quantisation: SecAgg+ works on integers. Values are scaled by ``clipping_range / range``
  (``privacy.secure_range`` bounds every sum coordinate and count; a client exceeding it
  fails loudly) and rounded stochastically to 2^30 levels: about 2e-4 per coordinate of a
  sum at the default range 1e5, far below a prototype's scale once divided by the count.
  Flower's stochastic rounding draws from numpy's global generator; the client seeds it from
  the run seed, client and round before replying so that runs stay reproducible.

Known limitation of the library (not fixed here): Flower 1.42's ``pseudo_rand_gen`` folds the
mask seed to 32 bits before expanding it, so a server willing to search 2^32 seeds per client
could remove a self mask; a deployment needs a full-width PRG.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from ..learner.prototypes import PrototypeSet
from ..records import CONFIG, GLOBAL, METRICS, UPLOAD, payload_bytes, protos_from_arrays, protos_to_arrays, record_bytes
from ..seeding import derive_seed

CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**30  # Flower's stochastic rounding casts to int32
MODULUS_RANGE = 2**40  # > number of clients x 2^30, within int64
KEYS = "protofed.array_keys"
CONFIG_JSON = "protofed.config"
#: reply metrics that may travel in clear next to the masked vector (bookkeeping only)
CLEAR_METRICS = ("partition_id", "steps", "server_round", "compute_seconds",
                 "context_state_bytes", "privacy.released")


class SecureRangeExceeded(RuntimeError):
    pass


# --------------------------------------------------------------------------- encoding
#: the loss sum travels divided by this, so that ``train_loss x num_examples`` may reach
#: ``LOSS_DIVISOR x privacy.secure_range`` (its quantisation step grows by the same factor:
#: about 0.02 per client at the default range, i.e. 2e-4 on the mean loss over 100 samples)
LOSS_DIVISOR = 100.0
TAIL = 3  # after the sums and counts: loss sum / LOSS_DIVISOR, its weight, num_examples


def encode_upload(protos: PrototypeSet, num_classes: int, dim: int, bound: float,
                  train_loss: float | None = None, num_examples: int = 0) -> np.ndarray:
    """The fixed-size vector of one client: per-class sums (count x prototype) then counts,
    over every class of the dataset, then ``train_loss x num_examples / LOSS_DIVISOR``, its weight
    (``num_examples``, 0 when the loss is withheld) and ``num_examples``, so that the server gets
    the plain run's num_examples-weighted mean loss and total without any client's own; scaled
    into +-CLIPPING_RANGE."""
    sums = np.zeros((num_classes, dim), dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.float64)
    if len(protos):
        sums[protos.classes] = protos.vectors.astype(np.float64) * protos.counts[:, None]
        counts[protos.classes] = protos.counts
    weight = float(num_examples) if train_loss is not None else 0.0
    tail = [weight * float(train_loss or 0.0) / LOSS_DIVISOR, weight, float(num_examples)]
    vec = np.concatenate([sums.reshape(-1), counts, tail])
    peak = float(np.abs(vec).max(initial=0.0))
    if peak > bound:
        raise SecureRangeExceeded(
            f"a per-class sum or count, num_examples or train_loss x num_examples / {LOSS_DIVISOR:g} reached "
            f"{peak:.4g}, beyond privacy.secure_range {bound:g}: "
            "raise privacy.secure_range (or clip the embeddings with privacy.clip)"
        )
    return vec * (CLIPPING_RANGE / bound)


def decode_loss(vec: np.ndarray, num_classes: int, dim: int, bound: float) -> tuple[float | None, int]:
    """The num_examples-weighted mean train_loss of a summed vector (None when no client sent
    a loss) and the summed num_examples."""
    start = num_classes * (dim + 1)
    loss_sum, weight, n = np.asarray(vec, dtype=np.float64)[start : start + TAIL] * (bound / CLIPPING_RANGE)
    weight = int(np.rint(weight))
    return (float(loss_sum * LOSS_DIVISOR / weight) if weight >= 1 else None), int(np.rint(n))


def decode_sum(vec: np.ndarray, num_classes: int, dim: int, bound: float) -> PrototypeSet:
    """Per-class prototypes (sum / count) of the classes whose summed count is at least 1."""
    vec = np.asarray(vec, dtype=np.float64) * (bound / CLIPPING_RANGE)
    sums = vec[: num_classes * dim].reshape(num_classes, dim)
    counts = np.rint(vec[num_classes * dim : num_classes * (dim + 1)]).astype(np.int64)
    keep = np.flatnonzero(counts >= 1)
    if len(keep) == 0:
        return PrototypeSet.empty(dim)
    return PrototypeSet(keep, (sums[keep] / counts[keep, None]).astype(np.float32), counts[keep])


# --------------------------------------------------------------------------- client side
def secure_train_mod(setup):
    """A Flower mod for the train handler: messages carrying SecAgg+ settings go through
    Flower's ``secaggplus_mod``, with our handler adapted to the legacy fit shape; every other
    message passes unchanged."""
    from flwr.client.mod import secaggplus_mod

    def mod(msg: Message, ctxt: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, ctxt)

        def adapted(inner: Message, context: Context) -> Message:
            return _fit_through_handler(setup, inner, context, call_next)

        return secaggplus_mod(msg, ctxt, adapted)

    return mod


def _fit_through_handler(setup, msg: Message, context: Context, handler) -> Message:
    from ..engine.runtime import runtime_for

    rt = runtime_for(setup)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = json.loads(str(fitins.config[KEYS]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    ours = RecordDict(
        {
            GLOBAL: ArrayRecord({k: _array(a) for k, a in zip(keys, arrays)}),
            CONFIG: ConfigRecord(json.loads(str(fitins.config[CONFIG_JSON]))),
        }
    )
    # the same message with our content: a client may not create a new request (on Ray,
    # Flower refuses messages without a reply_to outside the server's task)
    msg.content = ours
    reply = handler(msg, context)
    if reply.has_error():
        raise RuntimeError(reply.error.reason)
    metrics = reply.content[METRICS]
    counts = metrics["proto.counts"] if "proto.counts" in metrics else None
    protos = protos_from_arrays(reply.content[UPLOAD], counts=counts) or PrototypeSet.empty(rt.scenario.model.feature_dim)
    vec = encode_upload(protos, rt.stream.dataset.num_classes, rt.scenario.model.feature_dim,
                        rt.scenario.privacy.secure_range,
                        train_loss=float(metrics["train_loss"]) if "train_loss" in metrics else None,
                        num_examples=int(metrics["num_examples"]))
    clear = {k: metrics[k] for k in CLEAR_METRICS if k in metrics}
    # Flower's stochastic rounding (next, inside secaggplus_mod) draws from numpy's global
    # generator: seed it so that the run is reproducible
    cfg = ours[CONFIG]
    np.random.seed(derive_seed(rt.scenario.seed, "secagg_rounding", int(clear.get("partition_id", 0)), int(cfg["server_round"])) % 2**32)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vec]), 1, clear)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def _array(a: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(a))


# --------------------------------------------------------------------------- server side
class _NodeProxy(ClientProxy):
    """The legacy workflow addresses clients through proxies; only ``node_id`` is used."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - never called by the workflow
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover
        raise NotImplementedError


class _SumOnly(LegacyStrategy):
    """The legacy strategy the SecAgg+ workflow drives: hands out our sampled nodes and keeps
    the unmasked aggregate; it merges nothing itself."""

    def __init__(self, node_ids: list[int], fitins: FitIns) -> None:
        self.node_ids = node_ids
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_NodeProxy(n), self.fitins) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _split_bytes(content: RecordDict) -> tuple[int, int]:
    """``(payload, protocol)`` bytes of one SecAgg+ stage message. Payload: the values of the
    masked vectors (shape x item size, as :func:`~simulator.records.payload_bytes` counts
    arrays). Protocol: the rest of the SecAgg+ record (stage and its settings, public keys,
    encrypted shares, node lists, unmasking shares; bytes and strings by length, numbers 8
    bytes). Neither counts the legacy fit records around it: the global arrays are counted
    from our own messages, and our config and the reply metrics in clear are bookkeeping."""
    record = content.config_records.get(RECORD_KEY_CONFIGS)
    if record is None:
        return 0, 0
    payload = sum(bytes_to_ndarray(b).nbytes for b in record.get(SecAggKey.MASKED_PARAMETERS, []))
    rest = ConfigRecord({k: v for k, v in record.items() if k != SecAggKey.MASKED_PARAMETERS})
    return payload, record_bytes(RecordDict({RECORD_KEY_CONFIGS: rest}))


@dataclass
class _Counting:
    """Forwards the workflow's messages to the real grid, counting the masked vectors' bytes
    (payload, up) and the protocol's own traffic apart, and keeping every reply (errors
    included) for failure accounting."""

    grid: Any
    up: int = 0
    protocol_up: int = 0
    protocol_down: int = 0
    replies: list[Message] = field(default_factory=list)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.protocol_down += sum(_split_bytes(m.content)[1] for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_content():
                payload, protocol = _split_bytes(r.content)
                self.up += payload
                self.protocol_up += protocol
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


@dataclass
class RoundStats:
    """One secure round. ``bytes_up``/``bytes_down``: the payload as a plain run defines it
    (docs/metrics.md): the masked vectors up, the global state down; ``protocol_bytes_*``: the
    SecAgg+ protocol's own traffic (:func:`_split_bytes`), reported apart."""

    clients_ok: int = 0
    seconds: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    compute: list[float] = field(default_factory=list)  # each survivor's compute_seconds (sent in clear)
    protocol_bytes_up: int = 0
    protocol_bytes_down: int = 0


class SecureSum:
    """One secure training step per round: our strategy's messages in, one aggregate reply out."""

    def __init__(self, scenario, num_classes: int, on_failure) -> None:
        self.scenario = scenario
        self.num_classes = num_classes
        self.dim = scenario.model.feature_dim
        self.bound = scenario.privacy.secure_range
        self.on_failure = on_failure  # f(reply) for each error reply (failure accounting)
        self.last = RoundStats()

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=0.5,
            max_weight=1.0,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
        )

    def exchange(self, grid, msgs: list[Message], server_round: int) -> tuple[list[Message], dict[int, int]]:
        """Run SecAgg+ over the sampled clients. Returns ``[aggregate reply]`` (or ``[]`` when
        too few clients survived) and the clear metrics of each surviving client by partition."""
        t0 = time.perf_counter()
        if not msgs:
            self.last = RoundStats()
            return [], {}
        first = msgs[0].content
        arrays: ArrayRecord = first[GLOBAL]
        keys = list(arrays.keys())
        config = {KEYS: json.dumps(keys), CONFIG_JSON: json.dumps({k: v for k, v in first[CONFIG].items()})}
        params = Parameters(tensors=[ndarray_to_bytes(arrays[k].numpy()) for k in keys], tensor_type="numpy.ndarray")
        legacy = _SumOnly([m.metadata.dst_node_id for m in msgs], FitIns(params, config))
        ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        ctx.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(server_round)})
        ctx.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        counting = _Counting(grid)
        self.workflow()(counting, LegacyContext(ctx, ServerConfig(num_rounds=1), legacy, SimpleClientManager()))
        for r in counting.replies:
            if r.has_error():
                self.on_failure(r)
        clear = [dict(res.metrics) for _, res in legacy.results]
        self.last = RoundStats(len(clear), time.perf_counter() - t0, counting.up,
                               sum(payload_bytes(m.content) for m in msgs),  # the global state, as in a plain run
                               [float(m["compute_seconds"]) for m in clear if "compute_seconds" in m],
                               counting.protocol_up, counting.protocol_down)
        if not legacy.results:
            return [], {}
        summed = np.asarray(parameters_to_ndarrays(legacy.results[0][1].parameters)[0]) * len(legacy.results)
        total = decode_sum(summed, self.num_classes, self.dim, self.bound)
        loss, n = decode_loss(summed, self.num_classes, self.dim, self.bound)
        metrics = MetricRecord(
            {
                "partition_id": -1,  # the aggregate of the survivors, not one client
                "num_examples": n,  # their summed num_examples, and their num_examples-weighted mean loss
                **({"train_loss": loss} if loss is not None else {}),
                "steps": int(sum(int(m.get("steps", 0)) for m in clear)),
                "proto.counts": [int(c) for c in total.counts],
            }
        )
        reply = Message(RecordDict({UPLOAD: ArrayRecord(protos_to_arrays(total)), METRICS: metrics}), reply_to=msgs[0])
        return [reply], {int(m["partition_id"]): m for m in clear}


def exchange_securely(secure: SecureSum, grid, msgs: list[Message], delivery, task: int, rnd: int,
                      server_round: int, releases: dict[int, int]) -> tuple[list[Message], dict[str, int]]:
    """The engine's training exchange under secure aggregation. Error replies are accounted
    as the plain exchange does (``failures.csv``), but not retried: in SecAgg+ a client that
    misses a stage is a dropout, which the protocol itself recovers from. Returns the
    aggregate reply followed by the error replies (so fatal client errors still stop the run)."""
    from ..engine.failures import ERROR, INJECTED, KINDS, WORKER_DIED, Failure, injected_fault, is_infrastructure, split_reason

    counts = dict.fromkeys(KINDS, 0)
    errors: list[Message] = []

    def on_failure(reply: Message) -> None:
        pid = delivery.pid_of.get(reply.metadata.src_node_id, -1)
        code, reason = int(reply.error.code), str(reply.error.reason)
        injected = injected_fault(delivery.scenario, pid, server_round) is not None
        kind = INJECTED if injected else (WORKER_DIED if is_infrastructure(code, reason) else ERROR)
        message, tb = split_reason(reason)
        counts[kind] += 1
        delivery.recorder.record_failure(Failure("train", task, rnd, server_round, pid, kind, message, 1), traceback_text=tb)
        errors.append(reply)

    secure.on_failure = on_failure
    replies, clear = secure.exchange(grid, msgs, server_round)
    delivery.recorder.secagg_bytes_up += secure.last.protocol_bytes_up
    delivery.recorder.secagg_bytes_down += secure.last.protocol_bytes_down
    from .client import RELEASED

    for pid, m in clear.items():
        if int(m.get(RELEASED, 0)):
            releases[pid] = releases.get(pid, 0) + 1
    return replies + errors, counts
