"""FedSA on a many-class, image-shaped source with few samples per class (issue 19).

The source: procedural "handwritten characters". Every class is three strokes drawn from a
pool shared by all classes (so classes share parts, as letters do); each sample redraws its
class's strokes with jittered end points, shifts the glyph by up to 2 pixels, blurs it and adds
noise. Written as an ``npz`` file and read through the project's ``npz`` source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import run_tiny


def _stroke_image(strokes: list[tuple[np.ndarray, np.ndarray]], size: int, rng: np.random.Generator, jitter: float) -> np.ndarray:
    img = np.zeros((size, size))
    for a, b in strokes:
        a = a + rng.normal(0, jitter, 2)
        b = b + rng.normal(0, jitter, 2)
        t = np.linspace(0.0, 1.0, 3 * size)[:, None]
        pts = np.rint(a + t * (b - a)).astype(int)
        ok = ((pts >= 0) & (pts < size)).all(1)
        img[pts[ok, 0], pts[ok, 1]] = 1.0
    k = np.array([0.25, 0.5, 0.25])
    img = np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 0, img)
    return np.apply_along_axis(lambda r: np.convolve(r, k, "same"), 1, img)


def glyphs(num_classes: int, per_class: int, size: int = 12, seed: int = 0, pool: int = 30,
           strokes: int = 3, jitter: float = 0.8, shift: int = 1, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``x [N, 1, size, size]`` float32 glyphs and ``y [N]`` labels, ``per_class`` per class."""
    rng = np.random.default_rng(seed)
    ends = rng.uniform(1, size - 2, (pool, 2, 2))
    xs, ys = [], []
    for c in range(num_classes):
        pick = rng.choice(pool, strokes, replace=False)
        parts = [(ends[i, 0], ends[i, 1]) for i in pick]
        for _ in range(per_class):
            img = np.roll(_stroke_image(parts, size, rng, jitter), tuple(rng.integers(-shift, shift + 1, 2)), axis=(0, 1))
            xs.append(img + rng.normal(0, noise, img.shape))
            ys.append(c)
    return np.stack(xs)[:, None].astype(np.float32), np.array(ys, dtype=np.int64)


def write_glyphs(path: Path, num_classes: int, per_class: int, **kw) -> Path:
    x, y = glyphs(num_classes, per_class, **kw)
    np.savez(path, x=x, y=y)
    return path


MANY = dict(
    tasks={"initial_classes": 88, "classes_per_task": 16},
    clients__num_clients=3, clients__partition={"scheme": "iid"},
    training={"rounds_per_task": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.01},
    model={"backbone": "cnn", "embedding_dim": 32}, continual__memory_per_class=2,
    evaluation={"every": "task"},
)


# Why xfail and not a pass: the test states what FedSA should do (keep up with proto_avg) and records
# that, measured against the official code line by line, it does not here (strategies/fedsa.py). Strict:
# an unexpected pass fails the suite, and only the final assertion may fail (raises=AssertionError);
# a crash or an unlearnable regime (pytest.fail below) is a real failure.
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="issue 19: FedSA's random anchors do not align the clients' feature spaces "
                   "with many classes and few samples per class (strategies/fedsa.py docstring)")
def test_fedsa_keeps_up_with_proto_avg_on_many_image_classes(tmp_path):
    """104 glyph classes (88, then 16), 12 images each: 3 training images per class and client.

    Measured on today's code (fedsa / proto_avg final average accuracy, data and run seed s):
    s=0 0.078 / 0.203 (ratio 0.38), s=1 0.040 / 0.134 (0.30), s=2 0.056 / 0.193 (0.29); fedsa's
    training loss 21 falling to 16.5-17, proto_avg's 1.6-2.9. The assertion (0.6 x) fails with a
    margin of 0.22 in the ratio on the worst seed. Chance is 1/104. Strict: if FedSA stops
    collapsing here, this test says so."""
    path = write_glyphs(tmp_path / "glyphs.npz", 104, 12, seed=0)
    data = {"source": "npz", "path": str(path), "test_fraction": 0.25}
    fedsa = run_tiny(tmp_path, "fedsa", strategy={"name": "fedsa", "params": {}}, dataset=data, seed=0, **MANY)
    proto_avg = run_tiny(tmp_path, "proto_avg", strategy={"name": "proto_avg", "params": {}}, dataset=data, seed=0, **MANY)
    if proto_avg.summary["final_avg_accuracy"] <= 10 / 104:  # the regime must be learnable (a real failure, not the xfail)
        pytest.fail(f"proto_avg ended at {proto_avg.summary['final_avg_accuracy']:.3f}: the glyphs are not learnable")
    assert fedsa.summary["final_avg_accuracy"] > 0.6 * proto_avg.summary["final_avg_accuracy"]
