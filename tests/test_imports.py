"""Imports go one way: nothing under input_pipeline/ imports the model."""

import ast
import subprocess
import sys
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL_PACKAGE = 'pumamednet_jax'


def model_imports(source: str) -> list[int]:
  """Line numbers of every import of MODEL_PACKAGE in `source`, at any depth
  (inside functions too)."""
  lines = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and not node.level:
      names = [node.module or '']
    else:
      continue
    if any(n == MODEL_PACKAGE or n.startswith(MODEL_PACKAGE + '.')
           for n in names):
      lines.append(node.lineno)
  return lines


def test_model_imports_finds_every_form():
  source = '\n'.join([
      'import pumamednet_jax',
      'import os, pumamednet_jax.models as m',
      'from pumamednet_jax import heads',
      'from pumamednet_jax.losses import total_loss',
      'def f():',
      '  from pumamednet_jax import train',
      'import pumamednet_jax_extras',
      'from . import pumamednet_jax',
      'from input_pipeline import heads',
  ])
  assert model_imports(source) == [1, 2, 3, 4, 6]


def test_input_pipeline_does_not_import_the_model():
  files = sorted((REPO_ROOT / 'input_pipeline').rglob('*.py'))
  assert len(files) > 5
  offenders = [f'{path.relative_to(REPO_ROOT)}:{line}'
               for path in files
               for line in model_imports(path.read_text())]
  assert not offenders, f'input_pipeline imports {MODEL_PACKAGE}: {offenders}'


def test_every_module_imports_in_one_process():
  """Commands define their absl flags only when run, so any two modules (a
  library user's, or a test's) import together."""
  modules = [
      '.'.join(path.relative_to(REPO_ROOT).with_suffix('').parts)
      for package in (MODEL_PACKAGE, 'input_pipeline')
      for path in sorted((REPO_ROOT / package).rglob('*.py'))
      if path.name not in ('__init__.py', '__main__.py')]
  code = 'import importlib, sys\nfor name in sys.argv[1:]:\n  importlib.import_module(name)\n'
  result = subprocess.run([sys.executable, '-c', code, *modules], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(modules) > 30
