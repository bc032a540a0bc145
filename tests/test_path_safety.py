"""Nothing in a scenario can make protofed write outside the chosen output directory.

The rule: ``output.dir`` (scenario) and ``--out`` (command line) *are* the user's choice of where
results go, so they are taken as given (absolute or relative). Everything below them is built
only from validated components: ``<output.dir>/<name>/<strategy>/seed-<seed>`` for ``run``,
``<output.dir>/<name>/<label>/seed-<seed>`` for ``compare``, where ``name`` and compare labels
match ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}`` (so never ``..``, a slash, a backslash or a unicode
look-alike), a strategy is a registry name (plugin entry-point names are checked against the
same pattern, see test_plugins.py) and a seed is a non-negative integer.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cli import main
from simulator.engine.runner import default_run_dir
from simulator.scenario import NAME_PATTERN, validate_scenario
from strategies import STRATEGIES

FAST = {
    "dataset": {"source": "synthetic", "num_classes": 4, "samples_per_class": 12, "dim": 4},
    "model": {"backbone": "mlp", "embedding_dim": 8},
    "clients": {"num_clients": 2},
    "training": {"rounds_per_task": 1, "batch_size": 8},
    "resources": {"engine": "inline"},
}

BAD_NAMES = [
    "../evil",
    "..",
    ".",
    "/abs",
    "/tmp/evil",
    "a/b",
    "a/../../evil",
    "a\\b",
    "..\\evil",
    "a\u2215b",  # DIVISION SLASH
    "a\u2044b",  # FRACTION SLASH
    "a\uff0fb",  # FULLWIDTH SOLIDUS
    "\uff0e\uff0e",  # FULLWIDTH FULL STOPs
    "evil\n",
    "evil\x00",
    "~",
    "~/evil",
    "$HOME",
    "-rf",
    "",
    " evil",
    "a" * 101,
]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch) -> Path:
    """A working directory inside tmp_path (so that ``..`` from it still lands in tmp_path, where
    a stray write would be seen)."""
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    return work


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


@pytest.mark.parametrize("name", BAD_NAMES, ids=[ascii(n)[1:-1][:20] or "empty" for n in BAD_NAMES])
def test_a_bad_name_in_the_file_is_refused_and_writes_nothing(sandbox: Path, tmp_path: Path, capsys, name: str):
    scen = write(sandbox / "scen.yaml", {**FAST, "name": name, "output": {"dir": "results"}})
    before = snapshot(tmp_path)
    for argv in (["validate", str(scen)], ["run", str(scen)], ["compare", str(scen), "--strategies", "proto_avg"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2, err
        assert err.startswith(f"error: {scen}") and "  name: String should match pattern" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", "a\u2215b"])
def test_a_bad_name_through_set_is_refused(sandbox: Path, tmp_path: Path, capsys, name: str):
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "fine"})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "run", str(scen), f"--set=name={name}")
    assert code == 2 and "name: String should match pattern" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("label", ["../evil", "a/b", "..", "/abs", "a\u2215b", "\uff0e\uff0e"])
def test_compare_labels_cannot_be_paths(sandbox: Path, tmp_path: Path, capsys, label: str):
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "fine", "compare": {label: {"name": "fedavg"}}})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "compare", str(scen), "--strategies", label)
    assert code == 2 and "compare" in err and "letters, digits, . _ - only" in err, err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("strategy", ["../evil", "a/b", "..", "/abs"])
def test_strategy_names_come_from_the_registry_only(sandbox: Path, tmp_path: Path, capsys, strategy: str):
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "fine"})
    scen2 = write(sandbox / "s2.yaml", {**FAST, "strategy": {"name": strategy}})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "run", str(scen), "--strategy", strategy)
    assert code == 2 and f"unknown strategy {strategy!r}" in err, err
    code, err = run_cli(capsys, "compare", str(scen), "--strategies", strategy)
    assert code == 2 and "unknown strategy or compare label" in err, err
    code, err = run_cli(capsys, "run", str(scen2))
    assert code == 2 and "strategy.name" in err, err
    assert snapshot(tmp_path) == before


def test_a_negative_seed_cannot_change_the_path(sandbox: Path, tmp_path: Path, capsys):
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "fine"})
    before = snapshot(tmp_path)
    for argv in (["run", str(scen), "--seed", "-1"], ["compare", str(scen), "--strategies", "proto_avg", "--seeds", "-1"]):
        code, err = run_cli(capsys, *argv)
        assert code == 2, err
    assert snapshot(tmp_path) == before


@settings(max_examples=200, deadline=None)
@given(
    name=st.from_regex(NAME_PATTERN, fullmatch=True),
    strategy=st.sampled_from(sorted(STRATEGIES)),
    seed=st.integers(0, 2**31 - 1),
    out=st.sampled_from(["results", "/abs/results", "../up/results", "a/../b", "."]),
)
def test_every_valid_run_dir_is_three_levels_inside_output_dir(name: str, strategy: str, seed: int, out: str):
    scenario = validate_scenario({"name": name, "seed": seed, "strategy": {"name": strategy}, "output": {"dir": out}})
    run_dir = default_run_dir(scenario)
    base = Path(os.path.normpath(out))
    normal = Path(os.path.normpath(run_dir))
    assert normal.parent.parent.parent == base, (run_dir, base)
    assert normal.parts[-3:] == (name, strategy, f"seed-{seed}")
    assert all(re.fullmatch(NAME_PATTERN, p) for p in normal.parts[-3:])


def test_an_absolute_output_dir_is_the_users_choice(sandbox: Path, tmp_path: Path, capsys):
    """``output.dir`` may be absolute (or go up with ``..``): it names the results folder itself,
    and the run lands exactly three validated levels below it."""
    chosen = tmp_path / "chosen"
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "n1", "seed": 4, "output": {"dir": str(chosen)}})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "run", str(scen))
    assert code == 0, err
    created = snapshot(tmp_path) - before
    run_dir = chosen / "n1" / "proto_avg" / "seed-4"
    assert (run_dir / "summary.json").is_file()
    assert all(Path(tmp_path / p).is_relative_to(chosen) for p in created), sorted(created)


def test_out_is_the_run_directory_itself(sandbox: Path, tmp_path: Path, capsys):
    """``--out`` is taken as given (it is the run directory) and nothing is written beside it."""
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "n2", "output": {"dir": "unused"}})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "run", str(scen), "--out", "../mine")
    assert code == 0, err
    created = snapshot(tmp_path) - before
    mine = sandbox.parent / "mine"
    assert (mine / "summary.json").is_file() and not (sandbox / "unused").exists()
    assert all(Path(tmp_path / p).is_relative_to(mine) for p in created), sorted(created)


def test_out_below_a_file_is_a_clear_error(sandbox: Path, tmp_path: Path, capsys):
    (sandbox / "afile").write_text("x")
    scen = write(sandbox / "scen.yaml", {**FAST, "name": "n3"})
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "run", str(scen), "--out", "afile/run")
    assert code == 2 and "is not a directory" in err, err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- paths the filesystem refuses
UNUSABLE = {"nul": "a\x00b", "long_name": "x" * 300, "long_path": "/".join(["y" * 200] * 30)}


@pytest.mark.parametrize("key", sorted(UNUSABLE))
@pytest.mark.parametrize("field", ["output.dir", "resources.state_dir", "--out", "--resume", "compare --out"])
def test_unusable_paths_are_a_clear_error(sandbox: Path, tmp_path: Path, capsys, key: str, field: str):
    """A NUL byte or a name longer than the filesystem allows was a ValueError/OSError traceback
    from pathlib; now the field is named and nothing is written."""
    bad = UNUSABLE[key]
    data = dict(FAST, name="fine")
    if field == "output.dir":
        data["output"] = {"dir": bad}
    elif field == "resources.state_dir":
        data["resources"] = {"engine": "inline", "state_dir": bad}
    scen = write(sandbox / "scen.yaml", data)
    before = snapshot(tmp_path)
    argv = {
        "--out": ["run", str(scen), "--out", bad],
        "--resume": ["run", "--resume", bad],
        "compare --out": ["compare", str(scen), "--strategies", "proto_avg", "--out", bad],
    }.get(field, ["run", str(scen)])
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and field.split()[-1] in err, err
    assert snapshot(tmp_path) == before


def test_a_state_dir_below_a_file_is_a_clear_error(sandbox: Path, tmp_path: Path, capsys):
    (sandbox / "afile").write_text("x")
    scen = write(sandbox / "scen.yaml", {**FAST, "resources": {"engine": "inline", "state_dir": "afile/state"}})
    code, err = run_cli(capsys, "run", str(scen), "--out", "run")
    assert code == 2 and "resources.state_dir: cannot create the client state folder" in err, err
    assert not (sandbox / "run").exists()


def test_a_symlink_loop_as_output_is_a_clear_error(sandbox: Path, tmp_path: Path, capsys):
    (sandbox / "loop").symlink_to(sandbox / "loop")
    scen = write(sandbox / "scen.yaml", {**FAST})
    code, err = run_cli(capsys, "run", str(scen), "--out", "loop/run")
    assert code == 2 and "is a symbolic link that leads nowhere" in err, err


def test_a_scenario_path_too_long_is_a_clear_error(sandbox: Path, capsys):
    code, err = run_cli(capsys, "validate", "z" * 300 + ".yaml")
    assert code == 2 and "cannot read the file" in err, err
