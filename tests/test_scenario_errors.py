"""Bad scenario input: one clear screen naming the file and the dotted field, exit 2, no traceback,
nothing written (DESIGN.md §4 and §6).

Every bad-input case goes through the CLI's ``main`` in process; twelve distinct bad files also run
as ``python -m simulator.cli`` in a fresh process each (about 3 s of imports apiece, started together
by one module fixture so that they overlap). The rest of the checks call :mod:`simulator.scenario`
and the stream builder directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator.engine.runner import build_stream_checked
from simulator.errors import UserError
from simulator.scenario import (
    Scenario,
    apply_overrides,
    load_scenario,
    read_yaml,
    validate_scenario,
)

# A fast data source and a small model for scenarios that get as far as loading data.
# 4 classes x 20 samples, test_fraction 0.2 -> 16 training samples per class, 2 classes per task
# -> 32 training samples per task.
SYNTH = (
    "dataset: {source: synthetic, num_classes: 4, samples_per_class: 20, dim: 8}\n"
    "model: {backbone: mlp, embedding_dim: 8}\n"
)
SYNTH_DICT = {
    "dataset": {"source": "synthetic", "num_classes": 4, "samples_per_class": 20, "dim": 8},
    "model": {"backbone": "mlp", "embedding_dim": 8},
}


@dataclass(frozen=True)
class Case:
    id: str
    text: str | None  # YAML written to <id>.yaml; None: the file does not exist
    field: str  # the dotted field path the error must name (start of a problem line)
    command: str = "validate"  # "run" adds --engine inline --out out
    extra: tuple[str, ...] = ()  # more CLI arguments (e.g. --set)
    says: tuple[str, ...] = ()  # more substrings: what was wrong / what is allowed
    names: str | None = None  # what the first line must name instead of the file (e.g. --set)
    out_flag: bool = True  # run: pass --out out (else the scenario's output.dir decides)

    @property
    def filename(self) -> str:
        return f"{self.id}.yaml"


CASES = [
    Case("typo_top_level", "trainig: {lr: 0.1}\n", "trainig", says=("unknown key",)),
    Case("unknown_nested_key", SYNTH + "training: {epochs: 3}\n", "training.epochs", "run", says=("unknown key",)),
    Case("wrong_type", "clients: {num_clients: ten}\n", "clients.num_clients", says=("integer", "'ten'")),
    Case(
        "negative_alpha",
        SYNTH + "clients: {partition: {scheme: dirichlet, alpha: -1}}\n",
        "clients.partition.alpha",
        "run",
        says=("greater than 0", "-1"),
    ),
    Case(
        "unknown_scheme",
        "clients: {partition: {scheme: stripes}}\n",
        "clients.partition",
        says=("'stripes'", "allowed", "iid", "dirichlet", "pathological"),
    ),
    Case(
        "unknown_strategy",
        SYNTH + "strategy: {name: fedprox}\n",
        "strategy.name",
        "run",
        says=("'fedprox'", "allowed", "fedavg", "proto_avg"),
    ),
    Case("unknown_strategy_param", "strategy: {name: proto_avg, params: {foo: 1}}\n", "strategy.params.foo", says=("unknown key",)),
    Case(
        "unknown_source",
        "dataset: {source: cifar}\n",
        "dataset.source",
        says=("'cifar'", "allowed", "mnist1d", "synthetic", "npz"),
    ),
    Case(
        "npz_missing_file",
        "dataset: {source: npz, path: no_such_data.npz}\nmodel: {backbone: mlp}\n",
        "dataset.path",
        "run",
        says=("file not found", "no_such_data.npz"),
    ),
    Case(
        "class_order_not_permutation",
        SYNTH + "tasks: {class_order: [0, 1, 1, 5]}\n",
        "tasks.class_order",
        says=("missing [2, 3]", "repeated [1]", "out of range [5]"),
    ),
    Case(
        "tasks_both_sizes",
        "tasks: {classes_per_task: 2, num_tasks: 3}\n",
        "tasks:",
        says=("either classes_per_task or num_tasks",),
    ),
    Case("participation_zero", "clients: {participation: 0}\n", "clients.participation", says=("greater than 0",)),
    Case(
        "participation_above_one",
        SYNTH + "clients: {participation: 1.5}\n",
        "clients.participation",
        "run",
        says=("less than or equal to 1",),
    ),
    # a tab cannot start a YAML token: the error is on line 3
    Case("invalid_yaml", "name: fine\nseed: 1\n\tclients: 3\n", "line 3", says=("not valid YAML",)),
    Case("top_level_list", "- name: a\n- seed: 1\n", "(top level)", says=("mapping", "list")),
    Case("missing_file", None, "(top level)", "run", says=("file not found",)),
    Case(
        "iid_too_many_clients",
        SYNTH + "clients: {num_clients: 40, partition: {scheme: iid}}\n",
        "clients.num_clients",
        "run",
        says=("32 training samples for 40 clients",),
    ),
    Case(
        "dirichlet_min_size_impossible",
        SYNTH + "clients: {num_clients: 5, partition: {scheme: dirichlet, alpha: 0.5, min_size: 10}}\n",
        "clients.partition.min_size",
        says=("5 x 10 = 50",),
    ),
    Case(
        "set_not_key_value",
        SYNTH,
        "notakeyvalue",
        "run",
        extra=("--set", "notakeyvalue"),
        says=("expected KEY=VALUE",),
        names="--set",
    ),
    Case("set_negative_lr", SYNTH, "training.lr", "run", extra=("--set", "training.lr=-1"), says=("greater than 0", "-1")),
    # no --out: the run directory would be <output.dir>/../evil/...; nothing may appear anywhere
    Case(
        "name_path_trick",
        SYNTH + "name: ../evil\noutput: {dir: out}\n",
        "name",
        "run",
        says=("'../evil'",),
        out_flag=False,
    ),
]


# The cases also run in a real process (exit code, no traceback, ``__main__`` guard). Each costs
# about 3 s of imports, so only these; the in-process test below covers every case.
SUBPROCESS_CASES = [
    "typo_top_level",
    "unknown_nested_key",
    "negative_alpha",
    "unknown_strategy",
    "unknown_source",
    "npz_missing_file",
    "class_order_not_permutation",
    "invalid_yaml",
    "top_level_list",
    "iid_too_many_clients",
    "dirichlet_min_size_impossible",
    "name_path_trick",
]
BY_ID = {c.id: c for c in CASES}


def _argv(case: Case) -> list[str]:
    argv = [case.command, case.filename, *case.extra]
    if case.command == "run":
        argv += ["--engine", "inline"] + (["--out", "out"] if case.out_flag else [])
    return argv


def _prepare(root: Path, case: Case) -> Path:
    cwd = root / case.id
    cwd.mkdir(parents=True)
    if case.text is not None:
        (cwd / case.filename).write_text(case.text, encoding="utf-8")
    return cwd


def _run_case(root: Path, case: Case) -> tuple[Path, int, str, str]:
    cwd = _prepare(root, case)
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.cli", *_argv(case)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
    )
    return cwd, proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, tuple[Path, int, str, str]]:
    """Run the subprocess cases once, a few processes at a time (each spends its time importing)."""
    root = tmp_path_factory.mktemp("bad_scenarios")
    workers = max(2, min(8, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {cid: pool.submit(_run_case, root, BY_ID[cid]) for cid in SUBPROCESS_CASES}
        return {cid: f.result() for cid, f in futures.items()}


def check_reported(case: Case, cwd: Path, code: int, stdout: str, stderr: str) -> None:
    shown = f"exit {code}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert code == 2, shown
    assert "Traceback" not in stderr and "Traceback" not in stdout, shown
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), shown
    assert len(lines) <= 25, shown  # one screen
    assert (case.names or case.filename) in lines[0], shown
    # the field is named at the start of a problem line: "  clients.partition.alpha: ..."
    assert any(line.lstrip().startswith(case.field) for line in lines[1:]), shown
    for text in case.says:
        assert text in stderr, shown
    # nothing written: the case folder holds exactly what the test put there
    expected = {case.filename} if case.text is not None else set()
    assert {p.name for p in cwd.iterdir()} == expected, shown
    if case.command == "run":
        assert not (cwd / "out").exists()
        assert not (cwd / "results").exists()
    assert not (cwd.parent / "evil").exists()


def test_cases_are_distinct():
    assert len(CASES) >= 12 and len(SUBPROCESS_CASES) >= 12
    assert len(BY_ID) == len(CASES) and set(SUBPROCESS_CASES) <= set(BY_ID)
    inputs = [(c.text, c.extra) for c in CASES]
    assert len(set(inputs)) == len(inputs)
    bad_files = {BY_ID[cid].text for cid in SUBPROCESS_CASES if not BY_ID[cid].extra}
    assert None not in bad_files and len(bad_files) >= 12


@pytest.mark.parametrize("cid", SUBPROCESS_CASES)
def test_bad_scenario_subprocess(cid: str, cli_results):
    check_reported(BY_ID[cid], *cli_results[cid])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_scenario_in_process(case: Case, tmp_path: Path, monkeypatch, capsys):
    from simulator.cli import main

    cwd = _prepare(tmp_path, case)
    monkeypatch.chdir(cwd)
    code = main(_argv(case))
    out, err = capsys.readouterr()
    check_reported(case, cwd, code, out, err)


# --------------------------------------------------------------------------- unit level
def problems_of(exc: pytest.ExceptionInfo[UserError]) -> dict[str, str]:
    """field -> message (messages of one field joined with ' | ')."""
    out: dict[str, str] = {}
    for p in exc.value.problems:
        out[p.field] = f"{out[p.field]} | {p.message}" if p.field in out else p.message
    return out


# The documented defaults (DESIGN.md §4 lists the keys; more keys are welcome, so only these
# are pinned).
DEFAULTS = {
    "name": "scenario",
    "seed": 0,
    "dataset": {"source": "mnist1d", "test_fraction": 0.2, "num_samples": 4000, "data_seed": 42},
    "tasks": {"initial_classes": None, "classes_per_task": 2, "num_tasks": None, "class_order": "seeded"},
    "clients": {"num_clients": 10, "partition": {"scheme": "iid"}, "participation": 1.0},
    "training": {
        "rounds_per_task": 3,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0,
    },
    "model": {"backbone": "cnn1d", "embedding_dim": 64},
    "continual": {"backbone": "train", "feature_distillation": 0.0, "memory_per_class": 0},
    "strategy": {"name": "proto_avg", "params": {"share_weights": False}},
    "evaluation": {"protocol": "global", "every": "round"},
    "resources": {"engine": "ray", "num_cpus_per_client": 1, "num_gpus_per_client": 0.0},
    "output": {"dir": "results"},
}


def assert_contains(actual, expected, path="") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path or '(top)'}: {actual!r} is not a mapping"
        for key, value in expected.items():
            where = f"{path}.{key}" if path else key
            assert key in actual, f"{where} missing from {sorted(actual)}"
            assert_contains(actual[key], value, where)
    else:
        assert actual == expected and type(actual) is type(expected), f"{path}: {actual!r} != {expected!r}"


def test_defaults_are_filled_in(tmp_path: Path):
    s = validate_scenario({})
    assert isinstance(s, Scenario)
    resolved = s.resolved()
    assert_contains(resolved, DEFAULTS)
    assert resolved["clients"]["partition"] == {"scheme": "iid"}
    # an empty file (or one with only comments) is the same as {}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# all defaults\n", encoding="utf-8")
    assert load_scenario(empty).resolved() == resolved


def test_partial_sections_keep_the_other_defaults():
    s = validate_scenario({"clients": {"partition": {"scheme": "dirichlet"}}, "training": {"lr": 0.5}})
    assert s.clients.partition.scheme == "dirichlet"
    assert s.clients.partition.alpha == 0.5 and s.clients.partition.min_size == 1
    assert s.clients.num_clients == 10
    assert s.training.lr == 0.5 and s.training.batch_size == 32
    # the source's own defaults are resolved too
    s = validate_scenario(SYNTH_DICT)
    assert s.dataset.params() == {
        "num_classes": 4,
        "dim": 8,
        "samples_per_class": 20,
        "noise": 1.0,
        "class_sep": 3.0,
        "data_seed": 0,
    }


def test_all_problems_are_reported_together_with_the_source():
    with pytest.raises(UserError) as exc:
        validate_scenario(
            {"trainig": {}, "clients": {"num_clients": 0, "participation": 2}, "seed": -1}, "my.yaml"
        )
    probs = problems_of(exc)
    assert set(probs) == {"trainig", "clients.num_clients", "clients.participation", "seed"}
    text = exc.value.render()
    assert text.splitlines()[0] == "error: my.yaml"
    assert "  clients.num_clients: Input should be greater than or equal to 1 (got 0)" in text.splitlines()


@pytest.mark.parametrize(
    "data, field, fragment",
    [
        ({"dataset": {"source": "synthetic", "colour": 3}}, "dataset.colour", "unknown key"),
        ({"dataset": {"source": "npz"}}, "dataset.path", "required"),
        ({"dataset": {"test_fraction": 1.0}}, "dataset.test_fraction", "less than 1"),
        ({"model": {"backbone": "resnet"}}, "model.backbone", "allowed"),
        ({"resources": {"engine": "spark"}}, "resources.engine", "'ray' or 'inline'"),
        ({"evaluation": {"protocol": "both"}}, "evaluation.protocol", "'global' or 'local'"),
        ({"tasks": {"class_order": "random"}}, "tasks.class_order", "seeded"),
        ({"clients": {"partition": {"alpha": 0.5}}}, "clients.partition", "missing key 'scheme'"),
        ({"clients": {"partition": {"scheme": "iid", "alpha": 0.5}}}, "clients.partition.alpha", "unknown key"),
        ({"clients": "ten"}, "clients", "expected a mapping"),
        ({"strategy": {"name": "fedavg", "params": {"share_weights": True}}}, "strategy.params.share_weights", "unknown key"),
        ({"strategy": {"params": {"share_weights": "maybe"}}}, "strategy.params.share_weights", "bool"),
        ({"name": "a/b"}, "name", "pattern"),
        ({"name": ""}, "name", "pattern"),
    ],
)
def test_schema_errors_name_the_field(data, field, fragment):
    with pytest.raises(UserError) as exc:
        validate_scenario(data, "s.yaml")
    probs = problems_of(exc)
    assert field in probs, probs
    assert fragment in probs[field], probs


@pytest.mark.parametrize(
    "extra, field, fragment",
    [
        ({"tasks": {"initial_classes": 5}}, "tasks.initial_classes", "only 4 classes"),
        ({"tasks": {"classes_per_task": 5}}, "tasks.classes_per_task", "only 4 classes"),
        ({"tasks": {"num_tasks": 5}}, "tasks.num_tasks", "only 4 classes"),
        ({"tasks": {"class_order": [0, 1, 2]}}, "tasks.class_order", "missing [3]"),
        (
            {"clients": {"num_clients": 1, "partition": {"scheme": "pathological", "classes_per_client": 1}}},
            "clients.partition.classes_per_client",
            "classes_per_client >= 2",
        ),
        ({"clients": {"num_clients": 33}}, "clients.num_clients", "32 training samples for 33 clients"),
        (
            {"clients": {"num_clients": 4, "partition": {"scheme": "dirichlet", "min_size": 9}}},
            "clients.partition.min_size",
            "4 x 9 = 36",
        ),
    ],
)
def test_data_dependent_errors_name_the_field(extra, field, fragment):
    scenario = validate_scenario({**SYNTH_DICT, **extra}, "s.yaml")
    with pytest.raises(UserError) as exc:
        build_stream_checked(scenario, "s.yaml")
    assert exc.value.source == "s.yaml"
    probs = problems_of(exc)
    assert list(probs) == [field]
    assert fragment in probs[field], probs


def test_the_limits_themselves_are_accepted():
    # exactly num_clients x min_size samples and exactly one sample per iid client are fine
    ok = validate_scenario(
        {**SYNTH_DICT, "clients": {"num_clients": 4, "partition": {"scheme": "dirichlet", "min_size": 8}}}
    )
    stream = build_stream_checked(ok, "s.yaml")
    assert all(len(part) >= 8 for task in stream.train_indices for part in task)
    ok = validate_scenario({**SYNTH_DICT, "clients": {"num_clients": 32}})
    stream = build_stream_checked(ok, "s.yaml")
    assert all(len(part) == 1 for task in stream.train_indices for part in task)


def test_read_yaml_errors(tmp_path: Path):
    with pytest.raises(UserError) as exc:
        read_yaml(tmp_path / "nope.yaml")
    assert problems_of(exc) == {"": "file not found"}
    with pytest.raises(UserError) as exc:
        read_yaml(tmp_path)
    assert "is a directory" in exc.value.render()
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        read_yaml(bad)
    [(where, msg)] = problems_of(exc).items()
    assert where.startswith("line ") and msg.startswith("not valid YAML")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        read_yaml(scalar)
    assert "got int" in exc.value.render()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n", encoding="utf-8")
    assert read_yaml(empty) == {}
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError) as exc:
        read_yaml(binary)
    assert "cannot read" in exc.value.render()


def test_apply_overrides_parses_yaml_values_and_creates_keys():
    raw = {"training": {"lr": 0.1}, "clients": {"num_clients": 3}}
    out = apply_overrides(
        raw,
        [
            "clients.num_clients=20",
            "training.lr=0.5",
            "training.momentum = 0",  # spaces around the key are tolerated
            "continual.memory_per_class=7",  # a section that was absent
            "clients.partition.scheme=dirichlet",  # two levels created
            "clients.partition.alpha=1e6",  # YAML 1.1 reads this as a string; pydantic coerces it
            "strategy.params.share_weights=true",
            "tasks.class_order=[3, 2, 1, 0]",
            "name=my-run",
            "output.dir=a=b",  # only the first '=' splits
            "dataset.note=",
        ],
    )
    assert raw == {"training": {"lr": 0.1}, "clients": {"num_clients": 3}}  # input untouched
    assert out["clients"]["num_clients"] == 20 and isinstance(out["clients"]["num_clients"], int)
    assert out["training"]["lr"] == 0.5 and isinstance(out["training"]["lr"], float)
    assert out["training"]["momentum"] == 0
    assert out["continual"] == {"memory_per_class": 7}
    assert out["clients"]["partition"] == {"scheme": "dirichlet", "alpha": "1e6"}
    assert out["strategy"]["params"]["share_weights"] is True
    assert out["tasks"]["class_order"] == [3, 2, 1, 0]
    assert out["name"] == "my-run"
    assert out["output"]["dir"] == "a=b"
    assert out["dataset"]["note"] == ""
    assert apply_overrides({}, ["seed=3"]) == {"seed": 3}
    assert apply_overrides({}, ["a.b=off"]) == {"a": {"b": False}}  # YAML 1.1 booleans
    assert apply_overrides({}, ["a.b='off'"]) == {"a": {"b": "off"}}
    assert apply_overrides({}, ["a.b=[1, 2"]) == {"a": {"b": "[1, 2"}}  # not YAML: kept as text


def test_overrides_validate_like_the_file(tmp_path: Path):
    f = tmp_path / "s.yaml"
    f.write_text(SYNTH + "training: {lr: 0.1}\n", encoding="utf-8")
    s = load_scenario(f, ["training.lr=1e-3", "clients.num_clients=4", "tasks.class_order=sorted"])
    assert s.training.lr == pytest.approx(0.001)
    assert s.clients.num_clients == 4 and s.tasks.class_order == "sorted"
    with pytest.raises(UserError) as exc:
        load_scenario(f, ["training.lr=-1"])
    assert exc.value.source == f"--set training.lr=-1 (applied to {f})"  # the --set is wrong, not the file
    assert set(problems_of(exc)) == {"training.lr"}


@pytest.mark.parametrize(
    "raw, item, field, fragment",
    [
        ({"training": {"lr": 0.1}}, "training.lr.x=1", "training.lr.x", "'lr' is not a mapping"),
        ({"seed": 3}, "seed.value=1", "seed.value", "'seed' is not a mapping"),
        ({"tasks": {"class_order": [0, 1]}}, "tasks.class_order.first=0", "tasks.class_order.first", "not a mapping"),
        ({}, "notakeyvalue", "notakeyvalue", "expected KEY=VALUE"),
        ({}, "=3", "=3", "not a dotted key path"),
        ({}, "training..lr=3", "training..lr", "not a dotted key path"),
        ({}, "training.lr[0]=3", "training.lr[0]", "not a dotted key path"),
    ],
)
def test_bad_overrides(raw, item, field, fragment):
    with pytest.raises(UserError) as exc:
        apply_overrides(raw, [item])
    assert exc.value.source == "--set"
    probs = problems_of(exc)
    assert list(probs) == [field]
    assert fragment in probs[field]


def test_bad_overrides_are_reported_together():
    with pytest.raises(UserError) as exc:
        apply_overrides({"seed": 1}, ["a", "seed.x=1", "ok.key=1", "b"])
    assert list(problems_of(exc)) == ["a", "seed.x", "b"]
