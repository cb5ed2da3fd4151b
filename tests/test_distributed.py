"""Distributed training: pmap, jit over a sharded Mesh, shard_map.

Each way of splitting the work must leave SPD's per-leaf and FTP's per-row
reductions global, so the trajectory is the single-device one (to float32
round-off from the changed order of the sums). `spd_optax.state_sharding`
shards the optimizer state like the params.
"""

import functools

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spd_optax as spd
from methods import METHOD_CASES
from methods import METHODS

STEPS = 20
TOLERANCE = dict(rtol=2e-5, atol=2e-6)


def _devices():
  devices = jax.devices()
  assert len(devices) == 8, 'tests/conftest.py fakes 8 CPU devices'
  return devices


def _normal(seed, shape, scale=1.0):
  """NumPy data: no JAX op runs, so nothing is compiled outside the steps."""
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _pretrained():
  return {
      'hidden': {'kernel': _normal(0, (16, 32), 1 / 4),
                 'bias': _normal(1, (32,), 1 / 10)},
      'out': {'kernel': _normal(2, (32, 8), 1 / 4),
              'bias': _normal(3, (8,), 1 / 10)},
  }


def _batch(size=64):
  x = _normal(4, (size, 16))
  y = np.sin(x @ np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32)
             .reshape(16, 8))
  return x, y


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['hidden']['kernel'] + params['hidden']['bias'])
  return jnp.mean((hidden @ params['out']['kernel'] + params['out']['bias']
                   - y) ** 2)


def _gathered_loss(params, x, y):
  """FSDP's forward pass: each split kernel is gathered where it is used."""
  gathered = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
  return _loss(gathered, x, y)


def _assert_shardings(tree, shardings):
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
        leaf.sharding, sharding)


def _step(opt, loss=_loss):
  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _stacked(history):
  """A list of per-step trees as one tree with a leading step axis."""
  return jax.tree.map(lambda *steps: np.stack(steps), *history)


def _run_steps(step, params, state, *inputs, steps=STEPS):
  """Every step's (params, state), stacked (a jitted step, called in a loop)."""
  history = []
  for _ in range(steps):
    params, state = step(params, state, *inputs)
    history.append((params, state))
  return _stacked(history)


@functools.lru_cache(maxsize=None)
def _single_device_run(method):
  """The reference: every step on one device, on the whole batch."""
  opt = METHODS[method]()
  params = _pretrained()
  return _run_steps(jax.jit(_step(opt)), params, opt.init(params), *_batch())


def _stats(state):
  return state.ratio if hasattr(state, 'ratio') else state.gamma


class PmapTest(parameterized.TestCase):

  def _pmap_run(self, opt, average):
    """Every device steps on its slice of the batch; returns the history."""
    devices = _devices()
    params, (x, y) = _pretrained(), _batch()
    n = len(devices)
    shards = jax.tree.map(lambda a: a.reshape(n, -1, *a.shape[1:]), (x, y))

    def step(params, state, x, y):
      grads = jax.grad(_loss)(params, x, y)
      if average:
        grads = jax.lax.pmean(grads, 'batch')
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    replicate = lambda tree: jax.tree.map(
        lambda a: np.broadcast_to(a, (n,) + np.shape(a)), tree)
    step = jax.pmap(step, axis_name='batch', devices=devices)
    return _run_steps(step, replicate(params), replicate(opt.init(params)),
                      *shards)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_pmap_with_pmean_keeps_state_replicated_and_matches_one_device(
      self, method):
    params, state = self._pmap_run(METHODS[method](), average=True)
    # Every device holds the very same params and state at every step ...
    jax.tree.map(
        lambda a: np.testing.assert_array_equal(
            a, np.broadcast_to(a[:, :1], a.shape)), (params, state))
    # ... and it is the one-device run's.
    single_params, single_state = _single_device_run(method)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[:, 0], params), single_params, **TOLERANCE)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[:, 0], _stats(state)), _stats(single_state),
        **TOLERANCE)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_pmap_without_pmean_lets_device_decisions_drift_apart(self, method):
    _, state = self._pmap_run(METHODS[method](), average=False)
    stats = jax.tree.leaves(_stats(state))
    spread = max(float(np.max(np.abs(s - s[:, :1]))) for s in stats)
    self.assertGreater(spread, 0.0)


def _fsdp_shardings(mesh, axis):
  """Each kernel split over every device (one by columns, one by rows)."""
  return {
      'hidden': {'kernel': NamedSharding(mesh, P(None, axis)),
                 'bias': NamedSharding(mesh, P(axis))},
      'out': {'kernel': NamedSharding(mesh, P(axis, None)),
              'bias': NamedSharding(mesh, P())},
  }


