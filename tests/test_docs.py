"""The documentation site (docs/) stays true and complete.

Every ```python block of docs/**/*.md runs: the blocks of one page in page
order, in ONE namespace (as a reader would paste them), each page in a fresh
one. Tracebacks point at the page's own line numbers. Code that must not run
here (a download, a GPU, a shell) goes in a ```bash or ```text block.

The API reference check (docs/_ext/api_coverage.py) is tested here to fail on
a public name without a page, as a function and inside a real Sphinx build.
"""

import importlib.util
import io
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
PAGES = sorted(path for path in DOCS.rglob('*.md')
               if '_build' not in path.relative_to(DOCS).parts)
API_INDEX = DOCS / 'api' / 'index.rst'

# An opening fence "```python" (maybe indented, as in a list), its body, and
# the closing fence with the same indentation.
PYTHON_BLOCK = re.compile(
    r'^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$',
    re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(line of the block's first code line, code) for each ```python block."""
  return [(text.count('\n', 0, match.start('code')) + 1,
           textwrap.dedent(match.group('code')))
          for match in PYTHON_BLOCK.finditer(text)]


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
    with_code = {path.relative_to(DOCS).as_posix() for path in PAGES
                 if python_blocks(path.read_text())}
    guide = {path.relative_to(DOCS).as_posix()
             for path in (DOCS / 'guide').glob('*.md')}
    self.assertTrue(guide, f'no guide page under {DOCS}')
    self.assertEqual(guide - with_code, set())

  @parameterized.named_parameters(
      (re.sub(r'\W', '_', path.relative_to(DOCS).as_posix()), path)
      for path in PAGES)
  def test_page_python_blocks_run_in_order(self, path):
    namespace = {'__name__': '__docs__'}
    for line, code in python_blocks(path.read_text()):
      # Padding with blank lines makes tracebacks show the page's line numbers.
      program = compile('\n' * (line - 1) + code, str(path), 'exec')
      try:
        exec(program, namespace)  # pylint: disable=exec-used
      except Exception as error:  # pylint: disable=broad-except
        raise AssertionError(
            f'{path.relative_to(DOCS)} block at line {line} failed: '
            f'{type(error).__name__}: {error}') from error


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
