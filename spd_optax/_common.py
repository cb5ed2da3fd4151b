"""What SPD and FTP share: anchors, masks, per-leaf options and reductions."""

from collections.abc import Callable, Sequence
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

MaskedNode = optax.MaskedNode

# `reduce_sums` sums a leaf of at least this many elements in rows of this many.
_SPLIT_SUM_SIZE = 1 << 16
_SUM_ROW = 64

# A per-leaf option: one value for every leaf, a pytree of values (the params'
# structure or a prefix of it), or a callable `fn(path, shape) -> value`.
PerLeafOption = Union[Any, Callable[[tuple[str, ...], tuple[int, ...]], Any]]


def _is_masked(x) -> bool:
  return isinstance(x, MaskedNode)


def require_base_optimizer(base_optimizer, name: str, example: str) -> None:
  """Fails at once, saying why, when the base optimizer is missing."""
  if isinstance(base_optimizer, optax.GradientTransformation):
    return
  got = 'nothing' if base_optimizer is None else repr(base_optimizer)
  raise TypeError(
      f'{name} wraps a base optimizer and needs it as its first argument, '
      f'but got {got}. It needs both the raw gradient (to decide) and the '
      'base optimizer\'s proposed update (which it constrains); placed before '
      'or after the optimizer in `optax.chain` it would see only one of them. '
      f'Write it as `{example}`.'
  )


def check_non_negative(value, name: str) -> None:
  """Validates a hyper-parameter where it is given as a plain number."""
  if isinstance(value, (int, float)) and not value >= 0:
    raise ValueError(f'`{name}` must be >= 0, got {value!r}.')


def check_positive(value, name: str) -> None:
  """Validates `value > 0` where it is given as a plain number."""
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f'`{name}` must be > 0, got {value!r}.')


def check_in_range(value, name: str, low: float, high: float,
                   low_open: bool = False) -> None:
  """Validates `low <= value <= high` (or `low < value`) for plain numbers."""
  if not isinstance(value, (int, float)):
    return
  above_low = value > low if low_open else value >= low
  if not (above_low and value <= high):
    bracket = '(' if low_open else '['
    raise ValueError(
        f'`{name}` must be in {bracket}{low}, {high}], got {value!r}.')


def scalar_or_schedule(value, count):
  """The value of a float-or-schedule hyper-parameter at step `count`."""
  return value(count) if callable(value) else value


