"""Device selection and the client state store's CPU round trip (GPU placement is decided here;
a GPU itself is not needed for these tests)."""

from __future__ import annotations

import torch

from simulator.engine.device import select_device
from simulator.engine.state_store import ClientStateStore, to_cpu


def test_select_device():
    assert select_device(0.0, cuda_available=True) == "cpu"  # no GPU share: CPU even on a GPU host
    assert select_device(0.25, cuda_available=True) == "cuda"  # fractional share -> cuda
    assert select_device(1.0, cuda_available=False) == "cpu"  # asked for a GPU, none visible
    assert select_device(0.0) == "cpu"


def test_state_store_saves_cpu_tensors_and_loads_on_cpu(tmp_path):
    store = ClientStateStore(tmp_path / "clients")
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    store.save(7, {"model": to_cpu(weights), "task": 1})
    loaded = store.load(7)
    assert loaded["task"] == 1 and torch.equal(loaded["model"]["w"], weights["w"])
    assert loaded["model"]["w"].device.type == "cpu"
    assert store.load(8) is None
    assert [p.name for p in (tmp_path / "clients").iterdir()] == ["client-000007.pt"]  # no temp files left
    store.cleanup()
    assert not (tmp_path / "clients").exists()
