"""optax's wrappers around SPD and FTP: each does what it does around Adam.

`MultiSteps` (gradient accumulation), `apply_if_finite`, `inject_hyperparams`,
`multi_transform` (SPD or FTP on the backbone, AdamW on a new head) and
`chain` with gradient clipping in front.
"""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax as spd

STEPS = 15


def _adam_spd(learning_rate=3e-2, **options):
  return spd.adam_spd(learning_rate=learning_rate, weight_decay=1.0, **options)


def _adam_ftp(learning_rate=3e-2, **options):
  return spd.adam_ftp(learning_rate=learning_rate, **options)


METHODS = {'spd': _adam_spd}
if hasattr(spd, 'adam_ftp'):
  METHODS['ftp'] = _adam_ftp
METHOD_CASES = tuple((name, name) for name in METHODS)


def _pretrained():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
      'backbone': {'kernel': jax.random.normal(keys[0], (8, 16)) / 3,
                   'bias': jax.random.normal(keys[1], (16,)) / 10},
      'head': {'kernel': jax.random.normal(keys[2], (16, 2)) / 3,
               'bias': jnp.zeros((2,))},
  }


def _batches(count, size=32):
  """`count` different batches, stacked."""
  x = jax.random.normal(jax.random.key(1), (count, size, 8))
  y = jnp.stack([jnp.sin(x.sum(-1)), jnp.cos(x[..., 0])], axis=-1)
  return x, y


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['backbone']['kernel']
                    + params['backbone']['bias'])
  return jnp.mean((hidden @ params['head']['kernel'] + params['head']['bias']
                   - y) ** 2)


