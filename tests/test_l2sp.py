"""Tests for `l2_sp` and `adamw_l2sp`, against ../shared/ALGORITHMS.md."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base
import pytest

import spd_optax as spd
import reference_spd as ref

STEPS = 50
LEARNING_RATE = 0.03
ATOL = 1e-10


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params['w1'] + params['b1'])
  error = hidden @ params['w2'] + params['b2'] - y
  return 0.5 * jnp.sum(error * error) / x.shape[0]


mlp_grad = jax.jit(jax.grad(mlp_loss))


def problem():
  pretrained, x, y = ref.mlp_problem()
  return jax.tree.map(jnp.asarray, pretrained), jnp.asarray(x), jnp.asarray(y)


def fine_tune(opt, params, x, y, steps):
  """`steps` jitted steps of `opt`: the params after each step, the states."""

  @jax.jit
  def step(params, state):
    updates, state = opt.update(mlp_grad(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  history, states = [params], []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
    states.append(state)
  return history, states


def assert_params_match(history, reference_params):
  for t, (params, expected) in enumerate(zip(history, reference_params)):
    chex.assert_trees_all_close(params, expected, atol=ATOL, rtol=0,
                                custom_message=f'params after step {t}')


@functools.partial(jax.jit, static_argnames='anchor')
def adamw_l2sp_step(params, state, x, y, weight_decay, anchor):
  """One Adam + L2-SP step; `weight_decay` traced, so one compile serves all."""
  opt = spd.adamw_l2sp(LEARNING_RATE, weight_decay, anchor=anchor)
  updates, state = opt.update(mlp_grad(params, x, y), state, params)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('weight_decay', [0.1, 1.0, 5.0])
@pytest.mark.usefixtures('x64')
def test_adamw_l2sp_trajectory_matches_reference(weight_decay):
  params, x, y = problem()
  opt = spd.adamw_l2sp(LEARNING_RATE, weight_decay)
  state = opt.init(params)
  # The anchor must stay put while the params move: perturb them at once.
  params = jax.tree.map(lambda p: p + 0.1, params)
  history = [params]
  for _ in range(STEPS):
    params, state = adamw_l2sp_step(params, state, x, y,
                                    jnp.asarray(weight_decay), 'init')
    history.append(params)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.AdamwL2sp(LEARNING_RATE, weight_decay, anchor=pretrained)
  reference_params = ref.run_l2sp(
      reference, {k: p + 0.1 for k, p in pretrained.items()}, x_np, y_np, STEPS)
  adam_only = ref.run_l2sp(
      ref.AdamwL2sp(LEARNING_RATE, 0.0, anchor=pretrained),
      {k: p + 0.1 for k, p in pretrained.items()}, x_np, y_np, STEPS)
  assert not np.allclose(reference_params[-1]['w1'], adam_only[-1]['w1'],
                         atol=1e-6)
  assert_params_match(history, reference_params)
  chex.assert_trees_all_equal(state[1].anchor, problem()[0])


@pytest.mark.usefixtures('x64')
def test_explicit_anchor_and_schedule_match_reference():
  params, x, y = problem()
  rng = np.random.default_rng(2)
  pretrained, x_np, y_np = ref.mlp_problem()
  anchor = {k: p + 0.3 * rng.normal(size=p.shape)
            for k, p in pretrained.items()}
  # Values t / 16, exact in float32 (optax schedules return float32).
  schedule = optax.linear_schedule(0.0, 2.0, transition_steps=32)
  opt = spd.adamw_l2sp(LEARNING_RATE, schedule,
                       anchor=jax.tree.map(jnp.asarray, anchor))
  history, _ = fine_tune(opt, params, x, y, STEPS)
  reference = ref.AdamwL2sp(LEARNING_RATE, lambda t: 2.0 * min(t, 32) / 32,
                            anchor=anchor)
  assert_params_match(history,
                      ref.run_l2sp(reference, pretrained, x_np, y_np, STEPS))


def test_zero_anchor_is_adamw_decay():
  params, x, y = problem()
  l2sp = spd.adamw_l2sp(LEARNING_RATE, 0.5, anchor='zero')
  adamw = optax.adamw(LEARNING_RATE, weight_decay=0.5)
  l2sp_update, adamw_update = jax.jit(l2sp.update), jax.jit(adamw.update)
  l2sp_state, adamw_state = l2sp.init(params), adamw.init(params)
  assert l2sp_state[1].anchor is None
  for _ in range(10):
    grads = mlp_grad(params, x, y)
    updates, l2sp_state = l2sp_update(grads, l2sp_state, params)
    expected, adamw_state = adamw_update(grads, adamw_state, params)
    chex.assert_trees_all_equal(updates, expected)
    params = optax.apply_updates(params, expected)


def test_l2_sp_adds_weight_decay_times_deviation():
  params = {'w': jnp.array([1.0, 2.0, -3.0]), 'b': jnp.array([0.5])}
  anchor = {'w': jnp.array([0.0, 2.5, -1.0]), 'b': jnp.array([0.0])}
  updates = {'w': jnp.array([0.1, 0.2, 0.3]), 'b': jnp.array([-1.0])}
  transform = spd.l2_sp(0.5, anchor=anchor)
  got, state = transform.update(updates, transform.init(params), params)
  chex.assert_trees_all_close(
      got, {'w': jnp.array([0.6, -0.05, -0.7]), 'b': jnp.array([-0.75])})
  assert int(state.count) == 1


@pytest.mark.parametrize('mask', [
    {'w1': True, 'b1': False, 'w2': True, 'b2': False},
    lambda params: {k: k.startswith('w') for k in params},
], ids=['bool_pytree', 'callable'])
@pytest.mark.usefixtures('x64')
def test_mask_leaves_get_plain_adam_and_store_nothing(mask):
  params, x, y = problem()
  opt = spd.adamw_l2sp(LEARNING_RATE, 1.0, anchor='zero', mask=mask)
  adam = optax.adam(LEARNING_RATE)
  update, state = jax.jit(opt.update), opt.init(params)
  adam_update, adam_state = jax.jit(adam.update), adam.init(params)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.AdamwL2sp(
      LEARNING_RATE, 1.0, anchor='zero',
      mask={'w1': True, 'b1': False, 'w2': True, 'b2': False})
  reference_params = ref.run_l2sp(reference, pretrained, x_np, y_np, 10)
  for t in range(10):
    grads = mlp_grad(params, x, y)
    updates, state = update(grads, state, params)
    expected, adam_state = adam_update(grads, adam_state, params)
    chex.assert_trees_all_equal((updates['b1'], updates['b2']),
                                (expected['b1'], expected['b2']))
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(params, reference_params[t + 1], atol=ATOL,
                                rtol=0, custom_message=f'step {t}')

  opt = spd.l2_sp(1.0, mask=mask)
  anchor = opt.init(params).anchor
  assert isinstance(anchor['b1'], optax.MaskedNode)
  assert not isinstance(anchor['w1'], optax.MaskedNode)


# Errors.


def test_negative_weight_decay_raises_naming_it():
  for make in (spd.l2_sp, functools.partial(spd.adamw_l2sp, 1e-3)):
    with pytest.raises(ValueError, match=r'weight_decay.*-0\.5'):
      make(weight_decay=-0.5)


def test_update_without_params_raises_optax_message():
  params, _, _ = problem()
  opt = spd.adamw_l2sp(LEARNING_RATE, 0.1)
  state = opt.init(params)
  with pytest.raises(ValueError, match=re.escape(optax_base.NO_PARAMS_MSG)):
    opt.update(params, state)


def test_anchor_with_wrong_shape_raises_naming_the_leaf():
  params, _, _ = problem()
  anchor = dict(params, b1=jnp.zeros(3))
  with pytest.raises(ValueError, match=re.escape("['b1']")):
    spd.l2_sp(0.1, anchor=anchor).init(params)


def test_unknown_anchor_string_raises():
  params, _, _ = problem()
  with pytest.raises(ValueError, match=r'anchor.*pretrained'):
    spd.l2_sp(0.1, anchor='pretrained').init(params)
