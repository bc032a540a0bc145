"""``protofed attack RUN_DIR``: how much do released prototypes say about who trained on what?

Tracing (membership) attack on released means, after Homer et al. (2008) and Dwork, Smith,
Steinke, Ullman and Vadhan (FOCS 2015): a released class mean ``p`` moves towards each of the
samples behind it. Given a candidate embedding ``x`` and a reference mean ``m`` of the class
computed from other data, the score is ``<x - m, p - m>``; members score higher than
non-members of the same class. We report the true-positive rate at a 1% false-positive rate
and the AUC, members vs held-out non-members, pooled over every (release, class) of the run
after standardising each release's scores by its non-members (so releases of different scales
pool fairly).

Threat model (stated, not hidden): the server holds (a) what it received (``uploads.npz``,
the uploads as the strategy saw them; only the aggregate under secure aggregation) and (b) the
client's feature extractor at upload time and reference data of each class: a worst case for
prototype-only methods, the ordinary case once backbones are shared or public. Its reference
mean uses one half of the held-out samples of the class; the other half are the non-member
candidates, so the reference never contains a scored sample.

Two baselines say how much of that is the release's own doing. ``model_only_auc`` scores
``-||x - m||^2`` without any release: the extractor alone (it was trained on the members and
embeds them closer to their class centre). ``leave_one_out_auc`` is the standard one: each
member is scored against the release *without it*, ``p_-x = (n p - x) / (n - 1)`` (``n`` the
release's count of the class; under DP the released noisy count and the member's embedding
clipped to ``privacy.clip``, i.e. the same noise draw with the member removed), the non-members
against ``p`` itself. A release that leaves a member out still moves towards the client's other
samples, which the model pulls towards each other and which share the client's data
distribution; the leave-one-out baseline keeps that, so ``auc - leave_one_out_auc`` is what
including the member in the release adds. (Under secure aggregation ``n`` is the aggregate's count.)

Feature inversion (after Mahendran & Vedaldi 2015; Dosovitskiy & Brox 2016 learn a decoder
instead): optimise an input ``x`` so that the client's extractor maps it onto the released
prototype, ``min ||f(x) - p||^2 + 1e-3 ||x||^2`` (Adam, from zeros). The reconstruction is
compared with the client's real samples of the class: is its nearest sample among members and
held-out non-members of the class a member (top-1 retrieval; chance = the members' share), and
the distance to the nearest member relative to the nearest non-member. The baseline inverts the
reference mean instead of the release (what the server knows without the upload).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .mechanism import clip_rows

FPR_TARGET = 0.01


def load_uploads(run_dir: Path) -> tuple[list[dict[str, Any]], dict[tuple[int, int], dict[str, np.ndarray]]]:
    path = run_dir / "uploads.npz"
    if not path.exists():
        raise UserError.single(str(run_dir), "privacy.keep_uploads",
                               "holds no uploads.npz: run the scenario with privacy.keep_uploads: true (--set privacy.keep_uploads=true)")
    uploads: dict[int, dict[str, Any]] = {}
    truth: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    with np.load(path) as z:
        for key in z.files:
            parts = key.split("/")
            if parts[0] == "upload":
                uploads.setdefault(int(parts[1]), {})[parts[2]] = z[key]
            elif parts[0] == "truth":
                truth.setdefault((int(parts[1]), int(parts[2])), {})[parts[3]] = z[key]
    rows = []
    for i in sorted(uploads):
        u = uploads[i]
        sr, task, rnd, pid = (int(v) for v in u["meta"])
        rows.append({"server_round": sr, "task": task, "round": rnd, "pid": pid,
                     "classes": u["classes"], "vectors": u["vectors"], "counts": u["counts"]})
    return rows, truth


def _standardise(s_mem: np.ndarray, s_non: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    sd = s_non.std()
    if not np.isfinite(sd) or sd <= 0:
        return None
    return (s_mem - s_non.mean()) / sd, (s_non - s_non.mean()) / sd


def model_only_scores(members: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The baseline that ignores the release: ``-||x - m||^2`` (a model trained on its members
    embeds them closer to their class centre). What the release adds is the difference."""
    if len(others) < 4 or len(members) == 0:
        return None
    ref, cand = others[0::2].astype(np.float64), others[1::2].astype(np.float64)
    m = ref.mean(axis=0)
    return _standardise(-((members.astype(np.float64) - m) ** 2).sum(1), -((cand - m) ** 2).sum(1))


