"""The Python API behind ``import protofed`` (DESIGN.md §10).

``protofed.run`` / ``compare`` / ``sweep`` / ``load`` drive the same code as the command line
and return plain pandas objects, so a study can be driven from a notebook. A scenario is given
as a path to a YAML file, a mapping (the YAML's content) or a validated
:class:`~simulator.scenario.Scenario`; bad input raises :class:`~simulator.errors.UserError`
(its message names the field) before anything is written.

``compare`` and ``sweep`` given a mapping or a Scenario object write it to
``<out>/scenario.yaml`` first and run from that file: the output folder then records what was
asked, and ``protofed compare <out>/scenario.yaml ...`` repeats (or resumes) it from a shell.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from .errors import Problem, UserError
from .scenario import Scenario, apply_overrides, blame_overrides, read_yaml, validate_scenario

__all__ = ["RunResult", "run", "compare", "sweep", "load", "scenario_from"]

ScenarioLike = "str | Path | Mapping[str, Any] | Scenario"


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """A finished (or interrupted) run directory, read back.

    ``matrix`` / ``local_matrix``: rows = task trained through (index ``trained_through``),
    columns ``task_0 .. task_{T-1}`` = evaluated task, under the global and the local protocol
    (``local_matrix`` is None when the run recorded none). ``metrics`` is ``metrics.csv``.
    """

    run_dir: Path
    summary: dict[str, Any]
    matrix: pd.DataFrame
    local_matrix: pd.DataFrame | None
    metrics: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def client_metrics(self) -> pd.DataFrame | None:
        p = self.run_dir / "client_metrics.csv"
        return pd.read_csv(p) if p.is_file() else None

    def plot_forgetting(self, protocol: str | None = None):
        """The forgetting curves as a matplotlib figure (see :func:`simulator.report.plot_api.plot_forgetting`)."""
        from .report.plot_api import plot_forgetting

        return plot_forgetting(self, protocol)

    def plot_matrix(self, protocol: str = "global"):
        """The accuracy matrix heatmap as a matplotlib figure (see :func:`simulator.report.plot_api.plot_accuracy_matrix`)."""
        from .report.plot_api import plot_accuracy_matrix

        return plot_accuracy_matrix(self, protocol)

    def global_state(self) -> dict[str, np.ndarray]:
        """``final/global.npz``: the strategy's final global arrays (``proto.classes``,
        ``proto.vectors``, ``proto.counts``; model weights for weight-sharing methods)."""
        p = self.run_dir / "final" / "global.npz"
        if not p.is_file():
            raise UserError.single(str(p), "output.save", "not saved (the run used output.save: none, or did not finish)")
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def client_prototypes(self) -> pd.DataFrame:
        """Every client's final local prototypes: columns ``client, class, count, vector``."""
        p = self.run_dir / "final" / "client_prototypes.npz"
        if not p.is_file():
            raise UserError.single(str(p), "output.save", "not saved (the run used output.save: none, or did not finish)")
        with np.load(p) as z:
            return pd.DataFrame({"client": z["client"], "class": z["classes"], "count": z["counts"], "vector": list(z["vectors"])})

    def client_model(self, client: int):
        """Rebuild one client's final model (``output.save: clients``) in eval mode on the CPU:
        ``model(x)`` gives embeddings; the returned object's ``prototypes`` attribute holds the
        client's local prototypes (``classes``, ``vectors``, ``counts``) for nearest-prototype use."""
        from .engine.final_eval import model_from_saved, saved_client

        saved = saved_client(self.run_dir, client)
        model = model_from_saved(saved, (self.config.get("model") or {}).get("norm", "batch"))
        model.prototypes = saved["prototypes"]  # type: ignore[attr-defined]
        return model

    # ------------------------------------------------------------------ after the fact
    def _stream(self):
        """The run's data stream, rebuilt from ``config.yaml`` by the code the run used (cached)."""
        if self._cache.get("stream") is None:
            from .data.stream import build_stream
            from .engine.final_eval import recorded_scenario

            self._cache["scenario"] = recorded_scenario(self.run_dir)
            self._cache["stream"] = build_stream(self._cache["scenario"])
        return self._cache["stream"]

    def _tasks_arg(self, task: int | None) -> list[int]:
        n = self._stream().num_tasks
        if task is None:
            return list(range(n))
        if isinstance(task, (bool, np.bool_)) or not isinstance(task, (int, np.integer)) or not 0 <= int(task) < n:
            raise UserError.single("task=", "task", f"{task!r} is not a task of this run: give 0..{n - 1}, or None for every task")
        return [int(task)]

    def test_split(self, task: int | None = None):
        """The run's test samples of one task (``task``, 0-based) or of every task (None), as a
        :class:`~simulator.engine.final_eval.TestSplit` with arrays ``x``, ``y``, ``task``
        (the task that introduced each label) and ``index`` (row in the dataset's test set).
        Rebuilt from ``config.yaml`` with the run's own data-stream code (deterministic from
        the scenario and its seed); a task's test set holds every test sample of its classes."""
        from .engine.final_eval import test_split_of

        return test_split_of(self._stream(), self._tasks_arg(task))

    def partitions(self, task: int | None = None) -> pd.DataFrame:
        """Each client's training samples, one row per sample: ``task, client, index, label``
        (``index``: row in the dataset's training set), for one task or every task (None).
        A client that does not learn a task (late arrival, staleness) has no rows for it."""
        from .engine.final_eval import partitions_frame

        return partitions_frame(self._stream(), self._tasks_arg(task))

    def evaluate(self, model: Any = None, *, device: str = "cpu") -> pd.DataFrame:
        """Repeat the run's final evaluation (global protocol: every seen task's global test
        set) from what it saved; one row per client and task: ``client, eval_task, correct,
        total, accuracy, in_mean``.

        ``model=None``: every client the run evaluated last and every saved client, each with its
        saved model, the final global state (``final/global.npz``) and the run's inference rule
        (the ClientApp's code: head or prototypes, second-order classifier, continual
        calibration); needs ``output.save: clients``. ``in_mean`` marks the rows the run averaged
        (``evaluation.clients``, ``evaluation.population``): :meth:`evaluation_means` of the
        table equals the last row of :attr:`matrix` (up to float differences when the run
        trained on another device than ``device``). ``model=<client id>``: that client only.
        ``model=<torch module>`` mapping inputs to embeddings: that module classified with the
        run's final global prototypes (``client`` is -1; needs ``output.save: global`` or
        ``clients``, and a strategy that shares prototypes)."""
        from .engine.final_eval import FinalEvaluation

        self._stream()
        final = FinalEvaluation(self.run_dir, self._cache["scenario"], self._cache["stream"], device)
        if model is None:
            return final.clients_table()
        if isinstance(model, (int, np.integer)) and not isinstance(model, (bool, np.bool_)):
            n = final.scenario.clients.num_clients
            if not 0 <= int(model) < n:
                raise UserError.single("model=", "model", f"client {model} is not a client of this run: give 0..{n - 1}")
            return final.clients_table([int(model)])
        import torch

        if isinstance(model, torch.nn.Module):
            return final.model_table(model)
        raise UserError.single("model=", "model", f"expected None, a client id or a torch module, not {type(model).__name__}")

    @staticmethod
    def evaluation_means(table: pd.DataFrame) -> pd.Series:
        """Per evaluated task, the mean accuracy over the rows the run averages (``in_mean``) of
        an :meth:`evaluate` table: the run's accuracy-matrix row after its last task."""
        kept = table[table["in_mean"]].sort_values(["eval_task", "client"], kind="stable")
        with np.errstate(all="ignore"):  # as the run's scoring: NaN (no test sample) is left out
            means = kept.groupby("eval_task")["accuracy"].agg(lambda a: float(np.nanmean(a.to_numpy())))
        return means.rename("accuracy")

    def __repr__(self) -> str:
        s = self.summary
        acc = s.get("final_avg_accuracy")
        shown = f"{acc:.4f}" if isinstance(acc, float) else acc
        return (
            f"RunResult({s.get('scenario')!r}, strategy={s.get('strategy')!r}, seed={s.get('seed')}, "
            f"final_avg_accuracy={shown}, run_dir={str(self.run_dir)!r})"
        )


