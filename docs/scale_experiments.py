"""The population table and figure of docs/performance.md ("A million clients").

Reads the ``bench.json`` (and each engine's ``profile.json``) of ``protofed bench`` invocations,
groups them by population, takes the median of the repeats and prints a Markdown table; with
``--plot`` it draws setup time, peak memory and a round's wall time against the population, with
the straight-line projection to 15,000,000 clients. The measurement that produced the published
figures (three invocations per population, interleaved, i = 1, 2, 3)::

    OMP_NUM_THREADS=1 protofed bench scenarios/scale_1m_clients.yaml --set clients.num_clients=10000 \\
        --set clients.participation=0.03 --out B<i>
    OMP_NUM_THREADS=1 protofed bench scenarios/scale_1m_clients.yaml --set clients.num_clients=100000 \\
        --set clients.participation=0.003 --out C<i>
    OMP_NUM_THREADS=1 protofed bench scenarios/scale_1m_clients.yaml --out D<i>   # 1,000,000 clients
    OMP_NUM_THREADS=1 protofed bench scenarios/scale_10000_clients.yaml --set clients.participation=0.03 --out A<i>
    OMP_NUM_THREADS=1 protofed bench scenarios/scale_1m_clients.yaml --set clients.num_clients=15000000 \\
        --set clients.participation=0.00002 --out E   # once
    python docs/scale_experiments.py B1 B2 B3 C1 C2 C3 D1 D2 D3 --reference A1 A2 A3 --extra E \\
        --plot docs/scale_clients.png

A round's time does not grow with the population, so only setup, memory and the whole wall time
are projected, each only where its least-squares line rises (a falling line is noise around a
constant: "-").
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SETUP_PHASES = ("prepare", "ray_init", "engine_start", "discover_nodes", "strategy_setup")
ROUND_PHASES = ("configure", "train_exchange", "merge", "evaluate_exchange", "scoring")
PROJECT_TO = 15_000_000


def one_bench(folder: Path) -> dict:
    """Population, and per engine: setup seconds, the median round's seconds, peak memory."""
    bench = json.loads((folder / "bench.json").read_text())
    row = {"clients": int(bench["num_clients"])}
    for engine in ("inline", "ray"):
        prof = json.loads((folder / engine / "profile.json").read_text())
        rounds = [sum(r.get(p, 0.0) for p in ROUND_PHASES) for r in prof["rounds"]]
        row[f"{engine}_setup"] = sum(prof["driver"].get(p, 0.0) for p in SETUP_PHASES)
        row[f"{engine}_round"] = statistics.median(rounds[1:])  # the first round starts the actors
        row[f"{engine}_wall"] = bench["engines"][engine]["wall_seconds"]
        row[f"{engine}_pss_gb"] = bench["engines"][engine]["peak_pss_bytes"] / 1e9
    return row


def medians(folders: list[Path]) -> list[dict]:
    """One row per population: the median of each figure over its repeats."""
    groups: dict[int, list[dict]] = {}
    for folder in folders:
        row = one_bench(folder)
        groups.setdefault(row["clients"], []).append(row)
    out = []
    for clients in sorted(groups):
        rows = groups[clients]
        out.append({"clients": clients, "repeats": len(rows),
                    **{k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "clients"}})
    return out


def projection(rows: list[dict], key: str) -> float:
    """The least-squares line through (clients, figure), read at PROJECT_TO."""
    xs, ys = [r["clients"] for r in rows], [r[key] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my + slope * (PROJECT_TO - mx)


def _shown(rows: list[dict], key: str) -> str:
    """The projection, or "-" where the figure does not grow (a falling line through noise)."""
    value, first = projection(rows, key), rows[0][key]
    return f"{value:.2f}" if value > first else "-"


def table(rows: list[dict]) -> str:
    head = ("| clients | setup inline (s) | setup Ray (s) | round inline (s) | round Ray (s) | wall Ray (s) "
            "| peak PSS inline (GB) | peak PSS Ray (GB) |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['clients']:,} | {r['inline_setup']:.2f} | {r['ray_setup']:.2f} | {r['inline_round']:.2f} | "
                     f"{r['ray_round']:.2f} | {r['ray_wall']:.1f} | {r['inline_pss_gb']:.2f} | {r['ray_pss_gb']:.2f} |")
    keys = ("inline_setup", "ray_setup", "ray_wall", "inline_pss_gb", "ray_pss_gb")
    if len(rows) < 2:
        return "\n".join(lines)
    proj = {k: _shown(rows, k) for k in keys}
    lines.append(f"| {PROJECT_TO:,} (projected, linear) | {proj['inline_setup']} | {proj['ray_setup']} | - | - | "
                 f"{proj['ray_wall']} | {proj['inline_pss_gb']} | {proj['ray_pss_gb']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, reference: dict | None = None, extra: list[dict] = ()) -> None:
    """Three panels against the population; ``reference`` (scale_10000_clients at the same clients
    per round) as a dashed level, ``extra`` (populations measured outside the fit) as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = (("setup", "setup before the first round (s)"), ("round", "one round, 300 clients (s)"),
              ("pss_gb", "peak memory, PSS of the process tree (GB)"))
    xs = [r["clients"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        for engine, colour in (("inline", "tab:blue"), ("ray", "tab:orange")):
            k = f"{engine}_{key}"
            ax.plot(xs, [r[k] for r in rows], "o-", color=colour, label=engine)
            if key != "round" and _shown(rows, k) != "-":  # only a rising line is projected
                ax.plot([xs[-1], PROJECT_TO], [rows[-1][k], projection(rows, k)], ":", color=colour)
            for r in extra:
                ax.plot([r["clients"]], [r[k]], "*", ms=12, color=colour)
            if reference is not None and key == "round":
                ax.axhline(reference[k], ls="--", lw=1, color=colour)
        ax.set_xscale("log")
        ax.set_xlabel("clients in the population")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(title="dotted: linear projection to 15M\nstars: measured outside the fit", fontsize=8, title_fontsize=8)
    if reference is not None:
        axes[1].text(0.02, 0.04, "dashed: scale_10000_clients at 300 clients per round", transform=axes[1].transAxes, fontsize=8)
    fig.suptitle("scale_1m_clients at 10k, 100k and 1M clients (procedural source, 300 clients per round; stars: 15M, one run; "
                 "medians of 3 protofed bench runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="protofed bench output folders")
    parser.add_argument("--plot", type=Path, help="write the figure here")
    parser.add_argument("--reference", nargs="*", type=Path, default=[],
                        help="bench folders of scale_10000_clients at the same clients per round (a dashed level)")
    parser.add_argument("--extra", nargs="*", type=Path, default=[], help="bench folders shown as stars, outside the fit")
    args = parser.parse_args()
    rows = medians(args.folders)
    print(table(rows))
    reference = medians(args.reference)[0] if args.reference else None
    extra = medians(args.extra) if args.extra else []
    for label, more in (("reference", [reference] if reference else []), ("outside the fit", extra)):
        if more:
            print(f"\n{label}:\n" + "\n".join(table(more).splitlines()[2:]))
    if args.plot:
        plot(rows, args.plot, reference, extra)


if __name__ == "__main__":
    main()
