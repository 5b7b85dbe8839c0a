"""The layout's rules, read from the source: imports point down the layers, recipes keep to their own folder,
Beam-free helpers stay Beam-free, and no two modules import each other, directly or round a longer circle.

Layers, bottom to top: transforms/core -> transforms/lib -> model_handlers -> the spine's stages (the rest
of transforms/) -> beam_pipeline/recipes -> the beam_pipeline application. Function-level imports count like
top-level ones, so a late import cannot hide a cycle.
"""
import ast
import os
from typing import Dict, List, Set

import pytest

from tests.helpers import REPO

PACKAGES = ('beam_pipeline', 'transforms', 'model_handlers')
RECIPES = 'beam_pipeline.recipes'
# Recipe modules that are plain functions on arrays, like transforms/lib.
PURE_RECIPE_MODULES = ('beam_pipeline.recipes.nerf.frames', 'beam_pipeline.recipes.avatar.crop',
                       'beam_pipeline.recipes.mmvox.attributes', 'beam_pipeline.recipes.mmvox.captions',
                       'beam_pipeline.recipes.mmvox.sketch')


def module_files(root: str = REPO) -> Dict[str, str]:
  found = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(root, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          module = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
          found[module[:-len('.__init__')] if module.endswith('.__init__') else module] = path
  return found


def imports_of(path: str, modules: Set[str]) -> Set[str]:
  """Project modules `path` imports anywhere in it; `from package import module` names the module."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        if f'{node.module}.{alias.name}' in modules:
          found.add(f'{node.module}.{alias.name}')
        elif node.module in modules:
          found.add(node.module)
  return found


def third_party_imports(path: str) -> Set[str]:
  names = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
  return names


def layer(module: str) -> int:
  if module.startswith('transforms.core'):
    return 0
  if module.startswith('transforms.lib'):
    return 1
  if module.startswith('model_handlers'):
    return 2
  if module.startswith('transforms'):
    return 3
  if module.startswith(RECIPES):
    return 4
  return 5


def recipe_of(module: str) -> str:
  """The recipe folder a module belongs to ('' for the spine, the recipes' base and registry, hdtf)."""
  parts = module.split('.')
  if module.startswith(RECIPES + '.') and len(parts) >= 3 and parts[2] not in ('base', 'hdtf'):
    return parts[2]
  return ''


def graph(root: str = REPO) -> Dict[str, Set[str]]:
  files = module_files(root)
  return {module: imports_of(path, set(files)) - {module} for module, path in files.items()}


def layer_violations(edges: Dict[str, Set[str]]) -> List[str]:
  """Imports up the layers, and imports of a recipe's code from anywhere but its own folder (the application
  reaches recipes only through `get_recipe`)."""
  found = []
  for module, targets in sorted(edges.items()):
    for target in sorted(targets):
      if layer(target) > layer(module):
        found.append(f'{module} (layer {layer(module)}) imports {target} (layer {layer(target)})')
      elif recipe_of(target) and recipe_of(target) != recipe_of(module):
        found.append(f'{module} imports {target}, code of the {recipe_of(target)} recipe')
  return found


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
  """Strongly connected groups of more than one module (Tarjan), each a circle of imports."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in edges.get(node, ()):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      group = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        group.append(member)
        if member == node:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for node in sorted(edges):
    if node not in index:
      visit(node)
  return groups


def test_no_import_cycles():
  assert cycles(graph()) == []


def test_imports_point_down_the_layers_and_recipes_keep_to_their_folders():
  assert layer_violations(graph()) == []


def test_helpers_below_the_stages_use_no_beam_transforms():
  """core/, lib/ and the recipes' pure modules may read files through Beam's FileSystems, nothing more."""
  files = module_files()
  pure = [m for m in files if layer(m) <= 1 or m in PURE_RECIPE_MODULES]
  assert set(PURE_RECIPE_MODULES) <= set(files)
  beam = {m: sorted(n for n in third_party_imports(files[m])
                    if n.split('.')[0] == 'apache_beam' and not n.startswith('apache_beam.io'))
          for m in pure}
  assert {m: names for m, names in beam.items() if names} == {}


def test_every_recipe_has_one_folder():
  from beam_pipeline.recipes import NAMES
  files = module_files()
  for name in NAMES:
    if name == 'hdtf':  # the spine as it is: a module of hooks, no code of its own
      assert f'{RECIPES}.hdtf' in files
    else:
      assert os.path.basename(files[f'{RECIPES}.{name}']) == '__init__.py'


@pytest.mark.parametrize('bad, why', [
    ({'transforms.core.fileio': "from transforms.plan import PlanClips"}, 'layer'),
    ({'model_handlers.weights': "from beam_pipeline.recipes.nerf.writer import NerfFrames"}, 'layer'),
    ({'beam_pipeline.recipes.mmvox.writer': "from beam_pipeline.recipes.nerf.frames import encode_png"}, 'recipe'),
    ({'transforms.plan': "def f():\n  from transforms.render import RenderClips\n",
      'transforms.render': "from transforms.plan import PlanClips"}, 'cycle'),
])
def test_the_rules_catch_what_they_are_for(tmp_path, bad, why):
  """Each rule fails on a tree that breaks it (a module written with the offending import)."""
  for module in ('transforms.core.fileio', 'transforms.plan', 'transforms.render', 'model_handlers.weights',
                 'beam_pipeline.recipes.nerf.writer', 'beam_pipeline.recipes.nerf.frames',
                 'beam_pipeline.recipes.mmvox.writer'):
    path = tmp_path / (module.replace('.', '/') + '.py')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(bad.get(module, ''))
  for package in ('beam_pipeline', 'beam_pipeline/recipes', 'beam_pipeline/recipes/nerf', 'beam_pipeline/recipes/mmvox',
                  'transforms', 'transforms/core', 'model_handlers'):
    (tmp_path / package / '__init__.py').write_text('')
  edges = graph(str(tmp_path))
  if why == 'cycle':
    assert cycles(edges) == [['transforms.plan', 'transforms.render']]
  else:
    assert layer_violations(edges) and cycles(edges) == []
    assert [('code of the' in line) for line in layer_violations(edges)] == [why == 'recipe']
