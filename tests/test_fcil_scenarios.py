"""The shipped FCIL scenarios: compare labels that carry continual mechanisms (set), the
baseline scenario's labels, and one round of the CIFAR-100 B50-Inc10 scenario (resnet32) on a
tiny CIFAR-format file written here (no network)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from simulator.study.compare import plan
from simulator.engine.runner import run_scenario
from simulator.errors import UserError
from simulator.scenario import apply_overrides, load_scenario, read_yaml, validate_scenario

REPO = Path(__file__).resolve().parents[1]
BASELINES = REPO / "scenarios" / "fcil_baselines_mnist1d.yaml"


def test_baseline_labels_carry_their_mechanisms(tmp_path):
    labels = ["finetune", "fedavg", "fedlwf", "fedewc", "fedicarl", "fedicarl_random", "fedlwf_proto", "fedproto",
              "fedproto_teen", "proto_avg_shared", "proto_avg_prd", "frozen_ncm", "frozen_mahalanobis", "frozen_fecam", "frozen_lda", "frozen_ncm_teen", "joint"]
    runs, _ = plan(str(BASELINES), labels, [0], str(tmp_path / "cmp"))
    s = {r.label: r.scenario for r in runs}
    assert s["fedlwf"].strategy.name == "fedavg" and s["fedlwf"].continual.lwf.temperature == 2.0 and s["fedlwf"].continual.ewc is None
    assert s["fedewc"].continual.ewc.weight == 1000.0 and s["fedewc"].continual.lwf is None
    assert s["fedicarl"].continual.memory_selection == "herding" and s["fedicarl"].continual.memory_per_class == 20
    assert s["fedicarl_random"].continual.memory_selection == "random"
    assert s["fedproto_teen"].continual.teen.tau == 16.0 and s["fedproto"].continual.teen is None
    assert s["proto_avg_prd"].continual.prd.weight == 1.0 and s["proto_avg_prd"].continual.memory_per_class == 0
    assert s["frozen_mahalanobis"].model.classifier == "mahalanobis" and s["frozen_ncm"].model.classifier == "ncm"
    assert s["frozen_fecam"].model.classifier == "fecam" and s["frozen_fecam"].strategy.params["share_weights"] == "first_task"
    assert s["fedicarl"].model.classifier == "nme" and s["fedicarl_random"].model.classifier == "nme"  # iCaRL's NME
    assert s["frozen_lda"].strategy.params["share_weights"] == "first_task"
    assert s["frozen_ncm_teen"].continual.teen is not None and s["frozen_ncm"].continual.teen is None
    assert s["finetune"].continual.lwf is None and s["joint"].strategy.name == "joint"
    # the labels' results go to their own folders
    assert len({r.run_dir for r in runs}) == len(labels)


def test_bad_label_overrides_are_field_errors(tmp_path):
    raw = read_yaml(BASELINES)
    bad = apply_overrides(raw, ["compare.fedlwf.set={continual.lwf: {weight: -1}}"])
    with pytest.raises(UserError) as err:
        validate_scenario(bad, "b.yaml")
    assert "compare.fedlwf.set: continual.lwf.weight" in str(err.value)
    for key in ("seed", "strategy.name"):
        bad = apply_overrides(raw, [f"compare.fedlwf.set={{{key}: 1}}"])
        with pytest.raises(UserError, match="cannot be varied here"):
            validate_scenario(bad, "b.yaml")


def write_cifar100(root: Path, per_class: int = 3) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, reps in (("train", per_class), ("test", 1)):
        fine = np.tile(np.arange(100), reps)
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        (base / name).write_bytes(pickle.dumps({b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(), b"data": data}, protocol=4))
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                              b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}, protocol=4))


def test_cifar100_b50_inc10_runs_one_round_with_resnet32(tmp_path):
    write_cifar100(tmp_path / "data")
    scenario = load_scenario(REPO / "scenarios" / "cifar100_b50_inc10.yaml", [
        f"dataset.root={tmp_path / 'data'}", "tasks.initial_classes=100", "clients.num_clients=2",
        "clients.partition={scheme: iid}", "clients.participation=1.0", "training.rounds_per_task=1",
        "training.local_epochs=1", "resources.engine=inline", f"output.dir={tmp_path / 'out'}",
    ])
    assert scenario.model.backbone == "resnet32" and scenario.model.embedding_dim == 64
    out = run_scenario(scenario, run_dir=tmp_path / "run", plots=False)
    assert out.summary["completed"] and out.summary["num_tasks"] == 1
    assert 0.0 <= out.matrix[0, 0] <= 1.0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["backbone"] == "resnet32"
