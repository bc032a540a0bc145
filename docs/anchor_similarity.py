"""How well separated are FedSA's anchors? Random ``g(R)`` anchors against text anchors.

    python docs/anchor_similarity.py [--dim 64] [--seeds 0,1,2] [--names digits]
    python docs/anchor_similarity.py --npz digits|mnist1d --out FILE.npz [--shuffle]

Prints, per seed, the mean cosine similarity between the anchors of distinct classes, the mean
nearest-anchor distance (FedSA's "anchor gap", the contrastive margin when it exceeds the local
gap) relative to the anchors' norm, and the same for the raw 384-d name embeddings. Needs the
``text`` extra. ``--names`` is ``digits`` ("zero".."nine") or a comma-separated list of names.

``--npz`` writes the control in docs/privacy.md instead: the same data as the ``digits`` source (or the
``mnist1d`` source of ``scenarios/split_mnist1d.yaml``: 10,000 samples, data seed 42, test
fraction 0.2, its own split) as an npz file with ``class_names`` "zero".."nine", and with
``--shuffle`` those names in a fixed random order that leaves no name on its own class. Run the
scenario on it with ``dataset: {source: npz, path: FILE.npz}`` (and the scenario's test_fraction).
"""

from __future__ import annotations

import argparse

import numpy as np

from simulator.data.sources import DIGIT_NAMES
from simulator.learner.text_encoder import embed_names
from strategies.fedsa import all_class_anchors, mean_cosine, mean_nearest_gap, text_anchors


def derangement(n: int) -> np.ndarray:
    """The first seeded permutation of ``0..n-1`` (seeds 0, 1, ...) with no fixed point."""
    for s in range(10_000):
        perm = np.random.default_rng(s).permutation(n)
        if not (perm == np.arange(n)).any():
            return perm
    raise RuntimeError("no derangement found")  # pragma: no cover - impossible for n >= 2


def write_npz(source: str, out: str, shuffle: bool) -> None:
    names = np.array(DIGIT_NAMES)
    if shuffle:
        names = names[derangement(len(names))]
    if source == "digits":
        from sklearn.datasets import load_digits

        b = load_digits()
        np.savez(out, x=np.asarray(b.images, dtype=np.float64)[:, None], y=np.asarray(b.target, np.int64), class_names=names)
    else:  # the mnist1d source's arrays for split_mnist1d.yaml, generated as simulator/data/sources.py does
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed, args.train_split = 10000, 42, 1.0 - 0.2
        d = make_dataset(args)
        np.savez(out, x=np.asarray(d["x"])[:, None], y=np.asarray(d["y"], np.int64),
                 x_test=np.asarray(d["x_test"])[:, None], y_test=np.asarray(d["y_test"], np.int64), class_names=names)
    print(f"{out}: class_names {names.tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--names", default="digits")
    ap.add_argument("--npz", choices=["digits", "mnist1d"], help="write the control's npz file instead")
    ap.add_argument("--out", help="with --npz: the file to write")
    ap.add_argument("--shuffle", action="store_true", help="with --npz: names in a deranged order")
    args = ap.parse_args()
    if args.npz:
        if not args.out:
            ap.error("--npz needs --out FILE.npz")
        write_npz(args.npz, args.out, args.shuffle)
        return
    names = list(DIGIT_NAMES) if args.names == "digits" else [n.strip() for n in args.names.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    e = embed_names(names)
    print(f"{len(names)} classes, embedding_dim {args.dim}")
    print(f"name embeddings (384-d): mean cosine {mean_cosine(e):.3f}, nearest gap / norm {mean_nearest_gap(e):.3f}")
    print("seed | random: mean cosine, gap/norm | text: mean cosine, gap/norm")
    for s in seeds:
        rows = []
        for a in (all_class_anchors(s, len(names), args.dim), text_anchors(s, names, args.dim)):
            norm = float(np.linalg.norm(a.astype(np.float64), axis=1).mean())
            rows.append(f"{mean_cosine(a):.3f}, {mean_nearest_gap(a) / norm:.3f}")
        print(f"{s} | {rows[0]} | {rows[1]}")


if __name__ == "__main__":
    main()
