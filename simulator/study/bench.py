"""``protofed bench``: the same scenario on the inline engine and on the Ray engine, back to back,
with the figures that tell where the time goes.

Per engine: wall time; client compute (measured inside the client handlers); per-round engine
overhead = the training phase's wall time minus the slowest client's compute in that round
(median over rounds); client updates per second; the share of wall time spent evaluating; peak
resident memory of the whole process tree (this process, Ray's own processes and its workers,
sampled every 0.2 s); bytes per round; the largest ``context.state`` a client shipped. Both
accuracy matrices must be identical.

``profile`` in bench.json: per engine, the seconds of each phase summed over the run (from each
run directory's ``profile.json``, simulator/engine/profile.py). ``driver.*`` phases happen one
after the other in the driver and, with ``engine_overhead`` (wall time minus their sum), add up to
the wall time. ``client.train.*`` / ``client.evaluate.*`` are measured inside the client handlers
and summed over every call: they happen inside ``driver.train_exchange`` /
``driver.evaluate_exchange``, on several workers at once under Ray; ``*.unattributed`` is the
handlers' time outside the named phases. ``exchange_minus_client_compute`` estimates what the
messaging itself costs: both exchanges' wall time minus the clients' summed compute spread over
the workers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd
import psutil

from ..results import atomic_write_text
from ..scenario import Scenario

BENCH_KEYS = (
    "inline_wall_seconds",
    "ray_wall_seconds",
    "ratio",
    "round_overhead_seconds",
    "client_updates_per_second",
    "peak_rss_bytes",
    "eval_share",
    "bytes_per_round",
    "matrices_identical",
)


def _pss(pid: int) -> int | None:
    """Proportional set size (Linux ``/proc/<pid>/smaps_rollup``): the process's private memory
    plus its share of pages mapped by several processes (torch's libraries in every Ray worker),
    so summing it over a process tree counts each page once. None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class TreeMemorySampler:
    """Peak summed RSS of a process and all its descendants, sampled in a background thread;
    also the peak summed PSS (every ``pss_every``-th sample: reading it costs the kernel a page
    walk) and the CPU seconds each process used while sampled (:meth:`cpu_seconds`). RSS counts
    a page shared by N processes N times, so its sum overstates a process tree's memory; PSS
    does not."""

    def __init__(self, pid: int | None = None, interval: float = 0.2, pss_every: int = 5) -> None:
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self.peak_pss: int | None = None
        self._pss_every = pss_every
        self._samples = 0
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds so far)
        self._title: dict[int, str] = {}  # pid -> what the process calls itself (for the top list)
        self._cpu_before = self._cpu_of(self.root)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        procs = [self.root]
        try:
            procs += self.root.children(recursive=True)
        except psutil.Error:
            pass
        with_pss = self._samples % self._pss_every == 0
        self._samples += 1
        pss_total: int | None = 0 if with_pss else None
        for p in procs:
            if pss_total is not None:
                pss = _pss(p.pid)
                pss_total = None if pss is None else pss_total + pss
            try:
                total += p.memory_info().rss
                # a worker shows its ray:: title only once started: classify until it is a worker
                kind = self._cpu[p.pid][0] if self._cpu.get(p.pid, ("",))[0] in ("driver", "ray_workers") else self._kind(p)
                self._cpu[p.pid] = (kind, max(self._cpu_of(p), self._cpu.get(p.pid, ("", 0.0))[1]))
                if kind == "ray_system" and p.pid not in self._title:
                    self._title[p.pid] = _short_title(p.cmdline())
            except psutil.Error:
                continue
        self.peak = max(self.peak, total)
        if pss_total is not None:
            self.peak_pss = max(self.peak_pss or 0, pss_total)
        return total

    @staticmethod
    def _cpu_of(p: psutil.Process) -> float:
        t = p.cpu_times()
        return float(t.user + t.system)

    def _kind(self, p: psutil.Process) -> str:
        """driver (this process: the ServerApp loop and, under Ray, Flower's and Ray's threads
        in it), ray_workers (the actors running the ClientApp, or idle workers) or ray_system."""
        if p.pid == self.root.pid:
            return "driver"
        cmd = p.cmdline()
        title = " ".join(cmd[:1])
        if (title.startswith("ray::") and ("Actor" in title or "IDLE" in title)) or any(
            c.endswith("default_worker.py") for c in cmd
        ):
            return "ray_workers"
        return "ray_system"

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) per kind of process while sampled (a process that ended
        between two samples lost its last 0.2 s at most), and how many worker processes ran."""
        out = {"driver": 0.0, "ray_workers": 0.0, "ray_system": 0.0}
        for kind, sec in self._cpu.values():
            out[kind] += sec
        out["driver"] -= self._cpu_before
        out["ray_worker_processes"] = float(sum(1 for kind, _ in self._cpu.values() if kind == "ray_workers"))
        return out

    def top_system(self, n: int = 5) -> list[tuple[str, float]]:
        """The Ray system processes that used the most CPU while sampled."""
        rows = [(self._title.get(pid, str(pid)), sec) for pid, (kind, sec) in self._cpu.items() if kind == "ray_system"]
        return [(t, round(sec, 2)) for t, sec in sorted(rows, key=lambda r: -r[1])[:n]]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemorySampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _short_title(cmd: list[str]) -> str:
    """``raylet``, ``gcs_server``, ``ray::DashboardAgent``, ``log_monitor.py``...: the process's
    title or its program's (or Python script's) file name."""
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    scripts = [c for c in cmd[1:4] if c.endswith(".py")]
    if "-m" in cmd[1:3]:
        return cmd[cmd.index("-m") + 1]
    return os.path.basename(scripts[0] if scripts else cmd[0])


def engine_figures(run_dir: Path, wall: float, workers: int = 1) -> dict[str, Any]:
    """Figures of one run from its metrics.csv (one row per round after de-duplication).

    Round overhead: the training phase's wall time minus the time the clients' compute needs at
    best on ``workers`` parallel workers (the slowest client, or the summed compute spread evenly
    over the workers when there are more clients than workers). The issue's literal definition
    (wall time minus the slowest client only) is kept as ``round_overhead_literal_seconds``: with
    more clients than actors it counts queueing behind other clients as overhead."""
    m = pd.read_csv(run_dir / "metrics.csv").drop_duplicates("global_round")
    # max_client_seconds is NaN in vectorised rounds (no member's own time): the summed compute over
    # the workers alone then bounds the makespan (fmax ignores the NaN)
    makespan = np.fmax(m["max_client_seconds"], m["client_seconds"] / max(1, workers))
    overhead = (m["train_seconds"] - makespan).clip(lower=0)
    literal = (m["train_seconds"] - m["max_client_seconds"]).clip(lower=0)
    updates = int(m["clients_trained"].sum())
    return {
        "wall_seconds": wall,
        "workers": workers,
        "client_compute_seconds": float(m["client_seconds"].sum()),
        "round_overhead_seconds": float(overhead.median()),
        "round_overhead_seconds_max": float(overhead.max()),
        "round_overhead_literal_seconds": float(literal.median()),
        "clients_per_round": float(m["clients_trained"].mean()),
        "client_updates": updates,
        "client_updates_per_second": updates / wall if wall > 0 else float("nan"),
        "eval_seconds": float(m["eval_seconds"].sum()),
        "eval_share": float(m["eval_seconds"].sum()) / wall if wall > 0 else float("nan"),
        "bytes_per_round": float((m["bytes_up"] + m["bytes_down"]).mean()),
        "context_state_bytes": int(m["context_state_bytes"].max()) if "context_state_bytes" in m else 0,
    }


def engine_profile(run_dir: Path, wall: float, workers: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """The flat phase breakdown of one run (seconds) and its client call counts."""
    from ..engine.profile import DRIVER_PHASES, EVALUATE_PHASES, PROFILE_FILE, TRAIN_PHASES

    p = json.loads((run_dir / PROFILE_FILE).read_text())
    flat: dict[str, float] = {"wall": wall}
    names = list(DRIVER_PHASES) + [k for k in p["driver"] if k not in DRIVER_PHASES]
    for name in names:
        flat[f"driver.{name}"] = float(p["driver"].get(name, 0.0))
    flat["engine_overhead"] = wall - sum(float(v) for v in p["driver"].values())
    for kind, order in (("train", TRAIN_PHASES), ("evaluate", EVALUATE_PHASES)):
        phases = p[f"client_{kind}"]
        for name in list(order) + [k for k in phases if k not in order]:
            flat[f"client.{kind}.{name}"] = float(phases.get(name, 0.0))
        flat[f"client.{kind}.unattributed"] = float(p["client_compute_seconds"][kind]) - sum(float(v) for v in phases.values())
    compute = sum(float(v) for v in p["client_compute_seconds"].values())
    flat["exchange_minus_client_compute"] = (
        flat["driver.train_exchange"] + flat["driver.evaluate_exchange"] - compute / max(1, workers)
    )
    return flat, {k: int(v) for k, v in p["client_calls"].items()}


def run_bench(
    scenario: Scenario,
    *,
    source: str,
    out_dir: Path,
    verbose: bool = False,
    out: TextIO | None = sys.stdout,
) -> dict[str, Any]:
    from ..engine.runner import build_stream_checked, check_writable, run_scenario

    build_stream_checked(scenario, source)
    check_writable(out_dir)
    say = (lambda t: print(t, file=out, flush=True)) if out else (lambda t: None)
    per_engine: dict[str, dict[str, Any]] = {}
    matrices = {}
    profiles: dict[str, dict[str, float]] = {}
    for engine in ("inline", "ray"):
        say(f"\n=== {engine} engine ===")
        with TreeMemorySampler() as mem:
            t0 = time.perf_counter()
            outcome = run_scenario(scenario, source=source, run_dir=out_dir / engine, engine=engine, verbose=verbose, out=out, plots=False, overwrite=True)
            wall = time.perf_counter() - t0
        workers = 1 if engine == "inline" else max(1, (os.cpu_count() or 1) // scenario.resources.num_cpus_per_client)
        if engine == "ray" and scenario.resources.ray_address:
            workers = max(1, workers)  # a remote cluster's size is not known here; a lower bound
        figs = engine_figures(out_dir / engine, wall, workers)
        figs["peak_rss_bytes"] = mem.peak
        figs["peak_pss_bytes"] = mem.peak_pss
        figs["cpu_seconds"] = mem.cpu_seconds()
        figs["cpu_seconds_top_ray_system"] = mem.top_system()
        figs["final_avg_accuracy"] = outcome.summary["final_avg_accuracy"]
        profiles[engine], figs["client_calls"] = engine_profile(out_dir / engine, wall, workers)
        raw_profile = json.loads((out_dir / engine / "profile.json").read_text())
        figs["cohorts"] = raw_profile.get("cohorts")  # engine calls when clients_per_call > 1
        if "gpu_peak_bytes_per_worker" in raw_profile:  # clients on a GPU: torch's peak per actor process
            figs["gpu_peak_bytes_per_actor"] = raw_profile["gpu_peak_bytes_per_worker"]
        per_engine[engine] = figs
        matrices[engine] = outcome.matrix
    inline, ray = per_engine["inline"], per_engine["ray"]
    result = {
        "scenario": scenario.name,
        "strategy": scenario.strategy.name,
        "num_clients": scenario.clients.num_clients,
        "num_cpus_per_client": scenario.resources.num_cpus_per_client,
        "cpus": os.cpu_count(),
        "inline_wall_seconds": inline["wall_seconds"],
        "ray_wall_seconds": ray["wall_seconds"],
        "ratio": ray["wall_seconds"] / inline["wall_seconds"],
        "round_overhead_seconds": ray["round_overhead_seconds"],
        "round_overhead_budget_seconds": 0.2 + 0.01 * ray["clients_per_round"],
        "round_overhead_literal_seconds": ray["round_overhead_literal_seconds"],
        "client_updates_per_second": ray["client_updates_per_second"],
        "peak_rss_bytes": max(inline["peak_rss_bytes"], ray["peak_rss_bytes"]),
        "ray_peak_pss_bytes": ray["peak_pss_bytes"],
        "eval_share": ray["eval_share"],
        "bytes_per_round": ray["bytes_per_round"],
        "matrices_identical": bool(np.array_equal(matrices["inline"], matrices["ray"], equal_nan=True)),
        "engines": per_engine,
        "profile": profiles,
    }
    atomic_write_text(out_dir / "bench.json", json.dumps(result, indent=2))
    if out:
        print(file=out)
        print(format_bench(result), file=out)
        print(file=out)
        print(format_profile(result["profile"]), file=out)
        print(f"\nbench.json and both run directories in {out_dir}", file=out)
    return result


def format_bench(r: dict[str, Any]) -> str:
    e = r["engines"]
    rows = [
        ("wall time (s)", f"{e['inline']['wall_seconds']:.1f}", f"{e['ray']['wall_seconds']:.1f}"),
        ("client compute, summed (s)", f"{e['inline']['client_compute_seconds']:.1f}", f"{e['ray']['client_compute_seconds']:.1f}"),
        ("round overhead, median (s)", f"{e['inline']['round_overhead_seconds']:.3f}", f"{e['ray']['round_overhead_seconds']:.3f}"),
        ("  wall minus slowest client (s)", f"{e['inline']['round_overhead_literal_seconds']:.3f}", f"{e['ray']['round_overhead_literal_seconds']:.3f}"),
        ("client updates per second", f"{e['inline']['client_updates_per_second']:.2f}", f"{e['ray']['client_updates_per_second']:.2f}"),
        ("evaluation share of wall time", f"{e['inline']['eval_share']:.1%}", f"{e['ray']['eval_share']:.1%}"),
        ("peak RSS, process tree (MB)", f"{e['inline']['peak_rss_bytes'] / 1e6:.0f}", f"{e['ray']['peak_rss_bytes'] / 1e6:.0f}"),
        ("peak PSS, process tree (MB)", *[f"{e[k]['peak_pss_bytes'] / 1e6:.0f}" if e[k].get("peak_pss_bytes") else "n/a"
                                          for k in ("inline", "ray")]),
        ("bytes per round", f"{e['inline']['bytes_per_round']:,.0f}", f"{e['ray']['bytes_per_round']:,.0f}"),
        ("largest context.state (bytes)", str(e["inline"]["context_state_bytes"]), str(e["ray"]["context_state_bytes"])),
        *[(f"CPU seconds, {k.replace('_', ' ')}", f"{e['inline'].get('cpu_seconds', {}).get(k, 0.0):.1f}",
           f"{e['ray'].get('cpu_seconds', {}).get(k, 0.0):.1f}") for k in ("driver", "ray_workers", "ray_system")],
        ("final average accuracy", f"{e['inline']['final_avg_accuracy']:.4f}", f"{e['ray']['final_avg_accuracy']:.4f}"),
    ]
    w = max(len(r0[0]) for r0 in rows)
    lines = [f"{'':<{w}}  {'inline':>12}  {'ray':>12}"]
    lines += [f"{a:<{w}}  {b:>12}  {c:>12}" for a, b, c in rows]
    cohorts = e["ray"].get("cohorts")
    if cohorts:
        lines.append(f"Ray cohorts: {cohorts['clients_per_call']} clients per call on {cohorts['supernodes']} SuperNodes, "
                     f"{cohorts['engine_calls']} engine calls for {cohorts['client_messages']} client messages")
    lines.append(
        f"Ray / inline wall-time ratio {r['ratio']:.2f} · round overhead {r['round_overhead_seconds']:.3f} s "
        f"(budget {r['round_overhead_budget_seconds']:.3f} s) · matrices identical: {r['matrices_identical']}"
    )
    return "\n".join(lines)


def format_profile(profile: dict[str, dict[str, float]]) -> str:
    """The per-phase table: seconds summed over the run, one column per engine."""
    engines = list(profile)
    keys: list[str] = []
    for e in engines:
        keys += [k for k in profile[e] if k not in keys]
    def label(k: str) -> str:
        return k if k in ("wall", "engine_overhead") or k.startswith("driver.") else "  " + k

    title = "where the time goes (s, summed)"
    w = max(len(title), *(len(label(k)) for k in keys))
    lines = [f"{title:<{w}}  " + "  ".join(f"{e:>9}" for e in engines)]
    for k in keys:
        if all(abs(profile[e].get(k, 0.0)) < 0.0005 for e in engines):
            continue  # a phase neither engine has (e.g. ray_init inline)
        lines.append(f"{label(k):<{w}}  " + "  ".join(f"{profile[e].get(k, 0.0):>9.2f}" for e in engines))
    lines.append("driver.* + engine_overhead = wall; client.* run inside the exchanges (summed over clients, "
                 "in parallel on Ray's workers)")
    return "\n".join(lines)
