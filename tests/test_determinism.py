"""``resources.deterministic`` (simulator/engine/determinism.py): every process that may touch
CUDA runs PyTorch's deterministic kernels. What the CPU can check: the settings reach every
client process on both engines (each reply says which settings it ran under, profile.json sums
them), they are off when the key is off, and PyTorch's own refusal of a nondeterministic
operation becomes an error naming the key. That the settings make two CUDA runs identical is
checked on a GPU by ``docs/gpu_device_check.py``."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_tiny
from simulator.engine import determinism
from simulator.engine.profile import PROFILE_FILE
from simulator.scenario import validate_scenario
from helpers import tiny


def _client_determinism(run_dir) -> tuple[dict, int]:
    prof = json.loads((run_dir / PROFILE_FILE).read_text())
    return prof["client_determinism"], sum(prof["client_calls"].values())


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_the_key_is_on_by_default():
    assert validate_scenario(tiny()).resources.deterministic is True


@pytest.mark.parametrize("engine", ["inline", "ray"])
def test_every_client_process_runs_deterministic_kernels(tmp_path, engine):
    torch.use_deterministic_algorithms(False)  # whatever this process had before, the run sets it
    out = run_tiny(tmp_path, engine, engine=engine, clients__num_clients=2, tasks__classes_per_task=4,
                   training__rounds_per_task=1, resources__engine=engine)
    seen, calls = _client_determinism(out.run_dir)
    assert calls > 0 and seen == {"deterministic": calls, "not_deterministic": 0}
    assert torch.are_deterministic_algorithms_enabled()  # the driver too


def test_off_means_off_in_every_client(tmp_path):
    out = run_tiny(tmp_path, "off", clients__num_clients=2, tasks__classes_per_task=4,
                   training__rounds_per_task=1, resources__deterministic=False)
    seen, calls = _client_determinism(out.run_dir)
    assert calls > 0 and seen == {"deterministic": 0, "not_deterministic": calls}
    assert not torch.are_deterministic_algorithms_enabled()


def test_same_numbers_with_and_without_the_settings_on_the_cpu(tmp_path):
    on = run_tiny(tmp_path, "on", clients__num_clients=2, training__rounds_per_task=1)
    off = run_tiny(tmp_path, "off", clients__num_clients=2, training__rounds_per_task=1,
                   resources__deterministic=False)
    assert (on.run_dir / "accuracy_matrix.csv").read_text() == (off.run_dir / "accuracy_matrix.csv").read_text()


# Needs a GPU: no PyTorch CPU kernel raises under deterministic mode, so the refusal cannot be
# provoked on a CPU; the CPU half of the contract (same numbers with the settings on and off) is the
# test above; this one runs wherever the suite runs on a CUDA machine.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no PyTorch CPU kernel refuses deterministic mode; histc does on CUDA")
def test_a_nondeterministic_operation_is_refused_naming_the_key():
    determinism.apply(True)
    with pytest.raises(RuntimeError) as caught:
        torch.histc(torch.rand(100, device="cuda"), bins=4)
    message = determinism.explain(caught.value)
    assert message is not None and message.startswith("resources.deterministic:")
    assert "resources.deterministic: false" in message


def test_other_errors_are_left_alone():
    assert determinism.explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
