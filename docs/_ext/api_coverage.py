"""Fails the build when a public name of `spd_optax` has no reference page.

Compares `spd_optax.__all__` with the Python objects the pages document
(`autofunction`, `autoclass`, autosummary's generated pages), as optax's
`coverage_check` does, but inside every build rather than as a builder of its
own: `sphinx -b html` stops with an error (with or without `-W`) naming each
public name that has no page, and each page of a name that is not public.
"""

from collections.abc import Iterable
import importlib
from typing import Any

from sphinx import application
from sphinx import environment
from sphinx import errors


class ApiCoverageError(errors.SphinxError):
  """A public name without a page, or a page of a name that is not public."""

  category = 'API reference incomplete'


def coverage_errors(module: str, public_names: Iterable[str],
                    documented: Iterable[str]) -> list[str]:
  """What is wrong with the reference pages of `module`; empty when nothing.

  Args:
    module: the documented module's name, e.g. "spd_optax".
    public_names: the module's `__all__`.
    documented: the full names of the documented Python objects, e.g.
      "spd_optax.adam_spd" (members such as "spd_optax.L2SPState.count" are
      ignored).

  Returns:
    One line per public name without a page, and per page of a name that is
    not public.
  """
  public = {f'{module}.{name}' for name in public_names}
  prefix = module + '.'
  # Only the module's own top-level names: not members, not other modules.
  pages = {name for name in documented
           if name.startswith(prefix) and '.' not in name[len(prefix):]}
  return ([f'{name} is public (in {module}.__all__) but has no page'
           for name in sorted(public - pages)]
          + [f'{name} has a page but is not in {module}.__all__'
             for name in sorted(pages - public)])


def _check(app: application.Sphinx, env: environment.BuildEnvironment) -> None:
  module = app.config.api_coverage_module
  public_names = importlib.import_module(module).__all__
  documented = env.get_domain('py').objects
  problems = coverage_errors(module, public_names, documented)
  if problems:
    raise ApiCoverageError(
        f'{module}.__all__ and docs/api/index.rst disagree:\n  '
        + '\n  '.join(problems))


def setup(app: application.Sphinx) -> dict[str, Any]:
  app.add_config_value('api_coverage_module', 'spd_optax', 'env')
  # After every page is read (all objects known), before anything is written.
  app.connect('env-check-consistency', _check)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
