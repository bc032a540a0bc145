"""Plugins through entry points, and scenario files that never execute code.

A tiny plugin package (one strategy, one dataset source, and a few broken entry points) is
written into tmp_path and really installed with pip, into a folder of its own that the
subprocesses put on ``PYTHONPATH`` (``pip install --target``): entry points are discovered from
its ``*.dist-info`` exactly as from site-packages, but the shared virtual environment is never
changed, so tests running at the same time (``protofed list``, the README reference table) do
not see the plugin and nothing is left behind if the test is killed. A fresh process is needed
anyway: the registries load plugins once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import yaml

from simulator import plugins
from simulator.cli import main
from simulator.data.sources import BUILTIN_SOURCES, SOURCES, SourceSpec
from simulator.plugins import Registry
from strategies import BUILTIN_STRATEGIES, STRATEGIES
from strategies import _check_plugin as check_strategy

REPO = Path(__file__).resolve().parents[1]

PLUGIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "protofed-demo-plugin"
version = "0.1.0"
requires-python = ">=3.11"

[project.entry-points."protofed.strategies"]
myavg = "protofed_demo_plugin:MyAvg"
broken = "protofed_demo_plugin_missing:Nothing"
notastrategy = "protofed_demo_plugin:NOT_A_STRATEGY"
fedavg = "protofed_demo_plugin:MyAvg"
"../evil" = "protofed_demo_plugin:MyAvg"

[project.entry-points."protofed.datasets"]
demo_blobs = "protofed_demo_plugin:demo_blobs"
broken_source = "protofed_demo_plugin:raises_on_load"

[tool.setuptools]
py-modules = ["protofed_demo_plugin"]
"""

PLUGIN_MODULE = '''\
"""A protofed plugin: a strategy (prototype averaging with a scale) and a dataset source."""

import os

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simulator.data.sources import ArrayDataset, SourceSpec, stratified_split
from strategies.base import StrategyParams
from strategies.proto_avg import ProtoAvg


def _mark(what):
    path = os.environ.get("PROTOFED_DEMO_MARKER")
    if path:
        with open(path, "a") as fh:
            fh.write(what + "\\n")


class MyAvgParams(StrategyParams):
    share_weights: bool = False
    scale: float = Field(1.0, gt=0.0, le=10.0, description="multiplies every merged prototype")


class MyAvg(ProtoAvg):
    name = "myavg"
    description = "demo plugin: prototype averaging, then scaled"
    Params = MyAvgParams

    def merge(self, server_round, uploads):
        super().merge(server_round, uploads)
        self.global_protos.vectors[...] *= self.params.scale
        _mark(f"merge {server_round} {len(uploads)}")


NOT_A_STRATEGY = 42


class BlobParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    num_classes: int = Field(4, ge=2, le=50)
    samples_per_class: int = Field(20, ge=4, le=1000)
    dim: int = Field(6, ge=1, le=64)


def _load(params, test_fraction, seed):
    rng = np.random.default_rng(1234)
    c, m, d = params.num_classes, params.samples_per_class, params.dim
    y = np.repeat(np.arange(c), m)
    x = rng.standard_normal((c, d))[y] * 4.0 + rng.standard_normal((c * m, d))
    train, test = stratified_split(y, test_fraction, seed)
    _mark(f"load {c} {m} {d}")
    return ArrayDataset(
        x[train].astype(np.float32), y[train].astype(np.int64), x[test].astype(np.float32),
        y[test].astype(np.int64), [f"blob{i}" for i in range(c)],
    )


def demo_blobs():
    return SourceSpec("demo_blobs", "demo plugin: well separated Gaussian blobs", BlobParams, _load)


def raises_on_load():
    raise RuntimeError("the demo source cannot start")
'''

SCENARIO = {
    "name": "plugin-demo",
    "seed": 3,
    "dataset": {"source": "demo_blobs", "num_classes": 4, "samples_per_class": 20, "dim": 6},
    "tasks": {"classes_per_task": 2},
    "clients": {"num_clients": 2},
    "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 8, "lr": 0.05},
    "model": {"backbone": "mlp", "embedding_dim": 8},
    "strategy": {"name": "myavg", "params": {"scale": 0.5}},
    "resources": {"engine": "inline"},
}


# --------------------------------------------------------------------------- the installed plugin
@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> dict:
    """The demo plugin, pip-installed into its own folder; the environment that sees it."""
    root = tmp_path_factory.mktemp("plugin")
    pkg = root / "protofed-demo-plugin"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "protofed_demo_plugin.py").write_text(PLUGIN_MODULE)
    site = root / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(pkg)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(site.glob("protofed_demo_plugin-0.1.0.dist-info/entry_points.txt")), sorted(p.name for p in site.iterdir())
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    return {"env": env, "root": root}