def _matrix_frame(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    df = df.drop(columns=["task_name"], errors="ignore")
    return df.set_index("trained_through") if "trained_through" in df.columns else df


def load(run_dir: str | Path) -> RunResult:
    """Read a run directory back (``summary.json``, the matrices, ``metrics.csv``, ``config.yaml``)."""
    from .results import RUN_FILES, _read_summary

    rd = Path(run_dir)
    if not rd.is_dir():
        raise UserError.single(str(run_dir), "", "not a directory")
    missing = [n for n in RUN_FILES if not (rd / n).is_file()]
    if missing:
        raise UserError.single(str(run_dir), "", f"not a finished run directory (no {', '.join(missing)})")
    config = yaml.safe_load((rd / "config.yaml").read_text(encoding="utf-8")) or {}
    return RunResult(
        run_dir=rd,
        summary=_read_summary(rd / "summary.json"),
        matrix=_matrix_frame(rd / "accuracy_matrix.csv"),  # type: ignore[arg-type]
        local_matrix=_matrix_frame(rd / "local_accuracy_matrix.csv"),
        metrics=pd.read_csv(rd / "metrics.csv"),
        config=config,
    )


# --------------------------------------------------------------------------- scenarios
def _override_texts(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"clients.num_clients": 20}`` (or ``["clients.num_clients=20"]``) as ``--set`` texts.

    Values are written as JSON, which YAML reads back as the same value (a string stays a string).
    """
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(_plain(v))}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return [str(o) for o in overrides]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _raw(scenario: Any) -> tuple[dict[str, Any], str]:
    """The raw mapping of a scenario given as a path, a mapping or a Scenario, and its source name."""
    if isinstance(scenario, Scenario):
        return scenario.resolved(), "<scenario object>"
    if isinstance(scenario, Mapping):
        return copy.deepcopy(dict(scenario)), "<scenario mapping>"
    if isinstance(scenario, (str, Path)):
        return read_yaml(scenario), str(scenario)
    raise TypeError(f"scenario must be a path, a mapping or a Scenario, not {type(scenario).__name__}")


def scenario_from(
    scenario: Any,
    strategy: str | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[Scenario, str]:
    """Validate ``scenario`` with the same rules as ``protofed run --strategy --seed --set``."""
    raw, source = _raw(scenario)
    texts = _override_texts(overrides)
    if texts:
        with _api_words():  # a malformed override is named overrides=, not --set
            raw = apply_overrides(raw, texts)
    if strategy is not None:  # as the CLI: the scenario's params when it names the same strategy
        current = raw.get("strategy") if isinstance(raw.get("strategy"), dict) else {}
        params = current.get("params", {}) if current.get("name", "proto_avg") == strategy else {}
        raw["strategy"] = {"name": strategy, "params": params}
    if seed is not None:
        raw["seed"] = seed
    try:
        return validate_scenario(raw, source), source
    except UserError as exc:  # a bad override, strategy= or seed= is named as such, not as a mistake in the scenario
        after = {"strategy.name": f"strategy={strategy!r}"} if strategy is not None else {}
        if seed is not None:
            after["seed"] = f"seed={seed!r}"
        raise blame_overrides(exc, source, texts, after=after, word="overrides=") from None


# --------------------------------------------------------------------------- run / compare / sweep
def run(
    scenario: Any,
    strategy: str | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    engine: str | None = None,
    *,
    run_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> RunResult:
    """Run one scenario; the result read back from its run directory.

    ``overrides`` maps dotted keys to values (``{"clients.partition.alpha": 0.1}``). ``run_dir``
    defaults to the CLI's default path (with the overrides' hash, as ``--set``). A directory
    that holds another run is refused unless ``overwrite``. ``progress=False`` prints nothing.
    """
    from .engine.runner import run_scenario
    from .study.run_dirs import overrides_of

    sc, source = scenario_from(scenario, strategy, seed, overrides)
    changed: dict[str, Any] = {}
    if overrides:
        try:
            base = scenario_from(scenario, strategy, seed, None)[0].resolved()
        except UserError:
            base = None
        changed = overrides_of(base, sc.resolved())
    outcome = run_scenario(
        sc, source=source, run_dir=Path(run_dir) if run_dir is not None else None, engine=engine,
        out=sys.stdout if progress else None, overwrite=overwrite, overrides=changed,
    )
    return load(outcome.run_dir)


def _as_file(scenario: Any, out_dir: str | Path | None, overrides: Any, sub: str = "") -> tuple[str, str | None]:
    """A path for the compare/sweep machinery (which reads the scenario from a file), and the
    output folder. A mapping or Scenario is validated, then written to ``<out>/scenario.yaml``;
    the default ``<out>`` is the command line's: ``<output.dir>/<name>[-set-<hash>][/<sub>]``."""
    if isinstance(scenario, (str, Path)):
        return str(scenario), (str(out_dir) if out_dir is not None else None)
    sc, _ = scenario_from(scenario, overrides=overrides)
    raw, _ = _raw(scenario)
    if out_dir is not None:
        root = Path(out_dir)
    else:
        from .study.compare import study_overrides
        from .study.run_dirs import scenario_folder

        _, tag = study_overrides(raw, sc, "<scenario mapping>", _override_texts(overrides))
        root = Path(sc.output.dir) / scenario_folder(sc.name, tag) / sub
    from .results import atomic_write_text

    path = root / "scenario.yaml"
    atomic_write_text(path, yaml.safe_dump(_plain(raw), sort_keys=False, allow_unicode=True))
    return str(path), str(root)