class JitShardingTest(parameterized.TestCase):

  def _sharded_run(self, opt, params_sharding, batch_sharding, loss=_loss):
    params = jax.device_put(_pretrained(), params_sharding)
    x, y = jax.device_put(_batch(), batch_sharding)
    state = opt.init(params)
    state_sharding = spd.state_sharding(state, params, params_sharding)
    state = jax.device_put(state, state_sharding)
    step = jax.jit(
        _step(opt, loss),
        in_shardings=(params_sharding, state_sharding, batch_sharding,
                      batch_sharding),
        out_shardings=(params_sharding, state_sharding))
    history = []
    for _ in range(STEPS):
      params, state = step(params, state, x, y)
      history.append((params, state))
    return history, state_sharding

  def _assert_matches_single_device(self, method, history):
    params, state = _stacked(history)
    single_params, single_state = _single_device_run(method)
    chex.assert_trees_all_close(params, single_params, **TOLERANCE)
    chex.assert_trees_all_close(
        _stats(state), _stats(single_state), **TOLERANCE)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_data_parallel_mesh_matches_one_device(self, method):
    mesh = Mesh(np.array(_devices()), ('data',))
    replicated = NamedSharding(mesh, P())
    params_sharding = jax.tree.map(lambda _: replicated, _pretrained())
    opt = METHODS[method]()
    history, _ = self._sharded_run(
        opt, params_sharding, NamedSharding(mesh, P('data')))
    self._assert_matches_single_device(method, history)
    for leaf in jax.tree.leaves(history[-1]):
      self.assertTrue(leaf.sharding.is_fully_replicated)

  @parameterized.named_parameters(
      (f'{method}_{kind}', method, kind)
      for method in METHODS for kind in ('auto', 'explicit'))
  def test_fsdp_mesh_keeps_state_sharded_like_params_and_matches_one_device(
      self, method, kind):
    if kind == 'auto':
      mesh = Mesh(np.array(_devices()), ('fsdp',))
    else:
      mesh = jax.make_mesh((8,), ('fsdp',),
                           axis_types=(jax.sharding.AxisType.Explicit,))
    params_sharding = _fsdp_shardings(mesh, 'fsdp')
    opt = METHODS[method]()
    with jax.set_mesh(mesh):
      history, state_sharding = self._sharded_run(
          opt, params_sharding, NamedSharding(mesh, P('fsdp')),
          _gathered_loss)
    self._assert_matches_single_device(method, history)

    params, state = history[-1]
    _assert_shardings(params, params_sharding)
    _assert_shardings(state, state_sharding)
    # The design: what mirrors a param is split like it, the rest replicated.
    param_specs = {
        jax.tree_util.keystr(path): (np.shape(p), s.spec)
        for (path, p), s in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(params_sharding))}
    mirrored = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      key = jax.tree_util.keystr(path[-2:])
      if key in param_specs and leaf.shape == param_specs[key][0]:
        self.assertEqual(leaf.sharding.spec, param_specs[key][1], key)
        mirrored += 1
      elif leaf.shape == (32,) and key == "['hidden']['kernel']":
        # FTP's inverse row norms, one per output unit: split like them.
        self.assertEqual(leaf.sharding.spec, P('fsdp'))
      else:
        self.assertTrue(leaf.sharding.is_fully_replicated,
                        jax.tree_util.keystr(path))
    # Adam's two moments and the anchor, plus FTP's c_prev.
    self.assertGreaterEqual(mirrored, 3 * len(param_specs))


class StateShardingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.mesh = Mesh(np.array(_devices()), ('x',))
    self.params = {'backbone': {'kernel': np.ones((16, 32), np.float32),
                                'stacked': np.ones((8, 4, 6), np.float32)},
                   'head': np.zeros((32,), np.float32)}
    self.specs = {'backbone': {'kernel': P(None, 'x'),
                               'stacked': P('x', None, None)},
                  'head': P()}
    self.shardings = jax.tree.map(
        lambda s: NamedSharding(self.mesh, s), self.specs)

  def _assert_mirrors_params(self, state, shardings):
    """Param-shaped leaves carry their param's sharding; the rest replicate."""
    self.assertEqual(jax.tree.structure(state, is_leaf=_is_masked),
                     jax.tree.structure(shardings, is_leaf=_is_masked))
    expected_specs = {
        ("['backbone']['kernel']", (16, 32)): P(None, 'x'),
        # FTP's inverse row norms: one per output unit, split like them.
        ("['backbone']['kernel']", (32,)): P('x'),
        ("['backbone']['stacked']", (8, 4, 6)): P('x', None, None),
    }
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(shardings)):
      param = jax.tree_util.keystr(path[-2:])
      expected = expected_specs.get((param, np.shape(leaf)), P())
      self.assertEqual(sharding, NamedSharding(self.mesh, expected),
                       jax.tree_util.keystr(path))

  @parameterized.named_parameters(
      ('chain', lambda: optax.chain(
          optax.clip_by_global_norm(1.0), spd.adam_spd(1e-2, 0.5))),
      ('inject_hyperparams', lambda: optax.inject_hyperparams(spd.adam_spd)(
          learning_rate=1e-2, weight_decay=0.5)),
      ('masked', lambda: optax.masked(
          spd.adam_spd(1e-2, 0.5), {'backbone': True, 'head': False})),
      ('multi_transform', lambda: optax.multi_transform(
          {'backbone': spd.adam_spd(1e-2, 0.5), 'head': optax.adamw(1e-3)},
          {'backbone': 'backbone', 'head': 'head'})),
      ('multi_steps', lambda: optax.MultiSteps(
          spd.adam_spd(1e-2, 0.5, anchor='zero'), 4)),
      ('ftp_in_chain', lambda: optax.chain(
          optax.clip_by_global_norm(1.0), spd.adam_ftp(1e-2))),
      ('ftp_in_multi_transform', lambda: optax.multi_transform(
          {'backbone': spd.adam_ftp(1e-2), 'head': optax.adamw(1e-3)},
          {'backbone': 'backbone', 'head': 'head'})),
  )
  def test_state_sharding_mirrors_params_through_optax_wrappers(
      self, make_opt):
    state = make_opt().init(self.params)
    shardings = spd.state_sharding(state, self.params, self.shardings)
    self._assert_mirrors_params(state, shardings)
    # Usable as is: placing the state.
    placed = jax.device_put(state, shardings)
    _assert_shardings(placed, shardings)
    mirrored = [s for s in jax.tree.leaves(shardings)
                if s.spec == P(None, 'x')]
    self.assertNotEmpty(mirrored)

  def test_state_sharding_of_stacked_statistics_follows_the_layer_axis(self):
    opt = spd.adam_spd(1e-2, 0.5, layer_axis={'backbone': {
        'kernel': None, 'stacked': 0}, 'head': None})
    state = opt.init(self.params)
    shardings = spd.state_sharding(state, self.params, self.specs)
    self.assertEqual(shardings.ratio['backbone']['stacked'], P('x'))
    self.assertEqual(shardings.selected['backbone']['kernel'], P())
    self.assertEqual(shardings.anchor['backbone']['stacked'],
                     P('x', None, None))
    self.assertEqual(shardings.count, P())

  def test_state_sharding_of_abstract_state_initializes_sharded(self):
    opt = spd.adam_spd(1e-2, 0.5)
    abstract = jax.eval_shape(opt.init, self.params)
    shardings = spd.state_sharding(abstract, self.params, self.shardings)
    state = jax.jit(opt.init, out_shardings=shardings)(self.params)
    self.assertEqual(state.anchor['backbone']['kernel'].sharding,
                     self.shardings['backbone']['kernel'])
    chex.assert_trees_all_equal(state.anchor, self.params)

  def test_state_sharding_accepts_a_prefix_and_rejects_a_wrong_tree(self):
    opt = spd.adam_spd(1e-2, 0.5)
    state = opt.init(self.params)
    replicated = NamedSharding(self.mesh, P())
    shardings = spd.state_sharding(state, self.params, replicated)
    for sharding in jax.tree.leaves(shardings):
      self.assertEqual(sharding, replicated)
    with self.assertRaisesRegex(ValueError, 'params_sharding'):
      spd.state_sharding(state, self.params, {'head': replicated})


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def _shard_map_params():
  return {
      'split_rows': _normal(5, (16, 24), 1 / 4),
      'split_columns': _normal(6, (16, 24), 1 / 4),
      'bias': _normal(7, (24,), 1 / 4),
      'stacked': _normal(8, (8, 4, 6), 1 / 4),
      'replicated': _normal(9, (5, 3), 1 / 4),
  }


# Where each leaf is split, and the axis its reductions must be summed over:
# none for a leaf split over its layers (each device has whole layers) or not
# split at all.
_SHARD_MAP_SPECS = {
    'split_rows': P('x', None), 'split_columns': P(None, 'x'),
    'bias': P('x'), 'stacked': P('x', None, None), 'replicated': P()}
