"""One process of the multi-process tests: SPD and FTP steps on a global mesh.

`tests/test_multiprocess.py` starts this file in N real JAX processes on
localhost (`tests/multiprocess_launch.py`); each joins the others with
`jax.distributed.initialize` and the gloo CPU collectives, steps each
optimizer in its layouts (`CASES`) on a mesh of all the processes' devices,
and saves what it gathered back to its host (and what it saw: process count,
devices). The test runs the very same function, `run_layouts`, in its own
process on as many devices, for the reference.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python tests/multiprocess_worker.py --coordinator-address 127.0.0.1:PORT \
        --num-processes 2 --process-id 0 --out DIR [--checkpoint-dir DIR]
"""

import argparse
import json
import os
import sys
import time

_START = time.monotonic()  # Before JAX's import: what a process start costs.

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import spd_optax as spd

STEPS = 8
# Where a resumed run is stopped, saved and restored (the checkpoint test).
SAVE_AT = 4
BATCH = 32
LEARNING_RATE = 3e-2

OPTIMIZERS = {
    'adam_spd': lambda **options: spd.adam_spd(
        LEARNING_RATE, weight_decay=1.0, **options),
    'spd_of_adam': lambda **options: spd.selective_projection_decay(
        optax.adam(LEARNING_RATE), weight_decay=1.0, **options),
    'adam_ftp': lambda **options: spd.adam_ftp(LEARNING_RATE, **options),
    'ftp_of_adam': lambda **options: spd.fast_trainable_projection(
        optax.adam(LEARNING_RATE), **options),
}
# Every optimizer with FSDP; the two aliases also data parallel and in
# shard_map (each step program costs a compile of about a second per process).
CASES = (
    ('fsdp', 'adam_spd'), ('fsdp', 'spd_of_adam'), ('fsdp', 'adam_ftp'),
    ('fsdp', 'ftp_of_adam'),
    ('data_parallel', 'adam_spd'), ('data_parallel', 'adam_ftp'),
    ('shard_map', 'adam_spd'), ('shard_map', 'adam_ftp'),
)

# FSDP and shard_map: every leaf but the output bias split over all the
# devices of all the processes, the hidden kernel by its output units (FTP's
# rows), the output kernel by its input rows (the axis SPD and FTP sum over).
SPLIT_SPECS = {
    'hidden': {'kernel': P(None, 'x'), 'bias': P('x')},
    'out': {'kernel': P('x', None), 'bias': P()},
}


def _normal(seed, shape, scale=1.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def pretrained():
  return {
      'hidden': {'kernel': _normal(0, (16, 32), 1 / 4),
                 'bias': _normal(1, (32,), 1 / 10)},
      'out': {'kernel': _normal(2, (32, 8), 1 / 4),
              'bias': _normal(3, (8,), 1 / 10)},
  }


def batch():
  x = _normal(4, (BATCH, 16))
  y = np.sin(x @ np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32)
             .reshape(16, 8))
  return x, y


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['hidden']['kernel'] + params['hidden']['bias'])
  return jnp.mean((hidden @ params['out']['kernel'] + params['out']['bias']
                   - y) ** 2)


def _decisions(state):
  """What the optimizer decided: SPD's selection and ratio, FTP's radius."""
  if isinstance(state, spd.SelectiveProjectionDecayState):
    return {'selected': state.selected, 'ratio': state.ratio}
  return {'gamma': state.gamma}


def _global(host_tree, shardings):
  """Global arrays from values every process holds whole (as a loader would
  read a checkpoint): each process places only its own devices' shards."""
  return jax.tree.map(
      lambda value, sharding: jax.make_array_from_callback(
          value.shape, sharding, lambda index: value[index]),
      host_tree, shardings)


def _process_local_batch(mesh, x, y):
  """The batch split over the mesh, each process giving only its own rows."""
  sharding = NamedSharding(mesh, P('x'))
  rows = BATCH // jax.process_count()
  own = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  return tuple(
      jax.make_array_from_process_local_data(sharding, a[own], a.shape)
      for a in (x, y))


def _to_host(tree):
  """Every leaf whole on every process, as NumPy (one program for the tree)."""
  return jax.tree.map(np.asarray,
                      multihost_utils.process_allgather(tree, tiled=True))


def _replicated_to_host(tree):
  """A replicated tree's leaves, read from this process's own copy."""
  def read(leaf):
    if not leaf.sharding.is_fully_replicated:
      raise AssertionError(f'a decision is not replicated: {leaf.sharding}')
    return np.asarray(leaf.addressable_shards[0].data)
  return jax.tree.map(read, tree)


def _layout(name, mesh, opt_name):
  """The optimizer, params' shardings and jitted step of one layout."""
  params = pretrained()
  replicated = NamedSharding(mesh, P())
  if name == 'data_parallel':
    params_sharding = jax.tree.map(lambda _: replicated, params)
  else:
    params_sharding = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), SPLIT_SPECS)
  # shard_map: each device sees its shard; the specs say what to sum across.
  options = {'axis_name': SPLIT_SPECS} if name == 'shard_map' else {}
  opt = OPTIMIZERS[opt_name](**options)
  abstract_state = jax.eval_shape(opt.init, params)
  state_sharding = spd.state_sharding(abstract_state, params, params_sharding)

  if name == 'shard_map':
    state_specs = spd.state_sharding(abstract_state, params, SPLIT_SPECS)
    update = jax.shard_map(
        opt.update, mesh=mesh, in_specs=(SPLIT_SPECS, state_specs, SPLIT_SPECS),
        out_specs=(SPLIT_SPECS, state_specs))
  else:
    update = opt.update

  def step(params, state, x, y):
    grads = jax.grad(_loss)(params, x, y)
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state

  batch_sharding = NamedSharding(mesh, P('x'))
  step = jax.jit(
      step,
      in_shardings=(params_sharding, state_sharding, batch_sharding,
                    batch_sharding),
      out_shardings=(params_sharding, state_sharding))
  init = jax.jit(opt.init, out_shardings=state_sharding)
  return params_sharding, state_sharding, abstract_state, init, step


