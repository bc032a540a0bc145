"""Time vectorised cohort training (``train_cohort``) against the sequential loop (``train_local``
over the same models), for cohorts shaped like ``scenarios/scale_1000_clients.yaml``.

Shape: synthetic 32-dim Gaussian class blobs (the synthetic source's formula, class_sep 4),
``mlp`` backbone, embedding 32, the second task of 4 classes (classes 4..7 in the clients' data,
known prototypes of the 4 classes of the first task), 5 to 60 samples per client (uniform), batch
16, one epoch, lr 0.01, momentum 0.9, clip 10 (the defaults), prototype loss. Both arms start from
the same model weights; the model building and copying is outside the timed part. Medians of
``--repeats`` (default 3) per arm and cohort size, interleaved, on one thread by default.

    OMP_NUM_THREADS=1 python docs/bench_vectorized.py [--sizes 10 50 100] [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import torch

from simulator.learner.backbones import build_model
from simulator.learner.prototypes import PrototypeSet
from simulator.learner.training import TrainConfig, train_local
from simulator.learner.vectorized import train_cohort, why_not_vectorizable

DIM, EMB, CLASSES = 32, 32, 20


def cohort(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((CLASSES, DIM)) * (4.0 / np.sqrt(2.0 * DIM))
    xs, ys = [], []
    for _ in range(k):
        n = int(rng.integers(5, 61))
        y = rng.choice(np.arange(4, 8), size=n)
        xs.append((means[y] + rng.standard_normal((n, DIM))).astype(np.float32))
        ys.append(y.astype(np.int64))
    known = PrototypeSet(np.arange(4), rng.standard_normal((4, EMB)).astype(np.float32), np.full(4, 50))
    models = [build_model("mlp", (DIM,), EMB, CLASSES, with_head=False, init_seed=i) for i in range(k)]
    return models, xs, ys, known


def run(k: int, repeats: int, device: str) -> dict:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01)
    models, xs, ys, known = cohort(k)
    assert why_not_vectorizable(models, cfg, hooks_have_losses=False, teacher=None, private=None) is None
    seen = list(range(8))
    models = [m.to(device) for m in models]
    seq_t, vec_t = [], []
    for r in range(repeats):
        ms = copy.deepcopy(models)
        t0 = time.perf_counter()
        for i, m in enumerate(ms):
            train_local(m, xs[i], ys[i], cfg, seen_classes=seen, num_classes=CLASSES, known=known, seed=r * 1000 + i,
                        device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seq_t.append(time.perf_counter() - t0)
        ms_v = copy.deepcopy(models)
        t0 = time.perf_counter()
        train_cohort(ms_v, xs, ys, cfg, seen_classes=[seen] * k, num_classes=CLASSES, knowns=[known] * k,
                     seeds=[r * 1000 + i for i in range(k)], device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        vec_t.append(time.perf_counter() - t0)
        diff = max(float((a - b).detach().abs().max()) for m, v in zip(ms, ms_v) for a, b in zip(m.parameters(), v.parameters()))
    steps = [len(range(0, len(y), 16)) - (1 if len(y) % 16 == 1 else 0) for y in ys]
    return {
        "clients": k, "samples": int(sum(len(y) for y in ys)), "sequential_steps": int(sum(steps)),
        "vectorised_steps": int(max(steps)), "sequential_s": statistics.median(seq_t),
        "vectorised_s": statistics.median(vec_t), "speedup": statistics.median(seq_t) / statistics.median(vec_t),
        "max_weight_diff": diff,
    }


def profile(k: int, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.01)
    models, xs, ys, known = cohort(k)
    seen = list(range(8))
    for name, fn in (
        ("sequential", lambda ms: [train_local(m, xs[i], ys[i], cfg, seen_classes=seen, num_classes=CLASSES, known=known,
                                               seed=i, device=device) for i, m in enumerate(ms)]),
        ("vectorised", lambda ms: train_cohort(ms, xs, ys, cfg, seen_classes=[seen] * k, num_classes=CLASSES,
                                               knowns=[known] * k, seeds=list(range(k)), device=device)),
    ):
        ms = copy.deepcopy(models)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn(ms)
        print(f"--- {name}, {k} clients")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for the largest size")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for k in args.sizes:
        print(json.dumps(run(k, args.repeats, args.device)))
    if args.profile:
        profile(max(args.sizes), args.device)


if __name__ == "__main__":
    main()
