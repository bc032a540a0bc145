"""Run one scenario end to end: data -> engine (Ray or inline) -> run directory."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..errors import FieldError, Problem, RunFailure, UserError
from ..scenario import Scenario
from ..seeding import seed_table
from .cohorts import cohort_plan, resolve_clients_per_call
from .recorder import OPEN_WORLD_KEYS, RunRecorder
from . import determinism
from ..data.online import unseen as online_unseen
from .runtime import RunSetup, release_runtime, runtime_for, write_stream


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict[str, Any]
    matrix: np.ndarray


#: the run directory of the run in progress in this process (the CLI names it when interrupted)
ACTIVE_RUN_DIR: Path | None = None


def default_run_dir(scenario: Scenario, overrides_tag: str = "") -> Path:
    """``<output.dir>/<name>/<strategy>/seed-<seed>``; ``<name>-set-<tag>`` when ``--set``
    changed what the run computes (see :mod:`simulator.study.run_dirs`)."""
    from ..study.run_dirs import scenario_folder

    return Path(scenario.output.dir) / scenario_folder(scenario.name, overrides_tag) / scenario.strategy.name / f"seed-{scenario.seed}"


def build_stream_checked(scenario: Scenario, source: str):
    """Build the federated data stream; problems with the data become the user's clear error."""
    from ..data.stream import build_stream

    try:
        return build_stream(scenario)
    except FieldError as exc:
        raise UserError.single(source, exc.field, exc.message) from None
    except MemoryError as exc:  # numpy's "Unable to allocate ..." for data too large for this machine
        raise UserError.single(source, "dataset", f"the data do not fit in memory ({exc}); use a smaller dataset") from None


def check_writable(run_dir: Path, source: str = "--out") -> None:
    """Fail before any work when the run directory cannot be created or written."""
    probe = run_dir
    try:
        while not probe.exists():
            if os.path.lexists(probe):  # exists() follows links: this one is dangling or a loop
                raise UserError.single(source, "output.dir", f"{probe} is a symbolic link that leads nowhere")
            if probe.parent == probe:
                break
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise UserError.single(source, "output.dir", f"{probe} exists and is not a directory")
    except OSError as exc:  # e.g. a symlink loop, or a name the filesystem refuses
        raise UserError.single(source, "output.dir", f"cannot use {run_dir}: {exc.strerror or exc}") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError.single(source, "output.dir", f"cannot write to {probe} (permission denied)")
    try:  # permission bits are not the whole story (root, /proc, read-only mounts): try it
        os.rmdir(tempfile.mkdtemp(prefix=".protofed-probe-", dir=probe))
    except OSError as exc:
        raise UserError.single(source, "output.dir", f"cannot create {run_dir}: {exc.strerror or exc}") from None


def _strategy_shown(scenario: Scenario) -> str:
    """``proto_avg (share_weights)``: the strategy with the parameters it runs away from its defaults."""
    from strategies import nondefault_params, shown_label

    return shown_label(scenario.strategy.name, nondefault_params(scenario.strategy.name, scenario.strategy.params))


