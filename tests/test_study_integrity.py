"""A study's table never silently drops results, a study goes on after a failed run, sweeps
with ``--set`` get their own folder, and the Python API's sweep speaks the API's words.

Real runs of the tiny scenario on the inline engine (one round per task, nothing saved). The
failing run is a real run of a strategy registered in-process (as a plugin would be) whose
server merge raises at the second task: the first task's checkpoint is on disk, the run is
left unfinished, and nothing of the study machinery is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

import protofed
from helpers import tiny
from simulator.cli import main
from simulator.study.run_dirs import overrides_tag
from strategies import STRATEGIES
from strategies.proto_avg import ProtoAvg


def _scenario(tmp_path: Path, name: str = "s.yaml", **over) -> Path:
    raw = tiny(training={"rounds_per_task": 1, "local_epochs": 1, "batch_size": 16, "lr": 0.01},
               output={"dir": str(tmp_path / "res"), "save": "none"}, **over)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


class Boom(ProtoAvg):
    """proto_avg whose server merge fails at the second task (a bug in a plugin strategy)."""

    name = "boom"
    description = "fails at its second round (tests)"

    def aggregate_train(self, server_round, replies):
        if server_round >= 2:
            raise RuntimeError("boom: the merge of round 2 failed")
        return super().aggregate_train(server_round, replies)


@pytest.fixture
def boom(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "boom", Boom)
    return "boom"


def test_compare_table_covers_every_run_of_the_study_in_the_folder(tmp_path, capsys):
    scen = _scenario(tmp_path)
    out = tmp_path / "cmp"
    base = ["compare", str(scen), "--engine", "inline", "--out", str(out)]
    assert main([*base, "--strategies", "local,proto_avg"]) == 0
    first = pd.read_csv(out / "comparison.csv")
    capsys.readouterr()
    assert main([*base, "--strategies", "finetune"]) == 0
    text = capsys.readouterr().out
    df = pd.read_csv(out / "comparison.csv")
    assert sorted(df["label"]) == ["finetune", "local", "proto_avg"]  # not only the call's finetune
    earlier = df[df["label"] != "finetune"].set_index("label")
    assert set(earlier["status"]) == {"kept"} and not earlier["this_call"].any()
    assert bool(df.loc[df["label"] == "finetune", "this_call"].iloc[0]) is True
    old = first.set_index("label")
    for label in ("local", "proto_avg"):  # the figures of the earlier runs, as they were
        assert earlier.loc[label, "final_avg_accuracy"] == pytest.approx(old.loc[label, "final_avg_accuracy"])
    assert "2 runs found in" in text and "local, proto_avg" in text
    assert "local" in text.split("strategy", 1)[1]  # the printed table has their row too

    # a run of another scenario in the folder is refused, named, and nothing is written
    other = _scenario(tmp_path, "other.yaml", clients={"num_clients": 2, "partition": {"scheme": "iid"}})
    assert main(["run", str(other), "--strategy", "fedavg", "--engine", "inline", "--out", str(out / "fedavg" / "seed-0")]) == 0
    before = (out / "comparison.csv").read_text()
    capsys.readouterr()
    assert main([*base, "--strategies", "finetune"]) == 2
    err = capsys.readouterr().err
    assert str(out / "fedavg" / "seed-0") in err and "different scenario" in err and "clients.num_clients" in err
    assert (out / "comparison.csv").read_text() == before


def test_sweep_table_keeps_the_cells_on_disk_and_refuses_another_grid(tmp_path, capsys):
    scen = _scenario(tmp_path)
    out = tmp_path / "sw"
    base = ["sweep", str(scen), "--strategies", "proto_avg", "--seeds", "0", "--engine", "inline", "--out", str(out)]
    assert main([*base, "--grid", "clients.partition.alpha=0.1,10"]) == 0
    capsys.readouterr()
    assert main([*base, "--grid", "clients.partition.alpha=0.1"]) == 0
    text = capsys.readouterr().out
    df = pd.read_csv(out / "sweep.csv")
    assert sorted(df["clients.partition.alpha"]) == [0.1, 10]  # the cell alpha=10 is still in the table
    row = df[df["clients.partition.alpha"] == 10].iloc[0]
    assert row["status"] == "kept" and not row["this_call"] and row["cell"] == "clients.partition.alpha=10"
    assert "1 run found in" in text
    # another grid (other keys) in the same folder is another study: refused, named
    assert main([*base, "--grid", "clients.num_clients=2"]) == 2
    err = capsys.readouterr().err
    assert "clients.partition.alpha=10" in err and "clients.num_clients" in err
    assert sorted(pd.read_csv(out / "sweep.csv")["clients.partition.alpha"]) == [0.1, 10]


def test_sweep_with_set_gets_the_tagged_folder_and_records_the_overrides(tmp_path, capsys):
    scen = _scenario(tmp_path)
    sets = ["--set", "training.lr=0.02"]
    tag = overrides_tag({"training.lr": 0.02})
    assert main(["sweep", str(scen), "--grid", "clients.num_clients=2", "--strategies", "proto_avg", "--seeds", "0",
                 "--engine", "inline", *sets]) == 0
    root = tmp_path / "res" / f"tiny-set-{tag}" / "sweep"
    conf = yaml.safe_load((root / "clients.num_clients=2" / "proto_avg" / "seed-0" / "config.yaml").read_text())
    assert conf["training"]["lr"] == 0.02
    assert conf["overrides"] == {"training.lr": 0.02} and conf["overrides_tag"] == tag
    assert not (tmp_path / "res" / "tiny" / "sweep").exists()
    # compare records its --set the same way, in the folder of the same hash
    assert main(["compare", str(scen), "--strategies", "local", "--engine", "inline", *sets]) == 0
    conf = yaml.safe_load((tmp_path / "res" / f"tiny-set-{tag}" / "local" / "seed-0" / "config.yaml").read_text())
    assert conf["overrides"] == {"training.lr": 0.02} and conf["overrides_tag"] == tag
    # the Python API with a mapping and overrides: the same folder as the command line
    raw = yaml.safe_load(scen.read_text())
    table = protofed.sweep(raw, grid={"clients.num_clients": [2]}, strategies="proto_avg", seeds=0, engine="inline",
                           overrides={"training.lr": 0.02}, progress=False)
    assert list(table["status"]) == ["kept"] and Path(table["run_dir"][0]).parent.parent.parent == root


def test_api_sweep_grid_errors_speak_the_api_and_a_scalar_is_one_value(tmp_path):
    raw = tiny(training={"rounds_per_task": 1}, output={"dir": str(tmp_path / "res"), "save": "none"})
    out = tmp_path / "sw"
    table = protofed.sweep(raw, grid={"clients.partition.alpha": 0.1}, strategies="proto_avg", seeds=0, engine="inline",
                           out_dir=out, progress=False)
    assert list(table["clients.partition.alpha"]) == [0.1] and list(table["status"]) == ["ok"]
    for grid, words in (
        ({"clients.partition.alpha": "0.1,10"}, ["grid=", "clients.partition.alpha", "a list"]),
        ({"clients.partition.alpha": []}, ["grid=", "at least one value"]),
        ({"seed": [1, 2]}, ["grid=", "seed", "seed list"]),
        ("clients.partition.alpha=0.1", ["grid=", "a mapping"]),
        ({"clients.partiton.alpha": [0.1]}, ["clients.partiton", "did you mean"]),  # found when the cell is validated
    ):
        with pytest.raises(protofed.UserError) as exc:
            protofed.sweep(raw, grid=grid, strategies="proto_avg", seeds=0, engine="inline", out_dir=out, progress=False)
        text = exc.value.render()
        assert all(w in text for w in words) and "--" not in text and len(text.splitlines()) < 8, text
    # overwrite=: a run directory of another scenario is refused, then replaced when asked
    changed = dict(raw, training={"rounds_per_task": 1, "lr": 0.05})
    with pytest.raises(protofed.UserError, match="overwrite="):
        protofed.sweep(changed, grid={"clients.partition.alpha": 0.1}, strategies="proto_avg", seeds=0,
                       engine="inline", out_dir=out, progress=False)
    again = protofed.sweep(changed, grid={"clients.partition.alpha": 0.1}, strategies="proto_avg", seeds=0,
                           engine="inline", out_dir=out, progress=False, overwrite=True)
    assert list(again["status"]) == ["ok"]
    conf = yaml.safe_load((out / "clients.partition.alpha=0.1" / "proto_avg" / "seed-0" / "config.yaml").read_text())
    assert conf["training"]["lr"] == 0.05


def test_a_study_goes_on_after_a_failed_run_and_lists_it(tmp_path, capsys, boom):
    scen = _scenario(tmp_path)
    out = tmp_path / "cmp"
    base = ["compare", str(scen), "--engine", "inline", "--out", str(out)]
    assert main([*base, "--strategies", "boom,local"]) == 1
    text = capsys.readouterr().out
    df = pd.read_csv(out / "comparison.csv").set_index("label")
    assert df.loc["local", "status"] == "ok" and df.loc["boom", "status"] == "failed"  # the run after it ran
    failed_part = text.split("failed runs", 1)[1]
    assert str(out / "boom" / "seed-0") in failed_part and "the merge of round 2 failed" in failed_part
    assert json.loads((out / "boom" / "seed-0" / "summary.json").read_text())["completed"] is False
    # a later call without the failed label still lists it (failed, with its reason), exit 0
    assert main([*base, "--strategies", "local"]) == 0
    df = pd.read_csv(out / "comparison.csv").set_index("label")
    assert df.loc["boom", "status"] == "failed" and "round 2" in df.loc["boom", "error"]
    assert df.loc["local", "status"] == "kept"
    # without an earlier table (the process was killed before writing it) the unfinished run is
    # still a row, incomplete, with no figures, and the output says so
    (out / "comparison.csv").unlink()
    capsys.readouterr()
    assert main([*base, "--strategies", "local"]) == 0
    text = capsys.readouterr().out
    df = pd.read_csv(out / "comparison.csv").set_index("label")
    assert df.loc["boom", "status"] == "incomplete" and pd.isna(df.loc["boom", "final_avg_accuracy"])
    assert f"protofed run --resume {out / 'boom' / 'seed-0'}" in text.split("not in the figures", 1)[1]

    sw = tmp_path / "sw"
    code = main(["sweep", str(scen), "--grid", "clients.num_clients=2,3", "--strategies", "boom,local", "--seeds", "0",
                 "--engine", "inline", "--out", str(sw)])
    assert code == 1
    text = capsys.readouterr().out
    df = pd.read_csv(sw / "sweep.csv")
    assert sorted(zip(df["clients.num_clients"], df["label"], df["status"])) == [
        (2, "boom", "failed"), (2, "local", "ok"), (3, "boom", "failed"), (3, "local", "ok")]
    failed_part = text.split("failed runs", 1)[1]
    for n in (2, 3):
        assert str(sw / f"clients.num_clients={n}" / "boom" / "seed-0") in failed_part


class Stop(ProtoAvg):
    """proto_avg interrupted (as by Ctrl-C) at its second round."""

    name = "stop"
    description = "interrupted at its second round (tests)"

    def aggregate_train(self, server_round, replies):
        if server_round >= 2:
            raise KeyboardInterrupt
        return super().aggregate_train(server_round, replies)


def test_an_interrupted_sweep_table_lists_every_planned_run(tmp_path, monkeypatch):
    from simulator.study.sweep import run_sweep

    monkeypatch.setitem(STRATEGIES, "stop", Stop)
    scen = _scenario(tmp_path)
    out = tmp_path / "sw"
    run_sweep(str(scen), {"clients.num_clients": [2]}, ["local"], [0], out_dir=str(out), engine="inline", out=None, plots=False)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(scen), {"clients.num_clients": [3]}, ["local", "stop", "finetune"], [0], out_dir=str(out), engine="inline",
                  out=None, plots=False)
    df = pd.read_csv(out / "sweep.csv")
    got = sorted(zip(df["clients.num_clients"], df["label"], df["status"], df["this_call"]))
    assert got == [(2, "local", "kept", False), (3, "finetune", "pending", True), (3, "local", "ok", True),
                   (3, "stop", "interrupted", True)]
