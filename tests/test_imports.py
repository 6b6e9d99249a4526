"""The import graph of alignjax: no cycles at module level, and the layers import one way.

Reference: the source itself, read with ``ast`` (nothing is imported): every
``import`` / ``from ... import`` of ``alignjax/**/*.py`` becomes an edge between
alignjax modules; module-level edges must form a DAG (Tarjan's strongly connected
components, each of size one), and no import at any level may go up a layer
(DESIGN.md: ``losses`` and ``models`` never import ``training``, ``decoding`` or
``study``; ``training`` never imports ``study``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alignjax"


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _is_package(name: str) -> bool:
  return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.AST) -> list[str]:
  """The alignjax modules an import statement in ``module`` loads."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:  # relative: from the module's package
      pkg = module.split(".") if _is_package(module) else module.split(".")[:-1]
      pkg = pkg[:len(pkg) - (node.level - 1)]
      base = ".".join(pkg + ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
  out = []
  for name in names:
    while name and name not in MODULES:  # `import alignjax.x.y` of an attribute path: its module
      name = name.rpartition(".")[0]
    if name.startswith("alignjax") and name != module:
      out.append(name)
  return out


def _type_checking(node: ast.AST) -> bool:
  test = getattr(node, "test", None)
  return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test)


def _imports(module: str, *, top_level_only: bool) -> set[str]:
  """Edges of ``module``: module-level imports (also inside top-level if/try), or every import."""
  tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
  edges: set[str] = set()

  def visit(node, top):
    for child in ast.iter_child_nodes(node):
      if _type_checking(child):
        continue
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        if top or not top_level_only:
          edges.update(_resolve(module, child))
      nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
      visit(child, top and not nested)

  visit(tree, True)
  return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def strong(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strong(v)
  return out


def test_the_walker_sees_known_edges():
  """The graph is not empty: edges every reader can check by eye."""
  graph = {m: _imports(m, top_level_only=True) for m in MODULES}
  assert "alignjax.study.evaluation" in graph["alignjax.study.stages"]
  assert "alignjax.training.algorithms" in graph["alignjax.training.config"]
  assert "alignjax.configs" in graph["alignjax.training.config"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_level_import_cycles():
  graph = {m: _imports(m, top_level_only=True) for m in MODULES}
  assert _cycles(graph) == []


LAYERS = [
    ("alignjax.losses", ("alignjax.training", "alignjax.decoding", "alignjax.study")),
    ("alignjax.models", ("alignjax.training", "alignjax.decoding", "alignjax.study")),
    ("alignjax.training", ("alignjax.study",)),
]


@pytest.mark.parametrize("layer, forbidden", LAYERS)
def test_layers_import_one_way(layer, forbidden):
  """At any level, lazy imports inside functions included."""
  bad = [(m, e) for m in MODULES if m == layer or m.startswith(layer + ".")
         for e in sorted(_imports(m, top_level_only=False)) if e.startswith(forbidden)]
  assert bad == []


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when installed (~4 s per training process); the metrics writer hides it."""
  import subprocess
  import sys
  code = ("import sys\n"
          "from alignjax.training import runtime\n"
          "w = runtime._summary_writer_class()(sys.argv[1]); w.add_scalar('x', 1.0, 1); w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was imported'\n"
          "import importlib.util; assert importlib.util.find_spec('torch') is None or __import__('torch')\n")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