def _summary(
    scenario: Scenario, rec: RunRecorder, engine: str, wall: float, completed: bool, tasks: list[list[int]]
) -> dict[str, Any]:
    from strategies import nondefault_params

    from ..metrics import anytime_accuracy, metric_definitions, missing_cells, open_world_summary, summarize_partial

    done = rec.tasks_done
    definitions = metric_definitions(scenario.clients.task_order)
    summ: dict[str, Any] = {
        "scenario": scenario.name,
        "strategy": scenario.strategy.name,
        "strategy_params": nondefault_params(scenario.strategy.name, scenario.strategy.params),  # for labels
        "seed": scenario.seed,
        "engine": engine,
        "num_tasks": rec.num_tasks,
        "num_clients": rec.num_clients,
    }

    def reached(m: np.ndarray) -> np.ndarray:  # the rows (and, standard, columns) of finished tasks
        return m[:done, :] if definitions != "standard" else m[:done, :done]

    g = summarize_partial(reached(rec.matrix), definitions) if done > 0 else {}
    has_local = done > 0 and np.isfinite(rec.local_matrix[:done]).any()
    loc = summarize_partial(reached(rec.local_matrix), definitions) if has_local else {}
    gaps = {"global": len(missing_cells(reached(rec.matrix), definitions)) if done else 0,
            "local": len(missing_cells(reached(rec.local_matrix), definitions)) if has_local else 0}
    selected = scenario.evaluation.protocol
    other = "global" if selected == "local" else "local"
    for key in ("final_avg_accuracy", "avg_incremental_accuracy", "avg_forgetting", "bwt"):
        glob_v, loc_v = g.get(key, math.nan), loc.get(key, math.nan)
        if selected == "local":  # the selected protocol fills the standard keys
            glob_v, loc_v = loc_v, glob_v
        summ[key], summ[f"{other}_{key}"] = glob_v, loc_v
    for col, key in enumerate(OPEN_WORLD_KEYS):  # mean over tasks 0..T-2 (docs/metrics.md)
        summ[key] = open_world_summary(rec.open_world[:done, col], rec.num_tasks)
    summ["anytime_accuracy"] = anytime_accuracy(rec.rows)  # every evaluation, not only the task ends
    summ["missing_cells"] = gaps[selected]
    summ[f"{other}_missing_cells"] = gaps[other]
    summ["metric_definitions"] = definitions
    summ["evaluation_population"] = scenario.evaluation.population
    failures = rec.failure_counts()
    summ["clients_failed_injected"] = failures["injected"]
    summ["clients_failed_unexpected"] = failures["error"] + failures["worker_died"]
    summ["clients_worker_died"] = failures["worker_died"]
    rounds = max(1, done * scenario.training.rounds_per_task)
    summ.update(
        bytes_up=rec.bytes_up,
        bytes_down=rec.bytes_down,
        bytes_per_round=(rec.bytes_up + rec.bytes_down) / rounds,
        eval_bytes=rec.eval_bytes,
        secagg_bytes_up=rec.secagg_bytes_up,  # the SecAgg+ protocol's own traffic (0 without it)
        secagg_bytes_down=rec.secagg_bytes_down,
        wall_seconds=round(wall, 3),
        completed=completed,
        tasks_completed=done,
        protocol=scenario.evaluation.protocol,
        task_classes=[[int(c) for c in t] for t in tasks],
    )
    from ..privacy.run import privacy_summary

    summ.update(privacy_summary(scenario, rec.num_tasks, rec.num_clients, rec.privacy_releases, rec.privacy_sgd_steps))
    return summ


def small_batch_client_tasks(sizes: np.ndarray, batch_size: int) -> int:
    """Client-tasks whose new training samples (replay memory not counted) are fewer than one
    batch but not zero: such clients take one short step per epoch, so their updates are noisy
    and BatchNorm statistics unreliable. Counted into ``summary.json``; the runner warns once.
    ``sizes``: the stream's ``client_task_sizes()``."""
    return int(((sizes > 0) & (sizes < batch_size)).sum())


def check_pretrained(scenario: Scenario, stream, source: str) -> None:
    """``model.pretrained`` must be a state dict that fits every client's backbone exactly;
    otherwise the user's clear error (missing / unexpected keys named), before anything is written."""
    if scenario.model.pretrained is None:
        return
    from ..learner.backbones import PretrainedError, build_model, read_pretrained

    try:
        names = sorted({scenario.model.backbone_of(c) for c in range(scenario.clients.num_clients)})
        for name in names:
            state = read_pretrained(scenario.model.pretrained, name)
            try:
                build_model(name, stream.dataset.input_shape, scenario.model.embedding_dim, 1, False, 0,
                            norm=scenario.model.norm, pretrained=state)
            except PretrainedError as exc:
                raise PretrainedError(f"backbone {name}: {exc}") from None
    except PretrainedError as exc:
        raise UserError.single(source, "model.pretrained", str(exc)) from None


