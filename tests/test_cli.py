"""The ``protofed`` command line: validate, list, plot and run's output-directory checks (DESIGN.md §6).

Each subprocess spends about 3 s importing, so the checks that need a real process use one and
the rest call :func:`simulator.cli.main` or the runner directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from simulator.cli import main
from simulator.engine.runner import check_writable, run_scenario
from simulator.errors import UserError
from simulator.scenario import validate_scenario

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))
SMALL = (
    "dataset: {source: synthetic, num_classes: 4, samples_per_class: 20, dim: 8}\n"
    "model: {backbone: mlp, embedding_dim: 8}\n"
    "clients: {num_clients: 2}\n"
    "training: {rounds_per_task: 1, batch_size: 8}\n"
)


def cli(*args: str, cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m simulator.cli ARGS`` in a fresh process."""
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args], check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """The read-only subprocess calls of this module, started together (each spends ~3 s importing)."""
    missing = tmp_path_factory.mktemp("plot") / "no_such_dir"
    calls = {("list",): REPO, ("plot", str(missing)): missing.parent}
    calls[("validate", "scenarios/quickstart.yaml")] = REPO
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {args: pool.submit(cli, *args, cwd=cwd) for args, cwd in calls.items()}
        yield (lambda *args: futures[args].result()), missing


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def test_validate_quickstart_from_the_repo_root(started):
    result, _ = started
    proc = result("validate", "scenarios/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[0].startswith("ok"), proc.stdout
    # the summary line reflects the file: 4 initial classes then 2 per task over mnist1d's 10 classes
    assert "quickstart" in lines[0] and "[4, 2, 2, 2]" in lines[0] and "5 clients" in lines[0], lines[0]
    assert not (REPO / "scenarios" / "results").exists()


def test_the_scenario_folder_is_not_empty():
    assert REPO / "scenarios" / "quickstart.yaml" in SCENARIOS


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_every_shipped_scenario_validates(path: Path, monkeypatch, capsys):
    # in process: a subprocess per file would spend ~3 s importing each time
    monkeypatch.chdir(REPO)
    code = main(["validate", str(path.relative_to(REPO))])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    lines = out.strip().splitlines()
    assert lines and lines[0].startswith("ok"), out


def test_list_names_the_registries(started):
    result, _ = started
    proc = result("list")
    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    sections: dict[str, list[str]] = {}
    current = None
    for line in proc.stdout.splitlines():
        if line and not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = []
        elif line.strip():
            assert current is not None, line
            sections[current].append(line.split()[0])
    assert {"proto_avg", "fedavg"} <= set(sections["strategies"]), sections
    assert {"mnist1d", "digits", "synthetic", "npz", "folder"} <= set(sections["dataset sources"]), sections
    assert {"iid", "dirichlet", "pathological"} <= set(sections["partition schemes"]), sections
    assert {"mlp", "cnn1d", "cnn"} <= set(sections["backbones"]), sections


def test_plot_missing_dir(started):
    result, missing = started
    proc = result("plot", str(missing))
    assert proc.returncode == 2, proc.stderr
    no_traceback(proc)
    assert str(missing) in proc.stderr and "not a directory" in proc.stderr
    assert not missing.exists()


def test_plot_dir_without_runs(tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no run here\n", encoding="utf-8")
    code = main(["plot", str(empty)])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    assert str(empty) in err and "no run directory" in err
    assert sorted(p.relative_to(empty).as_posix() for p in empty.rglob("*")) == ["sub", "sub/notes.txt"]


def test_plot_file_instead_of_dir(tmp_path: Path, capsys):
    f = tmp_path / "summary.json"
    f.write_text("{}", encoding="utf-8")
    assert main(["plot", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- unwritable output
def test_run_with_unwritable_output_dir(tmp_path: Path, monkeypatch, capsys):
    """``protofed run --out`` into a folder that cannot be written: exit 2 before any work.

    In process (``main``), as the bad-file subprocess checks already cover ``python -m``."""
    monkeypatch.chdir(tmp_path)
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL, encoding="utf-8")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK) or os.geteuid() == 0:
            # root ignores the mode bits: block the run directory with a regular file instead
            blocker = tmp_path / "afile"
            blocker.write_text("not a folder\n", encoding="utf-8")
            out = blocker / "run"
        else:
            out = locked / "run"
        code = main(["run", scenario.name, "--engine", "inline", "--out", str(out)])
        stdout, stderr = capsys.readouterr()
        assert code == 2, stdout + stderr
        assert "Traceback" not in stdout + stderr
        assert "output.dir" in stderr or "permission" in stderr.lower(), stderr
        assert stderr.startswith("error: --out"), stderr
        assert stdout == ""  # failed before the run started
        assert not out.exists()
        assert not (tmp_path / "results").exists()
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_output_dir_from_the_scenario_names_the_file(tmp_path: Path, monkeypatch):
    """An unusable ``output.dir`` in the scenario is reported against the scenario file, not --out."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    raw = {
        "dataset": {"source": "synthetic", "num_classes": 4, "samples_per_class": 20, "dim": 8},
        "model": {"backbone": "mlp", "embedding_dim": 8},
        "clients": {"num_clients": 2},
        "output": {"dir": "afile/results"},
    }
    scenario = validate_scenario(raw, "small.yaml")
    with pytest.raises(UserError) as exc:
        run_scenario(scenario, source="small.yaml", engine="inline")
    assert exc.value.source == "small.yaml"
    [problem] = exc.value.problems
    assert problem.field == "output.dir" and "afile" in problem.message and "not a directory" in problem.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("below", ["run", "a/b/c"])
def test_check_writable_rejects_a_path_below_a_file(tmp_path: Path, below: str):
    blocker = tmp_path / "afile"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        check_writable(blocker / below)
    assert exc.value.source == "--out"
    [problem] = exc.value.problems
    assert problem.field == "output.dir"
    assert str(blocker) in problem.message and "not a directory" in problem.message
    assert blocker.read_text(encoding="utf-8") == "x"


def test_check_writable_rejects_an_existing_file(tmp_path: Path):
    f = tmp_path / "run"
    f.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="not a directory"):
        check_writable(f, "s.yaml")


def test_check_writable_accepts_new_and_existing_dirs(tmp_path: Path):
    check_writable(tmp_path / "new" / "deeper" / "run")
    assert list(tmp_path.iterdir()) == []  # checking creates nothing
    check_writable(tmp_path)


# Skipped as root only: root may write into a directory whatever its mode bits, so no directory
# can be made unwritable without a read-only mount, which a test cannot make. The same error path
# (check_writable raising a UserError that names the folder) runs as root in the test above.
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores the mode bits")
def test_check_writable_rejects_a_read_only_dir(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match="permission denied"):
            check_writable(locked / "run")
    finally:
        locked.chmod(0o700)


def test_set_strategy_params_survive_a_strategy_switch():
    """``--strategy X --set strategy.params.k=v``: the file's params of another strategy are
    dropped, the --set ones are kept (they were silently lost before)."""
    from simulator.cli import load_for_cli, set_overrides

    path = str(REPO / "scenarios" / "fcil_baselines_mnist1d.yaml")  # its strategy is fedavg
    sets = ["strategy.params.share_weights=true", "continual.prd.weight=10"]
    s = load_for_cli(path, "proto_avg", None, sets)
    assert s.strategy.name == "proto_avg" and s.strategy.params["share_weights"] is True
    assert s.continual.prd.weight == 10
    assert set_overrides(path, s, "proto_avg", None, sets)["strategy.params.share_weights"] is True
    # the same strategy as the file's: its params are kept under the --set ones
    split = str(REPO / "scenarios" / "split_mnist1d.yaml")  # proto_avg, share_weights false
    assert load_for_cli(split, "proto_avg", None, ["strategy.params.merge=running_mean"]).strategy.params == {
        "share_weights": False, "merge": "running_mean"}