def tracing_scores(p: np.ndarray, members: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Standardised scores of members and non-member candidates for one released mean ``p``;
    None when there are too few held-out samples to form a reference and candidates."""
    if len(others) < 4 or len(members) == 0:
        return None
    ref, cand = others[0::2].astype(np.float64), others[1::2].astype(np.float64)
    m = ref.mean(axis=0)
    direction = p.astype(np.float64) - m
    s_mem = (members.astype(np.float64) - m) @ direction
    s_non = (cand - m) @ direction
    return _standardise(s_mem, s_non)


def leave_one_out_scores(p: np.ndarray, n: float, members: np.ndarray, others: np.ndarray,
                         clip: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Members scored against the release without them, ``(n p - x) / (n - 1)`` (``x`` clipped
    to ``clip`` when the release clipped it), non-members against ``p``; standardised as
    :func:`tracing_scores`. None without enough held-out samples or with ``n <= 1``."""
    if len(others) < 4 or len(members) == 0 or not np.isfinite(n) or n <= 1:
        return None
    ref, cand = others[0::2].astype(np.float64), others[1::2].astype(np.float64)
    m = ref.mean(axis=0)
    mem = members.astype(np.float64)
    removed = clip_rows(mem, clip) if clip else mem  # what the release summed for this member
    p_loo = (n * p.astype(np.float64)[None, :] - removed) / (n - 1)  # one release per member
    s_mem = ((mem - m) * (p_loo - m)).sum(1)
    s_non = (cand - m) @ (p.astype(np.float64) - m)
    return _standardise(s_mem, s_non)


def _roc_summary(prefix: str, mem: list[np.ndarray], non: list[np.ndarray]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    if not mem:
        return {}
    m, n = np.concatenate(mem), np.concatenate(non)
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    s = np.concatenate([m, n])
    f, t, _ = roc_curve(y, s)
    return {f"{prefix}_auc": float(roc_auc_score(y, s)), f"{prefix}_tpr_at_1pct_fpr": float(t[f <= FPR_TARGET].max(initial=0.0))}


def tracing_attack(uploads: list[dict[str, Any]], truth: dict[tuple[int, int], dict[str, np.ndarray]],
                   clip: float | None = None) -> dict[str, Any]:
    """The tracing attack over every (release, class), with its two baselines (module docstring);
    ``clip``: the DP clip of the run, if any (the leave-one-out baseline removes clipped members)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    mem_all, non_all, base_mem, base_non, loo_mem, loo_non = [], [], [], [], [], []
    releases = 0
    for u in uploads:
        sr, pid = u["server_round"], u["pid"]
        # an aggregate (secure aggregation) is attacked with every client's samples of the round
        owners = [k for (k, r) in truth if r == sr] if pid < 0 else ([pid] if (pid, sr) in truth else [])
        for c, p, n in zip(u["classes"], u["vectors"], u["counts"]):
            for k in owners:
                t = truth[(k, sr)]
                mem = t["member_emb"][t["member_y"] == c]
                non = t["other_emb"][t["other_y"] == c]
                out = tracing_scores(p, mem, non)
                if out is None:
                    continue
                mem_all.append(out[0])
                non_all.append(out[1])
                base = model_only_scores(mem, non)
                if base is not None:
                    base_mem.append(base[0])
                    base_non.append(base[1])
                loo = leave_one_out_scores(p, float(n), mem, non, clip)
                if loo is not None:
                    loo_mem.append(loo[0])
                    loo_non.append(loo[1])
                releases += 1
    if not releases:
        return {"releases": 0}
    mem_s, non_s = np.concatenate(mem_all), np.concatenate(non_all)
    y = np.concatenate([np.ones(len(mem_s)), np.zeros(len(non_s))])
    s = np.concatenate([mem_s, non_s])
    fpr, tpr, _ = roc_curve(y, s)
    baseline = {**_roc_summary("model_only", base_mem, base_non), **_roc_summary("leave_one_out", loo_mem, loo_non)}
    return {
        "releases": releases,
        "members": int(len(mem_s)),
        "non_members": int(len(non_s)),
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_1pct_fpr": float(tpr[fpr <= FPR_TARGET].max(initial=0.0)),
        **baseline,
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
    }


def _model_from(t: dict[str, np.ndarray]):
    import torch

    from ..learner.backbones import build_model

    state = {k[len("model.w."):]: torch.as_tensor(v) for k, v in t.items() if k.startswith("model.w.")}
    # model.norm is recorded since it mattered (group norm under DP); older records: the one that fits
    norms = [str(t["model.spec.norm"])] if "model.spec.norm" in t else ["batch", "group", "none", "batch_local"]
    for i, norm in enumerate(norms):
        model = build_model(str(t["model.spec.backbone"]), tuple(int(v) for v in t["model.spec.input_shape"]),
                            int(t["model.spec.embedding_dim"]), int(t["model.spec.num_classes"]),
                            bool(t["model.spec.with_head"]), 0, norm=norm,
                            aper=bool(t["model.spec.aper"]) if "model.spec.aper" in t else False)
        try:
            model.load_state_dict(state)
            break
        except RuntimeError:
            if i == len(norms) - 1:
                raise
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def invert(model, target: np.ndarray, input_shape: tuple[int, ...], steps: int = 300, seed: int = 0) -> np.ndarray:
    """An input whose embedding is as close as possible to ``target``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (0.01 * torch.randn((1, *input_shape), generator=g)).requires_grad_(True)
    p = torch.as_tensor(target, dtype=torch.float32)[None]
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - p) ** 2).sum() + 1e-3 * (x**2).sum()
        loss.backward()
        opt.step()
    return x.detach().numpy()[0]


