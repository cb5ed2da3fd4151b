"""optax's wrappers around SPD and FTP: each does what it does around Adam.

`MultiSteps` (gradient accumulation), `apply_if_finite`, `inject_hyperparams`,
`multi_transform` (SPD or FTP on the backbone, AdamW on a new head) and
`chain` with gradient clipping in front.
"""

import functools
import types

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from optax.contrib import _common_test as optax_common_test

import spd_optax as spd
from methods import METHOD_CASES
from methods import METHODS

STEPS = 15


def _normal(seed, shape, scale=1.0):
  """NumPy data: no JAX op runs, so nothing is compiled outside the steps."""
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _pretrained():
  return {
      'backbone': {'kernel': _normal(0, (8, 16), 1 / 3),
                   'bias': _normal(1, (16,), 1 / 10)},
      'head': {'kernel': _normal(2, (16, 2), 1 / 3),
               'bias': np.zeros((2,), np.float32)},
  }


def _batches(count, size=32):
  """`count` different batches, stacked."""
  x = _normal(3, (count, size, 8))
  y = np.stack([np.sin(x.sum(-1)), np.cos(x[..., 0])], axis=-1)
  return x, y


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['backbone']['kernel']
                    + params['backbone']['bias'])
  return jnp.mean((hidden @ params['head']['kernel'] + params['head']['bias']
                   - y) ** 2)


_grad = jax.jit(jax.grad(_loss))


@functools.lru_cache(maxsize=None)
def _apply(opt):
  """`opt`'s jitted step, compiled once per optimizer object."""
  def apply(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates
  return jax.jit(apply)


@functools.lru_cache(maxsize=None)
def _method(method):
  """The method with default settings (one object, so one compiled step)."""
  return METHODS[method]()


def _run(opt, params, batches, grad_fn=_grad, state=None):
  """Every step's (params, state, updates), one batch per step, stacked.

  `opt` is an optimizer, or a method's name for its default settings.
  """
  opt = _method(opt) if isinstance(opt, str) else opt
  apply = _apply(opt)
  state = opt.init(params) if state is None else state
  history = []
  for batch in zip(*jax.tree.map(np.asarray, batches)):
    params, state, updates = apply(params, state, grad_fn(params, *batch))
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
        method, _pretrained(), grouped, jax.jit(mean_grad))

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
    params, state, _ = _run(guarded, _pretrained(), (x, y),
                            jax.jit(poisoned_grad))
    # The same run with the poisoned batch left out.
    keep = np.arange(STEPS) != poisoned_step
    reference_params, reference_state, _ = _run(
        method, _pretrained(), (x[keep], y[keep]))

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
    reference_params, reference_state, _ = _run(method, _pretrained(), batches)
    # Same run; Adam amplifies the round-off of a differently compiled step
    # where a gradient is ~0, hence the absolute tolerance (lr / 3000).
    chex.assert_trees_all_close(params, reference_params, rtol=1e-5,
                                atol=1e-5)

    # The injected learning rate is live state: from the state after a few
    # steps, a new value gives the step of the method built with it.
    after = 3
    state = jax.tree.map(lambda a: a[after - 1], state)
    params = jax.tree.map(lambda a: a[after - 1], params)
    state.hyperparams['learning_rate'] = np.float32(1e-2)
    next_batch = jax.tree.map(lambda a: a[after:after + 1], batches)
    _, _, updates = _run(injected, params, next_batch, state=state)
    _, _, expected = _run(METHODS[method](learning_rate=1e-2), params,
                          next_batch, state=state.inner_state)
    chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-7)
    _, _, unchanged = _run(method, params, next_batch, state=state.inner_state)
    self.assertGreater(
        float(optax.tree.norm(optax.tree.sub(unchanged, updates))), 1e-4)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_multi_transform_backbone_gets_method_and_head_gets_plain_adamw(
      self, method):
    batches = _batches(STEPS)
    labels = {'backbone': 'backbone', 'head': 'head'}
    split = optax.multi_transform(
        {'backbone': METHODS[method](), 'head': optax.adamw(1e-2)}, labels)
    pretrained = _pretrained()
    params, _, updates = _run(split, pretrained, batches)

    # Replay: each part's optimizer alone, at the run's params, fed the run's
    # gradients.
    before = [jax.tree.map(lambda a, i=i: a[i - 1], params) if i else
              pretrained for i in range(STEPS)]
    grads = [_grad(p, *jax.tree.map(lambda a, i=i: a[i], batches))
             for i, p in enumerate(before)]

    def replay(opt, part):
      apply = _apply(opt)
      state, replayed = opt.init(pretrained[part]), []
      for step_params, step_grads in zip(before, grads):
        _, state, part_updates = apply(step_params[part], state,
                                       step_grads[part])
        replayed.append(part_updates)
      return jax.tree.map(lambda *steps: np.stack(steps), *replayed)

    chex.assert_trees_all_close(
        updates['head'], replay(optax.adamw(1e-2), 'head'),
        rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(
        updates['backbone'], replay(METHODS[method](), 'backbone'),
        rtol=1e-6, atol=1e-9)

  @parameterized.named_parameters(*METHOD_CASES)
  def test_clip_before_method_equals_method_on_clipped_gradients(self, method):
    batches = _batches(STEPS)
    max_norm = 0.05
    clipped = optax.chain(optax.clip_by_global_norm(max_norm),
                          METHODS[method]())
    params, _, _ = _run(clipped, _pretrained(), batches)

    def clipped_grad(params, x, y):
      grads = jax.grad(_loss)(params, x, y)
      norm = optax.tree.norm(grads)
      return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / norm),
                          grads)
    reference_params, _, _ = _run(
        method, _pretrained(), batches, jax.jit(clipped_grad))
    chex.assert_trees_all_close(params, reference_params, rtol=1e-5,
                                atol=1e-7)
    # Clipping was active at every step, so it is not the unclipped run.
    norms = [optax.tree.norm(_grad(_pretrained(), x, y))
             for x, y in zip(*batches)]
    self.assertGreater(float(min(norms)), max_norm)


