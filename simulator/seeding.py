"""Every random stream of a run is derived from the one scenario seed and a purpose name.

Derived seeds do not depend on execution order, on which process runs a client, or on how
many other streams were drawn before, which is what makes the inline and Ray engines agree.
"""

from __future__ import annotations

import hashlib

import numpy as np

PURPOSES = ("class_order", "partition", "sampling", "model_init", "client_train", "memory", "data")


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed for ``purpose`` (and optional integer keys such as client, task, round)."""
    text = f"{seed}/{purpose}/" + "/".join(str(int(k)) for k in keys)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, purpose, *keys))


def seed_table(seed: int) -> dict[str, int]:
    """The top-level derived seeds, recorded in ``config.yaml`` for reproducibility."""
    return {p: derive_seed(seed, p) for p in PURPOSES}
