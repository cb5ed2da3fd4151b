"""Equinox: every optimizer trains a model filtered with `eqx.filter`.

Equinox hands the optimizer `eqx.filter(model, eqx.is_array)`: the model's
own pytree (modules, `GetAttrKey` / `SequenceKey` paths) with None where the
model holds a non-array (an activation function, a dropout rate, a missing
bias, a part kept frozen with `eqx.partition`). None must stay None in the
updates and in every per-leaf state field, and the trajectory must be the
one of the same weights held in a plain dict.
"""

import functools
import shutil
import tempfile
from typing import Callable

from absl.testing import parameterized
import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spd_optax as spd
from spd_optax import _common

# A restore refused on purpose leaves orbax's reads un-awaited.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

STEPS = 4
TOLERANCE = dict(rtol=1e-6, atol=1e-7)
DIM = 8


def _name(path) -> str:
  """A jax key path as 'layers/0/weight', for a model and for a dict alike."""
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _output_axes(path, shape):
  """Equinox's Linear weight is (out, in): its output units are axis 0.

  `path` is ('layers', '0', 'weight') for the model and ('layers/0/weight',)
  for the dict: the same last name only if Equinox's keys are read right.
  """
  del shape
  return 0 if path[-1].split('/')[-1] == 'weight' else -1


def _not_under(prefix):
  """A mask callable: every leaf but those under `prefix` (a new head)."""
  return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: not _name(path).startswith(prefix), params)


# Each method given its mask and per-leaf options as callables on paths.
METHODS = {
    'spd': lambda head: spd.adam_spd(
        3e-2, weight_decay=1.0, mask=_not_under(head),
        layer_axis=lambda path, shape: None),
    'ftp': lambda head: spd.adam_ftp(
        3e-2, mu=0.1, mask=_not_under(head), output_axes=_output_axes),
    'l2sp': lambda head: spd.adamw_l2sp(
        3e-2, weight_decay=1.0, mask=_not_under(head)),
}

# Every optimizer of the library, on its defaults.
OPTIMIZERS = {
    'selective_projection_decay': lambda: spd.selective_projection_decay(
        optax.adam(1e-2), weight_decay=1.0),
    'adam_spd': lambda: spd.adam_spd(1e-2, weight_decay=1.0),
    'fast_trainable_projection': lambda: spd.fast_trainable_projection(
        optax.adam(1e-2), output_axes=0),
    'adam_ftp': lambda: spd.adam_ftp(1e-2, output_axes=0),
    'sgd_ftp': lambda: spd.sgd_ftp(1e-2, momentum=0.9, output_axes=0),
    'l2_sp': lambda: spd.l2_sp(1.0),
    'adamw_l2sp': lambda: spd.adamw_l2sp(1e-2, weight_decay=1.0),
}


class _Block(eqx.Module):
  """A pre-norm transformer block on a (sequence, DIM) input."""

  norm1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  mlp_in: eqx.nn.Linear
  mlp_out: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, 3)
    self.norm1 = eqx.nn.LayerNorm(DIM)
    self.attention = eqx.nn.MultiheadAttention(2, DIM, key=keys[0])
    self.norm2 = eqx.nn.LayerNorm(DIM)
    self.mlp_in = eqx.nn.Linear(DIM, 2 * DIM, key=keys[1])
    self.mlp_out = eqx.nn.Linear(2 * DIM, DIM, key=keys[2])

  def __call__(self, x):
    h = jax.vmap(self.norm1)(x)
    x = x + self.attention(h, h, h)
    h = jax.nn.gelu(jax.vmap(self.mlp_in)(jax.vmap(self.norm2)(x)))
    return x + jax.vmap(self.mlp_out)(h)