# optax's bar for contributed optimizers, the installed optax's own checks
# (optax/contrib/_common_test.py), run on ours: extra args, no recompile,
# `tree_map_params`, convergence on its four targets, `inject_hyperparams`,
# dtypes kept, `MultiSteps`, dtype-stable state, schedules. Hyper-parameters
# are chosen per method as optax chooses them per optimizer; FTP's radius
# needs the larger `mu` to leave the anchor as far as the targets lie.
_OURS = types.SimpleNamespace(
    adam_spd=spd.adam_spd, adam_ftp=spd.adam_ftp, sgd_ftp=spd.sgd_ftp,
    adamw_l2sp=spd.adamw_l2sp,
    selective_projection_decay=spd.selective_projection_decay,
    fast_trainable_projection=spd.fast_trainable_projection)


class _OursThenContrib:
  """What `_common_test` looks optimizers up in: ours first, then optax's."""

  def __getattr__(self, name):
    return getattr(_OURS, name, None) or getattr(contrib, name)


def _contrib_case(opt_name, opt_kwargs, wrapper_name=None,
                  wrapper_kwargs=None):
  label = wrapper_name or opt_name
  return (label, dict(opt_name=opt_name, opt_kwargs=opt_kwargs,
                      wrapper_name=wrapper_name, wrapper_kwargs=wrapper_kwargs))


CONTRIB_CASES = (
    _contrib_case('adam_spd', {'learning_rate': 1e-2, 'weight_decay': 0.5}),
    _contrib_case('adam_ftp', {'learning_rate': 1e-2}),
    _contrib_case('sgd_ftp', {'learning_rate': 1e-3, 'momentum': 0.9}),
    _contrib_case('adamw_l2sp', {'learning_rate': 1e-2, 'weight_decay': 1e-4}),
    _contrib_case('adam', {'learning_rate': 1e-2},
                  'selective_projection_decay', {'weight_decay': 0.5}),
    _contrib_case('adam', {'learning_rate': 1e-2},
                  'fast_trainable_projection', {'k': 0.5}),
)


def _optax_check(name):
  """The undecorated check `name` of optax's `ContribTest`."""
  for method_name, method in vars(optax_common_test.ContribTest).items():
    if method_name.rstrip('0123456789') == name:
      return method.__wrapped__
  raise AssertionError(f'optax has no common check {name}')


class OptaxContribBarTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self._contrib = optax_common_test.contrib
    optax_common_test.contrib = _OursThenContrib()
    self.addCleanup(setattr, optax_common_test, 'contrib', self._contrib)
    self._checks = optax_common_test.ContribTest(
        'test_optimizers_accept_extra_args0')

  def _run_check(self, name, case, **kwargs):
    with self.subTest(name, **{k: str(v) for k, v in kwargs.items()}):
      _optax_check(name)(self._checks, **case, **kwargs)

  @parameterized.named_parameters(*CONTRIB_CASES)
  def test_passes_optax_contrib_common_checks(self, case):
    self._run_check('test_optimizers_accept_extra_args', case, wrap=True)
    for target in (optax_common_test._setup_parabola,
                   optax_common_test._setup_rosenbrock,
                   optax_common_test._setup_matrix_parabola,
                   optax_common_test._setup_mixed_tensor_target):
      self._run_check('test_optimizers', case, target=target, dtype='float32')
    self._run_check('test_optimizers_can_be_wrapped_in_inject_hyperparams',
                    case)
    for dtype in ('bfloat16', 'float32'):
      self._run_check('test_preserve_dtype', case, dtype=dtype)
      self._run_check('test_gradient_accumulation', case, dtype=dtype)
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
      self._run_check('test_state_shape_dtype_shard_stability', case,
                      dtype=dtype)
    self._run_check(
        'test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_'
        'such', case)
