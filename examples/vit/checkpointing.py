"""Checkpoints to resume from (`--workdir`), and the run they belong to.

A workdir holds an orbax `CheckpointManager`'s steps (params, optimizer
state, step, the grain iterator's position), `history_<step>.json` (the
logged history up to that step) and `run.json`: the fingerprint of the
flags that change a run's result. Resuming with other flags, from another
optimizer layout or from a corrupt checkpoint raises `ResumeError`.
"""

import dataclasses
import json
import os
import sys
from typing import Any

from etils import epath
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import orbax.checkpoint as ocp

import spd_optax as spd

from examples.vit import configs
from examples.vit import devices


class ResumeError(ValueError):
  """A --workdir checkpoint that cannot be resumed; the message says why."""


# Flags that do not change a run's result (a resumed run may change them).
_NOT_IN_FINGERPRINT = ('optimizer', 'eval_batch_size', 'log_every',
                       'results_dir', 'cache_dir', 'quiet', 'workdir',
                       'checkpoint_every', 'stop_after', 'distributed',
                       'coordinator_address', 'num_processes', 'process_id',
                       'local_device_ids', 'heartbeat_timeout',
                       'fsdp', 'mesh_fsdp', 'fsdp_min_size',
                       # The study's runs, not one run's: a seed's run
                       # carries its own `finetune_seed`.
                       'seeds', 'wise_alphas', 'sweep')


def fingerprint(config: configs.Config, method: str) -> dict[str, Any]:
  """The flags of `method`'s run that change its result: what `run.json`
  holds and a resumed run must match."""
  values = {k: v for k, v in dataclasses.asdict(config).items()
            if k not in _NOT_IN_FINGERPRINT}
  values.update(method=method, weight_decay=config.weight_decay[method])
  return values


def checkpoint_item(state, batches) -> dict[str, Any]:
  """What a checkpoint holds: the step, params, optimizer state and data
  position (the state's own anchor and the frozen backbone are remade)."""
  return {'step': state.step, 'params': state.params,
          'opt_state': state.opt_state,
          'data': {k: np.asarray(v, np.int64)
                   for k, v in batches.get_state().items()}}


def _fingerprint_differences(path: epath.Path, fingerprint) -> list[str]:
  recipe = path / 'run.json'
  if not recipe.exists():
    return []
  saved = json.loads(recipe.read_text())
  return [f'{k}={saved.get(k)!r} there, {fingerprint.get(k)!r} now'
          for k in sorted(set(saved) | set(fingerprint))
          if saved.get(k) != fingerprint.get(k)]


def open_workdir(workdir: str, fingerprint: dict[str, Any], state, batches,
                 shardings, mesh):
  """The checkpoint manager of `workdir`, and the state to start from.

  Returns `(manager, state, history or None)`: the latest checkpoint's
  params, optimizer state, step and data position if there is one (the
  iterator `batches` is moved to it; the buffers of `state` they replace are
  freed), else `state` unchanged. A checkpoint of another run (other flags)
  or one that cannot be read raises `ResumeError`, never a silent fresh
  start.
  """
  path = epath.Path(os.path.abspath(workdir))
  differences = _fingerprint_differences(path, fingerprint)
  if differences:
    raise ResumeError(f'--workdir {path} holds another run\'s checkpoints ('
                      + '; '.join(differences[:4]) + '); use a new --workdir.')
  try:
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True))
    latest = manager.latest_step()
  except Exception as error:  # pylint: disable=broad-except
    raise ResumeError(f'cannot open the checkpoints in {path}: '
                      f'{_one_line(error)}') from None
  if devices.is_writer() and not (path / 'run.json').exists():
    (path / 'run.json').write_text(json.dumps(fingerprint, sort_keys=True))
  if latest is None:
    return manager, state, None
  item = checkpoint_item(state, batches)
  replicated = NamedSharding(mesh, P())
  item_shardings = {'step': replicated, 'params': shardings.params,
                    'opt_state': shardings.opt_state,
                    'data': jax.tree.map(lambda _: replicated, item['data'])}
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                        if not hasattr(x, 'dtype') else x.dtype,
                                        sharding=s),
      item, item_shardings)
  try:
    restored = spd.restore_state(manager, latest, target)
  except Exception as error:  # pylint: disable=broad-except
    raise ResumeError(f'cannot resume from step {latest} in {path}: '
                      f'{_one_line(error)}') from None
  # The train loop owns `state` (its step donates it): free the replaced
  # buffers now rather than hold two states while training.
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    leaf.delete()
  state = state.replace(step=restored['step'], params=restored['params'],
                        opt_state=restored['opt_state'])
  batches.set_state({k: int(v) for k, v in restored['data'].items()})
  saved_history = path / f'history_{latest}.json'
  history = (json.loads(saved_history.read_text())
             if saved_history.exists() else None)
  print(f'resumed from step {latest} in {path}', file=sys.stderr)
  return manager, state, history


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return text[:400] + ('...' if len(text) > 400 else '') or type(error).__name__