def _check_privacy(scenario: Scenario, num_tasks: int, source: str) -> None:
    from strategies import STRATEGIES

    from ..privacy.run import check_scenario

    cls = STRATEGIES[scenario.strategy.name]
    check_scenario(scenario, num_tasks, cls, cls.Params.model_validate(scenario.strategy.params), source)


def check_online(scenario: Scenario, source: str) -> None:
    """``tasks.online`` is a single pass: one local epoch; and no DP (its accounting assumes
    the offline sampling of every sample at every round). ``continual.apf`` chooses what an
    online round replays: it needs ``tasks.online`` and a replay memory."""
    problems = []
    if scenario.continual.apf is not None:
        if scenario.tasks.online is None:
            problems.append(Problem("continual.apf", "chooses the memory samples an online round replays: it needs "
                                    "tasks.online (e.g. {batch_size: 10, communicate_every: 5})"))
        elif scenario.continual.memory_per_class <= 0:
            problems.append(Problem("continual.apf", "replays from the replay memory: set continual.memory_per_class > 0"))
    if scenario.tasks.online is None:
        if problems:
            raise UserError(source, problems)
        return
    if scenario.training.local_epochs != 1:
        problems.append(Problem("training.local_epochs", f"is {scenario.training.local_epochs}; tasks.online sees each sample "
                                "once: set it to 1"))
    if scenario.privacy.dp:
        problems.append(Problem("tasks.online", "differential privacy is accounted for the offline mode only; remove "
                                "privacy.epsilon / privacy.noise_multiplier or tasks.online"))
    if problems:
        raise UserError(source, problems)


def check_procedural(scenario: Scenario, stream, source: str) -> None:
    """A procedural population (``dataset.source: procedural``) never materialises the whole
    training set: what needs it (the joint upper bound, a frozen backbone's feature table) is
    refused, each named."""
    from ..data.stream import ProceduralStream

    if not isinstance(stream, ProceduralStream):
        return
    from strategies import STRATEGIES

    problems = []
    if STRATEGIES[scenario.strategy.name].Objective.data_scope == "all":
        problems.append(Problem("strategy.name", f"{scenario.strategy.name} trains on the whole training set, which "
                                "dataset.source: procedural never materialises; use a finite source (e.g. synthetic)"))
    if scenario.continual.backbone == "frozen":
        problems.append(Problem("continual.backbone", "frozen embeds the whole training set once; with dataset.source: "
                                "procedural the clients' samples are generated when sampled: use trainable"))
    if problems:
        raise UserError(source, problems)


def check_strategy_setup(scenario: Scenario, stream, source: str) -> None:
    """The strategy's own checks that need the loaded data or installed packages (e.g. fedsa
    ``anchors: text``: class names and the text model), before anything is written."""
    from strategies import STRATEGIES, RunInfo

    cls = STRATEGIES[scenario.strategy.name]
    run = RunInfo(seed=scenario.seed, participation=scenario.clients.participation,
                  num_classes=stream.dataset.num_classes, embedding_dim=scenario.model.feature_dim,
                  input_shape=tuple(stream.dataset.input_shape), text_names=stream.dataset.text_names)
    problems = cls.check_setup(cls.Params.model_validate(scenario.strategy.params), run)
    if problems:
        raise UserError(source, [Problem(f"strategy.params.{f}", m) for f, m in problems])


