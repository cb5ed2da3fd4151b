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
# `reduce_leaf` sums a large leaf on CPU a chunk of about this many elements
# at a time, each chunk in rows of `_SUM_LANES` (measured on ViT-B/16: 2^16
# 2.2x AdamW; 2^17 and 2^18 1.9x-2.0x, within noise of each other; 2^20
# leaves the attention kernels out of the loop).
_SUM_CHUNK = 1 << 18
_SUM_LANES = 8
# The chunk loops index a leaf as one flat buffer: XLA's partitioner then
# all-gathers a leaf split across devices (and its moments) on every device,
# and an explicitly sharded leaf cannot be flattened at all. So they run only
# where no leaf can be split: one device in all. Tests set this to run them
# under faked devices, on leaves that are not split.
_LOOP_ON_MANY_DEVICES = False

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


def check_hyperparameter(value, name: str, *, low: Optional[float] = None,
                         high: Optional[float] = None, low_open: bool = False,
                         high_open: bool = False,
                         schedule: bool = True) -> None:
  """Validates a numeric hyper-parameter wherever its value is known.

  Python and NumPy numbers and concrete 0-d arrays (what
  `optax.inject_hyperparams` passes outside `jit`) must be real, finite and
  within the bounds. A traced value cannot be checked and is left alone, as is
  a schedule (a callable) where `schedule` allows one: its values exist only
  step by step.

  Args:
    value: the hyper-parameter as given.
    name: the argument's name, for the message.
    low: the lower bound, or None.
    high: the upper bound, or None.
    low_open: whether `low` itself is excluded.
    high_open: whether `high` itself is excluded.
    schedule: whether a callable (a schedule of the step count) is allowed.
  """
  if isinstance(value, jax.core.Tracer):
    return
  if callable(value) and schedule:
    return
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    return  # Another host holds part of it; each host checks its own inputs.
  number = None
  if not isinstance(value, (bool, np.bool_, str, bytes)) and not callable(value):
    try:
      array = np.asarray(value)
    except (TypeError, ValueError):
      array = None
    if (array is not None and array.ndim == 0 and
        (np.issubdtype(array.dtype, np.integer)
         or np.issubdtype(array.dtype, np.floating))):
      number = float(array)
  if number is None:
    kind = 'a real number or a schedule' if schedule else 'a real number'
    raise TypeError(f'`{name}` must be {kind}, got {value!r}.')
  above = low is None or (number > low if low_open else number >= low)
  below = high is None or (number < high if high_open else number <= high)
  if not (math.isfinite(number) and above and below):
    if low is not None and high is not None:
      bounds = (f'in {"(" if low_open else "["}{low:g}, {high:g}'
                f'{")" if high_open else "]"}')
    elif low is not None:
      bounds = f'{">" if low_open else ">="} {low:g}'
    else:
      bounds = 'finite'
    finite = '' if math.isfinite(number) or bounds == 'finite' else 'finite and '
    raise ValueError(f'`{name}` must be {finite}{bounds}, got {value!r}.')


def check_learning_rate(value) -> None:
  """A learning rate: finite and >= 0 where known, or a schedule."""
  check_hyperparameter(value, 'learning_rate', low=0.0)


def check_adam(b1, b2, eps, eps_root) -> None:
  """Adam's own hyper-parameters, as `optax.adam` takes them."""
  check_hyperparameter(b1, 'b1', low=0.0, high=1.0, high_open=True,
                       schedule=False)
  check_hyperparameter(b2, 'b2', low=0.0, high=1.0, high_open=True,
                       schedule=False)
  check_hyperparameter(eps, 'eps', low=0.0, schedule=False)
  check_hyperparameter(eps_root, 'eps_root', low=0.0, schedule=False)


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


def is_callable_spec(spec) -> bool:
  """Whether a mask or per-leaf option is a function, not a pytree of values.

  `optax.masked`'s rule: every leaf is callable. An Equinox module is itself
  callable, but a module of bools (or axes) is a pytree of values.
  """
  leaves = jax.tree.leaves(jax.tree.map(callable, spec))
  return bool(leaves) and all(leaves)


def resolve_mask(mask, params):
  """The mask as a full bool tree shaped like `params` (True: constrained).

  Accepts what `optax.masked` accepts: None (every leaf), a bool pytree with
  the params' structure or a prefix of it, or a callable on the params. A
  None in the params (what `eqx.filter` leaves for a non-array) stays None,
  whatever the mask says there.
  """
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  mask_tree = mask(params) if is_callable_spec(mask) else mask
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
  if is_callable_spec(option):
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


