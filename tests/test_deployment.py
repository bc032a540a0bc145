"""The README's Flower Deployment Engine recipe, run as written on real processes.

The bash block between the README's ``deployment-recipe`` markers is executed by bash: a real
``flower-superlink``, one real ``flower-supernode`` per client and ``flwr run`` with a SuperLink
connection in a temporary Flower home. The test changes only the recipe's first line (its
variables: free ports picked now, a tiny scenario, run directories under ``tmp_path``) and runs
the ``flwr run`` line twice on the same SuperNodes. Each SuperNode's messages, of both runs, must be
answered by the one long-lived ClientApp process the recipe starts beside it
(``python -m simulator.deploy``), not by a process per message. Both runs must give the inline engine's
accuracy matrix and training losses (a second run that started from the first run's clients
would not), progress lines must reach ``flwr run --stream``, the SuperNodes must have removed
their run folders, and every process the test started is stopped, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest

from simulator.engine.runner import run_scenario
from simulator.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
README = REPO / "docs" / "engines.md"  # the deployment recipe
START, END = "<!-- deployment-recipe:start -->", "<!-- deployment-recipe:end -->"
SCENARIO = "tests/scenarios/deployment_tiny.yaml"  # relative: resolved against the app directory
NODES = 2
RUN_TIMEOUT_S = 900  # generous, for a busy machine; a healthy run of the whole script takes ~2-3 min

# flwr's console scripts live beside the interpreter running the tests (the project's venv);
# they are put first on PATH for the recipe, so the test never depends on an activated venv
BIN = str(Path(sys.executable).parent)
PATH = os.pathsep.join([BIN, os.environ.get("PATH", "")])
# skipped only where flwr's console scripts are not installed at all (flwr[simulation] is a
# dependency, so never in CI), or where bash is missing
pytestmark = pytest.mark.skipif(
    shutil.which("flower-superlink", path=PATH) is None or shutil.which("bash") is None,
    reason="needs flwr's console scripts and bash",
)


def recipe_lines() -> list[str]:
    text = README.read_text()
    assert START in text and END in text, "docs/engines.md lost its deployment recipe markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    return textwrap.dedent(body).strip("\n").splitlines()


def free_port_block(n: int) -> int:
    """A port p with p..p+n all free on 127.0.0.1 right now (the recipe uses PORT..PORT+NODES)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports")


def test_recipe_run_config_passes_flowers_own_check():
    """The SuperLink checks every ``--run-config`` key against ``[tool.flwr.app.config]`` (issue
    14, point 4: ``out`` was rejected); the README's command must pass that very check."""
    import shlex

    from flwr.common.config import flatten_dict, fuse_dicts, get_project_config, parse_config_args

    run_line = next(line for line in recipe_lines() if line.startswith("flwr run "))
    args = shlex.split(run_line.replace("$SCENARIO", SCENARIO).replace("$OUT", "/tmp/x"))
    overrides = parse_config_args([args[args.index("--run-config") + 1]])
    assert set(overrides) == {"scenario", "out"}
    declared = flatten_dict(get_project_config(REPO)["tool"]["flwr"]["app"]["config"])
    fused = fuse_dicts(declared, overrides, check_keys=True)  # what the SuperLink runs
    assert fused["out"] == "/tmp/x" and fused["scenario"] == SCENARIO
    fuse_dicts(declared, {"state-dir": "/tmp/nodes"}, check_keys=True)
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(declared, {"no-such-key": 1}, check_keys=True)
    # defaults mean "the default": empty paths, and a scenario that exists in the app directory
    assert declared["out"] == "" and declared["state-dir"] == ""
    assert (REPO / str(declared["scenario"])).is_file()


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("PROTOFED_TEST_TAG") == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _stop_all(tag: str) -> None:
    """Stop every process carrying this test's tag (bash, SuperLink, SuperNodes, and the
    executors Flower starts in sessions of their own), first gently, then for good."""
    procs = _tagged(tag)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def _table(run_dir: Path) -> pd.DataFrame:
    m = pd.read_csv(run_dir / "metrics.csv")
    return m[["task", "round", "eval_task", "train_loss", "accuracy"]].reset_index(drop=True)