def _names(items: str | Sequence[Any]) -> list[str]:
    return [s.strip() for s in items.split(",") if s.strip()] if isinstance(items, str) else [str(s) for s in items]


def _seeds(items: int | str | Sequence[int]) -> list[int]:
    from .study.compare import seeds_arg

    if isinstance(items, int):
        return [items]
    return seeds_arg(items if isinstance(items, str) else ",".join(str(int(s)) for s in items))


def compare(
    scenario: Any,
    strategies: str | Sequence[str],
    seeds: int | str | Sequence[int] = (0,),
    *,
    out_dir: str | Path | None = None,
    engine: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    parallel: int = 1,
) -> pd.DataFrame:
    """``protofed compare``: one row per run of the study folder with every summary key,
    ``status`` (ok | kept | failed | incomplete), ``this_call`` and ``run_dir``; the table is also
    written to ``<out>/comparison.csv``. A failed run does not raise: the others go on and its
    row says ``failed`` with the reason in ``error``. ``overwrite``: replace runs of another
    scenario in the run directories (as ``--overwrite``). ``parallel``: runs executed at once,
    each in its own process (as ``--parallel``; the numbers are those of a serial study)."""
    from .study.compare import labels_arg, run_compare
    from .study.executor import parallel_arg

    with _api_words():
        n = parallel_arg(parallel, "parallel=")
        path, out = _as_file(scenario, out_dir, overrides)
        df, _ = run_compare(
            path, labels_arg(",".join(_names(strategies))), _seeds(seeds), out_dir=out, engine=engine,
            sets=_override_texts(overrides), out=sys.stdout if progress else None, overwrite=overwrite, parallel=n,
        )
    return df