def _is_empty(x) -> bool:
  """A slot that holds no array: `optax.MaskedNode()` or None."""
  return x is None or isinstance(x, MaskedNode)


def _leaves_by_path(tree) -> dict[str, Any]:
  """Every leaf of `tree`, None and `MaskedNode` slots too, by `keystr` path."""
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_empty)}


def _dtype(x) -> np.dtype:
  """The dtype JAX computes `x` in (a Python float is float32, as in optax)."""
  dtype = x.dtype if hasattr(x, 'dtype') else jnp.asarray(x).dtype
  return jax.dtypes.canonicalize_dtype(dtype)


def as_arrays(tree):
  """`tree` with Python-scalar leaves as 0-d arrays, as `optax.adam` takes them."""
  return jax.tree.map(
      lambda x: x if hasattr(x, 'shape') and hasattr(x, 'dtype')
      else jnp.asarray(x), tree)


def check_params(params, mask_tree, name: str) -> None:
  """Refuses, naming the leaf, a constrained param that is not real floating."""
  keep = _leaves_by_path(mask_tree)
  for path, param in _leaves_by_path(params).items():
    if _is_empty(param) or not keep.get(path, False):
      continue
    dtype = _dtype(param)
    if not jnp.issubdtype(dtype, jnp.floating):
      why = ('complex params are not supported: the rule compares and clips '
             'real inner products and norms' if
             jnp.issubdtype(dtype, jnp.complexfloating) else
             'its updates would be rounded to integers and it would never move')
      raise TypeError(
          f'{name}: the param at {path} has dtype {dtype}, and the rule needs '
          f'real floating-point params ({why}). Leave it out with `mask`.')


def check_like_params(tree, params, name: str, what: str) -> None:
  """Refuses, naming the leaf, a `tree` (gradients) not shaped like `params`."""
  tree_leaves, params_leaves = _leaves_by_path(tree), _leaves_by_path(params)
  for path, param in params_leaves.items():
    if _is_empty(param):
      continue
    if path not in tree_leaves or _is_empty(tree_leaves[path]):
      raise ValueError(
          f'{name}: the {what} have no leaf at {path}, which the params have.')
    if np.shape(tree_leaves[path]) != np.shape(param):
      raise ValueError(
          f'{name}: the {what} at {path} have shape '
          f'{np.shape(tree_leaves[path])}, but the param has shape '
          f'{np.shape(param)}.')
  for path, leaf in tree_leaves.items():
    if _is_empty(leaf):
      continue
    if path not in params_leaves:
      raise ValueError(
          f'{name}: the {what} have a leaf at {path}, which the params lack.')
    if params_leaves[path] is None:
      raise ValueError(
          f'{name}: the {what} have a leaf at {path}, where the params hold '
          'None (with Equinox, filter the params as the gradients are, e.g. '
          '`eqx.filter(model, eqx.is_inexact_array)`).')


def checking_gradients(
    inner: optax.GradientTransformation,
    name: str) -> optax.GradientTransformationExtraArgs:
  """`inner`, with its gradients checked against the params (same state)."""
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:
      check_like_params(as_arrays(updates), as_arrays(params), name,
                        'gradients')
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def check_anchor_tree(anchor, params, mask_tree) -> None:
  """Refuses, naming the leaf, an anchor that cannot anchor these params.

  Each constrained leaf needs an array of its param's shape and dtype (the
  anchor is kept and compared in the param's dtype); a leaf left out by the
  mask may be anything, or absent.
  """
  anchor_leaves, keep = _leaves_by_path(anchor), _leaves_by_path(mask_tree)
  params_leaves = _leaves_by_path(params)
  for path, param in params_leaves.items():
    if _is_empty(param) or not keep.get(path, False):
      continue
    if path not in anchor_leaves:
      raise ValueError(
          f'`anchor` has no leaf at {path}, which the params have (and the '
          'mask constrains).')
    leaf = anchor_leaves[path]
    if _is_empty(leaf):
      raise ValueError(
          f'`anchor` at {path} is {leaf!r}, but the param there is constrained '
          'and needs an anchor array: give one, leave the leaf out with '
          '`mask`, or use anchor="zero" (PEFT mode) for every leaf.')
    if np.shape(leaf) != np.shape(param):
      raise ValueError(
          f'`anchor` at {path} has shape {np.shape(leaf)}, but the param has '
          f'shape {np.shape(param)}.')
    if _dtype(leaf) != _dtype(param):
      raise ValueError(
          f'`anchor` at {path} has dtype {_dtype(leaf)}, but the param has '
          f'dtype {_dtype(param)}: the anchor is kept and compared in the '
          'param\'s dtype, so cast it first, e.g. `jax.tree.map(lambda a, p: '
          'a.astype(p.dtype), anchor, params)`.')
  for path, leaf in anchor_leaves.items():
    if path not in params_leaves and not _is_empty(leaf):
      raise ValueError(
          f'`anchor` has a leaf at {path}, which the params lack.')


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
    check_anchor_tree(anchor, params, mask_tree)
  anchor_leaves = _leaves_by_path(anchor)
  paths = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_leaves_with_path(params)]
  keep_leaves = jax.tree.leaves(mask_tree)
  return jax.tree.structure(params).unflatten(
      jnp.array(anchor_leaves[path], copy=True) if keep else MaskedNode()
      for path, keep in zip(paths, keep_leaves))


