"""What one message costs a fresh ``flwr-clientapp`` process before any training: Flower's own
client runtime import, loading protofed's ClientApp with Flower's loader, the handler imports,
the run setup (scenario, data stream) and the client's model. Runs N fresh processes and prints
the median of each phase.

    OMP_NUM_THREADS=1 python .ci/startup_cost.py scenarios/quickstart.yaml 5
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
marks = {}
import flwr.supernode.runtime.run_clientapp  # what every flwr-clientapp process imports first
marks["flower runtime import"] = time.perf_counter()
from flwr.supercore.object_ref import load_app
app = load_app("simulator.flower_app:client_app", ValueError, sys.argv[1])
marks["load ClientApp"] = time.perf_counter()
from flwr.app import Context, RecordDict
import simulator.engine.client_app  # the train/evaluate handlers (torch, learner, strategies)
marks["handler imports"] = time.perf_counter()
from simulator import flower_app
ctx = Context(run_id=7, node_id=11, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(),
              run_config={"scenario": sys.argv[2], "state-dir": sys.argv[3]})
setup = flower_app._setup(ctx)
marks["run setup"] = time.perf_counter()
from simulator.engine.runtime import runtime_for
rt = runtime_for(setup)
rt.stream
rt.new_model(0)
marks["runtime, stream, model"] = time.perf_counter()
out, prev = {}, t0
for k, v in marks.items():
    out[k] = v - prev
    prev = v
out["total in process"] = prev - t0
print(json.dumps(out))
"""


def main() -> None:
    scenario = str(Path(sys.argv[1]).absolute())
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rows = []
    with tempfile.TemporaryDirectory() as state:
        for _ in range(n):
            t = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), scenario, state],
                                 capture_output=True, text=True, check=True, cwd=REPO)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["process wall"] = time.perf_counter() - t
            rows.append(row)
    for key in rows[0]:
        print(f"{key:28s} {statistics.median(r[key] for r in rows):7.2f} s")


if __name__ == "__main__":
    main()
