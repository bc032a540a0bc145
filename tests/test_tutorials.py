"""The tutorial notebooks of the docs (docs/tutorials/*.ipynb) run from top to bottom on small
settings, so they never rot; they write only under a temporary folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"


@pytest.mark.parametrize("name", ["quickstart", "sweep", "custom_strategy"])
def test_tutorial_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOFED_TUTORIAL_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(tmp_path.iterdir())
