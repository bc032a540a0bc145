"""GPU check for the Ray engine: ``protofed bench`` on a GPU scenario, with GPU memory per actor.

Run it on a machine with an NVIDIA GPU, from the repository root:

    python docs/gpu_device_check.py --out gpu-check            # writes gpu-check/bench.json

It writes a CIFAR-100-format file of random images (nothing is downloaded), then runs
``protofed bench`` on ``scenarios/cifar100_b50_inc10.yaml`` (``resnet32`` clients) shrunk to
one round per task and every client in every round, with a fractional GPU per client (``--gpus-per-client``, default 0.25: four
Ray actors share the GPU). ``bench.json`` holds both engines' wall times and phase profiles, and
``engines.<engine>.gpu_peak_bytes_per_actor``: the peak GPU memory torch allocated in each client
process. On a machine without a CUDA GPU it says so and exits with status 3, running nothing.

``--deterministic on|off`` sets ``resources.deterministic`` (default on, as in a scenario): with
it on, ``bench.json``'s ``matrices_identical`` compares the two engines' CUDA runs exactly.
While bench runs, ``nvidia-smi`` (when present) samples the GPU's utilisation every 0.5 s; the
busy share (samples with utilisation above 0) and the mean utilisation go to ``gpu_util.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NO_GPU_EXIT = 3


def write_cifar100(root: Path, per_class: int) -> None:
    """Random 32x32 RGB images in the CIFAR-100 python format (what the cifar source reads)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, reps in (("train", per_class), ("test", max(1, per_class // 5))):
        fine = np.tile(np.arange(100), reps)
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        (base / name).write_bytes(pickle.dumps({b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                                                b"data": data}, protocol=4))
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                                              b"coarse_label_names": [f"group{i}".encode() for i in range(20)]}, protocol=4))


class GpuSampler:
    """``nvidia-smi`` utilisation samples while the block runs (nothing when it is missing)."""

    def __init__(self, path: Path) -> None:
        self.path, self.proc = path, None

    def __enter__(self) -> "GpuSampler":
        import shutil

        if shutil.which("nvidia-smi"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.raw = self.path.with_suffix(".csv")
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "500"],
                                         stdout=open(self.raw, "w"), stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait()
        rows = [line.split(",") for line in self.raw.read_text().splitlines() if line.strip()]
        util = [float(r[0]) for r in rows if r[0].strip().replace(".", "").isdigit()]
        figs = {"samples": len(util), "busy_share": sum(u > 0 for u in util) / max(1, len(util)),
                "mean_utilization_percent": sum(util) / max(1, len(util)),
                "max_memory_used_mib": max((float(r[1]) for r in rows if len(r) > 1), default=0.0)}
        self.path.write_text(json.dumps(figs, indent=1))
        print(f"GPU utilisation while bench ran: busy {figs['busy_share']:.0%} of {len(util)} samples, "
              f"mean {figs['mean_utilization_percent']:.0f}%", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check", help="bench output folder (default: gpu-check)")
    ap.add_argument("--gpus-per-client", type=float, default=0.25)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=50, help="training images per class in the generated file")
    ap.add_argument("--deterministic", choices=("on", "off"), default="on", help="resources.deterministic")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}); "
              "this check needs a GPU machine, and nothing was run", file=sys.stderr)
        return NO_GPU_EXIT
    print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="protofed-gpu-") as tmp:
        write_cifar100(Path(tmp), args.per_class)
        cmd = [sys.executable, "-m", "simulator.cli", "bench", str(REPO / "scenarios" / "cifar100_b50_inc10.yaml"),
               "--out", args.out,
               "--set", f"dataset.root={tmp}",
               "--set", f"clients.num_clients={args.clients}",
               "--set", "clients.partition={scheme: iid}",
               "--set", "clients.participation=1.0",
               "--set", "training.rounds_per_task=1",
               "--set", f"resources.num_gpus_per_client={args.gpus_per_client}",
               "--set", f"resources.deterministic={'true' if args.deterministic == 'on' else 'false'}"]
        print(" ".join(cmd), flush=True)
        with GpuSampler(Path(args.out) / "gpu_util.json"):
            rc = subprocess.call(cmd, cwd=REPO)
    if rc != 0:
        return rc
    bench = json.loads((Path(args.out) / "bench.json").read_text())
    for engine, figs in bench["engines"].items():
        peaks = figs.get("gpu_peak_bytes_per_actor") or {}
        shown = ", ".join(f"{v / 2**20:.0f} MiB" for v in peaks.values()) or "none reported (clients ran on the CPU?)"
        print(f"{engine}: wall {figs['wall_seconds']:.1f} s, GPU peak per actor: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
