"""Which torch device a client uses: ``cuda`` when its actor was given a GPU share and CUDA
is there, the CPU otherwise."""

from __future__ import annotations


def select_device(num_gpus_per_client: float, cuda_available: bool | None = None) -> str:
    if num_gpus_per_client <= 0:
        return "cpu"
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"
