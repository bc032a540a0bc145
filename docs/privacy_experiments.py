"""Privacy measurements for docs/privacy.md (run from the repository root):

    OMP_NUM_THREADS=1 python docs/privacy_experiments.py attack SCENARIO --out DIR \
        [--strategies proto_avg,fedproto] [--epsilon 8] [--clip 10] [--set KEY=VALUE ...]
    OMP_NUM_THREADS=1 python docs/privacy_experiments.py sweep SCENARIO --out DIR \
        [--strategies proto_avg,fedproto,fedsa] [--epsilons 1,4,16] [--clip 10] [--set ...]

``attack``: each strategy without and with DP, uploads kept, ``protofed attack`` on each run;
writes DIR/attack.csv and DIR/attack_roc.png. ``sweep``: final average accuracy against
epsilon (plus the run without DP); writes DIR/sweep.csv and DIR/accuracy_epsilon.png.
``plot SCENARIO --out DIR --set A.csv --set B.csv``: one accuracy/epsilon figure from several
sweep.csv / attack.csv files (SCENARIO is ignored). ``pretrain SCENARIO --out scenarios/pretrained``:
the public backbone the accuracy/epsilon scenario loads frozen (SCENARIO is ignored; see
:func:`pretrain`).
Runs use the inline engine, one after the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.engine.runner import run_scenario  # noqa: E402
from simulator.privacy.attack import plot_many, run_attack, tracing_attack, load_uploads  # noqa: E402
from simulator.scenario import load_scenario  # noqa: E402


def _run(scenario: str, strategy: str, sets: list[str], out: Path):
    s = load_scenario(scenario, [f"strategy.name={strategy}", *sets])
    return run_scenario(s, source=scenario, run_dir=out, engine="inline", out=None, plots=False)


def attack(args) -> None:
    rows, curves = [], []
    for strategy in args.strategies.split(","):
        for eps in [None, args.epsilon]:
            sets = [*args.set, "privacy.keep_uploads=true"]
            if eps is not None:
                sets += [f"privacy.epsilon={eps}", f"privacy.clip={args.clip}"]
            label = f"{strategy} {'eps ' + str(eps) if eps is not None else 'no DP'}"
            out = _run(args.scenario, strategy, sets, args.out / f"{strategy}-{'eps' + str(eps) if eps else 'nodp'}")
            res = run_attack(out.run_dir)
            uploads, truth = load_uploads(out.run_dir)
            curves.append((label, tracing_attack(uploads, truth)))
            rows.append({"strategy": strategy, "epsilon": eps, "final_avg_accuracy": out.summary["final_avg_accuracy"],
                         "epsilon_spent_max": out.summary.get("epsilon_spent_max"), **res["tracing"],
                         **{f"inversion_{k}": v for k, v in (res["feature_inversion"] if isinstance(res["feature_inversion"], dict) else {}).items()}})
            print(rows[-1], flush=True)
    pd.DataFrame(rows).to_csv(args.out / "attack.csv", index=False)
    plot_many(curves, args.out / "attack_roc.png")


def sweep(args) -> None:
    rows = []
    for strategy in args.strategies.split(","):
        for eps in [None, *[float(e) for e in args.epsilons.split(",")]]:
            sets = list(args.set)
            if eps is not None:
                sets += [f"privacy.epsilon={eps}", f"privacy.clip={args.clip}"]
            out = _run(args.scenario, strategy, sets, args.out / f"{strategy}-{'eps' + str(eps) if eps else 'nodp'}")
            rows.append({"strategy": strategy, "epsilon": eps, "final_avg_accuracy": out.summary["final_avg_accuracy"],
                         "epsilon_spent_max": out.summary.get("epsilon_spent_max"),
                         "noise_multiplier": out.summary.get("privacy_noise_multiplier")})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(args.out / "sweep.csv", index=False)
    plot_sweep(df, args.out / "accuracy_epsilon.png")


def plot_sweep(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for strategy, g in df.groupby("strategy", sort=False):
        dp = g[g["epsilon"].notna()].sort_values("epsilon")
        line, = ax.plot(dp["epsilon"], dp["final_avg_accuracy"], "o-", label=strategy)
        base = g[g["epsilon"].isna()]["final_avg_accuracy"]
        if len(base):
            ax.axhline(float(base.iloc[0]), color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ticks = sorted(df["epsilon"].dropna().unique())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per client over the run (delta 1e-5)")
    ax.set_ylabel("final average accuracy")
    ax.set_title("accuracy against epsilon (dotted: no DP)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


PUBLIC_DATA_SEED = 2026  # the clients' mnist1d is generated with data_seed 42


def pretrain(args) -> None:
    """The public backbone of ``scenarios/privacy_epsilon_mnist1d.yaml``: a cnn1d (group norm,
    embedding 64) trained with a linear head (cross-entropy) on PUBLIC data only: mnist1d
    generated with another generator seed (``PUBLIC_DATA_SEED``), ``--public-samples`` samples of
    all ten classes, never any client's sample. Under DP the prototype strategies run on it
    frozen (``continual.backbone: frozen``), so their embedding function is independent of the
    private data. Writes the backbone's state dict to ``--out``/cnn1d_group_mnist1d_public.pt."""
    import numpy as np
    import torch

    from simulator.data.sources import Mnist1dParams, _load_mnist1d
    from simulator.learner.backbones import build_model
    from simulator.learner.training import TrainConfig, embed, train_local

    data = _load_mnist1d(Mnist1dParams(num_samples=args.public_samples, data_seed=PUBLIC_DATA_SEED), 0.2, 0)
    model = build_model("cnn1d", data.input_shape, 64, 10, True, 0, norm="group")
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, classifier="head", grad_clip=10.0)
    stats = train_local(model, data.x_train, data.y_train, cfg, seen_classes=range(10), num_classes=10, seed=0)
    model.eval()
    with torch.no_grad():
        acc = float((model.head(embed(model, data.x_test)).argmax(1).numpy() == data.y_test).mean())
    path = args.out / "cnn1d_group_mnist1d_public.pt"
    torch.save(model.backbone.state_dict(), path)
    print({"public_train": len(data.y_train), "public_test_accuracy": round(acc, 3), "loss": round(stats.loss, 3),
           "classes": np.unique(data.y_train).tolist(), "path": str(path)})


def plot_csvs(args) -> None:
    """Several sweep.csv / attack.csv files (given as --set PATH) drawn as one figure."""
    frames = [pd.read_csv(p)[["strategy", "epsilon", "final_avg_accuracy"]] for p in args.set]
    df = pd.concat(frames).drop_duplicates(["strategy", "epsilon"])
    df.to_csv(args.out / "accuracy_epsilon.csv", index=False)
    plot_sweep(df, args.out / "accuracy_epsilon.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["attack", "sweep", "plot", "pretrain"])
    p.add_argument("scenario")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategies", default="proto_avg,fedproto")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--epsilons", default="1,4,16")
    p.add_argument("--clip", type=float, default=10.0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--public-samples", type=int, default=500)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"attack": attack, "sweep": sweep, "plot": plot_csvs, "pretrain": pretrain}[args.what](args)


if __name__ == "__main__":
    main()
