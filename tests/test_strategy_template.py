"""The strategy plugin template of the docs (docs/templates/protofed-strategy-template) is a
working plugin: pip-installed into its own folder, found through its entry point, run end to end
from a scenario file; its merge is the coordinate-wise median numpy computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "docs" / "templates" / "protofed-strategy-template"


def test_median_merge_is_numpys_median():
    sys.path.insert(0, str(TEMPLATE))
    try:
        from protofed_median.strategy import median_prototypes
    finally:
        sys.path.remove(str(TEMPLATE))
    from simulator.learner.prototypes import PrototypeSet

    rng = np.random.default_rng(0)
    a = PrototypeSet(np.array([0, 1]), rng.standard_normal((2, 4)).astype(np.float32), np.array([3, 4]))
    b = PrototypeSet(np.array([1, 2]), rng.standard_normal((2, 4)).astype(np.float32), np.array([5, 6]))
    c = PrototypeSet(np.array([1]), rng.standard_normal((1, 4)).astype(np.float32), np.array([7]))
    merged = median_prototypes([a, b, c, None])
    assert merged.classes.tolist() == [0, 1, 2] and merged.counts.tolist() == [3, 16, 6]
    np.testing.assert_allclose(merged.vectors[1], np.median([a.vectors[1], b.vectors[0], c.vectors[0]], axis=0), rtol=1e-6)
    np.testing.assert_allclose(merged.vectors[0], a.vectors[0])


def test_the_template_installs_and_runs_from_a_scenario_file(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(TEMPLATE)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONPATH=os.pathsep.join([str(site), str(REPO)]),
               OMP_NUM_THREADS="1")
    listed = subprocess.run([sys.executable, "-m", "simulator.cli", "list"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert "proto_median" in listed.stdout, listed.stdout + listed.stderr
    scenario = {
        "name": "template", "seed": 0,
        "dataset": {"source": "synthetic", "num_classes": 4, "dim": 8, "samples_per_class": 30, "class_sep": 4.0},
        "tasks": {"classes_per_task": 2},
        "clients": {"num_clients": 3},
        "training": {"rounds_per_task": 2, "local_epochs": 1, "batch_size": 8},
        "model": {"backbone": "mlp", "embedding_dim": 8},
        "strategy": {"name": "proto_median", "params": {"pull": 0.5}},
        "resources": {"engine": "inline"},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    run = subprocess.run([sys.executable, "-m", "simulator.cli", "run", "s.yaml", "--out", "run"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] is True and summary["strategy"] == "proto_median"
    assert summary["final_avg_accuracy"] > 0.45  # 0.61-0.67 over seeds 0-4; chance is 0.25
    bad = subprocess.run([sys.executable, "-m", "simulator.cli", "validate", "s.yaml", "--set", "strategy.params.pull=-1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "strategy.params.pull" in bad.stdout + bad.stderr