def _check_shardings(tree, shardings):
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    if not leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
      raise AssertionError(f'{leaf.sharding} is not {sharding}')


def run_layouts(devices, checkpoint_dir=None):
  """Steps each optimizer in its layouts (`CASES`) on a mesh of `devices`.

  Args:
    devices: the devices of the mesh, one axis `x` (all of every process's).
    checkpoint_dir: if given, the FSDP runs are also saved with orbax at
      step `SAVE_AT` (all optimizers in one checkpoint), restored with
      `spd.restore_state` and run on to `STEPS`, beside the uninterrupted
      runs.

  Returns:
    A flat dict of NumPy arrays, the same on every process: per layout and
    optimizer, the final params and every step's decisions (and the resumed
    run's final params).
  """
  mesh = Mesh(np.array(devices), ('x',))
  x, y = batch()
  final_params, decisions, runs = {}, {}, {}
  inputs = {'data_parallel': _process_local_batch(mesh, x, y)}
  inputs['fsdp'] = inputs['shard_map'] = _global(
      (x, y), (NamedSharding(mesh, P('x')),) * 2)
  for layout, opt_name in CASES:
    params_sharding, state_sharding, abstract_state, init, step = _layout(
        layout, mesh, opt_name)
    params = _global(pretrained(), params_sharding)
    state = init(params)
    history = []
    for step_count in range(STEPS):
      params, state = step(params, state, *inputs[layout])
      history.append(_replicated_to_host(_decisions(state)))
      if layout == 'fsdp' and step_count + 1 == SAVE_AT:
        runs[opt_name] = dict(
            params=params, state=state, step=step, inputs=inputs[layout],
            shardings=(params_sharding, state_sharding),
            abstract_state=abstract_state)
    _check_shardings((params, state), (params_sharding, state_sharding))
    final_params[f'{layout}/{opt_name}/params'] = params
    decisions[f'{layout}/{opt_name}/decisions'] = jax.tree.map(
        lambda *steps: np.stack(steps), *history)
  if checkpoint_dir:
    restored = _save_and_restore(os.path.abspath(checkpoint_dir), runs)
    for name, run in runs.items():
      params, state = restored[name]['params'], restored[name]['state']
      for _ in range(SAVE_AT, STEPS):
        params, state = run['step'](params, state, *run['inputs'])
      _check_shardings((params, state), run['shardings'])
      final_params[f'fsdp/{name}/resumed_params'] = params
  results = {}
  results.update(_flat(_to_host(final_params)))
  results.update(_flat(decisions))
  return results


def _save_and_restore(directory, runs):
  """Saves every run's params and state in one step; restores them sharded."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  saved = {name: {'params': run['params'], 'state': run['state']}
           for name, run in runs.items()}
  target = {}
  for name, run in runs.items():
    params_sharding, state_sharding = run['shardings']
    target[name] = {
        'params': jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=sharding),
            run['params'], params_sharding),
        'state': jax.tree.map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(
                leaf.shape, leaf.dtype, sharding=sharding),
            run['abstract_state'], state_sharding)}
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    manager.save(SAVE_AT, args=ocp.args.StandardSave(saved))
    manager.wait_until_finished()
    restored = spd.restore_state(manager, SAVE_AT, target)
  for name, run in runs.items():
    _check_shardings((restored[name]['params'], restored[name]['state']),
                     run['shardings'])
  return restored


def _flat(tree):
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator-address', required=True)
  parser.add_argument('--num-processes', type=int, required=True)
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--checkpoint-dir', default=None)
  args = parser.parse_args(argv)

  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes, process_id=args.process_id,
      initialization_timeout=60)
  initialized = time.monotonic()
  seen = {
      'process_index': jax.process_index(),
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'device_processes': [d.process_index for d in jax.devices()],
  }
  results = run_layouts(jax.devices(), args.checkpoint_dir)
  seen['seconds'] = {'start_and_initialize': initialized - _START,
                     'run_layouts': time.monotonic() - initialized}
  os.makedirs(args.out, exist_ok=True)
  name = os.path.join(args.out, f'process_{args.process_id}')
  np.savez(name + '.npz', **results)
  with open(name + '.json', 'w') as f:
    json.dump(seen, f)
  print(f'process {jax.process_index()} of {jax.process_count()}, '
        f'{jax.local_device_count()} of {jax.device_count()} devices: '
        f'{len(results)} arrays in {name}.npz', flush=True)
  # Every process has its results before any leaves the collectives.
  multihost_utils.sync_global_devices('multiprocess_worker done')
  jax.distributed.shutdown()


if __name__ == '__main__':
  sys.exit(main())
