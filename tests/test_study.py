"""The study workflow: ``import protofed`` (run / compare / sweep / load), ``protofed sweep``,
``compare:`` labels that change scenario keys. Real runs on the inline engine with tiny data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import protofed
from helpers import tiny
from simulator.cli import main
from simulator.scenario import validate_scenario

REPO = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    """The exact code block of the README's "Use from Python / a notebook" section."""
    code = _readme_block("## Use from Python / a notebook")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scenarios").symlink_to(REPO / "scenarios")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result, table = namespace["result"], namespace["table"]
    assert isinstance(result, protofed.RunResult)
    assert result.run_dir == Path("results/notebook/fedproto")
    assert result.summary["strategy"] == "fedproto" and result.summary["completed"] is True
    assert result.matrix.shape == (4, 4) and result.local_matrix.shape == (4, 4)
    final_row = result.matrix.iloc[-1]
    assert abs(final_row.mean() - result.summary["final_avg_accuracy"]) < 1e-5
    assert set(result.metrics.columns) >= {"task", "round", "eval_task", "accuracy"}
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert sorted(table["clients.partition.alpha"].unique()) == [0.1, 10]
    assert (tmp_path / "results/notebook/sweep/sweep.csv").is_file()
    assert (tmp_path / "results/notebook/sweep/sweep.png").is_file()
    assert (tmp_path / "results/notebook/sweep/clients.partition.alpha=0.1/fedproto/seed-0/summary.json").is_file()
    # the alpha actually reached each run
    conf = yaml.safe_load((tmp_path / "results/notebook/sweep/clients.partition.alpha=10/proto_avg/seed-0/config.yaml").read_text())
    assert conf["clients"]["partition"]["alpha"] == 10 and conf["training"]["rounds_per_task"] == 1


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_sweep_cli_runs_every_cell_and_resumes(tmp_path, capsys):
    raw = tiny(output={"dir": str(tmp_path / "res")})
    raw["sweep"] = {"grid": {"clients.partition.alpha": [0.1, 10]}, "strategies": ["proto_avg", "local"], "seeds": [0]}
    scen = _write(tmp_path / "s.yaml", raw)
    assert main(["sweep", str(scen)]) == 0
    root = tmp_path / "res" / "tiny" / "sweep"
    df = pd.read_csv(root / "sweep.csv")
    assert list(df.columns[:5]) == ["clients.partition.alpha", "cell", "label", "seed", "status"]
    assert len(df) == 4 and set(df["status"]) == {"ok"}
    assert sorted(set(df["cell"])) == ["clients.partition.alpha=0.1", "clients.partition.alpha=10"]
    for _, row in df.iterrows():
        run = root / row["cell"] / row["label"] / "seed-0"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_avg_accuracy"] == pytest.approx(row["final_avg_accuracy"])
        conf = yaml.safe_load((run / "config.yaml").read_text())
        assert conf["clients"]["partition"]["alpha"] == row["clients.partition.alpha"]
        assert conf["strategy"]["name"] == row["label"]
    # label skew changes the data each client holds: the two cells' client tables differ
    a = pd.read_csv(root / "clients.partition.alpha=0.1/local/seed-0/clients.csv")
    b = pd.read_csv(root / "clients.partition.alpha=10/local/seed-0/clients.csv")
    assert not a["class_ids"].equals(b["class_ids"])
    assert (root / "sweep.png").stat().st_size > 10_000
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("summary.json")}
    capsys.readouterr()

    assert main(["sweep", str(scen)]) == 0  # everything is kept
    out = capsys.readouterr().out
    assert out.count("kept:") == 4
    assert {p: p.stat().st_mtime_ns for p in root.rglob("summary.json")} == stamps
    assert set(pd.read_csv(root / "sweep.csv")["status"]) == {"kept"}


