"""Executes every notebook in colab/ top to bottom."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS, "colab/ holds no notebooks"


# The real-model recipe notebook downloads the assets and trains 135M models: the `real` tier.
CASES = [pytest.param(p, marks=pytest.mark.real) if p.name.startswith("real") else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs(path):
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
