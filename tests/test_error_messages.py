"""Error messages that say where the mistake is: a bad ``--set`` names the ``--set`` argument
(not the scenario file, which is fine), a misspelt strategy gets a "did you mean", the scenario
reference says what each list holds, and a closed pipe ends a command quietly."""

from __future__ import annotations

import subprocess
import sys

from simulator.cli import main


def test_a_bad_set_key_blames_the_set_argument_not_the_file(capsys):
    assert main(["validate", "scenarios/quickstart.yaml", "--set", "clients.num_clientz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --set clients.num_clientz=3 (applied to scenarios/quickstart.yaml)"), err
    assert "did you mean 'num_clients'" in err


def test_a_problem_in_the_file_still_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: {lr: -1}\n")
    assert main(["validate", str(bad), "--set", "clients.num_clients=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}"), err
    assert "training.lr" in err and "--set" not in err


def test_a_misspelt_strategy_gets_a_did_you_mean(capsys):
    assert main(["validate", "scenarios/quickstart.yaml", "--set", "strategy.name=fed_proto"]) == 2
    assert "did you mean 'fedproto'" in capsys.readouterr().err


def test_the_reference_says_what_each_list_holds():
    from simulator.schema_doc import render_section

    table = render_section()
    assert "list of class ids" not in table
    row = next(line for line in table.splitlines() if line.startswith("| `output.plot_formats`"))
    assert "list of png, pdf, svg" in row
    row = next(line for line in table.splitlines() if line.startswith("| `sweep.seeds`"))
    assert "list of int" in row


def test_a_closed_pipe_ends_the_command_quietly():
    proc = subprocess.run(f"{sys.executable} -m simulator.cli schema | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.startswith("name") and "internal error" not in proc.stderr, proc.stderr


def test_a_bad_set_on_a_sweep_blames_the_set_argument_too(tmp_path, capsys):
    code = main(["sweep", "scenarios/quickstart.yaml", "--grid", "training.lr=0.1,0.2", "--set", "clients.num_clientz=3",
                 "--out", str(tmp_path / "sweep")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --set clients.num_clientz=3 (applied to scenarios/quickstart.yaml)"), err
    assert not (tmp_path / "sweep").exists()