def test_sweep_two_keys_from_the_command_line_draws_heatmaps(tmp_path, capsys):
    scen = _write(tmp_path / "s.yaml", tiny(training={"rounds_per_task": 1, "batch_size": 16}, output={"save": "none"}))
    out = tmp_path / "out"
    code = main(["sweep", str(scen), "--grid", "clients.num_clients=2,3", "--grid", "continual.memory_per_class=0,5",
                 "--strategies", "proto_avg", "--seeds", "0", "--out", str(out)])
    assert code == 0
    df = pd.read_csv(out / "sweep.csv")
    assert len(df) == 4
    assert sorted(zip(df["clients.num_clients"], df["continual.memory_per_class"])) == [(2, 0), (2, 5), (3, 0), (3, 5)]
    assert sorted(df["num_clients"]) == [2, 2, 3, 3]
    assert (out / "clients.num_clients=2,continual.memory_per_class=5" / "proto_avg" / "seed-0" / "summary.json").is_file()
    assert (out / "sweep_heatmap.png").stat().st_size > 10_000
    # protofed plot redraws a sweep folder: every run's plots and the sweep figure, here also as PDF
    assert main(["plot", str(out), "--format", "pdf"]) == 0
    assert (out / "sweep_heatmap.pdf").is_file()
    assert (out / "clients.num_clients=3,continual.memory_per_class=0" / "proto_avg" / "seed-0" / "plots" / "forgetting.pdf").is_file()
    from pypdf import PdfReader

    text = PdfReader(out / "sweep_heatmap.pdf").pages[0].extract_text()
    assert "clients.num_clients" in text and "continual.memory_per_class" in text and "n=1" in text


@pytest.mark.parametrize(
    "grid, field",
    [
        (["clients.partiton.alpha=0.1,1"], "clients.partiton"),  # unknown key: named, with the cell
        (["strategy.name=fedavg,local"], "strategy.name"),  # strategies are chosen by label
        (["clients.num_clients"], "clients.num_clients"),  # no values
        (["clients.num_clients=0,2"], "clients.num_clients"),  # a value out of range
    ],
)
def test_bad_grid_is_one_screen_and_writes_nothing(tmp_path, capsys, grid, field):
    scen = _write(tmp_path / "s.yaml", tiny())
    out = tmp_path / "out"
    argv = ["sweep", str(scen), "--strategies", "proto_avg", "--out", str(out)]
    for g in grid:
        argv += ["--grid", g]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and field in err and "Traceback" not in err
    assert not out.exists()


def test_sweep_section_is_validated(tmp_path):
    raw = tiny()
    raw["sweep"] = {"grid": {"seed": [0, 1]}}
    with pytest.raises(protofed.UserError, match=r"sweep\.grid"):
        validate_scenario(raw, "s.yaml")
    raw["sweep"] = {"grid": {"training.lr": []}}
    with pytest.raises(protofed.UserError, match="at least one value"):
        validate_scenario(raw, "s.yaml")


def test_compare_label_overrides_scenario_keys(tmp_path):
    raw = tiny(output={"dir": str(tmp_path / "res")})
    raw["compare"] = {
        "two_clients": {"name": "proto_avg", "params": {"share_weights": True}, "set": {"clients.num_clients": 2}},
    }
    df = protofed.compare(raw, ["proto_avg", "two_clients"], seeds=[0], engine="inline", progress=False)
    assert list(df["label"]) == ["proto_avg", "two_clients"]
    assert list(df["num_clients"]) == [3, 2]
    root = tmp_path / "res" / "tiny"
    conf = yaml.safe_load((root / "two_clients" / "seed-0" / "config.yaml").read_text())
    assert conf["clients"]["num_clients"] == 2 and conf["strategy"]["name"] == "proto_avg"
    assert conf["strategy"]["params"]["share_weights"] is True
    # the mapping was recorded, and running the recorded file again keeps both runs
    again = protofed.compare(root / "scenario.yaml", "proto_avg,two_clients", seeds=0, engine="inline", progress=False)
    assert list(again["status"]) == ["kept", "kept"]
    bad = dict(raw, compare={"x": {"name": "proto_avg", "set": {"strategy.name": "fedavg"}}})
    with pytest.raises(protofed.UserError, match=r"compare\.x\.set"):
        validate_scenario(bad, "s.yaml")


