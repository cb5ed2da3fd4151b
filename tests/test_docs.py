"""The documentation site (docs/) stays true and complete.

Every ```python block of docs/**/*.md (and of the files they `{include}`)
runs: the blocks of one page in page order, in ONE namespace (as a reader
would paste them), each page in a fresh one. Tracebacks point at the page's
own line numbers. Code that must not run here (a download, a GPU, a shell)
goes in a ```bash or ```text block.

The API reference check (docs/_ext/api_coverage.py) is tested here to fail on
a public name without a page, as a function and inside a real Sphinx build.
"""

import importlib.util
import io
import os
import pathlib
import re
import shutil
import sys
import tempfile
import textwrap

from absl.testing import absltest
from absl.testing import parameterized

import spd_optax

DOCS = pathlib.Path(__file__).resolve().parent.parent / 'docs'
INCLUDE = re.compile(r'^```\{include\}[ \t]+(?P<path>\S+)[ \t]*$', re.MULTILINE)


def _pages() -> list[pathlib.Path]:
  """docs/**/*.md, and the Markdown files they include (benchmarks/README.md)."""
  pages = {path.resolve() for path in DOCS.rglob('*.md')
           if '_build' not in path.relative_to(DOCS).parts}
  for page in list(pages):
    for match in INCLUDE.finditer(page.read_text()):
      pages.add((page.parent / match.group('path')).resolve())
  return sorted(pages)


PAGES = _pages()
API_INDEX = DOCS / 'api' / 'index.rst'
CONF = DOCS / 'conf.py'

# An opening fence "```python" (maybe indented, as in a list), its body, and
# the closing fence with the same indentation.
PYTHON_BLOCK = re.compile(
    r'^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$',
    re.MULTILINE | re.DOTALL)

# Fences that would show Python without running it here: ```py, ```python3,
# ```ipython, ```{code-block} python, ```{code-cell} ...
UNTESTED_PYTHON_FENCE = re.compile(
    r'^[ \t]*(```|~~~)[ \t]*(py|python3|ipython3?|pycon|'
    r'\{(code-block|code|sourcecode|code-cell)\}[ \t]*(py|python|ipython3?)?)'
    r'[ \t]*$', re.MULTILINE)