def _retrieval(rec: np.ndarray, members: np.ndarray, non: np.ndarray) -> tuple[float, float]:
    dm = np.sqrt(((members.reshape(len(members), -1) - rec.reshape(1, -1)) ** 2).sum(1)).min()
    dn = np.sqrt(((non.reshape(len(non), -1) - rec.reshape(1, -1)) ** 2).sum(1)).min()
    return float(dm < dn), float(dm / max(dn, 1e-12))


def feature_inversion(uploads: list[dict[str, Any]], truth: dict[tuple[int, int], dict[str, np.ndarray]],
                      max_releases: int = 40, steps: int = 300) -> dict[str, Any]:
    """Invert up to ``max_releases`` per-client releases (aggregates are skipped: no single
    extractor produced them)."""
    import torch

    torch.set_num_threads(1)
    hits, ratios, base_hits, base_ratios, chance = [], [], [], [], []
    models: dict[tuple[int, int], Any] = {}
    for u in uploads:
        key = (u["pid"], u["server_round"])
        if u["pid"] < 0 or key not in truth or "member_x" not in truth[key] or "model.spec.backbone" not in truth[key]:
            continue
        t = truth[key]
        for c, p in zip(u["classes"], u["vectors"]):
            mem_x = t["member_x"][t["member_y"] == c]
            non_x = t["other_x"][t["other_y"] == c]
            non_e = t["other_emb"][t["other_y"] == c]
            if len(mem_x) == 0 or len(non_x) < 4 or len(hits) >= max_releases:
                continue
            if key not in models:
                models[key] = _model_from(t)
            shape = tuple(int(v) for v in t["model.spec.input_shape"])
            rec = invert(models[key], p, shape, steps, seed=len(hits))
            ref_mean = non_e[0::2].mean(axis=0)
            base = invert(models[key], ref_mean, shape, steps, seed=len(hits))
            cand = non_x[1::2]  # the reference half is the server's; candidates are the other half
            h, r = _retrieval(rec, mem_x, cand)
            bh, br = _retrieval(base, mem_x, cand)
            hits.append(h)
            ratios.append(r)
            base_hits.append(bh)
            base_ratios.append(br)
            chance.append(len(mem_x) / (len(mem_x) + len(cand)))
    if not hits:
        return {"releases": 0}
    return {
        "releases": len(hits),
        "top1_member_rate": float(np.mean(hits)),
        "top1_member_rate_baseline": float(np.mean(base_hits)),
        "top1_chance": float(np.mean(chance)),
        "median_nearest_member_over_nonmember": float(np.median(ratios)),
        "median_nearest_member_over_nonmember_baseline": float(np.median(base_ratios)),
    }


