"""Import directions, read from the source (AST, no imports run): the layers import downwards
only, and the project's modules form no circle.

    configs       ml_collections, the standard library and other configs only
    modeling      nothing from parallelism, training, checkpoint or scripts
    parallelism   nothing from training or scripts
    checkpoint    nothing from training or scripts
    training      nothing from scripts or train.py
    scripts and train.py: anything

Every import counts, function-local ones too: a circle broken by an import inside a function
is still a circle (it only moves the failure from import time to call time).
"""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('configs', 'modeling', 'parallelism', 'training', 'checkpoint', 'scripts')
TOP_MODULES = ('train',)
PROJECT = (*PACKAGES, *TOP_MODULES)

# Package -> the project packages it must never import.
FORBIDDEN = {
    'modeling': ('parallelism', 'training', 'checkpoint', 'scripts', 'train'),
    'parallelism': ('training', 'scripts', 'train'),
    'checkpoint': ('training', 'scripts', 'train'),
    'training': ('scripts', 'train'),
}


def _module_files() -> dict[str, str]:
  """Dotted module name -> file, for every .py file of the project (not tests)."""
  files = {m: os.path.join(ROOT, f'{m}.py') for m in TOP_MODULES}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(('.', '__')))
      for name in sorted(filenames):
        if not name.endswith('.py'):
          continue
        parts = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        files['.'.join(parts)] = os.path.join(dirpath, name)
  return files


MODULES = _module_files()


def _is_package(module: str) -> bool:
  return MODULES.get(module, '').endswith('__init__.py')


def _resolve(module: str, node: ast.ImportFrom) -> str:
  """The absolute module an ImportFrom reads from (relative levels resolved)."""
  if not node.level:
    return node.module or ''
  base = module.split('.') if _is_package(module) else module.split('.')[:-1]
  base = base[:len(base) - (node.level - 1)]
  return '.'.join([*base, *([node.module] if node.module else [])])


def imports_of(module: str) -> list[tuple[str, int]]:
  """(imported module, line) for every import statement in the module, at any depth. For
  `from X import Y`, X.Y when that is a module of the project, else X; third-party and
  standard-library modules are kept by name."""
  with open(MODULES[module]) as f:
    tree = ast.parse(f.read(), MODULES[module])
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      source = _resolve(module, node)
      for alias in node.names:
        sub = f'{source}.{alias.name}'
        found.append((sub if sub in MODULES else source, node.lineno))
  return found


def _project_target(name: str) -> str | None:
  """The project module an imported name loads (its longest known prefix), or None."""
  if name.split('.')[0] not in PROJECT:
    return None
  parts = name.split('.')
  while parts and '.'.join(parts) not in MODULES:
    parts.pop()
  return '.'.join(parts) if parts else None


def graph() -> dict[str, dict[str, int]]:
  """Project module -> {project module it imports: first line}."""
  edges: dict[str, dict[str, int]] = {}
  for module in MODULES:
    out = edges.setdefault(module, {})
    for name, line in imports_of(module):
      target = _project_target(name)
      if target and target != module:
        out.setdefault(target, line)
  return edges


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges.get(v, {})):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 10 * len(edges)))
  try:
    for v in sorted(edges):
      if v not in index:
        visit(v)
  finally:
    sys.setrecursionlimit(limit)
  return sorted(found)


def _where(module: str, line: int) -> str:
  return f'{os.path.relpath(MODULES[module], ROOT)}:{line}'


def test_every_package_is_found():
  for package in PACKAGES:
    assert package in MODULES, package
  assert 'modeling.registry' in MODULES and 'training.loop' in MODULES


@pytest.mark.parametrize('package', sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(package):
  bad = []
  for module, targets in graph().items():
    if module.split('.')[0] != package:
      continue
    bad += [f'{_where(module, line)} {module} imports {target}'
            for target, line in sorted(targets.items())
            if target.split('.')[0] in FORBIDDEN[package]]
  assert not bad, '\n'.join(bad)


def test_configs_import_only_ml_collections_and_configs():
  bad = []
  for module in MODULES:
    if module.split('.')[0] != 'configs':
      continue
    for name, line in imports_of(module):
      top = name.split('.')[0]
      if top not in ('configs', 'ml_collections', '__future__') and \
         top not in sys.stdlib_module_names:
        bad.append(f'{_where(module, line)} {module} imports {name}')
  assert not bad, '\n'.join(bad)


def test_no_import_cycles():
  edges = graph()
  found = cycles(edges)
  lines = []
  for component in found:
    members = set(component)
    lines.append(' <-> '.join(component) + ':')
    lines += [f'    {_where(m, line)} {m} imports {t}' for m in component
              for t, line in sorted(edges[m].items()) if t in members]
  assert not found, '\n'.join(lines)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
  """A circle closed only by a function-local import is found, and relative imports resolve."""
  pkg = tmp_path / 'modeling'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from modeling import b\n')
  (pkg / 'b.py').write_text('def f():\n  from . import a\n  from .a import x\n')
  fake = {'modeling': str(pkg / '__init__.py'), 'modeling.a': str(pkg / 'a.py'),
          'modeling.b': str(pkg / 'b.py')}
  monkeypatch.setattr(sys.modules[__name__], 'MODULES', fake)
  assert imports_of('modeling.b') == [('modeling.a', 2), ('modeling.a', 3)]
  assert cycles(graph()) == [['modeling.a', 'modeling.b']]