def _name(path: pathlib.Path) -> str:
  """A page's path from the repository root, e.g. docs/guide/scale.md."""
  return path.relative_to(DOCS.parent).as_posix()


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(line of the block's first code line, code) for each ```python block."""
  return [(text.count('\n', 0, match.start('code')) + 1,
           textwrap.dedent(match.group('code')))
          for match in PYTHON_BLOCK.finditer(text)]


def _pages_with_code() -> list[pathlib.Path]:
  return [path for path in PAGES if python_blocks(path.read_text())]


def _sphinx_conf(environ: dict[str, str]) -> dict[str, object]:
  """The settings docs/conf.py makes with these environment variables."""
  saved, saved_path = dict(os.environ), list(sys.path)
  try:
    for name in ('READTHEDOCS', 'SPD_OPTAX_DOCS_INTERSPHINX'):
      os.environ.pop(name, None)
    os.environ.update(environ)
    namespace = {'__file__': str(CONF)}
    exec(compile(CONF.read_text(), str(CONF), 'exec'), namespace)  # pylint: disable=exec-used
    return namespace
  finally:
    os.environ.clear()
    os.environ.update(saved)
    sys.path[:] = saved_path


def _api_coverage():
  """docs/_ext/api_coverage.py, the Sphinx extension, as a module."""
  spec = importlib.util.spec_from_file_location(
      'api_coverage', DOCS / '_ext' / 'api_coverage.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _autosummary_names(text: str) -> list[str]:
  """The names listed in the `.. autosummary::` directives of an .rst page."""
  names = []
  for block in re.findall(r'^\.\. autosummary::\n((?:[ \t]+.*\n|\n)+)', text,
                          re.MULTILINE):
    names += [line.strip() for line in block.splitlines()
              if line.strip() and not line.strip().startswith(':')]
  return names


class DocsCodeBlocksTest(parameterized.TestCase):

  def test_python_blocks_are_found_with_their_lines(self):
    text = ('# t\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n'
            '- item\n\n  ```python\n  y = x\n  ```\n')
    self.assertEqual(python_blocks(text), [(4, 'x = 1\n'), (13, 'y = x\n')])

  def test_every_guide_page_has_code_that_runs(self):
    with_code = {_name(path) for path in PAGES
                 if python_blocks(path.read_text())}
    guide = {_name(path)
             for path in (DOCS / 'guide').glob('*.md')}
    self.assertTrue(guide, f'no guide page under {DOCS}')
    self.assertEqual(guide - with_code, set())

  def test_no_python_block_escapes_the_tests(self):
    self.assertIsNotNone(UNTESTED_PYTHON_FENCE.search('```{code-block} python'))
    for path in PAGES:
      match = UNTESTED_PYTHON_FENCE.search(path.read_text())
      self.assertIsNone(
          match, f'{_name(path)}: {match and match.group(0)!r} is '
          'not run by the tests; write ```python (or ```text for code that '
          'must not run)')

  @parameterized.named_parameters(
      (re.sub(r'\W', '_', _name(path)), path)
      for path in _pages_with_code())
  def test_page_python_blocks_run_in_order(self, path):
    namespace = {'__name__': '__docs__'}
    for line, code in python_blocks(path.read_text()):
      # Padding with blank lines makes tracebacks show the page's line numbers.
      program = compile('\n' * (line - 1) + code, str(path), 'exec')
      try:
        exec(program, namespace)  # pylint: disable=exec-used
      except Exception as error:  # pylint: disable=broad-except
        raise AssertionError(
            f'{_name(path)} block at line {line} failed: '
            f'{type(error).__name__}: {error}') from error


class SphinxConfTest(absltest.TestCase):

  def test_read_the_docs_build_links_python_numpy_jax_optax_flax(self):
    mapping = _sphinx_conf({'READTHEDOCS': 'True'})['intersphinx_mapping']
    self.assertEqual(sorted(mapping),
                     ['flax', 'jax', 'numpy', 'optax', 'python'])

  def test_local_build_fetches_nothing(self):
    self.assertEqual(_sphinx_conf({})['intersphinx_mapping'], {})
    mapping = _sphinx_conf({'SPD_OPTAX_DOCS_INTERSPHINX': '1'})[
        'intersphinx_mapping']
    self.assertLen(mapping, 5)


class ApiCoverageTest(absltest.TestCase):

  def test_missing_public_name_is_reported(self):
    problems = _api_coverage().coverage_errors(
        'spd_optax', ['adam_spd', 'adam_ftp'],
        ['spd_optax.adam_spd', 'spd_optax.SelectiveProjectionDecayState.count'])
    self.assertEqual(
        problems,
        ['spd_optax.adam_ftp is public (in spd_optax.__all__) but has no page'])

  def test_page_of_a_name_that_is_not_public_is_reported(self):
    problems = _api_coverage().coverage_errors(
        'spd_optax', ['adam_spd'],
        ['spd_optax.adam_spd', 'spd_optax.removed_alias', 'optax.adam'])
    self.assertEqual(
        problems,
        ['spd_optax.removed_alias has a page but is not in spd_optax.__all__'])

  def test_every_public_name_is_covered_is_no_problem(self):
    names = list(spd_optax.__all__)
    documented = [f'spd_optax.{name}' for name in names]
    self.assertEqual(
        _api_coverage().coverage_errors('spd_optax', names, documented), [])

  def test_api_index_lists_exactly_the_public_names(self):
    listed = _autosummary_names(API_INDEX.read_text())
    self.assertLen(listed, len(set(listed)))  # no name twice
    self.assertEqual(sorted(listed), sorted(spd_optax.__all__))

  def test_sphinx_build_fails_for_a_public_name_without_page(self):
    from sphinx import application  # pylint: disable=g-import-not-at-top
    src = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, src)
    (src / 'conf.py').write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(DOCS / '_ext')!r})
        extensions = ['sphinx.ext.autodoc', 'api_coverage']
        """))
    # One public name documented, the others forgotten.
    (src / 'index.rst').write_text(
        'API\n===\n\n.. autofunction:: spd_optax.adam_spd\n')
    app = application.Sphinx(
        str(src), str(src), str(src / '_build'), str(src / '_doctrees'),
        'html', status=io.StringIO(), warning=io.StringIO(), freshenv=True)
    coverage = sys.modules['api_coverage']
    with self.assertRaises(coverage.ApiCoverageError) as raised:
      app.build()
    message = str(raised.exception)
    self.assertIn('spd_optax.sgd_ftp is public', message)
    self.assertNotIn('spd_optax.adam_spd is public', message)
    self.assertLen(re.findall('but has no page', message),
                   len(spd_optax.__all__) - 1)


if __name__ == '__main__':
  absltest.main()
