"""Tests for `selective_projection_decay` and `adam_spd`.

The contract is ../shared/ALGORITHMS.md; `reference_spd.py` is its float64
NumPy transcription, and the trajectory tests fine-tune a small network with
both and require agreement to 1e-10 over 60 steps.
"""

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

STEPS = 60
LEARNING_RATE = 0.03
ATOL = 1e-10


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# The network: a backbone (pre-trained) and a head, as nested Flax-like params.


def nest(flat):
  return {'backbone': {'w1': flat['w1'], 'b1': flat['b1']},
          'head': {'w2': flat['w2'], 'b2': flat['b2']}}


def flatten(params):
  return {**params['backbone'], **params['head']}


def mlp_loss(params, x, y):
  hidden = jnp.tanh(x @ params['backbone']['w1'] + params['backbone']['b1'])
  error = hidden @ params['head']['w2'] + params['head']['b2'] - y
  return 0.5 * jnp.sum(error * error) / x.shape[0]


mlp_grad = jax.jit(jax.grad(mlp_loss))


def problem(dtype=None):
  """Pre-trained params (nested, as jnp arrays), inputs and targets."""
  pretrained, x, y = ref.mlp_problem()
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), nest(pretrained))
  return params, jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def fine_tune(opt, params, x, y, steps, before_step=None):
  """`steps` jitted steps of `opt` on the MLP: params after each step, states.

  `before_step(t, state) -> state` may edit the state before step t.
  """

  @jax.jit
  def step(params, state):
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  history, states = [params], []
  for t in range(steps):
    if before_step is not None:
      state = before_step(t, state)
    params, state = step(params, state)
    history.append(params)
    states.append(state)
  return history, states


def assert_params_match(history, reference_params, atol=ATOL):
  for t, (params, expected) in enumerate(zip(history, reference_params)):
    chex.assert_trees_all_close(
        flatten(params), expected, atol=atol, rtol=0,
        custom_message=f'params after step {t}')


def assert_statistics_match(states, reference, spd_state=lambda s: s):
  """`selected` and `ratio` in the JAX state equal the reference's, per step."""
  for t, state in enumerate(states):
    state = spd_state(state)
    selected = {k: v for k, v in flatten(state.selected).items()
                if not isinstance(v, optax.MaskedNode)}
    ratio = {k: v for k, v in flatten(state.ratio).items()
             if not isinstance(v, optax.MaskedNode)}
    expected = {k: np.bool_(v) for k, v in reference.selected[t].items()}
    assert selected == expected, f'selected at step {t}: {selected}'
    chex.assert_trees_all_close(ratio, reference.ratio[t], atol=ATOL, rtol=0,
                                custom_message=f'ratio at step {t}')


def selection_counts(reference):
  return {name: sum(step[name] for step in reference.selected)
          for name in reference.selected[0]}


# Trajectories against the reference.


@functools.partial(jax.jit, static_argnames='anchor')
def adam_spd_step(params, state, x, y, weight_decay, anchor):
  """One Adam-SPD step; `weight_decay` is traced: one compile serves all."""
  opt = spd.adam_spd(LEARNING_RATE, weight_decay, anchor=anchor)
  updates, state = opt.update(mlp_grad(params, x, y), state, params)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize('anchor', ['init', 'zero'])
@pytest.mark.parametrize('weight_decay', [0.1, 0.5, 2.0])
@pytest.mark.usefixtures('x64')
def test_adam_spd_trajectory_matches_reference(anchor, weight_decay):
  params, x, y = problem()
  state = spd.adam_spd(LEARNING_RATE, weight_decay, anchor=anchor).init(params)
  history, states = [params], []
  for _ in range(STEPS):
    params, state = adam_spd_step(params, state, x, y,
                                  jnp.asarray(weight_decay), anchor)
    history.append(params)
    states.append(state)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.run_spd(
      ref.Spd(ref.Adam(LEARNING_RATE), weight_decay, anchor=anchor),
      pretrained, x_np, y_np, STEPS)

  counts = selection_counts(reference)
  assert any(0 < count < STEPS for count in counts.values()), counts
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference)
  assert (ref.mlp_loss_and_grads(reference.params[-1], x_np, y_np)[0]
          < ref.mlp_loss_and_grads(pretrained, x_np, y_np)[0])


