"""The ``protofed`` command.

Bad input (scenario file, flags, data on disk) prints one screen naming the file and the field
and exits with code 2, never a traceback. A run that fails for another reason exits with 1;
Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import RunFailure, UserError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _raw_scenario(path: str, strategy: str | None, seed: int | None, sets: Sequence[str]) -> dict[str, Any]:
    from .scenario import apply_overrides, read_yaml

    raw = read_yaml(path)
    if strategy is not None:  # first: the file's params of another strategy go, --set's stay
        current = raw.get("strategy") if isinstance(raw.get("strategy"), dict) else {}
        params = current.get("params", {}) if current.get("name", "proto_avg") == strategy else {}
        raw["strategy"] = {"name": strategy, "params": params}
    if sets:
        raw = apply_overrides(raw, list(sets))
    if seed is not None:
        raw["seed"] = seed
    return raw


def load_for_cli(path: str, strategy: str | None = None, seed: int | None = None, sets: Sequence[str] = ()):
    from .scenario import blame_overrides, validate_scenario

    raw = _raw_scenario(path, strategy, seed, sets)
    try:
        return validate_scenario(raw, path)
    except UserError as exc:  # a bad --set, --strategy or --seed is named as such, not as a mistake in the file
        before = {"strategy.name": f"--strategy {strategy}"} if strategy is not None else {}
        after = {"seed": f"--seed {seed}"} if seed is not None else {}
        raise blame_overrides(exc, path, list(sets), before, after) from None


def set_overrides(path: str, scenario, strategy: str | None = None, seed: int | None = None, sets: Sequence[str] = ()) -> dict[str, Any]:
    """What ``--set`` changed in the resolved scenario (dotted key -> value): recorded in
    config.yaml and hashed into the default results path."""
    from .errors import UserError as _UserError
    from .study.run_dirs import overrides_of
    from .scenario import validate_scenario

    if not sets:
        return {}
    try:
        base = validate_scenario(_raw_scenario(path, strategy, seed, ()), path).resolved()
    except _UserError:  # the file alone is incomplete; --set completes it
        base = None
    return overrides_of(base, scenario.resolved())


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    def fmt(v: Any) -> str:
        return "n/a" if v is None or (isinstance(v, float) and v != v) else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = [
        ("final average accuracy", summary.get("final_avg_accuracy")),
        ("average incremental accuracy", summary.get("avg_incremental_accuracy")),
        ("average forgetting", summary.get("avg_forgetting")),
        ("backward transfer (BWT)", summary.get("bwt")),
        ("bytes up / down", f"{summary.get('bytes_up', 0):,} / {summary.get('bytes_down', 0):,}"),
        ("wall time (s)", summary.get("wall_seconds")),
    ]
    print()
    print(f"summary ({summary.get('protocol', 'global')} protocol)")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {fmt(value)}")
    print(f"run directory: {run_dir}")


def _resume_target(args: argparse.Namespace):
    """The scenario recorded in a run directory, for ``--resume``."""
    from .engine.checkpoint import has_checkpoint
    from .scenario import validate_scenario

    run_dir = Path(args.resume)
    config = run_dir / "config.yaml"
    if not config.exists():
        raise UserError.single(args.resume, "--resume", "not a run directory (no config.yaml)")
    if args.scenario or args.strategy or args.seed is not None or args.set or args.out:
        raise UserError.single(
            "--resume", "--resume", "resumes with the scenario recorded in the run directory; give no SCENARIO, --strategy, --seed, --set or --out"
        )
    from .study.run_dirs import read_recorded

    raw = read_recorded(config)
    summary = run_dir / "summary.json"
    if summary.exists():
        import json

        if json.loads(summary.read_text()).get("completed"):
            return None, run_dir
    from .study.supervisor import earlier_retries

    if not has_checkpoint(run_dir) and not earlier_retries(run_dir):  # a retry has said so already
        print(f"no checkpoint in {run_dir} (no task finished yet): starting the run again", file=sys.stderr)
    return validate_scenario(raw, str(config)), run_dir


def cmd_run(args: argparse.Namespace) -> int:
    from .engine.runner import run_scenario

    if args.resume:
        scenario, run_dir = _resume_target(args)
        if scenario is None:
            print(f"{run_dir} is already complete: nothing to resume")
            return 0
        source = str(run_dir / "config.yaml")
        overrides = None
    else:
        if not args.scenario:
            raise UserError.single("protofed run", "SCENARIO", "give a scenario file (or --resume RUN_DIR)")
        scenario = load_for_cli(args.scenario, args.strategy, args.seed, args.set)
        overrides = set_overrides(args.scenario, scenario, args.strategy, args.seed, args.set)
        run_dir, source = (Path(args.out) if args.out else None), args.scenario
    if args.ray_address:
        scenario.resources.ray_address = args.ray_address
    outcome = run_scenario(
        scenario,
        source=source,
        run_dir=run_dir,
        engine=args.engine,
        verbose=args.verbose,
        out=sys.stdout,
        resume=bool(args.resume),
        overwrite=bool(args.overwrite),
        overrides=overrides,
    )
    _print_summary(outcome.summary, outcome.run_dir)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .study.compare import labels_arg, run_compare, seeds_arg, this_call_failed

    parallel = _parallel(args)
    df, _ = run_compare(
        args.scenario,
        labels_arg(args.strategies),
        seeds_arg(args.seeds),
        out_dir=args.out,
        engine=args.engine,
        sets=args.set,
        verbose=args.verbose,
        out=sys.stdout,  # the current one (a default argument keeps the stream of the first import)
        overwrite=args.overwrite,
        parallel=parallel,
    )
    return 1 if this_call_failed(df) else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .study.compare import labels_arg, seeds_arg, this_call_failed
    from .study.sweep import grid_arg, run_sweep

    parallel = _parallel(args)
    df, _ = run_sweep(
        args.scenario,
        grid=grid_arg(args.grid) if args.grid else None,
        labels=labels_arg(args.strategies) if args.strategies else None,
        seeds=seeds_arg(args.seeds) if args.seeds else None,
        out_dir=args.out,
        engine=args.engine,
        sets=args.set,
        verbose=args.verbose,
        out=sys.stdout,
        overwrite=args.overwrite,
        parallel=parallel,
    )
    return 1 if this_call_failed(df) else 0


def _parallel(args: argparse.Namespace) -> int:
    """``--parallel N``; ``--ray-address`` becomes every run's ``resources.ray_address``
    (result-neutral: the study folder stays the same)."""
    import json

    from .study.executor import parallel_arg

    if args.ray_address:
        args.set = [*args.set, f"resources.ray_address={json.dumps(args.ray_address)}"]
    return parallel_arg(args.parallel)


def cmd_bench(args: argparse.Namespace) -> int:
    from .study.bench import run_bench

    scenario = load_for_cli(args.scenario, None, None, args.set)
    if args.ray_address:
        scenario.resources.ray_address = args.ray_address
    out_dir = Path(args.out) if args.out else Path(scenario.output.dir) / scenario.name / "bench"
    run_bench(scenario, source=args.scenario, out_dir=out_dir, verbose=args.verbose)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .engine.runner import build_stream_checked

    scenario = load_for_cli(args.scenario, None, None, args.set)
    try:
        stream = build_stream_checked(scenario, args.scenario)
    except UserError as exc:
        from .data.sources import SOURCES

        fields = {p.field for p in exc.problems}
        if getattr(SOURCES[scenario.dataset.source], "downloadable", False) and fields <= {"dataset.root"}:
            # the scenario is valid; only the dataset files are not on this machine yet
            print(f"ok: {scenario.name}: the scenario is valid, but its data is not here yet:")
            for p in exc.problems:
                print(f"  {p.field}: {p.message}")
            return 0
        raise
    from .engine.runner import _check_privacy, check_strategy_setup

    check_strategy_setup(scenario, stream, args.scenario)  # e.g. fedsa text anchors: class names, text model
    _check_privacy(scenario, stream.num_tasks, args.scenario)  # privacy budget, secure-aggregation support
    print(
        f"ok: {scenario.name}: {stream.num_tasks} tasks {[len(t) for t in stream.tasks]} classes, "
        f"{scenario.clients.num_clients} clients, strategy {scenario.strategy.name}"
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .report.figure_style import PLOT_FORMATS, with_formats

    formats = [f.strip() for item in (args.format or []) for f in item.split(",") if f.strip()]
    bad = [f for f in formats if f not in PLOT_FORMATS]
    if bad:
        raise UserError.single("--format", "--format", f"unknown format {bad[0]!r}; allowed: {', '.join(PLOT_FORMATS)}")
    if formats and "png" not in formats:
        formats.insert(0, "png")  # the PNGs are what the docs and the run directory show
    with with_formats(formats or None):
        return _plot(args)


def _plot(args: argparse.Namespace) -> int:
    from .report.plots import plot_run
    from .results import is_run_dir

    target = Path(args.dir)
    if not target.is_dir():
        raise UserError.single(args.dir, "", "not a directory")
    run_dirs = [target] if is_run_dir(target) else sorted(p.parent for p in target.rglob("summary.json"))
    if not run_dirs:
        raise UserError.single(args.dir, "", "holds no run directory (no summary.json or metrics.csv)")
    for rd in run_dirs:
        try:
            for p in plot_run(rd):
                print(p)
        except FileNotFoundError as exc:
            raise UserError.single(str(rd), "", str(exc)) from None
    table = target / "comparison.csv"
    if table.exists():  # a compare directory: redraw its two comparison plots as well
        import pandas as pd

        from .study.compare import OK_STATUSES
        from .report.plots import plot_compare

        df = pd.read_csv(table)
        ok = df[df["status"].isin(OK_STATUSES)]
        for p in plot_compare(ok, [Path(x) for x in ok["run_dir"]], list(ok["label"]), target):
            print(p)
    if (target / "sweep.csv").exists():  # a sweep directory: redraw its figure
        from .study.sweep import read_sweep
        from .report.sweep_plots import plot_sweep

        df, keys = read_sweep(target)
        for p in plot_sweep(df, keys, target, columns=args.columns):
            print(p)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .report.schema_doc import reference_rows, terminal_reference

    key = args.key.strip().strip(".") if args.key else None
    text = terminal_reference(key)
    if text is None:
        from .scenario import did_you_mean

        keys = sorted({r[0] for r in reference_rows()} | {r[0].rsplit(".", 1)[0] for r in reference_rows() if "." in r[0]})
        raise UserError.single("protofed schema", args.key, "no such scenario key" + did_you_mean(key or "", keys))
    print(text)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .privacy.attack import run_attack

    target = Path(args.dir)
    if not target.is_dir():
        raise UserError.single(args.dir, "", "not a directory")
    result = run_attack(target)
    t = result["tracing"]
    if t.get("releases"):
        print(f"tracing attack: AUC {t['auc']:.3f} · TPR at 1% FPR {t['tpr_at_1pct_fpr']:.3f} · "
              f"{t['releases']} releases, {t['members']} members, {t['non_members']} non-members")
    else:
        print("tracing attack: no release with enough held-out samples to score")
    inv = result["feature_inversion"]
    if isinstance(inv, dict) and inv.get("releases"):
        print(f"feature inversion: nearest real sample is a member for {inv['top1_member_rate']:.2f} of "
              f"{inv['releases']} releases (chance {inv['top1_chance']:.2f}, inverting the reference mean "
              f"{inv['top1_member_rate_baseline']:.2f})")
    print(target / "attack.json")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from strategies import STRATEGIES

    from .data.sources import SOURCES
    from .learner.backbones import BACKBONES
    from .scenario import PARTITION_SCHEMES

    def origin(registry: Any, name: str) -> str:
        return f"  (plugin: {registry.plugins[name]})" if name in registry.plugins else ""

    print("strategies:")
    for name, cls in sorted(STRATEGIES.items()):
        params = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items()) or "-"
        print(f"  {name:<12} {cls.description}  [params: {params}]{origin(STRATEGIES, name)}")
    print("dataset sources:")
    for name, spec in sorted(SOURCES.items()):
        print(f"  {name:<12} {spec.description}{origin(SOURCES, name)}")
    print("partition schemes:")
    for name in PARTITION_SCHEMES:
        print(f"  {name}")
    print("backbones:")
    for name, b in sorted(BACKBONES.items()):
        print(f"  {name:<12} {b.description}{origin(BACKBONES, name)}")
    broken = [*STRATEGIES.problems.values(), *SOURCES.problems.values(), *BACKBONES.problems.values()]  # type: ignore[attr-defined]
    if broken:  # installed but unusable plugins: listed, not fatal (scenarios that name them get the same error)
        print("warning: plugins left out:", file=sys.stderr)
        for p in broken:
            print(f"  {p.describe()}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protofed", description="Federated class-incremental learning with prototypes.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key, e.g. training.lr=0.01")

    r = sub.add_parser("run", help="run one scenario")
    r.add_argument("scenario", nargs="?")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last task checkpoint")
    r.add_argument("--strategy", help="strategy name (overrides strategy.name)")
    r.add_argument("--seed", type=int)
    r.add_argument("--engine", choices=["ray", "inline"])
    r.add_argument("--out", help="run directory (default <output.dir>/<name>/<strategy>/seed-<seed>)")
    r.add_argument("--ray-address", help="connect to an existing Ray cluster (resources.ray_address)")
    r.add_argument("--verbose", action="store_true", help="show Flower and Ray logs")
    r.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    common(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="run several strategies (or compare: labels) over several seeds")
    c.add_argument("scenario")
    c.add_argument("--strategies", required=True, help="comma-separated strategy names or labels from the scenario's compare: section")
    c.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    c.add_argument("--engine", choices=["ray", "inline"])
    c.add_argument("--out", help="output folder (default <output.dir>/<name>)")
    c.add_argument("--verbose", action="store_true")
    c.add_argument("--overwrite", action="store_true", help="replace runs of other scenarios found in the run directories")
    _study_flags(c)
    common(c)
    c.set_defaults(func=cmd_compare)

    sw = sub.add_parser("sweep", help="run a grid of scenario values x strategies x seeds (resumable)")
    sw.add_argument("scenario")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="a swept scenario key and its values (repeat for a 2-D grid); default: the scenario's sweep: section")
    sw.add_argument("--strategies", help="comma-separated strategy names or compare: labels (default: sweep.strategies)")
    sw.add_argument("--seeds", help="comma-separated seeds (default: sweep.seeds)")
    sw.add_argument("--engine", choices=["ray", "inline"])
    sw.add_argument("--out", help="output folder (default <output.dir>/<name>/sweep; <name>-set-<hash> with --set)")
    sw.add_argument("--verbose", action="store_true")
    sw.add_argument("--overwrite", action="store_true", help="replace runs of other scenarios found in the run directories")
    _study_flags(sw)
    common(sw)
    sw.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", help="run a scenario on the inline and the Ray engine and compare where the time goes")
    b.add_argument("scenario")
    b.add_argument("--out", help="output folder (default <output.dir>/<name>/bench)")
    b.add_argument("--ray-address", help="connect to an existing Ray cluster")
    b.add_argument("--verbose", action="store_true")
    common(b)
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("validate", help="check a scenario file (and its data) without running it")
    v.add_argument("scenario")
    common(v)
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plot", help="(re)draw the plots of a run directory (or of every run under a folder)")
    pl.add_argument("dir")
    pl.add_argument("--format", action="append", metavar="FMT[,FMT]",
                    help="also write the plots as pdf and/or svg (vector graphics, text kept as text); default: output.plot_formats")
    pl.add_argument("--columns", type=int, choices=(1, 2, 4), default=None,
                    help="a sweep's figure: panels per row (1: stacked at the width of one column of a paper; default: all in one row)")
    pl.set_defaults(func=cmd_plot)

    sc = sub.add_parser("schema", help="the scenario reference: every key (or the keys under KEY) with default and allowed values")
    sc.add_argument("key", nargs="?", help="a dotted key or section, e.g. clients.partition or training.lr")
    sc.set_defaults(func=cmd_schema)

    at = sub.add_parser("attack", help="leakage attacks on what the server received (runs with privacy.keep_uploads) -> attack.json")
    at.add_argument("dir")
    at.set_defaults(func=cmd_attack)

    ls = sub.add_parser("list", help="strategies, dataset sources, partition schemes, backbones")
    ls.set_defaults(func=cmd_list)
    return p


def _study_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--parallel", default="1", metavar="N",
                    help="run N runs of the study at once, each in its own process (default 1); on Ray they share one cluster")
    sp.add_argument("--ray-address", help="run the study on an existing Ray cluster (every run's resources.ray_address)")


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that every ``finally`` writes what was finished."""


