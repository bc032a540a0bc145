"""``resources.deterministic``: the same seed gives the same numbers on a GPU too.

On the CPU, PyTorch's kernels already give the same result for the same inputs and thread
count. On CUDA they do not by default: cuDNN picks convolution algorithms by timing them
(``cudnn.benchmark``), several kernels accumulate with atomics in a varying order, and cuBLAS
splits work according to its workspace. Measured on an H200 (issue 23): the quickstart run twice
with the same seed gave accuracies 0.778 and 0.916 on one task; with the settings below it gave
the same matrices byte for byte.

:func:`apply` sets, in the process that calls it:

* ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment (cuBLAS reads it when its first handle
  is created, so this must happen before any matrix product on CUDA; an existing value is kept);
* ``torch.use_deterministic_algorithms(True)``: an operation without a deterministic
  implementation raises instead of silently varying (:func:`explain` turns that error into one
  that names the key);
* ``torch.backends.cudnn.deterministic = True`` and ``cudnn.benchmark = False``.

Every process that may touch CUDA calls it before CUDA starts: the driver (runner, before the
engine starts, so Ray's actors inherit the environment variable through the runtime
environment) and each client process when it builds its :class:`~simulator.engine.runtime.Runtime`
(the first thing a client handler does). Each client reply reports the state it ran under
(:func:`state`), summed per run in ``profile.json`` as ``client_determinism``.

What it costs: nothing measurable on the CPU (the CPU kernels protofed uses are deterministic
already); on a GPU, deterministic kernels can be slower (cuDNN may not use its fastest
convolution algorithm); ``protofed bench`` and ``docs/gpu_device_check.py`` measure it.
"""

from __future__ import annotations

import os

KEY = "resources.deterministic"
CUBLAS_VAR, CUBLAS_VALUE = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
METRIC = "deterministic"  # reply metric: 1 when the client ran under the settings above, else 0


def apply(enabled: bool) -> None:
    """Switch this process's PyTorch to deterministic kernels (or back to the defaults)."""
    import torch

    if enabled:
        os.environ.setdefault(CUBLAS_VAR, CUBLAS_VALUE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def state() -> bool:
    """Whether this process runs under every setting :func:`apply` makes."""
    import torch

    return bool(
        torch.are_deterministic_algorithms_enabled()
        and torch.backends.cudnn.deterministic
        and not torch.backends.cudnn.benchmark
        and os.environ.get(CUBLAS_VAR) in (":4096:8", ":16:8")
    )


def ray_env() -> dict[str, str]:
    """Environment variables Ray's workers must start with (set by :func:`apply` in the driver)."""
    value = os.environ.get(CUBLAS_VAR)
    return {CUBLAS_VAR: value} if value else {}


def explain(exc: BaseException) -> str | None:
    """A message naming the key, when ``exc`` is PyTorch refusing a nondeterministic operation."""
    text = str(exc)
    if "deterministic" not in text or "use_deterministic_algorithms" not in text:
        return None
    first = text.strip().splitlines()[0][:300]
    return (f"{KEY}: an operation has no deterministic implementation on this device ({first}); "
            f"set {KEY}: false (or --set {KEY}=false) to run it, knowing that the same seed may then "
            "give different numbers on a GPU")
