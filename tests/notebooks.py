"""Runs a colab/ notebook top to bottom in a fresh kernel, as on Colab (tests/test_notebooks.py and the
modules whose work a notebook continues, e.g. tests/test_aligndistil_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"

_WORKDIR = """\
# Added by the tests: the notebook's work directory (tempfile.mkdtemp(prefix={prefix!r})) is {workdir!r},
# where the test module's fixture ran the same config's first stages.
import tempfile as _tempfile
_mkdtemp = _tempfile.mkdtemp
_tempfile.mkdtemp = lambda *a, **k: {workdir!r} if k.get("prefix") == {prefix!r} else _mkdtemp(*a, **k)
"""

_SAVE = """\
# Added by the tests: the notebook's variable {name!r}, saved as JSON for the test.
import json as _json
with open({path!r}, "w") as _f:
  _json.dump({name}, _f)
"""


def execute(name: str, *, tmp_path: Path, monkeypatch=None, before: str | None = None,
            workdir: tuple[str, str] | None = None, save: str | None = None):
  """Executes ``colab/<name>`` in a new ``python3`` kernel (cwd: the repository root); fails on any cell error.

  Args:
    tmp_path: the kernel's TMPDIR (the notebook's ``tempfile.mkdtemp()`` directories land there).
    monkeypatch: sets TMPDIR for the kernel (None: set for this call only, e.g. in a module fixture).
    before: a code cell added before the notebook's first (in memory; the file is not changed).
    workdir: ``(prefix, path)``: ``tempfile.mkdtemp(prefix=prefix)`` returns ``path`` in the notebook.
    save: the name of a notebook variable to return (JSON round trip); ``None``: return nothing.
  """
  if monkeypatch is None:
    with pytest.MonkeyPatch.context() as mp:
      return execute(name, tmp_path=tmp_path, monkeypatch=mp, before=before, workdir=workdir, save=save)
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(COLAB / name, as_version=4)
  added = [before] if before else []
  if workdir is not None:
    added.append(_WORKDIR.format(prefix=workdir[0], workdir=workdir[1]))
  nb.cells[:0] = [nbformat.v4.new_code_cell(src) for src in added]
  saved = None if save is None else tmp_path / f"notebook_{save}.json"
  if saved is not None:
    nb.cells.append(nbformat.v4.new_code_cell(_SAVE.format(name=save, path=str(saved))))
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
  return None if saved is None else json.loads(saved.read_text())


def code_cells(name: str) -> list[str]:
  """The sources of ``colab/<name>``'s code cells."""
  nbformat = pytest.importorskip("nbformat")
  return [c.source for c in nbformat.read(COLAB / name, as_version=4).cells if c.cell_type == "code"]
