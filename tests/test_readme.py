"""Runs README.md's ```python blocks: the documentation must stay true.

Blocks run in file order in ONE namespace, as a reader would paste them: a
later block may use what an earlier one defined. Tracebacks point at the
README's own line numbers. New sections are picked up automatically; show
code that must not run (needs a GPU, a download) in a ```text block.
"""

import pathlib
import re
import textwrap

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'

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


def test_python_blocks_are_found():
  text = ('# t\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n'
          '  ```python\n  y = x\n  ```\n')
  assert python_blocks(text) == [(4, 'x = 1\n'), (11, 'y = x\n')]


def test_readme_python_blocks_run_in_order():
  blocks = python_blocks(README.read_text())
  assert blocks, f'no ```python block in {README}'
  namespace = {'__name__': '__readme__'}
  for line, code in blocks:
    # Padding with blank lines makes tracebacks show the README's line numbers.
    program = compile('\n' * (line - 1) + code, str(README), 'exec')
    try:
      exec(program, namespace)  # pylint: disable=exec-used
    except Exception as error:  # pylint: disable=broad-except
      raise AssertionError(
          f'README.md block at line {line} failed: '
          f'{type(error).__name__}: {error}') from error