def why_not_vectorized(scenario: Scenario, stream, engine: str) -> str | None:
    """Why ``resources.vectorize`` cannot apply to this run, judged before it starts from what
    every client has in common (two fresh models, the training settings, the method's hooks);
    None when cohorts of same-architecture clients can train vectorised."""
    from strategies import STRATEGIES

    from ..learner.backbones import build_model
    from ..learner.continual import build_stack
    from ..learner.training import TrainConfig
    from ..learner.vectorized import why_not_vectorizable

    if engine == "flower":
        return "a Flower deployment runs one client per SuperNode (no cohorts)"
    if scenario.resources.clients_per_call == "auto" and resolve_clients_per_call(scenario, engine, 1) == 1:
        return "resources.clients_per_call is auto, which is 1 here (set it to the cohort size you want)"
    if scenario.resources.clients_per_call != "auto" and int(scenario.resources.clients_per_call) < 2:
        return "resources.clients_per_call is 1"
    cls = STRATEGIES[scenario.strategy.name]
    objective = cls.Objective
    stack = build_stack(scenario.continual, objective.uses_continual, None)
    d, m = stream.dataset, scenario.model
    # two clients of the first architecture (under model heterogeneity each architecture's
    # clients are trained together; different architectures never are)
    models = [build_model(m.backbone_of(0), d.input_shape, m.embedding_dim, d.num_classes, objective.needs_head(), 0,
                          norm=m.norm, aper=m.aper) for _ in range(2)]
    cfg = TrainConfig(classifier=objective.train_loss, distill_weight=scenario.continual.feature_distillation)
    return why_not_vectorizable(models, cfg, hooks_have_losses=objective.adds_own_loss() or bool(stack), teacher=None,
                                private=True if scenario.privacy.dp else None)


def run_scenario(
    scenario: Scenario,
    *,
    source: str = "<scenario>",
    run_dir: Path | None = None,
    engine: str | None = None,
    verbose: bool = False,
    out: TextIO | None = None,
    plots: bool = True,
    resume: bool = False,
    grid=None,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
) -> RunOutcome:
    """Run ``scenario`` and write its run directory. Bad input raises :class:`UserError`
    before anything is written. With ``resume``, continue from the checkpoint in ``run_dir``
    (written at the end of every task) instead of starting over. A directory that holds
    another run is refused unless ``overwrite`` (see :mod:`simulator.study.run_dirs`);
    ``overrides`` (what ``--set`` changed) is recorded in ``config.yaml`` and, without an
    explicit ``run_dir``, names the default one.

    The phases, each a method of :class:`_Run`: check the input (nothing written yet), open the
    run (client state folder, recorder, trackers), restore a checkpoint or write the config,
    announce, execute every task (retrying from the last finished task when the infrastructure
    fails), and finish (results, plots, tracking, profile) whatever happened."""
    global ACTIVE_RUN_DIR
    run = _Run.checked(scenario, source, run_dir, engine, grid, resume, overwrite, overrides or {})
    run.open(verbose, out)
    run.restore_or_start(resume)
    run.announce()
    ACTIVE_RUN_DIR = run.run_dir
    completed = False
    try:
        run.execute(verbose)
        completed = True
    finally:
        summary = run.finish(completed, plots)
    return RunOutcome(run.run_dir, summary, run.rec.matrix)


