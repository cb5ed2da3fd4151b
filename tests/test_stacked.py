"""Stacked layers: with `layer_axis`, a scanned model trains like its unrolling.

Flax's `nn.scan` stores L layers in one `(L, ...)` leaf per parameter. The
papers' unit is the layer, so each slice along `layer_axis` must be decided on
(SPD) or get its own radius (FTP) on its own: the same trajectory, to float32
round-off, as the same model written with L separate layers. (Hand-stacked
leaves against separate leaves are in test_spd.py and test_ftp.py.)
"""

import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from methods import METHOD_CASES
from methods import METHODS

DEPTH, WIDTH, STEPS = 3, 8, 25
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _data():
  x = np.random.default_rng(3).standard_normal((64, WIDTH)).astype(np.float32)
  return x, np.sin(x @ np.linspace(-1.0, 1.0, WIDTH, dtype=np.float32))[:, None]


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


def _unrolled(scanned, axis=0):
  """The scanned params as the unrolled model's: `block_0`, `block_1`, ...

  `axis` is where the layers are: 1 in a history with a leading step axis.
  """
  params = {f'block_{i}': jax.tree.map(lambda a, i=i: np.take(a, i, axis),
                                       scanned['blocks'])
            for i in range(DEPTH)}
  params['head'] = scanned['head']
  return params


@functools.lru_cache(maxsize=None)
def _pretrained():
  x, _ = _data()
  params = jax.jit(_Model(scanned=True).init)(jax.random.key(0), x)['params']
  return jax.tree.map(np.asarray, params)


def _trajectory(opt, scanned, params, steps=STEPS):
  """Params and optimizer state after each of `steps` steps, stacked."""
  model, (x, y) = _Model(scanned=scanned), _data()

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: jnp.mean(
        (model.apply({'params': p}, x) - y) ** 2))(params)
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
  return _trajectory(METHODS[method](), False, _unrolled(_pretrained()))


def _stats(state):
  """The per-layer decisions a method logs: SPD's ratio, FTP's gamma."""
  return state.ratio if hasattr(state, 'ratio') else state.gamma


# Flax's paths name the scanned block: ('blocks', 'Dense_0', 'kernel').
_LAYER_AXIS = lambda path, shape: 0 if path[0] == 'blocks' else None


class FlaxScanTest(parameterized.TestCase):

  def test_unrolled_params_have_the_unrolled_models_layout(self):
    x, _ = _data()
    chex.assert_trees_all_equal_shapes(
        _unrolled(_pretrained()),
        jax.eval_shape(_Model(scanned=False).init, jax.random.key(0), x)[
            'params'])

  @parameterized.named_parameters(*METHOD_CASES)
  def test_linen_scan_with_layer_axis_trains_like_unrolled_model(
      self, method):
    params, state = _trajectory(
        METHODS[method](layer_axis=_LAYER_AXIS), True, _pretrained())
    unrolled_params, unrolled_state = _unrolled_trajectory(method)

    chex.assert_trees_all_close(
        _unrolled(params, axis=1), unrolled_params, **TOLERANCE)
    # One decision per layer, each the unrolled layer's.
    chex.assert_shape(_stats(state)['blocks']['Dense_0']['kernel'],
                      (STEPS, DEPTH))
    chex.assert_trees_all_close(
        _unrolled(_stats(state), axis=1), _stats(unrolled_state), **TOLERANCE)
    # Fine-tuning moved the weights, so the comparison is not trivially equal.
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a[-1] - b))),
                         params, _pretrained())
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)
    if method == 'spd':
      # The layers were told apart: selected at some steps, not at others.
      selected = state.selected['blocks']['Dense_0']['kernel']
      self.assertTrue(selected.any() and not selected.all())

  @parameterized.named_parameters(*METHOD_CASES)
  def test_linen_scan_without_layer_axis_is_one_layer_and_differs(
      self, method):
    params, _ = _trajectory(METHODS[method](), True, _pretrained())
    unrolled_params, _ = _unrolled_trajectory(method)
    difference = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                              _unrolled(params, axis=1), unrolled_params)
    self.assertGreater(max(jax.tree.leaves(difference)), 1e-4)