_SHARD_MAP_AXIS_NAMES = {
    'split_rows': 'x', 'split_columns': 'x', 'bias': 'x', 'stacked': None,
    'replicated': None}
_LAYER_AXIS = {'split_rows': None, 'split_columns': None, 'bias': None,
               'stacked': 0, 'replicated': None}


def _moving_loss(params, step):
  """A loss whose minimum moves, so the gradient turns and decisions flip."""
  return sum(jnp.sum(jnp.cos(3 * p + 0.4 * step)
                     * jnp.sin(jnp.arange(p.size) + 0.5).reshape(p.shape))
             for p in jax.tree.leaves(params))


def _moving_step(update):
  def step(params, state, step_count):
    grads = jax.grad(_moving_loss)(params, step_count)
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


def _run_moving(opt, update):
  params = _shard_map_params()
  state = opt.init(params)
  step, history = _moving_step(update), []
  for step_count in range(STEPS):
    params, state = step(params, state, np.float32(step_count))
    history.append((params, state))
  return _stacked(history)


@functools.lru_cache(maxsize=None)
def _unsharded_run(method):
  opt = METHODS[method](layer_axis=_LAYER_AXIS)
  return _run_moving(opt, opt.update)


def _shard_map_run(method, specs, axis_names, check_vma=True):
  """The updates inside shard_map (the gradients are computed globally)."""
  mesh = Mesh(np.array(_devices()), ('x',))
  params = _shard_map_params()
  opt = METHODS[method](layer_axis=_LAYER_AXIS, axis_name=axis_names)
  state_specs = spd.state_sharding(
      jax.eval_shape(opt.init, params), params, specs)
  update = jax.shard_map(
      opt.update, mesh=mesh, in_specs=(specs, state_specs, specs),
      out_specs=(specs, state_specs), check_vma=check_vma)
  return _run_moving(opt, update)


class ShardMapTest(parameterized.TestCase):

  @parameterized.named_parameters(*METHOD_CASES)
  def test_axis_name_makes_shard_map_update_match_unsharded(self, method):
    specs = dict(_SHARD_MAP_SPECS)
    axis_names = dict(_SHARD_MAP_AXIS_NAMES)
    if method == 'ftp':
      # FTP's rows are output units: splitting them is the other test's case.
      specs['split_columns'] = P()
      axis_names['split_columns'] = None
    params, state = _shard_map_run(method, specs, axis_names)
    global_params, global_state = _unsharded_run(method)
    chex.assert_trees_all_close(params, global_params, **TOLERANCE)
    chex.assert_trees_all_close(_stats(state), _stats(global_state),
                                **TOLERANCE)
    if method == 'spd':
      selected = np.asarray(state.selected['split_rows'])
      self.assertTrue(selected.any() and not selected.all())

  @parameterized.named_parameters(*METHOD_CASES)
  def test_shard_map_without_axis_name_is_refused_by_replication_check(
      self, method):
    # Each shard would decide alone; shard_map sees the per-shard statistics
    # that out_specs (from state_sharding) declare replicated.
    no_names = {name: None for name in _SHARD_MAP_SPECS}
    specs = dict(_SHARD_MAP_SPECS, split_columns=P())
    with self.assertRaisesRegex(ValueError, 'replicat'):
      _shard_map_run(method, specs, no_names)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_partition_specs_as_axis_name_match_unsharded_for_any_split(
      self, method):
    # Given the specs, FTP also handles split output units: the row norms stay
    # per shard, `h` is psum'ed and `max(n)` pmax'ed across the devices.
    params, state = _shard_map_run(method, _SHARD_MAP_SPECS, _SHARD_MAP_SPECS)
    global_params, global_state = _unsharded_run(method)
    chex.assert_trees_all_close(params, global_params, **TOLERANCE)
    chex.assert_trees_all_close(_stats(state), _stats(global_state),
                                **TOLERANCE)

  def test_ftp_name_alone_cannot_split_output_units(self):
    # A bare name means "split along summed axes": with the columns (FTP's
    # output units) split, the psum'ed row norms mix different rows.
    specs = dict(_SHARD_MAP_SPECS, split_rows=P())
    axis_names = dict(_SHARD_MAP_AXIS_NAMES, split_rows=None)
    params, _ = _shard_map_run('ftp', specs, axis_names, check_vma=False)
    global_params, _ = _unsharded_run('ftp')
    self.assertFalse(np.allclose(params['split_columns'],
                                 global_params['split_columns'], **TOLERANCE))
