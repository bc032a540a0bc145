"""protofed: federated class-incremental learning with prototypes, from Python.

    import protofed
    result = protofed.run("scenarios/quickstart.yaml", strategy="fedproto", seed=1,
                          overrides={"clients.partition.alpha": 0.1}, engine="inline")
    result.summary["final_avg_accuracy"], result.matrix, result.metrics, result.run_dir
    table = protofed.compare("scenarios/quickstart.yaml", ["proto_avg", "fedproto"], seeds=[0, 1])
    table = protofed.sweep("scenarios/sweep_alpha_mnist1d.yaml")
    again = protofed.load(result.run_dir)
    fig = protofed.plot_forgetting(result)      # matplotlib figures, nothing written

This package is the public import name only; the implementation lives in the ``simulator`` and
``strategies`` packages of the same distribution (their layout is fixed by DESIGN.md §1), which
users never need to import.
"""

from simulator import __version__
from simulator.api import RunResult, compare, load, run, scenario_from, sweep
from simulator.errors import UserError
from simulator.report.plot_api import plot_accuracy_matrix, plot_comparison, plot_forgetting, plot_sweep
from simulator.scenario import Scenario

__all__ = ["__version__", "RunResult", "Scenario", "UserError", "run", "compare", "sweep", "load", "scenario_from",
           "plot_forgetting", "plot_accuracy_matrix", "plot_comparison", "plot_sweep"]