class _Run:
    """One run of a scenario, phase by phase (see :func:`run_scenario`)."""

    @classmethod
    def checked(cls, scenario: Scenario, source: str, run_dir: Path | None, engine: str | None, grid,
                resume: bool, overwrite: bool, overrides: dict[str, Any]) -> "_Run":
        """Everything that can be wrong with the input, checked before anything is written."""
        from ..report.tracking import check_available
        from ..study.run_dirs import check_run_dir, overrides_tag
        from .profile import RunProfile

        self = cls()
        self.profile = RunProfile()  # where the time goes (profile.json, read by protofed bench)
        self.engine = "flower" if grid is not None else (engine or scenario.resources.engine)
        self.grid, self.source, self.overrides = grid, source, overrides
        self.scenario = scenario = scenario.model_copy(deep=True)
        if grid is None:
            scenario.resources.engine = self.engine  # type: ignore[assignment]
        out_source = "--out" if run_dir is not None else source  # where the run directory came from
        self.tag = overrides_tag(overrides)
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(scenario, self.tag)
        self.stream = build_stream_checked(scenario, source)
        check_pretrained(scenario, self.stream, source)
        check_online(scenario, source)
        check_procedural(scenario, self.stream, source)
        check_strategy_setup(scenario, self.stream, source)
        _check_privacy(scenario, self.stream.num_tasks, source)
        check_writable(self.run_dir, out_source)
        if not resume:
            check_run_dir(self.run_dir, scenario.resolved(), overwrite=overwrite, source=out_source)
        check_available(scenario, source)
        return self

    def open(self, verbose: bool, out: TextIO | None) -> None:
        """The client state folder, the run's recorder, writer and experiment trackers."""
        from ..privacy.audit import UploadLog
        from ..report.tracking import Trackers
        from ..results import RunWriter
        from .progress import TimedRecorder

        scenario, source = self.scenario, self.source
        self.started = time.time()
        try:
            if scenario.resources.state_dir:
                Path(scenario.resources.state_dir).mkdir(parents=True, exist_ok=True)
            self.state_dir = Path(tempfile.mkdtemp(prefix="protofed-state-", dir=scenario.resources.state_dir))
        except OSError as exc:
            raise UserError.single(source, "resources.state_dir", f"cannot create the client state folder: {exc}") from None
        self.resolved = scenario.resolved()
        self.setup = RunSetup(scenario=self.resolved, state_dir=str(self.state_dir), verbose=verbose)
        self.clients_dir = self.state_dir / "clients"
        self.writer = RunWriter(self.run_dir)
        self.rec = TimedRecorder(num_tasks=self.stream.num_tasks, rounds_per_task=scenario.training.rounds_per_task,
                                 num_clients=scenario.clients.num_clients, out=out)
        try:
            self.trackers = Trackers(scenario, self.resolved, self.run_dir)
        except Exception as exc:  # e.g. an MLflow store that cannot be opened
            shutil.rmtree(self.state_dir, ignore_errors=True)
            raise UserError.single(source, "output.mlflow" if scenario.output.mlflow else "output.tensorboard",
                                   f"cannot start experiment tracking: {type(exc).__name__}: {str(exc)[:300]}") from None
        self.rec.upload_log = UploadLog() if scenario.privacy.keep_uploads else None  # not kept across --resume
        self.rec.profile = self.profile
        sizes = self.stream.client_task_sizes()  # every (task, client)'s samples: counted once, not kept
        self.small = small_batch_client_tasks(sizes, self.batch_size)
        self.with_data = int((sizes > 0).sum())
        online = scenario.tasks.online
        self.unseen = (0, 0) if online is None else online_unseen(
            sizes, scenario.training.rounds_per_task, online.batch_size, online.communicate_every)

    @property
    def batch_size(self) -> int:
        """The local batch: the stream's under ``tasks.online``."""
        online = self.scenario.tasks.online
        return self.scenario.training.batch_size if online is None else online.batch_size

    def restore_or_start(self, resume: bool) -> None:
        """With ``resume`` and a checkpoint: the recorder, task and strategy state it holds;
        otherwise ``config.yaml`` and ``clients.csv`` of a new run."""
        from ..study.run_dirs import resolved_paths
        from .checkpoint import has_checkpoint, load_checkpoint

        self.start_task, self.strategy_state, self.wall_before = 0, None, 0.0
        if resume and has_checkpoint(self.run_dir):
            ckpt = load_checkpoint(self.run_dir, self.clients_dir)
            self.rec.load_state_dict(ckpt["recorder"])
            self.start_task, self.strategy_state = int(ckpt["task"]) + 1, ckpt["strategy"]
            self.wall_before = float(ckpt.get("wall_seconds", 0.0))
            return
        import pandas as pd

        self.writer.write_config({
            **self.resolved, "derived_seeds": seed_table(self.scenario.seed), "overrides": dict(self.overrides),
            "overrides_tag": self.tag, "resolved_paths": resolved_paths(self.resolved),
        })
        self.write_clients()

    def took_part(self) -> list[int] | None:
        """Under a procedural population, the clients that have trained so far (those with a
        state); None for a finite stream, whose clients.csv lists every client."""
        from ..data.stream import ProceduralStream

        return runtime_for(self.setup).store.ids() if isinstance(self.stream, ProceduralStream) else None

    def write_clients(self) -> None:
        """``clients.csv``: every client's rows; under a procedural population only the rows of
        the clients that have trained so far (those with a state), rewritten at each task's end."""
        import pandas as pd

        from ..data.stream import CLIENT_COLUMNS

        self.writer.write_table("clients", pd.DataFrame(self.stream.summary_rows(self.took_part()), columns=list(CLIENT_COLUMNS)))

    def wall(self) -> float:
        return self.wall_before + time.time() - self.started

    def write_results(self, completed: bool) -> dict[str, Any]:
        """Every result file from what is recorded so far; returns the summary."""
        import pandas as pd

        from .failures import FAILURE_COLUMNS, INFRASTRUCTURE

        rec, writer = self.rec, self.writer
        summary = _summary(self.scenario, rec, self.engine, self.wall(), completed, self.stream.tasks)
        summary["small_batch_client_tasks"] = self.small
        if (took_part := self.took_part()) is not None:  # the population is never listed; those who trained are counted
            summary["clients_took_part"] = len(took_part)
        summary["retries"] = sum(1 for f in rec.failures if f.kind == INFRASTRUCTURE)  # simulator/engine/retry.py
        if rec.rows:
            writer.write_metrics(rec.rows)
        if rec.client_rows:
            writer.write_table("client_metrics", pd.DataFrame(rec.client_rows))
        writer.write_table("failures", pd.DataFrame([f.row() for f in rec.failures], columns=list(FAILURE_COLUMNS)))
        writer.write_matrix(rec.matrix)
        if rec.tasks_done > 0 and np.isfinite(rec.local_matrix).any():
            writer.write_matrix(rec.local_matrix, name="local_accuracy_matrix.csv")
        writer.write_summary(summary)
        if rec.upload_log is not None:
            from ..privacy.audit import write_uploads

            write_uploads(self.run_dir / "uploads.npz", rec.upload_log, self.state_dir)
        return summary

    def track(self, call) -> None:
        try:
            call()
        except Exception as exc:  # tracking must never lose a run
            self.rec.say(f"warning: experiment tracking failed: {type(exc).__name__}: {str(exc)[:300]}")

    def on_task_end(self, task: int, strategy) -> None:
        """Everything finished so far goes to disk at each task's end (summary with
        ``completed: false``), so even a process killed outright leaves its finished tasks."""
        from .checkpoint import save_checkpoint

        profile = self.profile
        with profile.task_end_part("results"):
            self.write_results(completed=False)
        with profile.task_end_part("tracking"):
            self.track(lambda: self.trackers.log_rows(self.rec.rows))
        if self.took_part() is not None:
            with profile.task_end_part("results"):
                self.write_clients()
        if task == self.stream.num_tasks - 1:  # output.save: the final global state (and clients')
            from .final_state import save_final

            try:
                with profile.task_end_part("final_state"):
                    save_final(self.run_dir, strategy, self.setup, self.scenario.output.save)
            except Exception as exc:  # saving the models must never lose a finished run
                self.rec.say(f"warning: could not save the final state: {type(exc).__name__}: {exc}")
        with profile.task_end_part("strategy_state"):
            state = strategy.state_dict()
        with profile.task_end_part("checkpoint"):
            save_checkpoint(self.run_dir, task, state, self.rec.state_dict(), self.clients_dir, self.wall())

    def announce(self) -> None:
        """The header line and the warnings a reader needs before the first round."""
        scenario, stream, say = self.scenario, self.stream, self.rec.say
        what = f"resuming at task {self.start_task + 1}" if self.start_task else f"engine {self.engine}"
        say(f"protofed · {scenario.name} · strategy {_strategy_shown(scenario)} · seed {scenario.seed} · "
            f"{stream.num_tasks} tasks x {scenario.training.rounds_per_task} rounds · "
            f"{scenario.clients.num_clients} clients · {what}")
        if self.small:
            key = "training.batch_size" if scenario.tasks.online is None else "tasks.online.batch_size"
            say(f"warning: {self.small} of {self.with_data} client-tasks have fewer training samples than one batch "
                f"({key} {self.batch_size}); see clients.csv "
                "(counted as small_batch_client_tasks in summary.json)")
        if (online := scenario.tasks.online) is not None:
            left, total = self.unseen
            if left:
                say(f"warning: tasks.online: {left} of {total} training samples are never seen ({scenario.training.rounds_per_task} "
                    f"rounds x {online.communicate_every} batches x {online.batch_size} samples per client and task); "
                    "raise training.rounds_per_task to see every sample")
        if self.engine == "flower" and scenario.resources.clients_per_call not in ("auto", 1):
            say("warning: resources.clients_per_call applies to the simulation engines; a Flower deployment runs "
                "one client per SuperNode")
        if scenario.resources.vectorize and (why := why_not_vectorized(scenario, stream, self.engine)):
            say(f"warning: resources.vectorize is on, but the clients train one by one: {why}")

    def execute(self, verbose: bool) -> None:
        """Every task from the first unfinished one; an infrastructure failure retries the run
        from its last finished task (bounded by ``resources.retries``), then fails it."""
        from ..study.supervisor import earlier_retries, report_run_dir, retries_spent
        from .retry import Retries

        scenario, rec, run_dir = self.scenario, self.rec, self.run_dir
        report_run_dir(run_dir, scenario.resources.retries)
        retries = Retries(rec, run_dir, self.clients_dir, scenario.resources.retries, self.start_task, self.strategy_state)
        for number, task, what in earlier_retries(run_dir):  # Ray ended an earlier process of this run
            retries.add(task, what, number)
        if why := retries_spent(run_dir):
            raise RunFailure(why)
        write_stream(self.stream, self.state_dir)
        self.write_results(completed=False)  # summary.json says what there is, even if Ray dies in task 1
        self.profile.add("prepare", time.perf_counter() - self.profile.started)
        if scenario.continual.backbone == "frozen":  # one forward pass over the data, before any client
            with self.profile.timed("frozen_features"):
                runtime_for(self.setup).prepare_frozen_features()
        start_task, strategy_state = self.start_task, self.strategy_state
        while start_task < self.stream.num_tasks:
            try:
                _launch(self.setup, rec, self.engine, scenario, verbose, grid=self.grid,
                        start_task=start_task, strategy_state=strategy_state, on_task_end=self.on_task_end)
                return
            except RunFailure as exc:
                start_task, strategy_state = _retry_or_fail(exc, retries, rec, self.setup, run_dir, self.engine, self.grid)

    def finish(self, completed: bool, plots: bool) -> dict[str, Any]:
        """Results, plots and tracking (MLflow after the plots: it logs them), whatever happened;
        then the client state folder goes and profile.json is written last."""
        from ..report.plots import plot_run
        from .checkpoint import remove_checkpoint

        rec, run_dir = self.rec, self.run_dir
        self.profile.mark("finish")
        summary = self.write_results(completed)
        if completed:
            remove_checkpoint(run_dir)
        drew = plots and rec.tasks_done > 0
        if drew:
            try:
                plot_run(run_dir)
            except Exception as exc:  # plotting must never lose a finished run
                rec.say(f"warning: plotting failed: {exc}")
        self.track(lambda: (self.trackers.log_rows(rec.rows), self.trackers.finish(summary, completed, drew)))
        release_runtime(self.setup)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.profile.add("finish", self.profile.since("finish"))
        _write_profile(run_dir, self.profile, self.engine, rec)
        return summary


