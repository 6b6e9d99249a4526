"""Executes every notebook in colab/ top to bottom, each in a fresh kernel (as on Colab).

Two notebooks run the test-sized work that another test module checks in full,
and are executed there: their kernel resumes that module's work directory (the
same config) and finishes it, so the work is paid for once.
colab/frontier_study.ipynb finishes tests/test_study.py's study (stopped before
its last run), colab/aligndistil_pipeline.ipynb tests/test_aligndistil_pipeline.py's
pipeline (run up to DPO). The real-model recipe notebook (``real`` tier) runs
here with DPO as its only method: a cell added before the notebook's first (in
memory; the file is not changed) shortens it through the config module's
``get_config`` (tests/test_real_recipe.py runs all of the methods).
"""

from pathlib import Path

import pytest

from tests import notebooks

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(notebooks.COLAB.glob("*.ipynb"))

# notebook -> (config module, get_config argument, fields replaced in its config)
SHORTER = {
    "real_recipe.ipynb": ("configs.smollm2_dpo", ("test",), dict(methods=("dpo",))),
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


def _install_cell(path: Path) -> str:
  return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def _repository() -> str:
  """pyproject's ``[project.urls] Repository``: the install cell's clone default."""
  tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


def test_every_notebook_starts_with_the_same_install_cell():
  cells = {p.name: _install_cell(p) for p in NOTEBOOKS}
  assert len(set(cells.values())) == 1, sorted(cells)
  assert f'"ALIGNJAX_REPO", "{_repository()}"' in next(iter(cells.values())), "clone default != pyproject's Repository"


@pytest.mark.parametrize("where, env, importable, expected", [
    ("elsewhere", None, False, [["git", "clone", "--depth=1", "<Repository>", "alignjax_repo"], "alignjax_repo"]),
    ("elsewhere", "/srv/alignjax.git", False, [["git", "clone", "--depth=1", "/srv/alignjax.git", "alignjax_repo"],
                                               "alignjax_repo"]),
    ("root", None, False, ["."]),
    ("colab", None, False, [".."]),
    ("elsewhere", None, True, []),
])
def test_install_cell_installs_the_checkout_it_runs_in_or_a_clone(where, env, importable, expected, tmp_path,
                                                                   monkeypatch):
  """The cell's commands, recorded instead of run: Colab (alignjax not importable) with no
  checkout around, inside a checkout (its root, its colab/), and a kernel that has alignjax."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  repository = _repository()
  monkeypatch.chdir({"elsewhere": tmp_path, "root": ROOT, "colab": ROOT / "colab"}[where])
  if env is None:
    monkeypatch.delenv("ALIGNJAX_REPO", raising=False)
  else:
    monkeypatch.setenv("ALIGNJAX_REPO", env)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (find_spec(name, *a) if importable or name != "alignjax" else None))
  calls = []
  monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(list(cmd)))
  monkeypatch.setattr(os, "chdir", lambda d: calls.append(("chdir", d)))
  monkeypatch.setattr(sys, "path", list(sys.path))
  exec(_install_cell(NOTEBOOKS[0]), {})  # pylint: disable=exec-used
  *clone, checkout = expected or [None]
  want = [] if not expected else [
      *[[repository if a == "<Repository>" else a for a in c] for c in clone],
      [sys.executable, "-m", "pip", "install", "-q", "-e", checkout], ("chdir", checkout)]
  assert calls == want


# The real-model recipe notebook downloads the assets and trains 135M models: the `real` tier. The
# study and AlignDistil notebooks finish the work of the test modules that execute them.
ELSEWHERE = {"frontier_study.ipynb": "tests/test_study.py",
             "aligndistil_pipeline.ipynb": "tests/test_aligndistil_pipeline.py"}
CASES = [pytest.param(p, marks=pytest.mark.real) if p.name.startswith("real") else p for p in NOTEBOOKS
         if p.name not in ELSEWHERE]


def test_every_notebook_is_executed_by_a_test():
  for name, module in ELSEWHERE.items():
    assert f'notebooks.execute("{name}"' in (ROOT / module).read_text(), (name, module)
  assert set(ELSEWHERE) <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  # The kernel inherits TMPDIR: the notebooks' tempfile.mkdtemp() work directories land in
  # pytest's tmp_path, not in the system temp dir.
  before = None
  if path.name in SHORTER:
    module, args, fields = SHORTER[path.name]
    before = _SHORTEN.format(module=module, args=args, fields=fields)
  notebooks.execute(path.name, tmp_path=tmp_path, monkeypatch=monkeypatch, before=before)
  if any("mkdtemp" in c for c in notebooks.code_cells(path.name)):  # it worked in tmp_path
    assert any(tmp_path.iterdir()), "the notebook's work directory is not under TMPDIR"