def run_attack(run_dir: Path, inversion: bool = True) -> dict[str, Any]:
    """Attack one run directory; writes ``attack.json`` and ``plots/attack_roc.png``."""
    run_dir = Path(run_dir)
    uploads, truth = load_uploads(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    cfg_privacy = _privacy_of(run_dir)
    clip = cfg_privacy.get("clip") if cfg_privacy.get("epsilon") or cfg_privacy.get("noise_multiplier") else None
    tracing = tracing_attack(uploads, truth, clip=float(clip) if clip else None)
    result = {
        "run_dir": str(run_dir),
        "strategy": summary.get("strategy"),
        "privacy": cfg_privacy,
        "epsilon_spent_max": summary.get("epsilon_spent_max"),
        "threat_model": "server with the uploads it received, the client's feature extractor at upload time, and held-out reference data of each class",
        "tracing": {k: v for k, v in tracing.items() if k != "roc"},
        "feature_inversion": feature_inversion(uploads, truth) if inversion else "skipped",
    }
    (run_dir / "attack.json").write_text(json.dumps(result, indent=2) + "\n")
    if "roc" in tracing:
        _plot(run_dir / "plots" / "attack_roc.png", tracing, summary.get("strategy", ""), cfg_privacy)
    return result


def _privacy_of(run_dir: Path) -> dict[str, Any]:
    import yaml

    cfg = run_dir / "config.yaml"
    if not cfg.exists():
        return {}
    data = yaml.safe_load(cfg.read_text()) or {}
    return dict(data.get("privacy") or {})


def _plot(path: Path, tracing: dict[str, Any], strategy: str, privacy: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    fpr, tpr = np.asarray(tracing["roc"]["fpr"]), np.asarray(tracing["roc"]["tpr"])
    eps = privacy.get("epsilon") or privacy.get("noise_multiplier")
    label = f"{strategy} ({'DP ' + str(eps) if eps else 'no DP'}) AUC {tracing['auc']:.3f}"
    ax.plot(np.maximum(fpr, 1e-4), tpr, label=label)
    chance = np.logspace(-4, 0, 50)
    ax.plot(chance, chance, "k:", lw=0.8, label="chance")
    ax.axvline(FPR_TARGET, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("tracing attack on released prototypes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_many(results: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """One ROC figure for several runs (label, tracing result with its roc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2))
    for label, tr in results:
        fpr, tpr = np.asarray(tr["roc"]["fpr"]), np.asarray(tr["roc"]["tpr"])
        ax.plot(np.maximum(fpr, 1e-4), tpr, label=f"{label}: AUC {tr['auc']:.3f}, TPR@1% {tr['tpr_at_1pct_fpr']:.3f}")
    chance = np.logspace(-4, 0, 50)
    ax.plot(chance, chance, "k:", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("tracing attack on released prototypes")
    ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