@pytest.mark.usefixtures('x64')
def test_sgd_momentum_base_matches_reference():
  params, x, y = problem()
  history, states = fine_tune(
      spd.selective_projection_decay(optax.sgd(0.1, momentum=0.9), 0.5),
      params, x, y, STEPS)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.run_spd(ref.Spd(ref.SgdMomentum(0.1, 0.9), 0.5),
                          pretrained, x_np, y_np, STEPS)

  counts = selection_counts(reference)
  assert any(0 < count < STEPS for count in counts.values()), counts
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference)


@pytest.mark.usefixtures('x64')
def test_explicit_anchor_pytree_matches_reference():
  params, x, y = problem()
  rng = np.random.default_rng(1)
  pretrained, x_np, y_np = ref.mlp_problem()
  anchor = {name: p + 0.2 * rng.normal(size=p.shape)
            for name, p in pretrained.items()}
  opt = spd.adam_spd(LEARNING_RATE, 0.5,
                     anchor=jax.tree.map(jnp.asarray, nest(anchor)))
  history, states = fine_tune(opt, params, x, y, STEPS)
  reference = ref.run_spd(ref.Spd(ref.Adam(LEARNING_RATE), 0.5, anchor=anchor),
                          pretrained, x_np, y_np, STEPS)

  assert any(reference.selected[0].values())  # p != a already at step 1
  chex.assert_trees_all_equal(flatten(states[-1].anchor), anchor)
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference)


def test_zero_anchor_stores_nothing():
  params, _, _ = problem()
  state = spd.adam_spd(LEARNING_RATE, 0.5, anchor='zero').init(params)
  assert state.anchor is None


def test_init_anchor_is_a_copy_of_the_initial_params():
  params, x, y = problem()
  history, states = fine_tune(spd.adam_spd(LEARNING_RATE, 0.5), params, x, y, 3)
  chex.assert_trees_all_equal(states[-1].anchor, history[0])


def test_zero_weight_decay_is_base_optimizer():
  params, x, y = problem()
  for wrapped, base in [
      (spd.adam_spd(LEARNING_RATE, 0.0), optax.adam(LEARNING_RATE)),
      (spd.selective_projection_decay(optax.sgd(0.1, momentum=0.9), 0.0),
       optax.sgd(0.1, momentum=0.9)),
  ]:
    # Update functions jitted on their own: a whole fused train step may
    # round `p + u` differently from one program to another.
    wrapped_update, base_update = jax.jit(wrapped.update), jax.jit(base.update)
    wrapped_state, base_state = wrapped.init(params), base.init(params)
    current = params
    for _ in range(20):
      grads = mlp_grad(current, x, y)
      updates, wrapped_state = wrapped_update(grads, wrapped_state, current)
      expected, base_state = base_update(grads, base_state, current)
      chex.assert_trees_all_equal(updates, expected)
      chex.assert_trees_all_equal(wrapped_state.base_optimizer_state,
                                  base_state)
      current = optax.apply_updates(current, expected)


# Masks.

MASKS = {
    'bool_pytree': {'backbone': {'w1': True, 'b1': False},
                    'head': {'w2': False, 'b2': False}},
    'prefix': {'backbone': True, 'head': False},
    'callable': lambda params: {k: k != 'head' for k in params},
}


@pytest.mark.usefixtures('x64')
@pytest.mark.parametrize('mask_name', list(MASKS))
def test_mask_matches_reference_and_masked_leaves_get_base_update(mask_name):
  mask = MASKS[mask_name]
  params, x, y = problem()
  opt = spd.adam_spd(LEARNING_RATE, 2.0, anchor='init', mask=mask)
  adam = optax.adam(LEARNING_RATE)

  @jax.jit
  def step(params, state, adam_state):
    grads = mlp_grad(params, x, y)
    updates, state = opt.update(grads, state, params)
    adam_updates, adam_state = adam.update(grads, adam_state, params)
    return (optax.apply_updates(params, updates), state, adam_state, updates,
            adam_updates)

  state, adam_state = opt.init(params), adam.init(params)
  history, states, updates, adam_updates = [params], [], [], []
  for _ in range(STEPS):
    params, state, adam_state, update, adam_update = step(
        params, state, adam_state)
    history.append(params)
    states.append(state)
    updates.append(flatten(update))
    adam_updates.append(flatten(adam_update))

  full_mask = jax.tree.map(
      lambda m, sub: jax.tree.map(lambda _: m, sub),
      mask(params) if callable(mask) else mask, params)
  flat_mask = flatten(full_mask)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.run_spd(
      ref.Spd(ref.Adam(LEARNING_RATE), 2.0, mask=flat_mask),
      pretrained, x_np, y_np, STEPS)
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference)

  masked = [name for name, keep in flat_mask.items() if not keep]
  assert masked
  for update, adam_update in zip(updates, adam_updates):
    chex.assert_trees_all_equal({n: update[n] for n in masked},
                                {n: adam_update[n] for n in masked})
  for name, keep in flat_mask.items():
    for tree in (states[-1].anchor, states[-1].selected, states[-1].ratio):
      stored = flatten(tree)[name]
      assert isinstance(stored, optax.MaskedNode) == (not keep), (name, stored)