def test_readme_recipe_on_real_superlink_and_supernodes(tmp_path):
    lines = recipe_lines()
    assert lines[0].startswith("PORT="), "the recipe's first line must hold its variables"
    run_at = [i for i, line in enumerate(lines) if line.startswith("flwr run ")]
    assert len(run_at) == 1
    out1, out2 = tmp_path / "run-1", tmp_path / "run-2"
    port = free_port_block(NODES)
    script = (
        [f"PORT={port} NODES={NODES} SCENARIO={SCENARIO} OUT={out1}"]
        + lines[1 : run_at[0] + 1]
        + [f"OUT={out2}", lines[run_at[0]]]  # the same command again, on the same SuperNodes
        + lines[run_at[0] + 1 :]
    )
    tmp = tmp_path / "tmp"  # mktemp (the Flower home) and the SuperNodes' default state-dir
    tmp.mkdir()
    tag = uuid.uuid4().hex
    timing = tmp_path / "messages.jsonl"  # one line per ClientApp message (simulator.flower_app)
    env = {**os.environ, "TMPDIR": str(tmp), "PROTOFED_TEST_TAG": tag, "OMP_NUM_THREADS": "1", "PATH": PATH,
           "PROTOFED_DEPLOY_LOG": str(timing)}
    env.pop("FLWR_HOME", None)
    started = time.time()
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", "\n".join(script)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            output, _ = proc.communicate(timeout=60)
            pytest.fail(f"the recipe did not finish within {RUN_TIMEOUT_S}s:\n{output[-4000:]}")
        wall = time.time() - started
        # the recipe's last line stops what it started (Flower's executors follow their parent)
        _, leftover = psutil.wait_procs(_tagged(tag), timeout=30)
    finally:
        _stop_all(tag)
    assert proc.returncode == 0, output[-4000:]
    assert not leftover, f"the recipe left processes running: {[p.pid for p in leftover]}"

    # progress lines reach `flwr run --stream` (Flower mirrors the ServerApp's stdout to its log)
    assert output.count("task 2/2 · round 1/1") == 2, output[-4000:]

    inline = run_scenario(load_scenario(REPO / SCENARIO), run_dir=tmp_path / "inline", engine="inline", out=None)
    expected = (tmp_path / "inline" / "accuracy_matrix.csv").read_text()
    for out in (out1, out2):
        assert (out / "accuracy_matrix.csv").read_text() == expected, out
        pd.testing.assert_frame_equal(_table(out), _table(tmp_path / "inline"))
    assert inline.summary["completed"]

    # one long-lived ClientApp process per SuperNode answered every message of both runs (with
    # Flower's process per message there were as many processes as messages); each node got
    # per run: the discovery query, then a train and an evaluate per round (2 tasks x 1 round)
    rows = [json.loads(line) for line in timing.read_text().splitlines()]
    answered = [r for r in rows if r.get("where") == "clientapp"]
    assert len(answered) == 2 * NODES * 5, answered
    assert len({r["pid"] for r in answered}) == NODES, "a ClientApp process per message, not per SuperNode"
    claimed = [r for r in rows if "claimed" in r]  # the worker's own line per message
    assert sorted((r["pid"], r["type"]) for r in claimed) == sorted((r["pid"], r["type"]) for r in answered)

    # client state was keyed by run and removed at its end; the data stream was built once
    state_root = tmp / "protofed-nodes"
    assert sorted(p.name for p in state_root.iterdir()) == ["streams"]
    assert len(list((state_root / "streams").glob("*.pkl"))) == 1
    print(f"two deployed runs of {SCENARIO} on {NODES} SuperNodes, start to stop: {wall:.1f}s")
