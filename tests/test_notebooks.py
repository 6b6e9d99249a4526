"""Executes every notebook in colab/ top to bottom, each in a fresh kernel (as on Colab).

The frontier-study notebook runs the test-sized study of configs/study_test.py,
which tests/test_study.py runs and checks in full. Here, to check the notebook's
own code without paying for that study twice, a cell added before the notebook's
first (in memory; the file is not changed) shortens it through the config
module's ``get_config``: DPO (with DeRa) as the only method, fewer steps. Batch
and sequence shapes stay those of the test config, so the programs
tests/test_study.py compiled come from the persistent compilation cache
(tests/conftest.py). (The AlignDistil notebook runs as is: its cost is fixed
costs, not steps.)
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))

# notebook -> (config module, get_config argument, fields replaced in its config)
SHORTER = {
    "frontier_study.ipynb": ("configs.study_test", (), dict(
        methods=("dpo",), dpo_betas=(), best_of_n=(), args_weights=(), genarm_alphas=(), sft_steps=10, steps=5)),
}

_SHORTEN = """\
# Added by tests/test_notebooks.py: a shorter run of the same config (see its docstring).
import importlib as _importlib
_module = _importlib.import_module({module!r})
_get_config = _module.get_config
def _shorter_config(*args):
  cfg = _get_config(*args)
  if args == {args!r}:
    cfg.update({fields!r})
  return cfg
_module.get_config = _shorter_config
"""


def test_there_are_notebooks():
  assert NOTEBOOKS, "colab/ holds no notebooks"


# The real-model recipe notebook downloads the assets and trains 135M models: the `real` tier.
CASES = [pytest.param(p, marks=pytest.mark.real) if p.name.startswith("real") else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits TMPDIR: the notebooks' tempfile.mkdtemp() work directories land in
  # pytest's tmp_path, not in the system temp dir.
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  if path.name in SHORTER:
    module, args, fields = SHORTER[path.name]
    nb.cells.insert(0, nbformat.v4.new_code_cell(_SHORTEN.format(module=module, args=args, fields=fields)))
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  if any("mkdtemp" in c.source for c in nb.cells if c.cell_type == "code"):  # it worked in tmp_path
    assert any(tmp_path.iterdir()), "the notebook's work directory is not under TMPDIR"
