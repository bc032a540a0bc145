"""How well separated are FedSA's anchors? Random ``g(R)`` anchors against text anchors.

    python docs/anchor_similarity.py [--dim 64] [--seeds 0,1,2] [--names digits]

Prints, per seed, the mean cosine similarity between the anchors of distinct classes, the mean
nearest-anchor distance (FedSA's "anchor gap", the contrastive margin when it exceeds the local
gap) relative to the anchors' norm, and the same for the raw 384-d name embeddings. Needs the
``text`` extra. ``--names`` is ``digits`` ("zero".."nine") or a comma-separated list of names.
"""

from __future__ import annotations

import argparse

import numpy as np

from simulator.data.sources import DIGIT_NAMES
from simulator.text_encoder import embed_names
from strategies.fedsa import all_class_anchors, mean_cosine, mean_nearest_gap, text_anchors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--names", default="digits")
    args = ap.parse_args()
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