class _Transformer(eqx.Module):
  embed: eqx.nn.Linear
  block: _Block
  head: eqx.nn.Linear
  pool: Callable

  def __init__(self, key):
    keys = jax.random.split(key, 3)
    self.embed = eqx.nn.Linear(3, DIM, key=keys[0])
    self.block = _Block(keys[1])
    self.head = eqx.nn.Linear(DIM, 2, key=keys[2])
    self.pool = functools.partial(jnp.mean, axis=0)

  def __call__(self, x):
    return self.head(self.pool(self.block(jax.vmap(self.embed)(x))))


def _mlp(depth=2):
  return eqx.nn.MLP(3, 2, 16, depth, activation=jnp.tanh,
                    key=jax.random.key(0))


# Each model, the part kept frozen with `eqx.partition` (the first layer),
# and the new head, which the mask leaves out.
MODELS = {
    'mlp': (_mlp, lambda m: m.layers[0], 'layers/2'),
    'transformer': (lambda: _Transformer(jax.random.key(1)),
                    lambda m: m.embed, 'head'),
}


def _batches(model_name):
  """A batch per step of one regression: the gradient keeps its direction
  (FTP's radius grows) but turns enough for SPD's decay to act."""
  rng = np.random.default_rng(7)
  shape = (STEPS, 4, 5, 3) if model_name == 'transformer' else (STEPS, 4, 3)
  x = rng.standard_normal(shape).astype(np.float32)
  features = x.mean(-2) if model_name == 'transformer' else x
  y = np.stack([np.sin(features.sum(-1)), np.cos(features[..., 0])], -1)
  return list(zip(x, y.astype(np.float32)))


def _partition(model_name):
  """(trainable, frozen): the first layer frozen, non-arrays static."""
  make, frozen_part, _ = MODELS[model_name]
  model = make()
  filter_spec = jax.tree.map(eqx.is_array, model)
  filter_spec = eqx.tree_at(
      frozen_part, filter_spec,
      replace=jax.tree.map(lambda _: False, frozen_part(filter_spec)))
  return eqx.partition(model, filter_spec)


