"""Error messages that say where the mistake is: a bad ``--set`` names the ``--set`` argument
(not the scenario file, which is fine), a misspelt strategy gets a "did you mean", the scenario
reference says what each list holds, and a closed pipe ends a command quietly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulator.cli import main
from simulator.errors import UserError


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


def _allowed(key: str) -> str:
    """The allowed column of one key in the generated scenario reference."""
    from simulator.report.schema_doc import reference_rows

    return next(row[3] for row in reference_rows() if row[0] == key)


def test_the_reference_says_what_each_list_holds():
    from simulator.report.schema_doc import render_section

    table = render_section()
    assert [line for line in table.splitlines() if "list of class ids" in line] == [
        line for line in table.splitlines() if line.startswith("| `tasks.class_order`")
    ]
    row = next(line for line in table.splitlines() if line.startswith("| `output.plot_formats`"))
    assert "list of png, pdf, svg" in row
    row = next(line for line in table.splitlines() if line.startswith("| `sweep.seeds`"))
    assert "list of int" in row


@pytest.mark.parametrize(
    "key, words",
    [
        ("tasks.class_order", "seeded \\| sorted \\| list of class ids"),
        ("sweep.seeds", "list of integers >= 0"),
        ("sweep.strategies", "list of strings"),
        ("clients.fault_injection", "list of mappings"),
        ("clients.arrival.at_task", "list of integers >= 0, <= 1000000 \\| unset"),
        ("model.backbone", "str \\| list of strings \\| mapping of strings to lists of client ids"),
        ("sweep.grid", "mapping of strings to lists of values"),
        ("compare", "mapping of strings to mappings"),
        ("strategy.params", "mapping of strings to values"),
    ],
)
def test_the_reference_names_what_lists_and_mappings_hold(key, words):
    assert _allowed(key).startswith(words), _allowed(key)


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


# --------------------------------------------------------------------------- a bad override names itself
@pytest.mark.parametrize("flag, field", [("trainin.rounds_per_task=2", "trainin"), ("training.rounds_per_task=-1", "training.rounds_per_task")])
def test_run_with_a_bad_set_names_the_set_argument_in_one_screen(flag, field, capsys):
    assert main(["run", "scenarios/quickstart.yaml", "--set", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --set {flag} (applied to scenarios/quickstart.yaml)\n  {field}: "), err
    assert len(err.splitlines()) <= 3, err


def test_a_top_level_unknown_key_points_at_protofed_schema_without_a_dangling_space(capsys):
    assert main(["validate", "scenarios/quickstart.yaml", "--set", "trainin.rounds_per_task=2"]) == 2
    assert "did you mean 'training'? (`protofed schema` lists the keys)" in capsys.readouterr().err


def test_a_bad_strategy_flag_blames_the_flag_not_the_file(capsys):
    assert main(["run", "scenarios/quickstart.yaml", "--strategy", "fed_proto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strategy fed_proto (applied to scenarios/quickstart.yaml)\n  strategy.name: "), err
    assert "did you mean 'fedproto'" in err


def test_a_bad_seed_flag_blames_the_flag(capsys):
    assert main(["run", "scenarios/quickstart.yaml", "--seed", "-1"]) == 2
    assert capsys.readouterr().err.startswith("error: --seed -1 (applied to scenarios/quickstart.yaml)\n  seed: ")


def test_problems_from_the_file_and_from_set_are_each_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntraining: {lr: -1}\n")
    assert main(["validate", str(bad), "--set", "clients.num_clientz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} (with --set)"), err
    assert "(from --set clients.num_clientz=3)" in err and "training.lr" in err


@pytest.mark.parametrize(
    "overrides, header",
    [
        ({"trainin.rounds_per_task": 2}, "overrides= trainin.rounds_per_task=2 (applied to scenarios/quickstart.yaml)"),
        ({"training.rounds_per_task": -1}, "overrides= training.rounds_per_task=-1 (applied to scenarios/quickstart.yaml)"),
        (["nonsense"], "overrides="),
    ],
)
def test_the_python_api_names_overrides_not_the_file(overrides, header):
    from simulator.api import scenario_from

    with pytest.raises(UserError) as info:
        scenario_from("scenarios/quickstart.yaml", overrides=overrides)
    assert info.value.source == header, info.value.render()
    assert "--set" not in info.value.render()


def test_the_python_api_names_a_bad_strategy_argument():
    from simulator.api import scenario_from

    with pytest.raises(UserError) as info:
        scenario_from("scenarios/quickstart.yaml", strategy="fed_proto")
    assert info.value.source == "strategy='fed_proto' (applied to scenarios/quickstart.yaml)", info.value.render()
    assert "did you mean 'fedproto'" in info.value.render()


def test_the_python_api_still_names_the_scenario_for_its_own_mistakes():
    from simulator.api import scenario_from

    with pytest.raises(UserError) as info:
        scenario_from({"name": "x", "training": {"lr": -1}}, overrides={"clients.num_clients": 3})
    assert info.value.source == "<scenario mapping>", info.value.render()


# --------------------------------------------------------------------------- did you mean, for names
@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_a_misspelt_strategies_label_gets_a_did_you_mean(command, tmp_path, capsys):
    extra = ["--grid", "training.lr=0.1"] if command == "sweep" else []
    code = main([command, "scenarios/quickstart.yaml", "--strategies", "fedproto,fed_avg", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --strategies\n  fed_avg: unknown strategy or compare label; did you mean 'fedavg'"), err
    assert "; allowed: fedavg, fedproto" in err


@pytest.mark.parametrize(
    "setting, hint",
    [("strategy.name=fed_proto", "'fedproto'"), ("model.backbone=resnet_32", "'resnet32'"), ("dataset.source=mnist_1d", "'mnist1d'")],
)
def test_misspelt_registry_names_get_a_did_you_mean(setting, hint, capsys):
    assert main(["validate", "scenarios/quickstart.yaml", "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --set {setting} (applied to"), err
    assert f"did you mean {hint}" in err
