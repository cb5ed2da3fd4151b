"""Stacked layers: with `layer_axis`, a scanned model trains like its unrolled twin.

`nn.scan` (or a hand-stacked `(L, ...)` leaf) stores L layers in one array.
The papers' unit is the layer, so each slice along `layer_axis` must be
decided on and projected on its own: the same trajectory, to float32
round-off, as the model written with L separate leaves.
"""

import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax as spd

DEPTH, WIDTH, STEPS = 3, 8, 25


def _adam_spd(**options):
  return spd.adam_spd(learning_rate=3e-2, weight_decay=1.0, **options)


def _adam_ftp(**options):
  return spd.adam_ftp(learning_rate=3e-2, **options)


METHODS = {'spd': _adam_spd}
if hasattr(spd, 'adam_ftp'):
  METHODS['ftp'] = _adam_ftp
METHOD_CASES = tuple((name, name) for name in METHODS)


def _normal(seed, shape, scale=1.0):
  """NumPy data: no JAX op runs, so nothing is compiled outside the steps."""
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _data():
  x = _normal(3, (64, WIDTH))
  return x, np.sin(x @ np.linspace(-1.0, 1.0, WIDTH, dtype=np.float32))[:, None]


def _stacked_pretrained():
  return {
      'blocks': {'kernel': _normal(0, (DEPTH, WIDTH, WIDTH), 1 / 3),
                 'bias': _normal(1, (DEPTH, WIDTH), 1 / 10)},
      'head': {'kernel': _normal(2, (WIDTH, 1), 1 / 3)},
  }


def _unstack(stacked, axis=0):
  """The same weights as L separate leaves: `block_0`, `block_1`, ...

  `axis` is where the layers are: 1 in a history with a leading step axis.
  """
  params = {f'block_{i}': jax.tree.map(lambda x, i=i: np.take(x, i, axis),
                                       stacked['blocks'])
            for i in range(DEPTH)}
  params['head'] = stacked['head']
  return params


def _stacked_loss(params, x, y):
  def block(h, layer):
    return h + jnp.tanh(h @ layer['kernel'] + layer['bias']), None
  h, _ = jax.lax.scan(block, x, params['blocks'])
  return jnp.mean((h @ params['head']['kernel'] - y) ** 2)


def _unrolled_loss(params, x, y):
  h = x
  for i in range(DEPTH):
    layer = params[f'block_{i}']
    h = h + jnp.tanh(h @ layer['kernel'] + layer['bias'])
  return jnp.mean((h @ params['head']['kernel'] - y) ** 2)


def _trajectory(opt, loss, params, steps=STEPS):
  """Params and optimizer state after each of `steps` steps, stacked."""
  x, y = _data()

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, history = opt.init(params), []
  for _ in range(steps):
    params, state = step(params, state)
    history.append((params, state))
  return jax.tree.map(lambda *steps: np.stack(steps), *history)


@functools.lru_cache(maxsize=None)
def _unrolled_trajectory(method):
  """The reference: the model written with L separate layers."""
  return _trajectory(METHODS[method](), _unrolled_loss,
                     _unstack(_stacked_pretrained()))


def _stats(state):
  """The per-layer decisions a method logs: SPD's ratio, FTP's gamma."""
  return state.ratio if hasattr(state, 'ratio') else state.gamma


class StackedLayersTest(parameterized.TestCase):

  @parameterized.named_parameters(*METHOD_CASES)
  def test_stacked_leaf_with_layer_axis_trains_like_unrolled_layers(
      self, method):
    opt = METHODS[method]
    stacked = _stacked_pretrained()
    stacked_history = _trajectory(
        opt(layer_axis={'blocks': 0, 'head': None}), _stacked_loss, stacked)
    stacked_params, stacked_state = stacked_history
    unrolled_params, unrolled_state = _unrolled_trajectory(method)
    chex.assert_trees_all_close(
        _unstack(stacked_params, axis=1), unrolled_params,
        rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        _unstack(_stats(stacked_state), axis=1), _stats(unrolled_state),
        rtol=1e-5, atol=1e-6)
    if method == 'spd':
      # The decision must actually vary per layer for the test to mean much.
      selected = np.asarray(stacked_state.selected['blocks']['kernel'])
      chex.assert_shape(selected, (STEPS, DEPTH))
      self.assertTrue(selected.any() and not selected.all())

  @parameterized.named_parameters(*METHOD_CASES)
  def test_stacked_leaf_without_layer_axis_is_one_layer_and_differs(
      self, method):
    opt = METHODS[method]
    stacked = _stacked_pretrained()
    stacked_params, _ = _trajectory(opt(), _stacked_loss, stacked)
    unrolled_params, _ = _unrolled_trajectory(method)
    difference = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b))),
        _unstack(stacked_params, axis=1), unrolled_params)
    self.assertGreater(max(jax.tree.leaves(difference)), 1e-4)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h, _):
    return h + nn.tanh(nn.Dense(WIDTH)(h)), None


class _Model(nn.Module):
  scanned: bool

  @nn.compact
  def __call__(self, x):
    if self.scanned:
      blocks = nn.scan(_Block, variable_axes={'params': 0},
                       split_rngs={'params': True}, length=DEPTH)
      x, _ = blocks(name='blocks')(x, None)
    else:
      for i in range(DEPTH):
        x, _ = _Block(name=f'block_{i}')(x, None)
    return nn.Dense(1, name='head')(x)


class FlaxScanTest(parameterized.TestCase):

  @parameterized.named_parameters(*METHOD_CASES)
  def test_linen_scan_with_layer_axis_callable_trains_like_unrolled_model(
      self, method):
    x, y = _data()
    scanned, unrolled = _Model(scanned=True), _Model(scanned=False)
    pretrained = jax.jit(scanned.init)(jax.random.key(0), x)['params']
    as_unrolled = {
        f'block_{i}': jax.tree.map(lambda a, i=i: a[i], pretrained['blocks'])
        for i in range(DEPTH)}
    as_unrolled['head'] = pretrained['head']
    # Same layout as `unrolled.init` would produce.
    chex.assert_trees_all_equal_shapes(
        as_unrolled, jax.eval_shape(unrolled.init, jax.random.key(0), x)[
            'params'])

    def loss_of(model):
      return lambda p, x, y: jnp.mean(
          (model.apply({'params': p}, x) - y) ** 2)

    layer_axis = lambda path, shape: 0 if path[0] == 'blocks' else None
    opt = METHODS[method]
    scanned_params, _ = _trajectory(
        opt(layer_axis=layer_axis), loss_of(scanned), pretrained)
    unrolled_params, _ = _trajectory(opt(), loss_of(unrolled), as_unrolled)
    for i in range(DEPTH):
      chex.assert_trees_all_close(
          jax.tree.map(lambda a, i=i: a[:, i], scanned_params['blocks']),
          unrolled_params[f'block_{i}'], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        scanned_params['head'], unrolled_params['head'], rtol=1e-5, atol=1e-6)
    # Fine-tuning moved the weights, so the comparison is not trivially equal.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a[-1] - b))),
                         scanned_params, pretrained)
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)