def _loss(trainable, frozen, x, y):
  model = eqx.combine(trainable, frozen)
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _as_dict(tree):
  """A pytree's arrays in a plain dict keyed by path: {'layers/0/weight': ..}."""
  return {_name(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _train_equinox(opt, trainable, frozen, batches):
  """The idiomatic Equinox loop; the params after each step."""

  @eqx.filter_jit
  def step(trainable, state, x, y):
    loss, grads = eqx.filter_value_and_grad(_loss)(trainable, frozen, x, y)
    updates, state = opt.update(grads, state, trainable)
    return eqx.apply_updates(trainable, updates), state, loss

  state, history = opt.init(trainable), []
  for x, y in batches:
    trainable, state, loss = step(trainable, state, x, y)
    history.append((_as_dict(trainable), loss, state))
  return history, state


def _train_dict(opt, trainable, frozen, batches):
  """The same weights as a plain dict of arrays, the same loss."""
  treedef = jax.tree.structure(trainable)
  names = list(_as_dict(trainable))

  def dict_loss(params, x, y):
    model = treedef.unflatten([params[name] for name in names])
    return _loss(model, frozen, x, y)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(dict_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  params = _as_dict(trainable)
  state, history = opt.init(params), []
  for x, y in batches:
    params, state, loss = step(params, state, x, y)
    history.append((params, loss))
  return history


@functools.lru_cache(maxsize=None)
def _equinox_run(model_name, method):
  """(params and loss after each step, final state), trained once per case."""
  trainable, frozen = _partition(model_name)
  opt = METHODS[method](MODELS[model_name][2])
  return _train_equinox(opt, trainable, frozen, _batches(model_name))


def _params_shaped(state, like):
  """Every subtree of `state` with the module type of `like` (the params)."""
  found = []
  is_module = lambda x: isinstance(x, type(like))
  for node in jax.tree.leaves(state, is_leaf=is_module):
    if is_module(node):
      found.append(node)
  return found


def _none_slots(tree):
  """The paths where `tree` holds None."""
  return sorted(_name(path) for path, leaf in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: x is None) if leaf is None)


class EquinoxTest(parameterized.TestCase):

  def test_path_names_of_an_equinox_module(self):
    paths = [_common.path_names(path) for path, _ in
             jax.tree_util.tree_leaves_with_path(eqx.filter(_mlp(),
                                                            eqx.is_array))]
    self.assertEqual(paths[:2], [('layers', '0', 'weight'),
                                 ('layers', '0', 'bias')])

  @parameterized.named_parameters(*((name, name) for name in OPTIMIZERS))
  def test_none_leaves_stay_none_in_updates_and_state(self, name):
    opt = OPTIMIZERS[name]()
    params = eqx.filter(_mlp(), eqx.is_array)
    none_slots = _none_slots(params)
    self.assertEqual(none_slots, ['activation', 'final_activation'])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    update = jax.jit(opt.update)
    updates, state = update(grads, opt.init(params), params)
    updates, state = update(grads, state, params)
    self.assertEqual(jax.tree.structure(updates), jax.tree.structure(params))
    chex.assert_tree_all_finite(updates)
    # Adam's moments, the anchor and each per-leaf statistic: None where
    # the params hold None (not `optax.MaskedNode()`, not an array).
    shaped = _params_shaped(state, params)
    self.assertGreaterEqual(len(shaped), 1 if name == 'l2_sp' else 3)
    for tree in shaped:
      self.assertEqual(_none_slots(tree), none_slots)
    fields = [field for field in ('anchor', 'selected', 'ratio', 'gamma',
                                  'gamma_m', 'gamma_v', 'c_prev', 's_prev')
              if hasattr(state, field)]
    for field in fields:
      self.assertIsInstance(getattr(state, field), eqx.nn.MLP, field)

  @parameterized.product(model_name=tuple(MODELS), method=tuple(METHODS))
  def test_trajectory_equals_plain_dict(self, model_name, method):
    trainable, frozen = _partition(model_name)
    self.assertIsNone(MODELS[model_name][1](trainable).weight)
    head = MODELS[model_name][2]
    equinox_run, state = _equinox_run(model_name, method)
    dict_run = _train_dict(METHODS[method](head), trainable, frozen,
                           _batches(model_name))
    for (equinox_params, equinox_loss, _), (dict_params, dict_loss) in zip(
        equinox_run, dict_run):
      self.assertEqual(sorted(equinox_params), sorted(dict_params))
      chex.assert_trees_all_close(equinox_params, dict_params, **TOLERANCE)
      chex.assert_trees_all_close(equinox_loss, dict_loss, **TOLERANCE)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         equinox_run[-1][0], _as_dict(trainable))
    self.assertGreater(max(moved.values()), 1e-3)
    # The frozen part and the non-arrays: None in every params-shaped field.
    shaped = _params_shaped(state, trainable)
    self.assertGreaterEqual(len(shaped), 3)
    for tree in shaped:
      self.assertEqual(_none_slots(tree), _none_slots(trainable))
    # The mask, a callable on Equinox paths, left the head out; the output
    # axes, another, gave each output unit (axis 0) its own norm.
    if method == 'l2sp':
      self.assertIsInstance(_head_of(state[1].anchor, head), optax.MaskedNode)
    if method == 'spd':
      self.assertIsInstance(_head_of(state.selected, head), optax.MaskedNode)
      selected = [np.ravel(s) for _, _, step_state in equinox_run
                  for s in jax.tree.leaves(step_state.selected)]
      self.assertTrue(np.concatenate(selected).any(), 'the decay never acted')
    if method == 'ftp':
      self.assertIsInstance(_head_of(state.gamma, head), optax.MaskedNode)
      weights = _as_dict(trainable)
      for path, s_prev in jax.tree_util.tree_leaves_with_path(state.s_prev):
        param = weights[_name(path)]
        chex.assert_shape(s_prev, param.shape[:1] if param.ndim > 1 else ())

  def test_masks_and_options_as_modules_equal_callables(self):
    # An Equinox module is callable: a module of bools (or of axes) must be
    # read as a pytree of values, as `optax.masked` reads it.
    model = _mlp(depth=1)
    params = eqx.filter(model, eqx.is_array)
    mask = jax.tree.map(lambda x: eqx.is_array(x) and x.ndim > 1, model)
    axes = jax.tree.map(lambda x: 0 if x.ndim > 1 else None, params)
    grads = jax.tree.map(lambda p: jnp.cos(p + 1.0), params)
    none_axes = jax.tree.map(lambda _: None, params)
    cases = (
        (lambda **kw: spd.adam_spd(1e-2, weight_decay=1.0, **kw),
         'layer_axis', none_axes, lambda path, shape: None),
        (lambda **kw: spd.adam_ftp(1e-2, **kw),
         'output_axes', axes, lambda path, shape: 0 if len(shape) > 1 else None),
    )
    for make, option, as_module, as_callable in cases:
      as_modules = make(mask=mask, **{option: as_module})
      as_callables = make(mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
                          **{option: as_callable})
      results = []
      for opt in (as_modules, as_callables):
        state, moved, update = opt.init(params), params, jax.jit(opt.update)
        for _ in range(2):
          updates, state = update(grads, state, moved)
          moved = optax.apply_updates(moved, updates)
        results.append((moved, state))
      chex.assert_trees_all_equal(results[0], results[1])
      self.assertIsInstance(results[0][1].anchor.layers[0].bias,
                            optax.MaskedNode)

  def test_layer_axis_callable_on_stacked_equinox_layers(self):
    # eqx.filter_vmap stacks layers, as a scan over layers expects.
    layers = eqx.filter_eval_shape(
        eqx.filter_vmap(lambda key: eqx.nn.Linear(DIM, DIM, key=key)),
        jax.random.split(jax.random.key(3), 4))
    params = eqx.filter(layers,
                        lambda x: isinstance(x, jax.ShapeDtypeStruct))
    chex.assert_shape(params.weight, (4, DIM, DIM))
    opt = spd.adam_spd(
        1e-2, weight_decay=1.0,
        layer_axis=lambda path, shape: 0 if path == ('weight',) else None)
    state = jax.eval_shape(opt.init, params)
    chex.assert_shape(state.ratio.weight, (4,))
    chex.assert_shape(state.ratio.bias, ())

  @parameterized.named_parameters(('spd', 'spd'), ('ftp', 'ftp'),
                                  ('l2sp', 'l2sp'))
  def test_gradients_and_state_must_match_filtered_params(self, method):
    trainable, _ = _partition('mlp')
    opt = METHODS[method]('layers/2')
    state = opt.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    is_none = lambda x: x is None
    # An array where the params hold None (the frozen layer)...
    with self.assertRaisesRegex(ValueError, r'layers\[0\]\.weight.*hold None'):
      opt.update(eqx.tree_at(lambda m: m.layers[0].weight, grads,
                             jnp.ones((16, 3)), is_leaf=is_none),
                 state, trainable)
    # ...None where they hold an array...
    with self.assertRaisesRegex(ValueError, r'no leaf at .*layers\[1\]\.bias'):
      opt.update(eqx.tree_at(lambda m: m.layers[1].bias, grads, None),
                 state, trainable)
    # ...and a state built for the params with nothing frozen.
    if method != 'l2sp':
      whole = eqx.filter(_mlp(), eqx.is_array)
      with self.assertRaisesRegex(ValueError, r'layers\[0\]\.weight'):
        opt.update(grads, opt.init(whole), trainable)

  def test_state_sharding_follows_equinox_params(self):
    params = eqx.filter(_mlp(), eqx.is_array)
    mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
    split = lambda p: P('x', None) if p.shape[0] % 8 == 0 and p.ndim > 1 else P()
    params_sharding = jax.tree.map(
        lambda p: NamedSharding(mesh, split(p)), params)
    opt = spd.adam_ftp(1e-2, output_axes=0)
    state = jax.eval_shape(opt.init, params)
    sharding = spd.state_sharding(state, params, params_sharding)
    self.assertEqual(sharding.c_prev.layers[1].weight.spec, P('x', None))
    self.assertEqual(sharding.s_prev.layers[0].weight.spec, P("x"))
    self.assertEqual(sharding.base_optimizer_state[0].mu.layers[1].weight.spec,
                     P('x', None))
    self.assertEqual(sharding.gamma.layers[1].weight.spec, P())
    self.assertIsNone(sharding.anchor.activation)
    self.assertEqual(_none_slots(sharding.anchor), _none_slots(params))
    # It shards a real state on the mesh.
    placed = jax.device_put(opt.init(params), sharding)
    self.assertEqual(placed.c_prev.layers[1].weight.sharding.spec,
                     P('x', None))

  def test_shard_map_update_with_equinox_specs_matches_unsharded(self):
    params = eqx.filter(_mlp(depth=1), eqx.is_array)
    mesh = Mesh(np.array(jax.devices()[:8]), ('x',))
    # The first layer split over its outputs (FTP's rows), the second over
    # its inputs (which FTP's row norms sum).
    specs = eqx.nn.MLP(3, 2, 16, 1, key=jax.random.key(0))
    specs = eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight,
                   m.layers[1].bias), eqx.filter(specs, eqx.is_array),
        (P('x', None), P('x'), P(None, 'x'), P()))
    self.assertEqual(_none_slots(specs), ['activation', 'final_activation'])
    grads = jax.tree.map(lambda p: jnp.sin(3 * p + 1.0), params)
    opt = spd.adam_ftp(1e-2, output_axes=0, axis_name=specs)
    state_specs = spd.state_sharding(jax.eval_shape(opt.init, params), params,
                                     specs)
    update = jax.jit(jax.shard_map(
        opt.update, mesh=mesh, in_specs=(specs, state_specs, specs),
        out_specs=(specs, state_specs)))
    reference = spd.adam_ftp(1e-2, output_axes=0)
    reference_update = jax.jit(reference.update)
    state, reference_state, moved, reference_moved = (
        opt.init(params), reference.init(params), params, params)
    for _ in range(3):
      updates, state = update(grads, state, moved)
      reference_updates, reference_state = reference_update(
          grads, reference_state, reference_moved)
      moved = optax.apply_updates(moved, updates)
      reference_moved = optax.apply_updates(reference_moved, reference_updates)
    chex.assert_trees_all_close(moved, reference_moved, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state.gamma, reference_state.gamma,
                                rtol=1e-5, atol=1e-6)

  def test_orbax_round_trip_of_equinox_state(self):
    # FTP's state: an anchor, per-leaf statistics, MaskedNode for the head
    # and None for the frozen embedding and the non-arrays.
    trainable, _ = _partition('transformer')
    opt = METHODS['ftp']('head')
    _, state = _equinox_run('transformer', 'ftp')
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory)
    manager = ocp.CheckpointManager(directory)
    manager.save(STEPS, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = spd.restore_state(manager, STEPS,
                                 jax.eval_shape(opt.init, trainable))
    is_masked = lambda x: isinstance(x, optax.MaskedNode)
    self.assertEqual(jax.tree.structure(restored, is_leaf=is_masked),
                     jax.tree.structure(state, is_leaf=is_masked))
    chex.assert_trees_all_equal(restored, state)
    # A state of the optimizer without the head left out is refused.
    other = METHODS['ftp']('no such leaf')
    with self.assertRaisesRegex(ValueError, 'head/weight'):
      spd.restore_state(manager, STEPS, jax.eval_shape(other.init, trainable))


def _head_of(tree, head):
  """The subtree of `tree` at `head` ('layers/2' or 'head')."""
  node = tree
  for part in head.split('/'):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node.weight


if __name__ == '__main__':
  from absl.testing import absltest  # pylint: disable=g-import-not-at-top
  absltest.main()