def _on_sigterm(signum, frame) -> None:  # pragma: no cover - exercised through a subprocess test
    raise Terminated()


def _stop_ray() -> None:
    from .engine.ray_engine import stop_ray

    stop_ray()


def main(argv: Sequence[str] | None = None) -> int:
    from .study.supervisor import report_status

    try:
        code = _main(argv)
    except SystemExit as exc:  # argparse's usage errors and --help
        report_status(exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2))
        raise
    report_status(code)
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        from .paths import check_path_arg

        for flag in ("out", "resume"):
            check_path_arg(getattr(args, flag, None), f"--{flag}")
        return int(args.func(args) or 0)
    except UserError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except RunFailure as exc:
        print(f"error: the run failed: {exc}", file=sys.stderr)
        print("results so far are kept in the run directory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        from .engine import runner
        from .study.supervisor import report_status

        if runner.ACTIVE_RUN_DIR is not None:
            hint = f"continue with `protofed run --resume {runner.ACTIVE_RUN_DIR}`"
        else:  # a study (its runs ran in other processes) or nothing started yet
            hint = "run the same command again to continue (finished runs are kept, an interrupted one resumes)"
        print(f"\ninterrupted: finished tasks are kept; {hint}", file=sys.stderr)
        report_status(code)  # before shutting Ray down, which can itself crash on the way out
        _stop_ray()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # Flower's server thread may still wait on replies that will never come
    except BrokenPipeError:  # the reader went away (`protofed schema | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # not bad input (that is a UserError, exit 2) but a bug: say so, exit 1
        if os.environ.get("PROTOFED_DEBUG"):
            raise
        print(f"error: internal error, a bug in protofed: {type(exc).__name__}: {str(exc)[:500]}", file=sys.stderr)
        print(f"  please report it with the traceback, kept in {_crash_report()} (PROTOFED_DEBUG=1 prints it)", file=sys.stderr)
        _stop_ray()
        return 1


def _crash_report() -> str:
    """Write the traceback of the exception being handled to a temp file; its path."""
    import tempfile
    import traceback

    try:
        with tempfile.NamedTemporaryFile("w", prefix="protofed-crash-", suffix=".txt", delete=False) as f:
            traceback.print_exc(file=f)
            return f.name
    except OSError:
        return "(no file: the temp folder is not writable)"


def entry() -> None:
    """Console-script entry point: commands that may start Ray run under a supervisor
    (:mod:`simulator.study.supervisor`), so that Ray's own death ends with a protofed message."""
    from .study.supervisor import supervise, wants_supervision

    argv = sys.argv[1:]
    sys.exit(supervise(argv) if wants_supervision(argv) else main(argv))


if __name__ == "__main__":  # pragma: no cover
    entry()
