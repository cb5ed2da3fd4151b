"""The devices: a `(data, fsdp)` mesh, the state's and batches' shardings.

Also the two questions every host asks: which rows of a batch are mine
(`global_batch`), and do I write the files (`is_writer`).
"""

import math

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import spd_optax as spd

from examples.vit import configs


def initialize_distributed(config: configs.Config) -> None:
  """Joins this process to the others (`jax.distributed.initialize`).

  The flags left out (`--coordinator-address`, `--num-processes`,
  `--process-id`, `--local-device-ids`) are JAX's to detect (TPU, SLURM,
  Open MPI). `--heartbeat-timeout` bounds how long the others keep going
  after a process is lost. CPU processes talk through gloo (collectives
  over TCP), which the CPU backend needs for more than one process.
  """
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  given = {'coordinator_address': config.coordinator_address,
           'num_processes': config.num_processes,
           'process_id': config.process_id,
           'local_device_ids': config.local_device_ids}
  kwargs = {name: value for name, value in given.items() if value is not None}
  if config.heartbeat_timeout is not None:
    kwargs['heartbeat_timeout_seconds'] = config.heartbeat_timeout
  jax.distributed.initialize(**kwargs)


def make_mesh(config: configs.Config) -> Mesh:
  """A `(data, fsdp)` mesh of the devices; batches are split over both axes.

  Without `--distributed`, as many devices as divide the batch sizes (all of
  them when the batch sizes are multiples of the device count; one CPU
  device: a mesh of one). `--fsdp` makes the fsdp axis every device of the
  mesh, `--mesh-fsdp N` N of them; params of at least `--fsdp-min-size`
  elements, and their optimizer state, are split over it.
  """
  devices = jax.devices()
  n = math.gcd(len(devices), config.batch_size, config.pretrain_batch_size)
  if config.distributed and n != len(devices):
    raise configs.UsageError(f'--batch-size and --pretrain-batch-size must be '
                             f'multiples of the {len(devices)} devices.')
  fsdp = config.mesh_fsdp or (n if config.fsdp else 1)
  if n % fsdp:
    raise configs.UsageError(f'--mesh-fsdp {fsdp} does not divide the {n} '
                             'devices used (as many as divide the batch '
                             'sizes).')
  return Mesh(np.asarray(devices[:n]).reshape(n // fsdp, fsdp),
              ('data', 'fsdp'))


def param_shardings(params, mesh: Mesh, min_size: int):
  """Leaves of >= `min_size` elements split over `fsdp` along their largest
  divisible axis; the others (and every leaf without fsdp) replicated."""
  fsdp = mesh.shape['fsdp']

  def one(x):
    spec = [None] * len(x.shape)
    if fsdp > 1 and math.prod(x.shape) >= min_size:
      for axis in sorted(range(len(x.shape)), key=lambda a: -x.shape[a]):
        if x.shape[axis] % fsdp == 0:
          spec[axis] = 'fsdp'
          break
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, params)


def state_shardings(state, mesh: Mesh, min_size: int):
  """A `TrainState`'s shardings (concrete or `jax.eval_shape`d): the params,
  the optimizer state (its anchor included) and the state's own anchor
  leaves alike; the frozen LoRA backbone by the same rule."""
  params = param_shardings(state.params, mesh, min_size)
  return state.replace(
      step=NamedSharding(mesh, P()), params=params,
      anchor=param_shardings(state.anchor, mesh, min_size),
      opt_state=spd.state_sharding(state.opt_state, state.params, params),
      frozen=(None if state.frozen is None
              else param_shardings(state.frozen, mesh, min_size)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def global_batch(batch, sharding: NamedSharding):
  """This host's rows of a batch as one array over the whole mesh."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def tree_bytes(tree) -> int:
  """The bytes of a pytree's arrays (e.g. an optimizer state's memory)."""
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, 'dtype')))


def is_writer() -> bool:
  """Only process 0 writes logs, results and plots (orbax: every process)."""
  return jax.process_index() == 0