# Schedules and injected hyper-parameters.


@pytest.mark.usefixtures('x64')
def test_weight_decay_schedule_matches_reference():
  params, x, y = problem()
  # Every value t / 16 is exact in float32 (optax schedules return float32),
  # so the reference can use the schedule's formula.
  schedule = optax.linear_schedule(0.0, 2.0, transition_steps=32)
  history, states = fine_tune(spd.adam_spd(LEARNING_RATE, schedule),
                              params, x, y, STEPS)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.run_spd(
      ref.Spd(ref.Adam(LEARNING_RATE), lambda t: 2.0 * min(t, 32) / 32),
      pretrained, x_np, y_np, STEPS)
  constant = ref.run_spd(ref.Spd(ref.Adam(LEARNING_RATE), 2.0),
                         pretrained, x_np, y_np, STEPS)
  assert not np.allclose(reference.params[-1]['w2'], constant.params[-1]['w2'])
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference)


@pytest.mark.usefixtures('x64')
def test_injected_weight_decay_change_takes_effect_mid_run():
  params, x, y = problem()
  opt = optax.inject_hyperparams(spd.adam_spd)(
      learning_rate=LEARNING_RATE, weight_decay=0.1)
  switch = 20

  def raise_weight_decay(t, state):
    if t == switch:
      state.hyperparams['weight_decay'] = jnp.asarray(
          2.0, state.hyperparams['weight_decay'].dtype)
    return state

  history, states = fine_tune(opt, params, x, y, STEPS, raise_weight_decay)
  pretrained, x_np, y_np = ref.mlp_problem()
  reference = ref.run_spd(
      ref.Spd(ref.Adam(LEARNING_RATE), lambda t: 0.1 if t < switch else 2.0),
      pretrained, x_np, y_np, STEPS)
  unchanged = ref.run_spd(ref.Spd(ref.Adam(LEARNING_RATE), 0.1),
                          pretrained, x_np, y_np, STEPS)
  assert not np.allclose(reference.params[-1]['w1'], unchanged.params[-1]['w1'])
  assert_params_match(history, reference.params)
  assert_statistics_match(states, reference, lambda s: s.inner_state)


class SpdVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_matches_reference(self):
    with jax.enable_x64(True):
      params, x, y = problem()
      opt = spd.adam_spd(LEARNING_RATE, 0.5, anchor='zero')
      update = self.variant(opt.update)
      state = opt.init(params)
      pretrained, x_np, y_np = ref.mlp_problem()
      reference = ref.Spd(ref.Adam(LEARNING_RATE), 0.5, anchor='zero')
      reference.init(pretrained)
      ref_params = pretrained
      for t in range(4):
        grads = mlp_grad(params, x, y)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ref_grads = ref.mlp_loss_and_grads(ref_params, x_np, y_np)[1]
        step = reference.update(ref_grads, ref_params)
        ref_params = {k: p + step.updates[k] for k, p in ref_params.items()}
        chex.assert_trees_all_close(flatten(params), ref_params, atol=ATOL,
                                    rtol=0, custom_message=f'step {t}')
        chex.assert_trees_all_close(flatten(state.ratio), step.ratio,
                                    atol=ATOL, rtol=0)


# Dtypes.