def _retry_or_fail(exc: RunFailure, retries, rec: RunRecorder, setup: RunSetup, run_dir: Path, engine: str, grid) -> tuple[int, Any]:
    """After the engine failed: when its infrastructure died (not the method's code) and
    ``resources.retries`` allows, go back to the last finished task (``(start_task,
    strategy_state)`` to launch again, one line says so); else the run fails with ``exc`` or,
    for an infrastructure failure, with protofed's message naming the run and Ray's logs."""
    from .failures import infrastructure_cause
    from .ray_engine import last_log_dir, stop_ray

    what = infrastructure_cause(exc) if engine == "ray" and grid is None else None
    if what is None:
        raise exc
    with contextlib.suppress(Exception):  # Ray's cluster failed: its shutdown may fail too
        stop_ray()
    logs = f" Ray's logs: {last_log_dir()}." if last_log_dir() else ""
    if retries.used >= retries.allowed:
        raise RunFailure(
            f"{what}; the run was resumed {retries.used} times already (resources.retries {retries.allowed}). "
            "This is usually the machine running out of memory or CPU. Try fewer actors at once (a larger "
            "resources.num_cpus_per_client), a smaller model or batch, or --engine inline; finished tasks are "
            f"kept and `protofed run --resume {run_dir}` continues from them.{logs}"
        ) from exc
    failed_in = rec.tasks_done
    row = retries.add(failed_in, what)
    release_runtime(setup)  # a fresh driver runtime over the restored client states
    start_task, strategy_state = retries.restore()
    rec.say(f"protofed: {what} during task {failed_in + 1}; resuming the run from its last finished task "
            f"(retry {row.attempts} of {retries.allowed}).{logs}")
    return start_task, strategy_state


