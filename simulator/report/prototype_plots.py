"""``plots/prototypes.png``: do the clients' feature spaces agree?

A 2-D PCA (scikit-learn) fitted on the final global prototypes/anchors together with every
client's final local prototypes (``final/global.npz``, ``final/client_prototypes.npz``). One
colour per class: the global prototype is a large star, each client's prototype of that class a
small dot joined to it by a thin line. When clients share one feature space (a shared backbone)
the dots of a class sit around its star; when each client trains its own backbone, a class's
dots scatter and mix with other classes (why ``proto_avg`` without shared weights falls behind).
PCA rather than t-SNE/UMAP: linear, deterministic, and it keeps distances comparable across the
plot, which is what the question is about.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection

from .figure_style import MAX_LEGEND_ENTRIES, _colors, _index_colorbar, _save, plt


MAX_CLIENTS_SHOWN = 200


def _shown_rows(clients: np.ndarray) -> np.ndarray:
    """Rows of the clients drawn: every client up to ``MAX_CLIENTS_SHOWN``, else a fixed seeded
    sample of that many (thousands of dots only hide each other)."""
    clients = np.asarray(clients, dtype=np.int64)
    ids = np.unique(clients)
    if len(ids) <= MAX_CLIENTS_SHOWN:
        return np.arange(len(clients))
    keep = np.random.default_rng(0).choice(ids, size=MAX_CLIENTS_SHOWN, replace=False)
    return np.flatnonzero(np.isin(clients, keep))


def plot_prototypes(run_dir: Path, path: Path, title: str = "") -> Path | None:
    run_dir = Path(run_dir)
    g = np.load(run_dir / "final" / "global.npz")
    c = np.load(run_dir / "final" / "client_prototypes.npz")
    has_global = "proto.classes" in g.files and len(g["proto.classes"]) > 0
    if len(c["classes"]) == 0 and not has_global:
        return None
    from sklearn.decomposition import PCA

    parts = [c["vectors"]]
    if has_global:
        parts.append(g["proto.vectors"])
    allv = np.vstack([p for p in parts if len(p)]).astype(np.float64)
    n_comp = min(2, allv.shape[0], allv.shape[1])
    pca = PCA(n_components=n_comp).fit(allv)

    def project(v: np.ndarray) -> np.ndarray:
        z = pca.transform(np.asarray(v, dtype=np.float64))
        return z if z.shape[1] == 2 else np.hstack([z, np.zeros((len(z), 2 - z.shape[1]))])

    classes = sorted(set(int(x) for x in c["classes"]) | (set(int(x) for x in g["proto.classes"]) if has_global else set()))
    fig, ax = plt.subplots(figsize=(7.0, 5.6), layout="constrained")
    many = len(classes) > MAX_LEGEND_ENTRIES  # a colour bar over the classes instead of a legend entry each
    palette = _index_colorbar(fig, ax, len(classes), f"class, in order of id ({len(classes)} classes)") if many else _colors(len(classes))
    colors = dict(zip(classes, palette))
    zc = project(c["vectors"]) if len(c["classes"]) else np.zeros((0, 2))
    zg = project(g["proto.vectors"]) if has_global else np.zeros((0, 2))
    gpos = {int(k): zg[i] for i, k in enumerate(g["proto.classes"])} if has_global else {}
    shown = _shown_rows(c["client"])
    ck = np.asarray(c["classes"], dtype=np.int64)[shown]
    zs = zc[shown]
    # one LineCollection and one scatter per class, not an artist per point: with 1000 clients the
    # per-point version took two minutes to draw (scale_1000_clients)
    lines = [(zs[i], gpos[int(k)]) for i, k in enumerate(ck) if int(k) in gpos]
    if lines:
        ax.add_collection(LineCollection(lines, colors=[colors[int(k)] for k in ck if int(k) in gpos],
                                         alpha=0.25, linewidths=0.8, zorder=1))
    for k in sorted(set(ck.tolist())):
        sel = ck == k
        ax.scatter(zs[sel, 0], zs[sel, 1], s=18, color=colors[k], alpha=0.75, zorder=2)
    for k, z in gpos.items():
        ax.scatter(z[0], z[1], s=220, marker="*", color=colors[k], edgecolor="black", linewidth=0.8, zorder=3)
    for k in classes if not many else ():
        ax.scatter([], [], color=colors[k], label=f"class {k}")
    ax.scatter([], [], marker="*", s=120, color="white", edgecolor="black", label="global prototype / anchor")
    ax.scatter([], [], s=18, color="0.5", label="a client's local prototype")
    if many:
        ax.legend(loc="best", fontsize=8, framealpha=0.8)
    else:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 ({ratio[0]:.0%} of variance)" if len(ratio) > 0 else "PC 1")
    ax.set_ylabel(f"PC 2 ({ratio[1]:.0%} of variance)" if len(ratio) > 1 else "PC 2")
    n_clients = len(set(int(x) for x in c["client"]))
    n_shown = len(set(int(x) for x in np.asarray(c["client"])[shown]))
    head = f"final prototypes (PCA): global vs {n_clients} clients' local"
    if n_shown < n_clients:
        head = f"final prototypes (PCA): global vs local, {n_shown} of {n_clients} clients drawn\n(a seeded sample; the PCA is fitted on all)"
    ax.set_title((title + "\n" if title else "") + head, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return path
