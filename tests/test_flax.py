"""Flax: SPD and FTP drive `nnx.Optimizer` and a Linen `TrainState`.

Both hand the optimizer the model's current params at every update (SPD and
FTP need them), and both keep the weights given at creation as the anchor.
"""

from absl.testing import parameterized
import chex
import flax.linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np

import spd_optax as spd

STEPS = 40


def _adam_spd():
  return spd.adam_spd(learning_rate=1e-2, weight_decay=0.5)


def _adam_ftp():
  return spd.adam_ftp(learning_rate=1e-2)


METHODS = {'spd': _adam_spd, 'ftp': _adam_ftp}
METHOD_CASES = tuple((name, name) for name in METHODS)


def _data():
  x = jax.random.normal(jax.random.key(1), (64, 4))
  return x, jnp.sin(x @ jnp.array([1.0, -2.0, 0.5, 1.5]))[:, None]


class _NnxMlp(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class _LinenMlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(16)(x)))


class FlaxTest(parameterized.TestCase):

  def _assert_moved_and_anchored(self, anchor, pretrained, params):
    chex.assert_trees_all_equal(anchor, pretrained)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         params, pretrained)
    self.assertGreater(min(jax.tree.leaves(moved)), 0.0)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_nnx_optimizer_fine_tunes_and_keeps_initial_params_as_anchor(
      self, method):
    x, y = _data()
    model = _NnxMlp(nnx.Rngs(0))
    pretrained = nnx.as_pure(nnx.clone(nnx.state(model, nnx.Param)))
    optimizer = nnx.Optimizer(model, METHODS[method](), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
      loss, grads = nnx.value_and_grad(
          lambda model: jnp.mean((model(x) - y) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    losses = [float(train_step(model, optimizer)) for _ in range(STEPS)]
    self.assertLess(losses[-1], 0.7 * losses[0])
    self.assertEqual(int(optimizer.step[...]), STEPS)
    self._assert_moved_and_anchored(
        nnx.as_pure(optimizer.opt_state.anchor), pretrained,
        nnx.as_pure(nnx.state(model, nnx.Param)))

  @parameterized.named_parameters(*METHOD_CASES)
  def test_linen_train_state_fine_tunes_and_keeps_initial_params_as_anchor(
      self, method):
    x, y = _data()
    model = _LinenMlp()
    pretrained = model.init(jax.random.key(0), x)['params']
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=pretrained, tx=METHODS[method]())

    @jax.jit
    def train_step(state):
      def loss_fn(params):
        return jnp.mean((state.apply_fn({'params': params}, x) - y) ** 2)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(STEPS):
      state, loss = train_step(state)
      losses.append(float(loss))
    self.assertLess(losses[-1], 0.7 * losses[0])
    self.assertEqual(int(state.step), STEPS)
    self._assert_moved_and_anchored(state.opt_state.anchor, pretrained,
                                    state.params)
    # The optimizer state went through TrainState's jit boundary intact.
    self.assertIsInstance(
        state.opt_state, (spd.SelectiveProjectionDecayState,
                          spd.FastTrainableProjectionState))
    np.testing.assert_array_equal(state.opt_state.count, STEPS)
