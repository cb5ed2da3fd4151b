"""Optimizer state at scale: sharded like the params, restored from orbax."""

import itertools
from typing import Any, Optional

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from spd_optax import _common


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _shape(x) -> tuple[int, ...]:
  """The shape of an array, a `jax.ShapeDtypeStruct` or orbax's metadata."""
  shape = getattr(x, 'shape', None)
  return tuple(shape) if shape is not None else np.shape(x)


def _spec_entries(sharding, ndim: int):
  """The per-axis entries of a NamedSharding or PartitionSpec (ndim of them)."""
  spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return entries[:ndim]


def _reduced_spec(stat_shape, param_shape, param_entries):
  """The spec of a statistic that keeps some of a param's axes, or None.

  A statistic of a leaf (SPD's per-layer `ratio`, FTP's per-row norms) keeps
  some of the param's axes, in order, and drops or squeezes the others to
  size 1. Each of its axes takes the param axis it is matched to: its spec
  entry if the sizes agree, no sharding if it was squeezed to 1. None
  (replicate) when shapes alone leave the matching ambiguous with different
  answers, as for the `(8,)` statistic of an `(8, 8, 8)` leaf.
  """
  candidates = set()
  for axes in itertools.combinations(range(len(param_shape)), len(stat_shape)):
    entries = []
    for size, axis in zip(stat_shape, axes):
      if size == param_shape[axis]:
        entries.append(param_entries[axis] if size > 1 else None)
      elif size == 1:
        entries.append(None)
      else:
        break
    else:
      candidates.add(tuple(entries))
  if len(candidates) != 1:
    return None
  return candidates.pop()


def state_sharding(
    opt_state: optax.OptState,
    params: Any,
    params_sharding: Any,
    *,
    replicated: Optional[Any] = None,
) -> Any:
  """Shardings for an optimizer state, following the params' shardings.

  Every subtree of `opt_state` with the params' tree structure (Adam's moments,
  SPD's and FTP's anchor and statistics, `MultiSteps`' accumulated gradients;
  `optax.MaskedNode` standing in for a masked leaf) mirrors the params, at any
  depth of `chain`, `inject_hyperparams`, `masked`, `multi_transform`, ...
  Its leaves shaped like their param get the param's sharding; a per-layer or
  per-row statistic of a leaf keeps the param's sharding of the axes it
  keeps (a stacked leaf split over its layer axis has its per-layer
  statistics split the same way); everything else (step counts, schedules'
  values, scalars) is replicated.

  Works on concrete or abstract states (`jax.eval_shape(opt.init, params)`),
  and with `NamedSharding`s (for `jax.jit`) or `PartitionSpec`s (for
  `jax.shard_map`).

  Args:
    opt_state: the optimizer state, or its `jax.eval_shape`.
    params: the params (or their shapes) the state was initialized with.
    params_sharding: a `NamedSharding` or `PartitionSpec` per params leaf (a
      pytree with the params' structure, or a prefix of it).
    replicated: the sharding of leaves that mirror no param. Default: a
      replicated `NamedSharding` on the params' mesh, or `PartitionSpec()`.

  Returns:
    A pytree of shardings with `opt_state`'s structure, for `jax.jit`'s
    `out_shardings`, `jax.device_put` or `shard_map`'s specs.
  """
  params_def = jax.tree.structure(params)
  try:
    sharding_leaves = params_def.flatten_up_to(
        jax.tree.map(
            lambda s, sub: jax.tree.map(lambda _: s, sub),
            params_sharding, params,
            is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding,
                                             PartitionSpec))))
  except ValueError as error:
    raise ValueError(
        '`params_sharding` must have the params\' tree structure (or a '
        f'prefix of it), one sharding per leaf: {error}') from None
  if replicated is None:
    replicated = _default_replicated(sharding_leaves)
  param_leaves = params_def.flatten_up_to(params)

  def leaf_sharding(state_leaf, param, sharding):
    if _is_masked(state_leaf):
      return state_leaf
    stat_shape, param_shape = _shape(state_leaf), _shape(param)
    if stat_shape == param_shape:
      return sharding
    if not isinstance(sharding, (NamedSharding, PartitionSpec)):
      return replicated
    entries = _reduced_spec(
        stat_shape, param_shape, _spec_entries(sharding, len(param_shape)))
    if entries is None or all(entry is None for entry in entries):
      return replicated
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec(*entries))
    return PartitionSpec(*entries)

  def assign(node):
    if _is_masked(node) or node is None:
      return node
    if jax.tree.structure(node, is_leaf=_is_masked) == params_def:
      return params_def.unflatten(
          leaf_sharding(*leaf) for leaf in zip(
              params_def.flatten_up_to(node), param_leaves, sharding_leaves))
    children, node_def = jax.tree.flatten(
        node, is_leaf=lambda x: x is not node)
    if len(children) == 1 and children[0] is node:
      return replicated
    return node_def.unflatten(assign(child) for child in children)

  return assign(opt_state)


def _default_replicated(sharding_leaves):
  for sharding in sharding_leaves:
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, PartitionSpec())
    if isinstance(sharding, PartitionSpec):
      return PartitionSpec()
  for sharding in sharding_leaves:
    if sharding.is_fully_replicated:
      return sharding
  raise ValueError(
      'state_sharding cannot tell which sharding replicates a leaf from '
      '`params_sharding` (no NamedSharding or PartitionSpec in it): pass '
      '`replicated=`.')