def test_run_and_load_from_a_mapping_and_a_scenario_object(tmp_path):
    raw = tiny()
    r1 = protofed.run(raw, strategy="fedproto", seed=3, overrides={"training.rounds_per_task": 1}, run_dir=tmp_path / "a", progress=False)
    assert r1.summary["strategy"] == "fedproto" and r1.summary["seed"] == 3
    assert r1.config["training"]["rounds_per_task"] == 1
    assert r1.metrics["round"].max() == 0  # one round per task
    sc, _ = protofed.scenario_from(raw, seed=3, strategy="fedproto", overrides=["training.rounds_per_task=1"])
    r2 = protofed.run(sc, run_dir=tmp_path / "b", progress=False)
    pd.testing.assert_frame_equal(r1.matrix, r2.matrix)  # same scenario, same seed: same matrix
    loaded = protofed.load(tmp_path / "a")
    pd.testing.assert_frame_equal(loaded.metrics, r1.metrics)
    with pytest.raises(protofed.UserError, match="clients.num_clients"):
        protofed.run(raw, overrides={"clients.num_clients": -1}, run_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
    with pytest.raises(protofed.UserError, match="not a finished run"):
        protofed.load(tmp_path)


def test_small_batch_warning_once_with_a_count_in_the_summary(tmp_path):
    import io

    from simulator.engine.runner import run_scenario

    out = io.StringIO()
    outcome = run_scenario(validate_scenario(tiny(training={"rounds_per_task": 1, "batch_size": 24})),
                           run_dir=tmp_path / "r", out=out)
    clients = pd.read_csv(tmp_path / "r" / "clients.csv")
    expected = int(((clients["samples"] > 0) & (clients["samples"] < 24)).sum())
    assert 0 < expected < len(clients)  # some client-tasks are small, not all: the count means something
    assert outcome.summary["small_batch_client_tasks"] == expected
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["small_batch_client_tasks"] == expected
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{expected} of {int((clients['samples'] > 0).sum())} client-tasks" in warnings[0]


def test_unknown_keys_get_a_suggestion_and_schema_prints_the_reference(capsys):
    with pytest.raises(protofed.UserError) as exc:
        validate_scenario({"clients": {"partition": {"scheme": "dirichlet", "alph": 0.1}}, "trainig": {}}, "s.yaml")
    text = exc.value.render()
    assert "clients.partition.alph: unknown key; did you mean 'alpha'?" in text
    assert "trainig: unknown key; did you mean 'training'?" in text
    with pytest.raises(protofed.UserError, match="did you mean 'lambda'"):
        validate_scenario({"strategy": {"name": "fedproto", "params": {"lamda": 1.0}}}, "s.yaml")
    assert main(["schema", "clients.partition"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("clients.partition.scheme  (default iid; iid | dirichlet")
    assert "clients.partition.alpha  (default 0.5" in out and "training.lr" not in out
    assert main(["schema", "trainig.lr"]) == 2
    assert "did you mean 'training.lr'" in capsys.readouterr().err


def test_readme_lists_the_metrics_columns_of_a_real_run(tmp_path):
    text = (REPO / "docs" / "run-directory.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `metrics.csv` |"))
    listed = [c.strip() for c in re.search(r"\): `([^`]*)`", row).group(1).split(",")]
    protofed.run(tiny(training={"rounds_per_task": 1}, output={"save": "none"}), run_dir=tmp_path / "r", progress=False)
    assert listed == list(pd.read_csv(tmp_path / "r" / "metrics.csv").columns)


def test_sweep_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path):
    import io

    from simulator.study.sweep import run_sweep

    raw = tiny(training={"rounds_per_task": 1}, output={"save": "none"})
    scen = _write(tmp_path / "s.yaml", raw)
    plain = io.StringIO()
    run_sweep(str(scen), {"clients.num_clients": [2, 3]}, ["proto_avg"], [0], out_dir=str(tmp_path / "o"), out=plain, plots=False)
    lines = [line for line in plain.getvalue().splitlines() if line.startswith("=== sweep run")]
    assert lines[0].startswith("=== sweep run 1/2 · clients.num_clients=2 · proto_avg · seed 0 · elapsed ")
    assert "ETA" in lines[1] and "\x1b[" not in plain.getvalue()  # an estimate once a run has taken time; no escapes
    term = io.StringIO()
    run_sweep(str(scen), {"clients.num_clients": [2, 3]}, ["proto_avg"], [0], out_dir=str(tmp_path / "o"), out=term,
              plots=False, live=True)
    text = term.getvalue()
    assert "2/2" in text and "\x1b[" in text  # rich drew its bar, with terminal escapes
    assert "kept: " in text  # the run's own lines still reach the terminal above the bar


def test_sweep_bands_are_clipped_and_alpha_gets_a_log_axis():
    from simulator.report.sweep_plots import _spans_decades, band

    df = pd.DataFrame({"a": [0.1, 0.1, 0.1, 10, 10], "final_avg_accuracy": [0.99, 0.97, 0.6, 0.02, 0.3]})
    means, lo, hi, n = band(df, "a", [0.1, 10], "final_avg_accuracy", (0.0, 1.0))
    assert n == [3, 2]
    assert means == pytest.approx([np.mean([0.99, 0.97, 0.6]), 0.16])
    sd = np.std([0.99, 0.97, 0.6], ddof=1)
    assert hi[0] == 1.0 and means[0] + sd > 1.0  # the band would leave [0, 1]: clipped
    assert lo[1] == 0.0 and lo[0] == pytest.approx(means[0] - sd)
    assert _spans_decades(np.array([0.05, 0.1, 0.5, 1, 10])) and not _spans_decades(np.array([2.0, 3.0, 5.0]))


def test_run_progress_lines_carry_elapsed_time_and_an_eta(tmp_path):
    import io

    from simulator.engine.runner import run_scenario

    out = io.StringIO()
    run_scenario(validate_scenario(tiny(output={"save": "none"})), run_dir=tmp_path / "r", out=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("task ")]
    assert len(lines) == 6  # 3 tasks x 2 rounds
    assert all(re.search(r" · elapsed \d+s", line) for line in lines)
    assert all(" · ETA " in line for line in lines[1:-1])  # from the second round to the one before last
    assert " · ETA " not in lines[0] and " · ETA " not in lines[-1]
    assert lines[0].startswith("task 1/3 · round 1/2 · ")  # positions: ids + 1 (README: Counting)


def test_a_value_swept_as_null_is_the_last_category(tmp_path):
    """``--grid privacy.epsilon=2,16,null``: the run without DP is a point of its own
    ("unset", last), read back from sweep.csv (where it is an empty cell) as well."""
    from simulator.report.sweep_plots import UNSET, band, plot_sweep_1d, sweep_order

    df = pd.DataFrame({"privacy.epsilon": [16.0, None, 2.0, None, 2.0], "label": ["a"] * 5, "seed": [0, 0, 0, 1, 1],
                       "status": ["ok"] * 5, "scenario": ["s"] * 5, "final_avg_accuracy": [0.5, 0.8, 0.2, 0.6, 0.3],
                       "avg_incremental_accuracy": [0.5] * 5, "avg_forgetting": [0.1] * 5, "bytes_per_round": [10] * 5})
    df.to_csv(tmp_path / "sweep.csv", index=False)
    for frame in (df, pd.read_csv(tmp_path / "sweep.csv")):
        column, order, x = sweep_order(frame["privacy.epsilon"])
        assert order == [2.0, 16.0, UNSET] and x is None
        means, _, _, n = band(frame.assign(**{"privacy.epsilon": column}), "privacy.epsilon", order, "final_avg_accuracy", (0, 1))
        assert n == [2, 1, 2] and means == pytest.approx([0.25, 0.5, 0.7])
        assert plot_sweep_1d(frame, "privacy.epsilon", tmp_path / "p.png").stat().st_size > 10_000
