"""Sphinx configuration of the spd_optax documentation.

Build it from the repository root (after `pip install -e ".[docs]"`):

  python -m sphinx -W --keep-going -b html docs docs/_build/html

Markdown pages are read by myst-parser; the API reference comes from the
docstrings (autodoc, autosummary, napoleon for their Google style), and
`_ext/api_coverage.py` stops the build when a name of `spd_optax.__all__` has
no page. The Python blocks of the pages run as tests: tests/test_docs.py.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))   # spd_optax from this checkout
sys.path.insert(0, str(DOCS / '_ext'))

import spd_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

# -- Project -----------------------------------------------------------------

project = 'spd_optax'
author = 'The spd_optax authors'
copyright = 'the spd_optax authors'  # pylint: disable=redefined-builtin
release = spd_optax.__version__
version = release

# -- General -----------------------------------------------------------------

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.doctest',
    'sphinx.ext.intersphinx',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'api_coverage',
]

root_doc = 'index'
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
templates_path = ['_templates']
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store', 'requirements.txt']

# The docstrings write code in single backticks, as optax's do: a name that
# resolves becomes a link, anything else a literal.
default_role = 'py:obj'

# -- API reference -----------------------------------------------------------

autosummary_generate = True
autodoc_default_options = {'member-order': 'bysource'}
# The docstrings say in words what each argument is; the annotations, expanded
# (optax.ScalarOrSchedule is a Union of ten types), would bury the names.
autodoc_typehints = 'none'
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False
api_coverage_module = 'spd_optax'

# `sphinx -b doctest` runs `>>>` examples of the docstrings with these names.
doctest_global_setup = """
import jax
import jax.numpy as jnp
import optax
import spd_optax as spd
"""

# -- Markdown ----------------------------------------------------------------

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3

# -- Links to other projects -------------------------------------------------

# Read the Docs builds online and links the names of these projects; a local or
# CI build (no network there) keeps them as plain code, so it is hermetic and
# still fails on any other warning. SPD_OPTAX_DOCS_INTERSPHINX=1 turns the
# links on anywhere.
INTERSPHINX = {
    'python': ('https://docs.python.org/3/', None),
    'numpy': ('https://numpy.org/doc/stable/', None),
    'jax': ('https://docs.jax.dev/en/latest/', None),
    'optax': ('https://optax.readthedocs.io/en/latest/', None),
    'flax': ('https://flax.readthedocs.io/en/latest/', None),
}
if (os.environ.get('READTHEDOCS') == 'True'
    or os.environ.get('SPD_OPTAX_DOCS_INTERSPHINX') == '1'):
  intersphinx_mapping = INTERSPHINX
else:
  intersphinx_mapping = {}
intersphinx_timeout = 30

# -- HTML --------------------------------------------------------------------

html_theme = 'sphinx_book_theme'
html_title = f'spd_optax {release}'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