def restore_state(manager, step: int, target: Any) -> Any:
  """Restores an optimizer state saved with orbax, or says how it differs.

  `manager.restore(step, args=ocp.args.StandardRestore(target))`, checked:
  orbax fills a slot the checkpoint holds as empty (`optax.MaskedNode()`, the
  anchor None of `anchor="zero"`) with None and silently drops arrays that
  `target` has no slot for, so a state written by an optimizer with another
  mask or anchor mode would come back wrong. This raises instead, naming the
  leaves that differ.

  Args:
    manager: an `orbax.checkpoint.CheckpointManager` whose steps were saved
      with `ocp.args.StandardSave(opt_state)`.
    step: the step to restore.
    target: a state of the optimizer to restore into (`opt.init(params)`, or
      its `jax.eval_shape` with shardings), whose structure, shapes and
      dtypes the checkpoint must have.

  Returns:
    The restored state, with `target`'s structure and shardings.

  Raises:
    ValueError: in one line naming the step and the folder, when the
      manager holds no such step, or the step's folder lacks the item's
      folder or its metadata; with the leaves that differ, when the
      checkpoint holds a state of another layout.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  _check_checkpoint_files(manager, step)

  def check(saved, cause=None):
    differences = _layout_differences(saved, target)
    if differences:
      raise ValueError(
          f'The checkpoint of step {step} does not hold a state of the '
          'optimizer it is restored into (was it written with another mask, '
          'anchor mode, base optimizer or params?):\n  '
          + '\n  '.join(differences)) from cause

  # Orbax describes the checkpoint once a restore (even a failed one) has
  # told the manager its handler; asking before would only log warnings.
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except ValueError as error:
    saved = _saved_tree(manager, step)
    if saved is not None:
      check(saved, cause=error)
    raise
  saved = _saved_tree(manager, step)
  if saved is not None:
    check(saved)
  return restored


# What orbax writes for a manager of one item (`StandardSave`): the item's
# folder inside the step's folder, and its tree's metadata inside that.
_ITEM_FOLDER = 'default'
_ITEM_METADATA = '_METADATA'


def _step_folder(manager, step: int):
  """The folder of a saved step, as the manager names it."""
  try:
    return manager._get_read_step_directory(step, manager.directory)  # pylint: disable=protected-access
  except (AttributeError, TypeError, ValueError, FileNotFoundError):
    return manager.directory / str(step)


def _check_checkpoint_files(manager, step: int) -> None:
  """Raises, in one line naming the step and folder, what orbax would muddle."""
  steps = sorted(manager.all_steps())
  if step not in steps:
    raise ValueError(
        f'restore_state: {manager.directory} holds no checkpoint of step '
        f'{step} (its steps: {steps if steps else "none"}).')
  folder = _step_folder(manager, step)
  item = folder / _ITEM_FOLDER
  if not item.exists():
    raise ValueError(
        f'restore_state: the checkpoint of step {step} in {folder} has no '
        f'item folder {_ITEM_FOLDER!r} (was it saved with named items, '
        '`ocp.args.Composite`, or is it incomplete?); restore_state reads a '
        'step saved with `ocp.args.StandardSave(opt_state)`.')
  if not (item / _ITEM_METADATA).exists():
    raise ValueError(
        f'restore_state: the checkpoint of step {step} in {folder} has no '
        f'metadata file {_ITEM_FOLDER}/{_ITEM_METADATA}, so its tree cannot '
        'be read (an incomplete or damaged checkpoint?).')


def _saved_tree(manager, step):
  """The checkpoint's tree of array metadata, or None if orbax cannot tell."""
  try:
    saved = manager.item_metadata(step)
  except (ValueError, KeyError, FileNotFoundError):
    return None
  saved = getattr(saved, 'tree', saved)
  return saved if jax.tree.leaves(saved) else None


def _layout_differences(saved, target, limit: int = 8) -> list[str]:
  """What differs between a checkpoint's metadata tree and a target state."""

  def by_path(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {'/'.join(_common.path_names(path)): leaf for path, leaf in leaves}

  saved_leaves, target_leaves = by_path(saved), by_path(target)
  differences = []
  for path, leaf in target_leaves.items():
    if path not in saved_leaves:
      differences.append(f'{path}: in the target, not in the checkpoint')
    elif _shape(saved_leaves[path]) != _shape(leaf):
      differences.append(
          f'{path}: shape {_shape(saved_leaves[path])} in the checkpoint, '
          f'{_shape(leaf)} in the target')
    elif (hasattr(saved_leaves[path], 'dtype') and hasattr(leaf, 'dtype')
          and np.dtype(saved_leaves[path].dtype) != np.dtype(leaf.dtype)):
      differences.append(
          f'{path}: dtype {saved_leaves[path].dtype} in the checkpoint, '
          f'{leaf.dtype} in the target')
  for path in saved_leaves:
    if path not in target_leaves:
      differences.append(f'{path}: in the checkpoint, not in the target')
  if len(differences) > limit:
    differences = differences[:limit] + [
        f'... and {len(differences) - limit} more']
  return differences