def _run(opt, params, batches, grad_fn=None):
  """Every step's (params, state, updates), one batch per step, stacked."""
  grad_fn = grad_fn or jax.grad(_loss)

  @jax.jit
  def step(params, state, batch):
    grads = grad_fn(params, *batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  state = opt.init(params)
  history = []
  for batch in zip(*jax.tree.map(np.asarray, batches)):
    params, state, updates = step(params, state, batch)
    history.append((params, state, updates))
  return jax.tree.map(lambda *steps: np.stack(steps), *history)


def _stats(state):
  return state.ratio if hasattr(state, 'ratio') else state.gamma


class OptaxWrappersTest(parameterized.TestCase):

  @parameterized.named_parameters(*METHOD_CASES)
  def test_multi_steps_accumulates_k_micro_steps_into_one_mean_step(
      self, method):
    micro_steps, macro_steps = 4, 6
    x, y = _batches(micro_steps * macro_steps)
    accumulated = optax.MultiSteps(METHODS[method](), micro_steps)
    params, state, _ = _run(accumulated, _pretrained(), (x, y))

    # The reference: one step per group of k micro-batches, on the mean of
    # their gradients at the same params.
    def mean_grad(params, x, y):
      return jax.tree.map(lambda g: g.mean(0),
                          jax.vmap(jax.grad(_loss), (None, 0, 0))(params, x, y))
    grouped = jax.tree.map(
        lambda a: a.reshape(macro_steps, micro_steps, *a.shape[1:]), (x, y))
    reference_params, reference_state, _ = _run(
        METHODS[method](), _pretrained(), grouped, mean_grad)

    last_micro_step = slice(micro_steps - 1, None, micro_steps)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[last_micro_step], params), reference_params,
        rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[last_micro_step],
                     _stats(state.inner_opt_state)),
        _stats(reference_state), rtol=1e-5, atol=1e-6)
    # Between macro steps the params do not move.
    first_micro_step = slice(0, None, micro_steps)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a: a[first_micro_step][1:], params),
        jax.tree.map(lambda a: a[last_micro_step][:-1], params))

  @parameterized.named_parameters(*METHOD_CASES)
  def test_apply_if_finite_skips_a_nan_step_and_leaves_state_untouched(
      self, method):
    x, y = _batches(STEPS)
    poisoned_step = 5

    def poisoned_grad(params, x, y):
      grads = jax.grad(_loss)(params, x, y)
      poisoned = jnp.all(x == _batches(STEPS)[0][poisoned_step])
      return jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)

    guarded = optax.apply_if_finite(METHODS[method](), max_consecutive_errors=3)
    params, state, _ = _run(guarded, _pretrained(), (x, y), poisoned_grad)
    # The same run with the poisoned batch left out.
    keep = np.arange(STEPS) != poisoned_step
    reference_params, reference_state, _ = _run(
        METHODS[method](), _pretrained(), (x[keep], y[keep]))

    chex.assert_tree_all_finite(params)
    np.testing.assert_array_equal(state.notfinite_count[poisoned_step], 1)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda a: a[poisoned_step], state.inner_state),
        jax.tree.map(lambda a: a[poisoned_step - 1], state.inner_state))
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[keep], params), reference_params,
        rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a[keep], state.inner_state),
        reference_state, rtol=1e-6, atol=1e-7)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_inject_hyperparams_runs_like_fixed_values_and_can_change_them(
      self, method):
    batches = _batches(STEPS)
    make = spd.adam_spd if method == 'spd' else spd.adam_ftp
    options = {'weight_decay': 1.0} if method == 'spd' else {}
    injected = optax.inject_hyperparams(make)(learning_rate=3e-2, **options)
    params, state, _ = _run(injected, _pretrained(), batches)
    reference_params, reference_state, _ = _run(
        METHODS[method](), _pretrained(), batches)
    chex.assert_trees_all_close(params, reference_params, rtol=1e-6)
    chex.assert_trees_all_close(state.inner_state, reference_state, rtol=1e-6)

    # The injected learning rate is live state: changing it changes the step.
    pretrained = _pretrained()
    state = injected.init(pretrained)
    grads = jax.grad(_loss)(pretrained, *jax.tree.map(lambda a: a[0], batches))
    full, _ = injected.update(grads, state, pretrained)
    state.hyperparams['learning_rate'] = jnp.asarray(3e-2 / 2)
    half, _ = injected.update(grads, state, pretrained)
    chex.assert_trees_all_close(half, jax.tree.map(lambda u: u / 2, full),
                                rtol=1e-5, atol=1e-9)

  def test_inject_hyperparams_weight_decay_zero_is_adam(self):
    batches = _batches(STEPS)
    injected = optax.inject_hyperparams(spd.adam_spd)(
        learning_rate=3e-2, weight_decay=1.0)
    pretrained = _pretrained()
    state = injected.init(pretrained)
    state.hyperparams['weight_decay'] = jnp.asarray(0.0)

    def step(carry, batch):
      params, state = carry
      grads = jax.grad(_loss)(params, *batch)
      updates, state = injected.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(
        (pretrained, state), batches)
    adam_params, _, _ = _run(optax.adam(3e-2), pretrained, batches)
    chex.assert_trees_all_close(params, jax.tree.map(lambda a: a[-1],
                                                     adam_params), rtol=1e-6)
    # ... although SPD did select layers it would have decayed.
    self.assertTrue(any(bool(s) for s in jax.tree.leaves(state.inner_state
                                                         .selected)))

  @parameterized.named_parameters(*METHOD_CASES)
  def test_multi_transform_backbone_gets_method_and_head_gets_plain_adamw(
      self, method):
    batches = _batches(STEPS)
    labels = {'backbone': 'backbone', 'head': 'head'}
    split = optax.multi_transform(
        {'backbone': METHODS[method](), 'head': optax.adamw(1e-2)}, labels)
    pretrained = _pretrained()
    params, _, updates = _run(split, pretrained, batches)

    # Replay: each part's optimizer alone, fed the gradients of the run.
    def replay(opt, part):
      def step(state, inputs):
        all_params, batch = inputs
        grads = jax.grad(_loss)(all_params, *batch)[part]
        part_updates, state = opt.update(grads, state, all_params[part])
        return state, part_updates
      before = jax.tree.map(
          lambda first, rest: jnp.concatenate([first[None], rest[:-1]]),
          pretrained, params)
      return jax.lax.scan(step, opt.init(pretrained[part]), (before, batches))[1]

    chex.assert_trees_all_close(
        updates['head'], replay(optax.adamw(1e-2), 'head'),
        rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(
        updates['backbone'], replay(METHODS[method](), 'backbone'),
        rtol=1e-6, atol=1e-9)
    # The backbone's steps are not AdamW's: the method did act on them.
    adamw_backbone = replay(optax.adamw(3e-2, weight_decay=0.0), 'backbone')
    difference = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                              updates['backbone'], adamw_backbone)
    self.assertGreater(max(jax.tree.leaves(difference)), 1e-5)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_clip_before_method_equals_method_on_clipped_gradients(self, method):
    batches = _batches(STEPS)
    max_norm = 0.05
    clipped = optax.chain(optax.clip_by_global_norm(max_norm),
                          METHODS[method]())
    params, _, _ = _run(clipped, _pretrained(), batches)

    def clipped_grad(params, x, y):
      grads = jax.grad(_loss)(params, x, y)
      norm = optax.global_norm(grads)
      return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / norm),
                          grads)
    reference_params, _, _ = _run(
        METHODS[method](), _pretrained(), batches, clipped_grad)
    chex.assert_trees_all_close(params, reference_params, rtol=1e-5,
                                atol=1e-7)
    # Clipping was active, so it is not the unclipped run.
    norms = jax.vmap(lambda b: optax.global_norm(jax.grad(_loss)(
        _pretrained(), *b)))(batches)
    self.assertGreater(float(norms.min()), max_norm)