def sweep(
    scenario: Any,
    grid: Mapping[str, Sequence[Any]] | None = None,
    strategies: str | Sequence[str] | None = None,
    seeds: int | str | Sequence[int] | None = None,
    *,
    out_dir: str | Path | None = None,
    engine: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    parallel: int = 1,
) -> pd.DataFrame:
    """``protofed sweep``: every grid cell x strategy x seed; one row per run of the sweep folder
    (the swept keys as columns, then every summary key), also written to ``<out>/sweep.csv``.
    ``grid`` maps dotted keys to lists of values (a single value, not a list, is a one-value
    list; a text with a comma is refused: give a list); unset, the scenario's ``sweep:`` section
    gives grid, strategies and seeds. ``overwrite`` and ``parallel`` as in :func:`compare`."""
    from .study.executor import parallel_arg
    from .study.sweep import run_sweep

    with _api_words():
        n = parallel_arg(parallel, "parallel=")
        values = _grid(grid)
        path, out = _as_file(scenario, out_dir, overrides, "sweep")
        df, _ = run_sweep(
            path,
            grid=values,
            labels=_names(strategies) if strategies is not None else None,
            seeds=_seeds(seeds) if seeds is not None else None,
            out_dir=out, engine=engine, sets=_override_texts(overrides), out=sys.stdout if progress else None,
            overwrite=overwrite, parallel=n,
        )
    return df


def _grid(grid: Any) -> dict[str, list[Any]] | None:
    """``grid=`` as ``{dotted key: [values]}``: a single value counts as a one-value list; a text
    holding a comma, which ``--grid`` would split, is refused rather than guessed."""
    from .scenario import overridable_key_problem

    if grid is None:
        return None
    if not isinstance(grid, Mapping):
        shown = repr(grid) if len(repr(grid)) <= 60 else repr(grid)[:57] + "..."
        raise UserError.single("grid=", "grid", f"expected a mapping of dotted keys to lists of values, e.g. "
                                                f"grid={{'clients.partition.alpha': [0.1, 10]}}; got {type(grid).__name__} {shown}")
    problems, out = [], {}
    for key, values in grid.items():
        where = f"grid[{key!r}]"
        problem = overridable_key_problem(key) if isinstance(key, str) else "a key must be a dotted key text"
        if problem:
            problems.append(Problem(where, problem))
            continue
        if isinstance(values, str) and "," in values:
            problems.append(Problem(where, f"{values!r} is one text; give a list of values, e.g. [0.1, 10]"))
            continue
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            values = [values]  # one value
        values = [_plain(v) for v in values]
        if not values:
            problems.append(Problem(where, "give at least one value"))
            continue
        out[key] = values
    if problems:
        raise UserError("grid=", problems)
    return out


#: the command line's flags and the API's arguments that mean the same
_API_NAMES = {"--grid": "grid=", "--strategies": "strategies=", "--seeds": "seeds=", "--set": "overrides=",
              "--out": "out_dir=", "--overwrite": "overwrite="}


@contextmanager
def _api_words():
    """Errors of the shared compare/sweep code name the API's arguments, not the CLI's flags."""
    import re

    def words(text: str) -> str:
        return re.sub(r"--(grid|strategies|seeds|set|out|overwrite)\b", lambda m: _API_NAMES[m.group(0)], text)

    try:
        yield
    except UserError as exc:
        raise UserError(words(exc.source), [Problem(words(p.field), words(p.message)) for p in exc.problems]) from None
