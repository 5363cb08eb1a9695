"""pyproject.toml's dependencies agree with requirements.txt's pins."""

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins() -> tuple[dict[str, Version], set[str]]:
  """({name: pinned version}, names of the direct section) of requirements.txt."""
  pins, direct, in_direct = {}, set(), True
  for line in (REPO_ROOT / 'requirements.txt').read_text().splitlines():
    if line.strip() == '# Transitive.':
      in_direct = False
    if not line.strip() or line.startswith('#'):
      continue
    name, version = line.split('==')
    pins[canonicalize_name(name)] = Version(version)
    if in_direct:
      direct.add(canonicalize_name(name))
  return pins, direct


def _declared() -> list[Requirement]:
  with open(REPO_ROOT / 'pyproject.toml', 'rb') as file:
    project = tomllib.load(file)['project']
  requirements = [Requirement(r) for r in project['dependencies']]
  for extra in project['optional-dependencies'].values():
    requirements += [Requirement(r) for r in extra]
  return [r for r in requirements
          if canonicalize_name(r.name) != canonicalize_name(project['name'])]


def test_every_declared_dependency_admits_its_pin():
  pins, _ = _pins()
  for requirement in _declared():
    name = canonicalize_name(requirement.name)
    assert name in pins, f'{name} is not pinned in requirements.txt'
    assert requirement.specifier.contains(pins[name]), (
        f'{requirement} excludes the pinned {pins[name]}')


def test_every_direct_pin_is_declared():
  _, direct = _pins()
  declared = {canonicalize_name(r.name) for r in _declared()}
  assert direct == declared


def test_the_pinned_torch_is_the_cpu_build():
  pins, _ = _pins()
  assert pins['torch'].local == 'cpu'