def test_bfloat16_params_keep_dtype_and_stay_finite():
  params, x, y = problem(jnp.bfloat16)
  opt = spd.adam_spd(LEARNING_RATE, 2.0)
  update, state = jax.jit(opt.update), opt.init(params)
  ever_selected = False
  for _ in range(30):
    updates, state = update(mlp_grad(params, x, y), state, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    params = optax.apply_updates(params, updates)
    ever_selected |= any(bool(s) for s in jax.tree.leaves(state.selected))
  chex.assert_trees_all_equal_dtypes(params, problem(jnp.bfloat16)[0])
  chex.assert_tree_all_finite((params, state))
  assert ever_selected
  for leaf in jax.tree.leaves(state.ratio):
    assert leaf.dtype == jnp.float32


def test_bfloat16_statistics_are_computed_in_float32():
  rng = np.random.default_rng(3)
  anchor = rng.normal(size=(64, 32))
  deviation = rng.normal(size=(64, 32))
  # <g, p - a> > 0 and a step that grows the deviation: SPD selects.
  grad = 0.05 * deviation + rng.normal(size=(64, 32))
  p = jnp.asarray(anchor + deviation, jnp.bfloat16)
  a = jnp.asarray(anchor, jnp.bfloat16)
  g = jnp.asarray(grad, jnp.bfloat16)
  opt = spd.selective_projection_decay(optax.sgd(0.5), 0.5, anchor={'w': a})
  state = opt.init({'w': p})
  _, state = opt.update({'w': g}, state, {'w': p})
  sgd = optax.sgd(0.5)
  base_update, _ = sgd.update({'w': g}, sgd.init({'w': p}))
  f64 = lambda t: np.asarray(t, np.float64)
  expected = ref.spd_leaf(f64(g), f64(p), f64(a), f64(base_update['w']), 0.5)
  assert expected.selected and 0.05 < expected.ratio < 0.95
  assert bool(state.selected['w'])
  np.testing.assert_allclose(float(state.ratio['w']), expected.ratio, atol=1e-5)


@pytest.mark.usefixtures('x64')
def test_float64_params_give_float64_updates():
  params, x, y = problem(jnp.float64)
  opt = spd.adam_spd(LEARNING_RATE, 0.5)
  state = opt.init(params)
  grads = mlp_grad(params, x, y)
  updates, state = opt.update(grads, state, params)
  params = optax.apply_updates(params, updates)
  updates, state = opt.update(grads, state, params)
  chex.assert_trees_all_equal_dtypes(updates, params)
  for leaf in jax.tree.leaves(state.ratio):
    assert leaf.dtype == jnp.float64


# Edge cases.


def small_params():
  rng = np.random.default_rng(4)
  return {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


def assert_all_finite(*trees):
  for tree in trees:
    chex.assert_tree_all_finite(tree)


def test_zero_gradient_gives_no_nan_and_no_decay():
  params = small_params()
  moved = jax.tree.map(lambda p: p + 0.5, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt = spd.adam_spd(LEARNING_RATE, 1.0)
  state = opt.init(params)
  for current in (params, moved, moved):
    updates, state = opt.update(zeros, state, current)
    assert_all_finite(updates, state)
    chex.assert_trees_all_equal(updates, zeros)
    assert not any(bool(s) for s in jax.tree.leaves(state.selected))


def test_zero_learning_rate_gives_no_nan_and_no_update():
  params = small_params()
  anchor = jax.tree.map(lambda p: p - 1.0, params)  # deviation != 0
  grads = jax.tree.map(jnp.ones_like, params)        # <g, p - a> > 0
  opt = spd.adam_spd(0.0, 1.0, anchor=anchor)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  assert_all_finite(updates, state)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert all(bool(s) for s in jax.tree.leaves(state.selected))
  chex.assert_trees_all_equal(state.ratio, {'w': 0.0, 'b': 0.0})


def test_first_step_decays_nothing_and_is_the_base_update():
  params = small_params()
  grads = jax.tree.map(lambda p: 2 * p + 1, params)
  opt = spd.adam_spd(LEARNING_RATE, 1.0)
  updates, state = opt.update(grads, opt.init(params), params)
  base = optax.adam(LEARNING_RATE)
  expected, _ = base.update(grads, base.init(params), params)
  assert_all_finite(updates, state)
  chex.assert_trees_all_equal(updates, expected)
  chex.assert_trees_all_equal(state.selected, {'w': False, 'b': False})
  chex.assert_trees_all_equal(state.ratio, {'w': 0.0, 'b': 0.0})


def test_zero_deviation_with_nonzero_update_is_not_decayed():
  # LoRA's B starts at zero; with anchor="zero", d = 0 and u != 0 (r = 1).
  params = {'lora_b': jnp.zeros((4, 3)), 'lora_a': jnp.zeros((3, 4))}
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
  opt = spd.selective_projection_decay(optax.sgd(0.1), 1.0, anchor='zero')
  updates, state = opt.update(grads, opt.init(params), params)
  assert_all_finite(updates, state)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.1 * g, grads))
  assert not any(bool(s) for s in jax.tree.leaves(state.selected))


def test_step_landing_on_the_anchor_gives_zero_ratio_not_nan():
  # u = -(p - a): ||p_tilde - a|| = 0, the ratio's denominator.
  anchor = {'w': jnp.zeros((2, 2))}
  params = {'w': jnp.full((2, 2), 0.5)}
  opt = spd.selective_projection_decay(optax.sgd(1.0), 1.0, anchor=anchor)
  updates, state = opt.update(params, opt.init(params), params)  # g = p - a
  assert_all_finite(updates, state)
  assert bool(state.selected['w'])
  assert float(state.ratio['w']) == 0.0
  chex.assert_trees_all_close(updates, {'w': -params['w']})


def test_empty_leaves_give_no_nan():
  rng = np.random.default_rng(5)
  params = {'empty': jnp.zeros((0,)), 'empty_rows': jnp.zeros((0, 3)),
            'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  anchor = jax.tree.map(lambda p: p - 1.0, params)
  opt = spd.adam_spd(LEARNING_RATE, 1.0, anchor=anchor)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for _ in range(4):
    grads = jax.tree.map(jnp.ones_like, params)  # <g, p - a> > 0 for 'w'
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert_all_finite(updates, state, params)
    chex.assert_shape(updates['empty_rows'], (0, 3))
    assert not bool(state.selected['empty'])
    assert float(state.ratio['empty_rows']) == 0.0
  assert bool(state.selected['w'])


# Inside apply_if_finite.


def test_non_finite_gradient_step_is_skipped_with_inner_state_untouched():
  params, x, y = problem()
  opt = optax.apply_if_finite(spd.adam_spd(LEARNING_RATE, 2.0),
                              max_consecutive_errors=3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  ever_selected = False
  for _ in range(10):
    grads = mlp_grad(params, x, y)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    ever_selected |= any(
        bool(s) for s in jax.tree.leaves(state.inner_state.selected))
  assert ever_selected

  grads = mlp_grad(params, x, y)
  for bad in (jnp.nan, jnp.inf):
    bad_grads = jax.tree.map(lambda g: g, grads)
    bad_grads['head']['w2'] = bad_grads['head']['w2'].at[0, 0].set(bad)
    before = state.inner_state
    updates, state = update(bad_grads, state, params)
    assert not bool(state.last_finite)
    chex.assert_trees_all_equal(state.inner_state, before)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))

  assert int(state.total_notfinite) == 2
  updates, state = update(grads, state, params)
  assert bool(state.last_finite)
  chex.assert_tree_all_finite(updates)


# Errors.


@pytest.mark.parametrize('make', [
    lambda: spd.adam_spd(1e-3, weight_decay=-0.1),
    lambda: spd.selective_projection_decay(optax.adam(1e-3), weight_decay=-0.1),
])
def test_negative_weight_decay_raises_naming_it(make):
  with pytest.raises(ValueError, match=r'weight_decay.*-0\.1'):
    make()


def test_update_without_params_raises_optax_message():
  params = small_params()
  opt = spd.adam_spd(LEARNING_RATE, 0.5)
  state = opt.init(params)
  with pytest.raises(ValueError, match=re.escape(optax_base.NO_PARAMS_MSG)):
    opt.update(params, state)


def test_anchor_with_missing_leaf_raises_naming_the_leaf():
  params, _, _ = problem()
  anchor = jax.tree.map(lambda p: p, params)
  del anchor['head']['b2']
  opt = spd.adam_spd(LEARNING_RATE, 0.5, anchor=anchor)
  with pytest.raises(ValueError, match=re.escape("['head']['b2']")):
    opt.init(params)


def test_anchor_with_wrong_shape_raises_naming_the_leaf():
  params, _, _ = problem()
  anchor = jax.tree.map(lambda p: p, params)
  anchor['backbone']['w1'] = anchor['backbone']['w1'].T
  opt = spd.adam_spd(LEARNING_RATE, 0.5, anchor=anchor)
  with pytest.raises(ValueError, match=re.escape("['backbone']['w1']")):
    opt.init(params)


def assert_explains_wrapping(message):
  assert 'wraps a base optimizer' in message, message
  assert 'raw gradient' in message and 'optax.chain' in message, message
  spelling = 'selective_projection_decay(optax.adam(lr), weight_decay='
  assert spelling in message, message


def test_chaining_instead_of_wrapping_explains_the_right_spelling():
  with pytest.raises(TypeError) as error:
    optax.chain(spd.selective_projection_decay(weight_decay=0.1),
                optax.adam(1e-3))
  assert_explains_wrapping(str(error.value))


def test_weight_decay_as_first_argument_explains_the_right_spelling():
  with pytest.raises(TypeError) as error:
    spd.selective_projection_decay(0.1)
  assert_explains_wrapping(str(error.value))
  assert '0.1' in str(error.value)


def test_unknown_anchor_string_raises():
  params = small_params()
  with pytest.raises(ValueError, match=r'anchor.*"init".*"zero".*pretrained'):
    spd.adam_spd(LEARNING_RATE, 0.5, anchor='pretrained').init(params)


# Stacked layers.

LAYERS, WIDTH = 3, 4


def stacked_loss(stack, head, x, y):
  hidden = x
  for layer in range(LAYERS):
    hidden = jnp.tanh(hidden @ stack[layer])
  return 0.5 * jnp.mean((hidden @ head - y) ** 2)


@pytest.mark.usefixtures('x64')
def test_stacked_leaf_with_layer_axis_equals_separate_leaves():
  rng = np.random.default_rng(6)
  stack = jnp.asarray(rng.normal(size=(LAYERS, WIDTH, WIDTH)) / 2)
  head = jnp.asarray(rng.normal(size=(WIDTH, 1)))
  x = jnp.asarray(rng.normal(size=(16, WIDTH)))
  y = jnp.asarray(rng.normal(size=(16, 1)))
  names = [f'layer_{i}' for i in range(LAYERS)]

  def loss_stacked(params):
    return stacked_loss(params['stack'], params['head'], x, y)

  def loss_separate(params):
    return stacked_loss([params[n] for n in names], params['head'], x, y)

  def run(params, loss, **kwargs):
    opt = spd.adam_spd(0.05, 1.0, **kwargs)

    @jax.jit
    def step(params, state):
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    state, out = opt.init(params), []
    for _ in range(40):
      params, state = step(params, state)
      out.append((params, state))
    return out

  separate = run({**{n: stack[i] for i, n in enumerate(names)}, 'head': head},
                 loss_separate)
  slices_disagree = sum(len({bool(state.selected[n]) for n in names}) > 1
                        for _, state in separate)
  assert slices_disagree > 0  # else one condition per leaf would pass too

  for form, layer_axis in [
      ('pytree', {'stack': 0, 'head': None}),
      ('callable', lambda path, shape: 0 if len(shape) == 3 else None),
  ]:
    stacked = run({'stack': stack, 'head': head}, loss_stacked,
                  layer_axis=layer_axis)
    for t, ((p_stack, s_stack), (p_sep, s_sep)) in enumerate(
        zip(stacked, separate)):
      message = f'layer_axis as a {form}, step {t}'
      chex.assert_trees_all_close(
          p_stack, {'stack': jnp.stack([p_sep[n] for n in names]),
                    'head': p_sep['head']},
          atol=ATOL, custom_message=message)
      chex.assert_shape(s_stack.selected['stack'], (LAYERS,))
      chex.assert_trees_all_equal(
          s_stack.selected['stack'],
          jnp.stack([s_sep.selected[n] for n in names]), custom_message=message)
      chex.assert_trees_all_close(
          s_stack.ratio['stack'], jnp.stack([s_sep.ratio[n] for n in names]),
          atol=ATOL, custom_message=message)


# Compilation.


def test_jitted_step_compiles_once():
  params, x, y = problem()
  opt = spd.adam_spd(LEARNING_RATE, optax.linear_schedule(0.0, 1.0, 10),
                     mask={'backbone': True, 'head': False})
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    grads = jax.grad(mlp_loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1


def primitive_names(jaxpr):
  """Every primitive in `jaxpr`, nested jaxprs (jit, custom_jvp) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr holds a Jaxpr
        if hasattr(sub, 'eqns'):
          names |= primitive_names(sub)
  return names


def test_update_has_no_host_callback_or_branch():
  params, x, y = problem()
  opt = spd.adam_spd(LEARNING_RATE, 0.5)
  state = opt.init(params)
  grads = mlp_grad(params, x, y)
  jaxpr = jax.make_jaxpr(opt.update)(grads, state, params)
  names = primitive_names(jaxpr.jaxpr)
  assert 'select_n' in names  # the condition is a jnp.where
  assert not {n for n in names if 'callback' in n or n in ('cond', 'while')}, (
      names)