def anchor_layout(anchor, params, mask_tree):
  """What `init_anchor` stores, as shapes and dtypes: for `check_state`."""
  if isinstance(anchor, str) and anchor == 'zero':
    return None
  return jax.tree.map(
      lambda p, keep: jax.ShapeDtypeStruct(np.shape(p), _dtype(p)) if keep
      else MaskedNode(), params, mask_tree)


def anchor_leaves(anchor, params):
  """The stored anchor, or (PEFT mode) a None per leaf, to walk beside params."""
  return jax.tree.map(lambda _: None, params) if anchor is None else anchor


def _describe(x) -> str:
  if _is_empty(x):
    return repr(x)
  return f'an array {_dtype(x)}{list(np.shape(x))}'


def _layout_difference(got, want) -> Optional[str]:
  """Where and how a state field differs from what `init` builds, or None."""
  if want is None or got is None:
    if (want is None) == (got is None):
      return None
    if want is None:
      return ('holds arrays, where `init` builds None (anchor="zero": no '
              'anchor is stored)')
    return 'is None (as anchor="zero" stores), where `init` builds arrays'
  got_leaves, want_leaves = _leaves_by_path(got), _leaves_by_path(want)
  for path, expected in want_leaves.items():
    if path not in got_leaves:
      return f'has no leaf at {path}, where `init` builds {_describe(expected)}'
    leaf = got_leaves[path]
    if _is_empty(expected) or _is_empty(leaf):
      if type(leaf) is not type(expected):
        return (f'at {path} is {_describe(leaf)}, where `init` builds '
                f'{_describe(expected)}')
    elif (np.shape(leaf) != np.shape(expected)
          or _dtype(leaf) != _dtype(expected)):
      return (f'at {path} is {_describe(leaf)}, where `init` builds '
              f'{_describe(expected)}')
  for path, leaf in got_leaves.items():
    if path not in want_leaves:
      return f'has a leaf at {path}, which `init` does not build'
  return None