def cli(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


# Several CLI calls in one fresh process (each process spends seconds importing torch and Flower).
MANY = """
import contextlib, io, json, sys
from simulator.cli import main
results = {}
for key, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    results[key] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def calls(plugin) -> dict:
    """Every CLI call of this module with the plugin installed: the run in a process of its own
    (``python -m simulator.cli run``), the others through ``main()`` in one more fresh process."""
    root: Path = plugin["root"]
    env = dict(plugin["env"], PROTOFED_DEMO_MARKER=str(root / "marker.txt"))
    scen = root / "scen.yaml"
    scen.write_text(yaml.safe_dump(SCENARIO))
    bad = {}
    for key, over in {
        "broken_strategy": {"strategy": {"name": "broken"}},
        "wrong_type": {"strategy": {"name": "notastrategy"}},
        "broken_source": {"dataset": {"source": "broken_source"}},
        "bad_params": {"strategy": {"name": "myavg", "params": {"scale": 100.0}}},
    }.items():
        bad[key] = root / f"{key}.yaml"
        bad[key].write_text(yaml.safe_dump({**SCENARIO, **over}))
    jobs = {
        "list": ["list"],
        **{key: ["validate", str(path)] for key, path in bad.items()},
        "compare_broken": ["compare", str(scen), "--strategies", "myavg,broken", "--out", str(root / "cmp")],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        run = pool.submit(cli, env, root, "run", str(scen), "--engine", "inline", "--out", str(root / "out"))
        many = pool.submit(
            subprocess.run, [sys.executable, "-c", MANY, json.dumps(jobs)],
            capture_output=True, text=True, cwd=root, env=env, timeout=300,
        )
        run_proc, many_proc = run.result(), many.result()
    assert many_proc.returncode == 0, many_proc.stderr
    results = {
        key: subprocess.CompletedProcess(jobs[key], code, out, err)
        for key, (code, out, err) in json.loads(many_proc.stdout.strip().splitlines()[-1]).items()
    }
    results["run"] = run_proc
    results["root"] = root
    return results


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr


def test_a_scenario_runs_with_a_plugin_strategy_and_a_plugin_source(calls):
    proc, root = calls["run"], calls["root"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    no_traceback(proc)
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["strategy"] == "myavg" and summary["num_tasks"] == 2 and summary["num_clients"] == 2
    assert sorted(c for t in summary["task_classes"] for c in t) == [0, 1, 2, 3]  # the plugin's 4 classes
    config = yaml.safe_load((root / "out" / "config.yaml").read_text())
    assert config["dataset"] == {"source": "demo_blobs", "test_fraction": 0.2, "num_classes": 4, "samples_per_class": 20, "dim": 6}
    assert config["strategy"] == {"name": "myavg", "params": {"share_weights": False, "scale": 0.5}}
    marks = (root / "marker.txt").read_text().splitlines()
    # the plugin's own code ran: its loader (data of 4 classes x 20 x 6) and its merge, once per round
    assert "load 4 20 6" in marks
    assert [m for m in marks if m.startswith("merge")] == ["merge 1 2", "merge 2 2", "merge 3 2", "merge 4 2"]


def test_list_shows_the_plugins_and_the_broken_entry_points(calls):
    proc = calls["list"]
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert "myavg" in lines and "plugin: protofed-demo-plugin 0.1.0" in lines["myavg"] and "scale=1.0" in lines["myavg"]
    assert "demo_blobs" in lines and "plugin: protofed-demo-plugin 0.1.0" in lines["demo_blobs"]
    assert "plugin" not in lines["fedavg"]  # the built-in keeps its name
    for name in ("broken", "notastrategy", "../evil", "broken_source"):
        assert name not in lines
    err = proc.stderr
    assert "plugin entry point 'broken' = 'protofed_demo_plugin_missing:Nothing'" in err and "ModuleNotFoundError" in err
    assert "'notastrategy'" in err and "expected a subclass of strategies.base.FederatedStrategy, got 42" in err
    assert "'fedavg'" in err and "already taken by the built-in strategy" in err
    assert "'../evil'" in err and "invalid name" in err
    assert "'broken_source'" in err and "RuntimeError: the demo source cannot start" in err


@pytest.mark.parametrize(
    "key, says",
    [
        ("broken_strategy", ["strategy.name", "strategy 'broken' is not available", "failed to load", "protofed-demo-plugin"]),
        ("wrong_type", ["strategy.name", "'notastrategy'", "is not a valid strategy"]),
        ("broken_source", ["dataset.source", "dataset source 'broken_source' is not available", "cannot start"]),
        ("bad_params", ["strategy.params.scale", "less than or equal to 10"]),
    ],
)
def test_a_scenario_naming_a_broken_plugin_is_a_clear_error(calls, key, says):
    proc = calls[key]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    no_traceback(proc)
    assert proc.stderr.startswith("error: ")
    for fragment in says:
        assert fragment in proc.stderr, proc.stderr


def test_compare_names_the_broken_plugin_and_writes_nothing(calls):
    proc, root = calls["compare_broken"], calls["root"]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    no_traceback(proc)
    assert "plugin entry point 'broken'" in proc.stderr
    assert not (root / "cmp").exists()


def test_this_process_does_not_see_the_plugin(plugin):
    """The plugin lives in its own folder: the shared environment (and this process) is unchanged."""
    assert "myavg" not in STRATEGIES and "demo_blobs" not in SOURCES


# --------------------------------------------------------------------------- the registry itself
class FakeDist:
    metadata = {"Name": "fake-pkg"}
    version = "9.9"


def fake_entry_points(monkeypatch, group: str, entries: dict[str, str]) -> None:
    eps = [EntryPoint(name, value, group)._for(FakeDist()) for name, value in entries.items()]
    monkeypatch.setattr(plugins, "entry_points", lambda group: [e for e in eps if e.group == group])


def test_registry_loads_once_lazily_and_checks_every_entry(monkeypatch):
    fake_entry_points(
        monkeypatch,
        "protofed.strategies",
        {
            "proto_avg": "strategies.proto_avg:ProtoAvg",  # taken by the built-in
            "renamed": "strategies.proto_avg:ProtoAvg",  # class name 'proto_avg' != 'renamed'
            "sources": "simulator.data.sources:SOURCES",  # not a class
            "nomodule": "no_such_module_xyz:Thing",
            "a b": "strategies.proto_avg:ProtoAvg",  # not a safe name
        },
    )
    reg = Registry(dict(BUILTIN_STRATEGIES), "protofed.strategies", "strategy", check_strategy)
    assert reg._state == "new"  # nothing loaded before the first read
    assert set(reg) == set(BUILTIN_STRATEGIES)
    assert reg._state == "loaded"
    problems = reg.problems
    assert set(problems) == {"proto_avg", "renamed", "sources", "nomodule", "a b"}
    assert "already taken by the built-in strategy" in problems["proto_avg"].message
    assert "must equal the entry point name 'renamed'" in problems["renamed"].message
    assert "expected a subclass" in problems["sources"].message
    assert "ModuleNotFoundError" in problems["nomodule"].message
    assert "invalid name" in problems["a b"].message
    assert problems["nomodule"].describe().startswith(
        "plugin entry point 'nomodule' = 'no_such_module_xyz:Thing' (group protofed.strategies from package fake-pkg 9.9)"
    )
    assert reg.unknown("nomodule").startswith("strategy 'nomodule' is not available: plugin entry point 'nomodule'")
    assert reg.unknown("zzz").startswith("unknown strategy 'zzz'; allowed: ")


def test_registry_adds_a_good_plugin(monkeypatch):
    fake_entry_points(monkeypatch, "protofed.datasets", {"digits2": f"{__name__}:digits2"})
    reg = Registry(dict(BUILTIN_SOURCES), "protofed.datasets", "dataset source", SOURCES._check)
    assert "digits2" in reg and reg["digits2"].name == "digits2"
    assert reg.plugins == {"digits2": "fake-pkg 9.9"}
    assert sorted(reg) == sorted([*BUILTIN_SOURCES, "digits2"]) and len(reg) == len(BUILTIN_SOURCES) + 1
    assert dict(reg)["digits2"] is reg.get("digits2")


def digits2() -> SourceSpec:
    spec = BUILTIN_SOURCES["digits"]
    return SourceSpec("digits2", "digits again", spec.params_model, spec.load)


# --------------------------------------------------------------------------- no code in scenario files
TAGS = [
    '!!python/object/apply:os.system ["echo pwned > {marker}"]',
    '!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
    "!!python/name:os.system",
    "!!python/module:os",
    '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("where", ["top", "value", "set"])
def test_python_tags_are_refused_and_run_nothing(tmp_path: Path, capsys, tag: str, where: str):
    marker = tmp_path / "pwned"
    payload = tag.format(marker=marker)
    path = tmp_path / "scen.yaml"
    sets: list[str] = []
    if where == "top":
        path.write_text(payload + "\n")
    elif where == "value":
        path.write_text(f"name: x\nstrategy:\n  name: proto_avg\n  params:\n    share_weights: {payload}\n")
    else:
        path.write_text("name: x\n")
        sets = [f"--set=seed={payload}"]
    for command in (["validate", str(path)], ["run", str(path), "--engine", "inline", "--out", str(tmp_path / "out")]):
        assert main([*command, *sets]) == 2
        _, err = capsys.readouterr()
        assert err.startswith("error: ") and "Traceback" not in err, err
        if where != "set":
            assert "could not determine a constructor for the tag" in err, err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
