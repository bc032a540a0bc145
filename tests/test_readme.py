"""The docs' scenario reference is generated from the schema and must not drift."""

from pathlib import Path

from simulator.report.schema_doc import END, START, render_section

README = Path(__file__).resolve().parents[1] / "docs" / "scenario-reference.md"


def test_readme_scenario_reference_is_up_to_date():
    text = README.read_text()
    assert START in text and END in text
    current = START + text.split(START, 1)[1].split(END, 1)[0] + END
    assert current == render_section(), "run: python -m simulator.report.schema_doc --write docs/scenario-reference.md"


def test_reference_lists_every_top_level_section():
    table = render_section()
    for key in ("dataset.source", "tasks.initial_classes", "clients.partition.alpha", "continual.memory_per_class",
                "resources.num_gpus_per_client", "strategy.params.share_weights", "evaluation.protocol"):
        assert f"`{key}`" in table