def check_state(name: str, state, expected: dict[str, Any]) -> None:
  """Refuses a state whose fields differ from what `init` builds for params.

  Shapes and dtypes only, read while tracing: nothing runs on the device.
  `expected` maps field names to trees of `jax.ShapeDtypeStruct`,
  `optax.MaskedNode()` and None, as `init` would build them.
  """
  for field, want in expected.items():
    if not hasattr(state, field):
      raise ValueError(
          f'{name}: the state has no `{field}`, so it is not a state of '
          f'{name} ({type(state).__name__} was given); call `init` of this '
          'transformation.')
    difference = _layout_difference(getattr(state, field), want)
    if difference is not None:
      raise ValueError(
          f'{name}: the state\'s `{field}` {difference} for these params. Was '
          'it restored into another layout (a changed mask, anchor mode or '
          'params) with plain orbax? Restore with `spd_optax.restore_state`, '
          'which checks, or call `init` again.')


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
  keeps nothing runs on one. Not where the leaf may be split across devices:
  its rows would cross the devices' blocks, and XLA would gather the leaf.
  """
  ndim = terms[0].ndim
  reduced = tuple(axis for axis in range(ndim) if axis not in kept_axes)
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  add = lambda x, y: tuple(a + b for a, b in zip(x, y))
  kept_shape = terms[0].shape[:len(kept_axes)]
  summed = math.prod(terms[0].shape[axis] for axis in reduced)
  if (kept_axes == tuple(range(len(kept_axes))) and summed >= _SPLIT_SUM_SIZE
      and summed % _SUM_ROW == 0 and _whole_on_one_device(terms[0])):
    rows = tuple(t.reshape(kept_shape + (-1, _SUM_ROW)) for t in terms)
    terms = jax.lax.reduce(rows, zeros, add, (len(kept_axes) + 1,))
    reduced = (len(kept_axes),)
  sums = jax.lax.reduce(tuple(terms), zeros, add, reduced)
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(sums)


def _sum_in_lanes(terms: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """Sums of several same-shaped terms over all their elements.

  In rows of `_SUM_LANES` elements, then the row sums in rows again: a fused
  reduction of 8-element rows is the one XLA:CPU vectorizes (LLVM unrolls the
  row and vectorizes across rows, the terms' divides and square roots
  included); longer rows, or nested loops, run scalar.
  """
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  add = lambda x, y: tuple(a + b for a, b in zip(x, y))
  terms = tuple(t.reshape(-1) for t in terms)
  size = terms[0].size
  while size >= 64 * _SUM_LANES and size % _SUM_LANES == 0:
    rows = tuple(t.reshape(-1, _SUM_LANES) for t in terms)
    terms = jax.lax.reduce(rows, zeros, add, (1,))
    size //= _SUM_LANES
  return tuple(jax.lax.reduce(terms, zeros, add, (0,)))


def _whole_on_one_device(leaf) -> bool:
  """Whether `leaf` is known, while tracing, to be held whole by one device.

  True with one device in all (or `_LOOP_ON_MANY_DEVICES`), unless the
  leaf's type says it is split (explicit sharding). Under automatic
  sharding a traced leaf does not say how it will be split.
  """
  spec = getattr(getattr(jax.typeof(leaf), 'sharding', None), 'spec', None)
  if spec is not None and any(entry is not None for entry in spec):
    return False
  return _LOOP_ON_MANY_DEVICES or jax.device_count() == 1


def reduce_leaf(terms_fn: Callable[..., Sequence[jax.Array]],
                arrays: Sequence[jax.Array], kept_axes: tuple[int, ...],
                axis_name=None) -> tuple[jax.Array, ...]:
  """`reduce_sums(terms_fn(*arrays), kept_axes, axis_name)`, in one read.

  `terms_fn` maps same-shaped arrays (the leaf's inputs) elementwise to the
  terms to sum. On CPU a large leaf summed whole is read a chunk at a time in
  a `fori_loop`, the terms computed and summed per chunk in cache: nothing
  leaf-sized is written, however costly the terms (XLA:CPU would otherwise
  write an expensive term shared with a later pass to a leaf-sized temporary,
  which it allocates, and the kernel page-faults in, afresh every step).
  Elsewhere, for a leaf that keeps axes, and where the leaf may be split
  across devices (`_whole_on_one_device`), it is `reduce_sums`.
  """
  size = arrays[0].size
  if (kept_axes or size < 2 * _SUM_CHUNK
      or jax.default_backend() != 'cpu'
      or not _whole_on_one_device(arrays[0])):
    return reduce_sums(terms_fn(*arrays), kept_axes, axis_name)
  flat = tuple(x.reshape(-1) for x in arrays)
  chunks = size // _SUM_CHUNK

  def chunk_sums(start, length):
    pieces = tuple(jax.lax.dynamic_slice_in_dim(x, start, length)
                   for x in flat)
    return _sum_in_lanes(terms_fn(*pieces))

  def body(i, sums):
    return tuple(s + c for s, c in zip(sums, chunk_sums(i * _SUM_CHUNK,
                                                        _SUM_CHUNK)))

  zeros = jax.tree.map(lambda t: jnp.zeros((), t.dtype), jax.eval_shape(
      terms_fn, *(jax.ShapeDtypeStruct((_SUM_CHUNK,), x.dtype) for x in flat)))
  sums = jax.lax.fori_loop(0, chunks, body, tuple(zeros))
  if size % _SUM_CHUNK:
    tail = chunk_sums(chunks * _SUM_CHUNK, size - chunks * _SUM_CHUNK)
    sums = tuple(s + t for s, t in zip(sums, tail))
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(sums)


def _chunk_length(size: int) -> Optional[int]:
  """A length of whole rows of lanes that divides `size`, near `_SUM_CHUNK`."""
  first = -(-size // _SUM_CHUNK)
  for chunks in range(max(first, 2), 4 * first + 1):
    if size % chunks == 0 and (size // chunks) % _SUM_LANES == 0:
      return size // chunks
  return None


def loops_over_chunks(leaf: jax.Array, kept_axes: tuple[int, ...]) -> bool:
  """Whether `reduce_leaf_writing` can take a leaf: on CPU, a large leaf
  summed whole that splits into equal chunks (a ragged last chunk would make
  XLA copy the buffers it writes), held whole by one device."""
  return (not kept_axes and leaf.size >= 2 * _SUM_CHUNK
          and jax.default_backend() == 'cpu'
          and _chunk_length(leaf.size) is not None
          and _whole_on_one_device(leaf))


def reduce_leaf_writing(write_fn, terms_fn, arrays, buffers, axis_name=None):
  """Writes `buffers` in place and sums terms of the result, in one pass.

  A chunk at a time (see `reduce_leaf`): `write_fn(*array_chunks,
  *buffer_chunks)` gives the buffers' new chunks, written in place; the
  chunks just written are read back (in cache) for
  `terms_fn(*array_chunks, *new_chunks)`, whose sums over the leaf are
  returned with the new buffers. One read of every input and one write of
  every buffer: the multi-output pass XLA:CPU's fusion does not make.

  Returns:
    `(new_buffers, sums)`.
  """
  shape = arrays[0].shape
  size = arrays[0].size
  flat = tuple(x.reshape(-1) for x in arrays)
  buffers = tuple(x.reshape(-1) for x in buffers)

  def chunk_pass(start, length, buffers):
    pieces = tuple(jax.lax.dynamic_slice_in_dim(x, start, length)
                   for x in flat)
    old = tuple(jax.lax.dynamic_slice_in_dim(x, start, length)
                for x in buffers)
    new = write_fn(*pieces, *old)
    buffers = tuple(jax.lax.dynamic_update_slice_in_dim(x, n, start, 0)
                    for x, n in zip(buffers, new))
    # Read back what was just written: no reader of the old chunk is left
    # after the in-place write, so XLA copies no buffer.
    written = tuple(jax.lax.dynamic_slice_in_dim(x, start, length)
                    for x in buffers)
    return buffers, _sum_in_lanes(terms_fn(*pieces, *written))

  def body(i, carry):
    buffers, sums = carry
    buffers, part = chunk_pass(i * length, length, buffers)
    return buffers, tuple(s + c for s, c in zip(sums, part))

  length = _chunk_length(size)
  chunk = tuple(jax.ShapeDtypeStruct((length,), x.dtype)
                for x in flat + buffers)
  zeros = jax.tree.map(lambda t: jnp.zeros((), t.dtype), jax.eval_shape(
      lambda *x: terms_fn(*x[:len(flat)], *write_fn(*x)), *chunk))
  buffers, sums = jax.lax.fori_loop(0, size // length, body,
                                    (buffers, tuple(zeros)))
  if axis_name:
    sums = jax.lax.psum(sums, axis_name)
  return tuple(x.reshape(shape) for x in buffers), tuple(sums)


def rows_per_chunk(leaf: jax.Array, rows: tuple[int, ...],
                   layers: tuple[int, ...]) -> Optional[int]:
  """Rows of the leaf's summed axes per chunk of `reduce_rows_writing`, or None.

  On CPU, for a large leaf held whole by one device whose row axes (the axes
  its row norms keep) are its last ones and which stacks no layers: its
  summed axes then lead, so a chunk of whole leading rows holds every row
  axis. Chunks are equal (a ragged one would make XLA copy the buffers it
  writes), of about `_SUM_CHUNK` elements.
  """
  ndim = leaf.ndim
  if (layers or not rows or len(rows) == ndim
      or rows != tuple(range(ndim - len(rows), ndim))
      or leaf.size < 2 * _SUM_CHUNK or jax.default_backend() != 'cpu'
      or not _whole_on_one_device(leaf)):
    return None
  height = math.prod(leaf.shape[:ndim - len(rows)])
  first = -(-leaf.size // _SUM_CHUNK)
  for chunks in range(max(first, 2), 4 * first + 1):
    if height % chunks == 0:
      return height // chunks
  return None


def reduce_rows_writing(stages, old_terms_fn, new_terms_fn, arrays, buffers,
                        width, chunk_rows):
  """Writes `buffers` in place and sums terms over the leading axes, one pass.

  `reduce_leaf_writing` for sums that keep the trailing axes (an FTP leaf's
  row axes): the leaf is a matrix of (summed, kept: `width` elements) and
  is read `chunk_rows` rows at a time. Per chunk:
  `old_terms_fn(*array_chunks, *buffer_chunks)` (possibly none) are summed
  over all their elements (in lanes, as in `reduce_leaf`); then each stage
  `(n, fn)` of `stages`, in order, writes the next `n` buffers' chunks
  `fn(*array_chunks, *buffer_chunks, *old_sums)` in place, later stages
  seeing the chunks earlier ones wrote, read back; then
  `new_terms_fn(*array_chunks, *buffer_chunks)` of the chunks written are
  summed over the chunk's rows. A stage must depend on whatever reads a
  buffer it overwrites (XLA then reads the old chunk before it is
  overwritten instead of copying the whole buffer every chunk), and on the
  read-back chunks, not on chunks it recomputes (which would keep the old
  chunks alive: a copy too).

  Returns:
    `(new_buffers, old_sums + new_sums)`: scalars, then sums of `width`.
  """
  shape = buffers[0].shape
  matrices = tuple(x.reshape(-1, width) for x in arrays)
  buffers = tuple(x.reshape(-1, width) for x in buffers)
  # A column sum as a product with ones: XLA:CPU's own reductions (and
  # YNNPACK's) of a (rows, width) chunk to its width ran 1.3x-3x slower.
  column_sums = lambda terms: tuple(
      jnp.matmul(jnp.ones((chunk_rows,), t.dtype), t,
                 precision=jax.lax.Precision.HIGHEST) for t in terms)
  chunk_of = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start,
                                                           chunk_rows)

  def body(i, carry):
    buffers, sums = carry
    start = i * chunk_rows
    pieces = tuple(chunk_of(x, start) for x in matrices)
    chunks = [chunk_of(x, start) for x in buffers]
    old_terms = old_terms_fn(*pieces, *chunks)
    old_sums = _sum_in_lanes(old_terms) if old_terms else ()
    buffers, first = list(buffers), 0
    for count, write_fn in stages:
      new = write_fn(*pieces, *chunks, *old_sums)
      for index in range(first, first + count):
        buffers[index] = jax.lax.dynamic_update_slice_in_dim(
            buffers[index], new[index - first], start, 0)
        chunks[index] = chunk_of(buffers[index], start)
      first += count
    part = old_sums + column_sums(new_terms_fn(*pieces, *chunks))
    return tuple(buffers), tuple(s + c for s, c in zip(sums, part))

  chunk = tuple(jax.ShapeDtypeStruct((chunk_rows, width), x.dtype)
                for x in matrices + buffers)
  zeros = tuple(jnp.zeros((), t.dtype)
                for t in jax.eval_shape(old_terms_fn, *chunk)) + tuple(
                    jnp.zeros((width,), t.dtype)
                    for t in jax.eval_shape(new_terms_fn, *chunk))
  buffers, sums = jax.lax.fori_loop(0, matrices[0].shape[0] // chunk_rows,
                                    body, (buffers, tuple(zeros)))
  return tuple(x.reshape(shape) for x in buffers), tuple(sums)


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
  """Splits a tree of n-tuples (with `like`'s structure as prefix) into n trees.

  A None in `like` (a params slot holding no array) is None in each tree.
  """
  return tuple(
      jax.tree.map(lambda _, r, i=i: r[i], like, results) for i in range(n))


def num_elements(shape) -> int:
  return math.prod(shape)


def moments_rule(update_of_moments, grads, base_state, new_base_state, params):
  """The fused path's rule and its per-leaf moments: `(None, Nones)` without
  one (`update_of_moments` is `_spd._adam_update_of_moments`'s)."""
  if update_of_moments is None:
    return None, jax.tree.map(lambda _: None, params)
  rule = update_of_moments(grads, base_state, new_base_state)
  return rule, rule.moments