def path_names(path) -> tuple[str, ...]:
  """A jax key path as plain strings: ('params', 'Dense_0', 'kernel')."""
  names = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def resolve_mask(mask, params):
  """The mask as a full bool tree shaped like `params` (True: constrained).

  Accepts what `optax.masked` accepts: None (every leaf), a bool pytree with
  the params' structure or a prefix of it, or a callable on the params.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  mask_tree = mask(params) if callable(mask) else mask
  return jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask_tree, params)


def _is_option_value(x) -> bool:
  """Values a per-leaf option may take at a leaf: None, int, str, int tuple.

  Or a `PartitionSpec`, for `axis_name`.
  """
  if x is None or isinstance(x, (int, str, np.integer, PartitionSpec)):
    return True
  return isinstance(x, (tuple, list)) and all(
      isinstance(i, (int, np.integer)) for i in x)


def resolve_per_leaf(option: PerLeafOption, params, name: str):
  """A per-leaf option resolved to one value per params leaf.

  Returns a tree with the params' structure (as a prefix) whose value at each
  leaf is what `option` says for that leaf.
  """
  if isinstance(option, (jax.Array, np.ndarray)):
    # What `optax.inject_hyperparams` makes of an int it was not told is static.
    raise TypeError(
        f'`{name}` must be a static value (an int, a tuple of ints, a pytree or '
        f'a callable), got an array. Under `optax.inject_hyperparams`, pass '
        f'`static_args=({name!r},)`.')
  if callable(option) and not isinstance(option, (tuple, list, dict)):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: option(path_names(path), tuple(np.shape(leaf))),
        params)
  if _is_option_value(option):
    return jax.tree.map(lambda _: option, params)
  try:
    return jax.tree.map(
        lambda value, sub: jax.tree.map(lambda _: value, sub),
        option, params, is_leaf=_is_option_value)
  except ValueError as error:
    raise ValueError(
        f'`{name}` must be one value, a callable (path, shape) -> value, or a '
        f'pytree with the params\' structure (or a prefix of it): {error}'
    ) from None


def normalize_axes(axes, ndim: int, name: str) -> tuple[int, ...]:
  """Axes as sorted non-negative ints, validated against `ndim`."""
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
  out = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
          f'`{name}` names axis {axis} of a leaf with {ndim} dimensions.')
    out.append(int(axis) % ndim)
  return tuple(sorted(set(out)))


def check_anchor(anchor) -> None:
  """Validates an `anchor` given as a string where it is given."""
  if isinstance(anchor, str) and anchor not in ('init', 'zero'):
    raise ValueError(
        f'`anchor` must be "init", "zero" or a params-shaped pytree, got '
        f'{anchor!r}.')


def init_anchor(anchor, params, mask_tree):
  """The anchor to keep in the state: a copy of `params`, None, or checked.

  Leaves excluded by the mask store `optax.MaskedNode()` instead.
  """
  if isinstance(anchor, str):
    check_anchor(anchor)
    if anchor == 'zero':
      return None
    anchor = params
  else:
    check_same_layout(anchor, params, 'anchor')
  return jax.tree.map(
      lambda keep, a: jnp.array(a, copy=True) if keep else MaskedNode(),
      mask_tree, anchor)


def anchor_leaves(anchor, params):
  """The stored anchor, or (PEFT mode) a None per leaf, to walk beside params."""
  return jax.tree.map(lambda _: None, params) if anchor is None else anchor


def check_same_layout(tree, params, name: str) -> None:
  """Raises, naming the first offending leaf path, if `tree` != params layout."""
  tree_leaves = jax.tree_util.tree_leaves_with_path(tree)
  params_leaves = jax.tree_util.tree_leaves_with_path(params)
  tree_paths = {jax.tree_util.keystr(p): x for p, x in tree_leaves}
  params_paths = {jax.tree_util.keystr(p): x for p, x in params_leaves}
  for path in params_paths:
    if path not in tree_paths:
      raise ValueError(f'`{name}` has no leaf at {path}, which the params have.')
  for path in tree_paths:
    if path not in params_paths:
      raise ValueError(f'`{name}` has a leaf at {path}, which the params lack.')
  if (jax.tree.structure(tree) != jax.tree.structure(params)):
    raise ValueError(
        f'`{name}` must have the params\' tree structure: '
        f'{jax.tree.structure(tree)} != {jax.tree.structure(params)}.')
  for path, leaf in params_paths.items():
    if np.shape(tree_paths[path]) != np.shape(leaf):
      raise ValueError(
          f'`{name}` at {path} has shape {np.shape(tree_paths[path])}, but the '
          f'param has shape {np.shape(leaf)}.')


def split_names(axis_name, ndim: int, axes: Sequence[int],
                summed: bool) -> tuple[str, ...]:
  """The `shard_map` mesh axes that split the given axes of a leaf.

  `axis_name` is the leaf's option: None (not split), a mesh axis name (the
  leaf is split along axes its statistics sum over: those are `summed`), or
  the leaf's `PartitionSpec`, which says which mesh axes split which axes.
  """
  if axis_name is None:
    return ()
  if not isinstance(axis_name, PartitionSpec):
    return (axis_name,) if summed else ()
  entries = tuple(axis_name) + (None,) * (ndim - len(axis_name))
  names = []
  for axis in axes:
    entry = entries[axis]
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
      continue
    names.extend((entry,) if isinstance(entry, str) else entry)
  return tuple(names)


def stat_dtype(dtype) -> jnp.dtype:
  """The dtype statistics are kept in: float32, or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def kept_shape(shape: Sequence[int], kept_axes: tuple[int, ...]):
  """The shape of a reduction that keeps `kept_axes` (and drops the rest)."""
  return tuple(shape[axis] for axis in kept_axes)


def reduce_sums(terms: Sequence[jax.Array], kept_axes: tuple[int, ...],
                axis_name=None) -> tuple[jax.Array, ...]:
  """Sums of several same-shaped terms over every axis but `kept_axes`.

  One variadic reduction, so the inputs are read in a single pass (XLA on CPU
  does not fuse sibling reductions), then summed across `axis_name` when the
  leaf is split over a `shard_map` axis. The result keeps `kept_axes` only.
  A large leaf whose kept axes lead is summed in rows of `_SUM_ROW` elements
  first: XLA:CPU splits that pass across its threads, where a reduction that
  keeps nothing runs on one.
  """
  ndim = terms[0].ndim
  reduced = tuple(axis for axis in range(ndim) if axis not in kept_axes)
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  add = lambda x, y: tuple(a + b for a, b in zip(x, y))
  kept_shape = terms[0].shape[:len(kept_axes)]
  summed = math.prod(terms[0].shape[axis] for axis in reduced)
  if (kept_axes == tuple(range(len(kept_axes))) and summed >= _SPLIT_SUM_SIZE
      and summed % _SUM_ROW == 0):
    rows = tuple(t.reshape(kept_shape + (-1, _SUM_ROW)) for t in terms)
    terms = jax.lax.reduce(rows, zeros, add, (len(kept_axes) + 1,))
    reduced = (len(kept_axes),)
  sums = jax.lax.reduce(tuple(terms), zeros, add, reduced)
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(sums)


def expand_kept(x: jax.Array, ndim: int, kept_axes: tuple[int, ...]):
  """Inverse of a reduction that kept `kept_axes`: broadcastable to the leaf."""
  shape = [1] * ndim
  for axis, size in zip(kept_axes, x.shape):
    shape[axis] = size
  return jnp.reshape(x, shape)


def safe_div(numerator, denominator):
  """`numerator / denominator`, and 0 where the denominator is 0."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def unzip(results, like, n: int):
  """Splits a tree of n-tuples (with `like`'s structure as prefix) into n trees."""
  return tuple(
      jax.tree.map(lambda _, r, i=i: r[i], like, results,
                   is_leaf=lambda x: x is None)
      for i in range(n))


def num_elements(shape) -> int:
  return math.prod(shape)
