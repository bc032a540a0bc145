"""The Gaussian mechanism on per-class sums of clipped embeddings (runs on the client).

Neighbouring relation: two datasets differ by adding or removing ONE training sample of ONE
client (sample-level DP). What a client releases in one round, for every class of the task it
learns this round (a public list from the schedule, so empty classes are released too and
presence leaks nothing):

* ``S_c = sum_{i: y_i = c} clip(e_i)``, with ``clip(e) = e * min(1, C / ||e||_2)``,
  released as ``S_c + N(0, s_s^2 I)``;
* ``n_c = |{i: y_i = c}|``, released as ``n_c + N(0, s_n^2)`` (the counts get noise too; they
  are not treated as public).

One sample moves one class's sum by at most ``C`` (L2) and its count by 1 PROVIDED the
embedding function does not depend on the sample (a frozen backbone that never trained on
client data; anything else is refused before the run, :func:`.run.release_problems`), so the pair of
releases is a Gaussian mechanism with noise multiplier ``z`` when
``(C / s_s)^2 + (1 / s_n)^2 = 1 / z^2``. We split that with ``count_share`` ``a``:
``s_n = z / sqrt(a)``, ``s_s = C z / sqrt(1 - a)``.

The prototype is post-processing: the count is rounded, classes whose noisy count is below 1
are dropped, and the vector is ``noisy sum / rounded count``, so ``count * vector`` is the
noisy sum and a count-weighted merge on the server is the merge of noisy sums.

Simulator note: the noise is drawn from a generator seeded from the run seed, the client,
the task and the round, so runs are reproducible. A deployment must draw it from a secret
source (``secrets``/OS entropy); the guarantee assumes the server cannot predict the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..learner.prototypes import PrototypeSet


@dataclass(frozen=True)
class NoiseScales:
    noise_multiplier: float  # z of one release
    sum_std: float  # s_s
    count_std: float  # s_n


def noise_scales(noise_multiplier: float, clip: float, count_share: float) -> NoiseScales:
    z = float(noise_multiplier)
    return NoiseScales(z, clip * z / np.sqrt(1.0 - count_share), z / np.sqrt(count_share))


def clip_rows(emb: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled down to L2 norm at most ``clip`` (rows already inside are unchanged)."""
    emb = np.asarray(emb, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def class_sums(emb: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class sums ``[C, D]`` and counts ``[C]`` over ``classes`` (absent classes: zeros)."""
    classes = np.asarray(classes, dtype=np.int64)
    pos = {int(c): i for i, c in enumerate(classes)}
    sums = np.zeros((len(classes), emb.shape[1]), dtype=np.float64)
    counts = np.zeros(len(classes), dtype=np.float64)
    for i, c in enumerate(np.asarray(labels, dtype=np.int64)):
        j = pos.get(int(c))
        if j is None:
            raise ValueError(f"sample of class {int(c)} outside the released classes")
        sums[j] += emb[i]
        counts[j] += 1.0
    return sums, counts


def noisy_class_sums(
    emb: np.ndarray, labels: np.ndarray, classes: np.ndarray, clip: float, scales: NoiseScales, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The released pair: noisy sums of clipped embeddings and noisy counts, for every class."""
    sums, counts = class_sums(clip_rows(emb, clip), labels, classes)
    sums = sums + rng.normal(0.0, scales.sum_std, size=sums.shape)
    counts = counts + rng.normal(0.0, scales.count_std, size=counts.shape)
    return sums, counts


def prototypes_from_sums(classes: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> PrototypeSet:
    """Post-processing of a (noisy) release into prototypes: counts rounded, classes with a
    count below 1 dropped, vectors = sum / count."""
    rounded = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    keep = rounded >= 1
    dim = sums.shape[1] if sums.ndim == 2 else 0
    if not keep.any():
        return PrototypeSet.empty(dim)
    return PrototypeSet(
        np.asarray(classes, dtype=np.int64)[keep],
        (sums[keep] / rounded[keep, None]).astype(np.float32),
        rounded[keep],
    )