def _write_profile(run_dir: Path, profile, engine: str, rec: RunRecorder) -> None:
    """``profile.json``: the run's phases (simulator/engine/profile.py), written last; never
    lets a run fail."""
    import json

    from ..results import atomic_write_text
    from .profile import PROFILE_FILE

    try:
        atomic_write_text(run_dir / PROFILE_FILE, json.dumps({"engine": engine, **profile.to_dict()}, indent=1))
    except Exception as exc:
        rec.say(f"warning: could not write {PROFILE_FILE}: {type(exc).__name__}: {exc}")


def _launch(
    setup: RunSetup, rec: RunRecorder, engine: str, scenario: Scenario, verbose: bool, grid=None, **loop_kwargs: Any
) -> None:
    from .client_app import build_client_app
    from .server_app import build_server_app, server_loop

    if grid is not None:  # launched by Flower's own tooling (simulator.flower_app)
        server_loop(setup, rec, grid, **loop_kwargs)
        return
    client_app = build_client_app(setup)
    determinism.apply(scenario.resources.deterministic)  # the driver, before CUDA or Ray start
    profile = getattr(rec, "profile", None)
    if profile is not None:
        profile.mark("launch")
    if engine == "inline":
        from .inline import InlineGrid, set_server_identity
        from .ray_engine import quiet_logs

        quiet_logs(verbose)
        runtime_for(setup)  # build once, in this process
        set_server_identity()
        k, nodes = cohort_plan(scenario, engine, 1)
        server_loop(setup, rec, InlineGrid(client_app, nodes), clients_per_call=k, cohort_nodes=nodes, **loop_kwargs)
        return
    from .ray_engine import quiet_logs, ray_workers, run_ray, start_ray

    try:
        quiet_logs(verbose)
        t0 = time.perf_counter()
        start_ray(verbose, scenario.resources.ray_address)  # ray.init apart from the rest of the start-up
        if profile is not None:
            profile.add("ray_init", time.perf_counter() - t0)
            profile.mark("launch")
        k, nodes = cohort_plan(scenario, engine, ray_workers(scenario.resources.num_cpus_per_client))
        run_ray(
            build_server_app(setup, rec, clients_per_call=k, cohort_nodes=nodes, **loop_kwargs),
            client_app,
            nodes,
            scenario.resources.num_cpus_per_client,
            scenario.resources.num_gpus_per_client,
            verbose,
            scenario.resources.ray_address,
        )
        if profile is not None:
            profile.add("engine_stop", profile.since("loop_end"))  # the ServerApp returned -> Ray shut down
    except (RunFailure, UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray itself failed (a dead raylet, the object store, start-up), or the method's code
        from .failures import InfrastructureFailure, infrastructure_cause

        if (what := infrastructure_cause(exc)) is not None:  # retried by run_scenario
            raise InfrastructureFailure(what) from exc
        raise RunFailure(
            f"the Ray engine failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}; "
            "finished tasks are kept and "
            f"`protofed run --resume {ACTIVE_RUN_DIR or 'RUN_DIR'}` continues from them"
        ) from exc
