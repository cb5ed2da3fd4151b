"""Bad inputs are refused where they enter; a state of another layout is loud.

Hyper-parameters of any concrete numeric type are checked when the
transformation is built; params, anchors and gradients when `init` and
`update` see them; a state that is not what `init` would build for these
params (a checkpoint restored into another layout) is refused at `update`,
at trace time, naming the leaf.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax as spd


def _params():
  rng = np.random.default_rng(0)
  return {'w': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


def _grads(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)


# The five optimizers, built with default settings.
OPTIMIZERS = {
    'adam_spd': lambda **kw: spd.adam_spd(1e-2, 0.5, **kw),
    'adam_ftp': lambda **kw: spd.adam_ftp(1e-2, **kw),
    'sgd_ftp': lambda **kw: spd.sgd_ftp(1e-2, momentum=0.9, **kw),
    'adamw_l2sp': lambda **kw: spd.adamw_l2sp(1e-2, 0.1, **kw),
    'l2_sp': lambda **kw: spd.l2_sp(0.1, **kw),
}
# Those whose state holds per-leaf fields beside the anchor.
WRAPPERS = ('adam_spd', 'adam_ftp', 'sgd_ftp')


def _inner(state):
  """The SPD / FTP / L2-SP state inside an alias's state."""
  if isinstance(state, tuple) and not hasattr(state, 'anchor'):
    return next(s for s in state if hasattr(s, 'anchor'))
  return state


def _replace_inner(state, **fields):
  if hasattr(state, 'anchor'):
    return state._replace(**fields)
  return tuple(s._replace(**fields) if hasattr(s, 'anchor') else s
               for s in state)


# Hyper-parameters.

NOT_FINITE = (float('inf'), float('-inf'), float('nan'))
BAD_HYPERPARAMETERS = [
    # (factory, argument, bad values)
    (lambda v: spd.adam_spd(1e-2, v), 'weight_decay',
     (-0.5, np.float32(-0.5), jnp.asarray(-0.5), np.asarray(-0.5)) + NOT_FINITE),
    (lambda v: spd.selective_projection_decay(optax.sgd(1e-2), v),
     'weight_decay', (np.float64(-1.0), jnp.asarray(-1.0)) + NOT_FINITE),
    (lambda v: spd.l2_sp(v), 'weight_decay',
     (np.float32(-0.5), jnp.asarray(-0.5)) + NOT_FINITE),
    (lambda v: spd.adamw_l2sp(1e-2, v), 'weight_decay',
     (np.float32(-0.5), jnp.asarray(-0.5)) + NOT_FINITE),
    (lambda v: spd.adam_ftp(1e-2, k=v), 'k',
     (np.float32(1.5), jnp.asarray(-0.1)) + NOT_FINITE),
    (lambda v: spd.fast_trainable_projection(optax.sgd(1e-2), mu=v), 'mu',
     (np.float32(0.0), jnp.asarray(-1e-2)) + NOT_FINITE),
    (lambda v: spd.fast_trainable_projection(optax.sgd(1e-2), b1=v), 'b1',
     (1.0, -0.1, np.float32(1.0), jnp.asarray(1.0)) + NOT_FINITE),
    (lambda v: spd.fast_trainable_projection(optax.sgd(1e-2), b2=v), 'b2',
     (1.0, 1.5, np.float64(1.0), jnp.asarray(-0.5)) + NOT_FINITE),
    (lambda v: spd.adam_spd(v, 0.5), 'learning_rate',
     (-1e-2, jnp.asarray(-1e-2)) + NOT_FINITE),
    (lambda v: spd.adam_ftp(v), 'learning_rate', (-1e-2,) + NOT_FINITE),
    (lambda v: spd.sgd_ftp(v), 'learning_rate', (-1e-2,) + NOT_FINITE),
    (lambda v: spd.adamw_l2sp(v, 0.1), 'learning_rate', NOT_FINITE),
    (lambda v: spd.adam_spd(1e-2, 0.5, b1=v), 'b1', (1.0, jnp.asarray(1.0))),
    (lambda v: spd.adam_ftp(1e-2, b2=v), 'b2', (1.0, np.float32(-0.1))),
    (lambda v: spd.adam_spd(1e-2, 0.5, eps=v), 'eps', (-1e-8, float('nan'))),
    (lambda v: spd.sgd_ftp(1e-2, momentum=v), 'momentum', (-0.9, np.inf)),
]


@pytest.mark.parametrize(
    'make, name, value',
    [(make, name, value) for make, name, values in BAD_HYPERPARAMETERS
     for value in values],
    ids=lambda x: x if isinstance(x, str) else None)
def test_bad_hyperparameter_of_any_numeric_type_is_refused_naming_it(
    make, name, value):
  with pytest.raises(ValueError, match=f'`{name}`'):
    make(value)


@pytest.mark.parametrize('value', ['0.1', jnp.ones(2), np.ones((1,)), True,
                                   jnp.asarray(0.1 + 0j)])
def test_hyperparameter_that_is_not_a_real_scalar_is_refused(value):
  with pytest.raises(TypeError, match='`weight_decay`'):
    spd.adam_spd(1e-2, value)


def test_inject_hyperparams_refuses_a_bad_concrete_value_and_keeps_working():
  params = _params()
  bad = optax.inject_hyperparams(spd.adam_spd)(1e-2, weight_decay=-0.5)
  with pytest.raises(ValueError, match='`weight_decay`'):
    bad.init(params)
  bad = optax.inject_hyperparams(spd.adam_ftp)(1e-2, b1=1.0)
  with pytest.raises(ValueError, match='`b1`'):
    bad.init(params)
  # Good values as concrete arrays, eager and jitted (traced: not checked).
  good = optax.inject_hyperparams(spd.adam_ftp)(1e-2, k=0.5, mu=3e-2)
  state = good.init(params)
  updates, _ = good.update(_grads(params), state, params)
  jitted, _ = jax.jit(good.update)(_grads(params), jax.jit(good.init)(params),
                                   params)
  chex.assert_trees_all_close(updates, jitted, rtol=1e-6)


def test_traced_hyperparameters_and_schedules_are_not_checked():
  params = _params()

  @jax.jit
  def step(weight_decay, k):
    spd_opt = spd.adam_spd(1e-2, weight_decay)
    ftp_opt = spd.adam_ftp(1e-2, k=k)
    return (spd_opt.update(params, spd_opt.init(params), params)[0],
            ftp_opt.update(params, ftp_opt.init(params), params)[0])

  chex.assert_tree_all_finite(step(-0.5, 2.0))
  spd.adam_spd(1e-2, lambda count: -0.5 * count)
  spd.fast_trainable_projection(optax.sgd(1e-2), mu=lambda count: -1.0)


# The state `update` is given must be what `init` builds for these params.

LAYOUT_CHANGES = {
    # What a plain orbax restore into a target with a newly constrained leaf
    # leaves there (the checkpoint held a MaskedNode).
    'anchor_leaf_none': lambda s: dict(anchor={**s.anchor, 'b': None}),
    'anchor_leaf_masked': lambda s: dict(
        anchor={**s.anchor, 'b': optax.MaskedNode()}),
    'anchor_none': lambda s: dict(anchor=None),
    'anchor_leaf_shape': lambda s: dict(
        anchor={**s.anchor, 'w': jnp.zeros((4, 3))}),
    'anchor_leaf_dtype': lambda s: dict(
        anchor={**s.anchor, 'w': s.anchor['w'].astype(jnp.bfloat16)}),
    'anchor_leaf_missing': lambda s: dict(anchor={'w': s.anchor['w']}),
}
STAT_CHANGES = {
    # Per-leaf statistics: SPD's `ratio`, FTP's `gamma` and `c_prev`.
    'stat_leaf_none': lambda s, f: {f: {**getattr(s, f), 'b': None}},
    'stat_leaf_masked': lambda s, f: {f: {**getattr(s, f),
                                          'w': optax.MaskedNode()}},
    'stat_leaf_shape': lambda s, f: {f: {**getattr(s, f),
                                         'w': jnp.zeros((7,))}},
    'stat_leaf_dtype': lambda s, f: {f: {
        **getattr(s, f), 'b': getattr(s, f)['b'].astype(jnp.float16)}},
}


def _stat_fields(name):
  if name == 'adam_spd':
    return ('selected', 'ratio')
  return ('gamma', 'gamma_m', 'gamma_v', 'c_prev', 's_prev')


def _layout_cases():
  for name in OPTIMIZERS:
    for change in LAYOUT_CHANGES:
      yield name, change, None
  for name in WRAPPERS:
    for change in STAT_CHANGES:
      for field in _stat_fields(name):
        yield name, change, field


@pytest.mark.parametrize('name, change, field', list(_layout_cases()))
def test_update_refuses_a_state_of_another_layout_naming_the_leaf(
    name, change, field):
  opt = OPTIMIZERS[name]()
  params = _params()
  state = opt.init(params)
  inner = _inner(state)
  if field is None:
    fields = LAYOUT_CHANGES[change](inner)
    leaf = 'anchor'
  else:
    fields = STAT_CHANGES[change](inner, field)
    leaf = field
  state = _replace_inner(state, **fields)
  for update in (opt.update, jax.jit(opt.update)):
    with pytest.raises(ValueError) as raised:
      update(_grads(params), state, params)
    message = str(raised.value)
    assert '\n' not in message, message
    assert f'`{leaf}`' in message, message
    assert 'restore_state' in message, message
    if change != 'anchor_none':
      assert re.search(r"\['[wb]'\]", message), message


def test_update_accepts_the_state_init_builds_in_every_mode():
  params = _params()
  for name, make in OPTIMIZERS.items():
    for options in (dict(), dict(mask={'w': True, 'b': False}),
                    dict(anchor='zero')):
      opt = make(**options)
      updates, _ = jax.jit(opt.update)(_grads(params), opt.init(params), params)
      chex.assert_tree_all_finite(updates)


# Params: Python scalars, integers, complex numbers.


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_python_scalar_leaf_is_a_0d_float32_leaf_like_optax_adam(name):
  params = {'w': _params()['w'], 'temperature': 0.07}
  as_array = {'w': params['w'], 'temperature': jnp.asarray(0.07, jnp.float32)}
  grads = {'w': _grads(_params())['w'], 'temperature': jnp.asarray(0.3)}
  opt = OPTIMIZERS[name]()
  expected_adam, _ = optax.adam(1e-2).update(
      grads, optax.adam(1e-2).init(params), params)
  for update in (opt.update, jax.jit(opt.update)):
    updates, state = update(grads, opt.init(params), params)
    chex.assert_shape(updates['temperature'], ())
    assert updates['temperature'].dtype == expected_adam['temperature'].dtype
    expected, _ = update(grads, opt.init(as_array), as_array)
    chex.assert_trees_all_close(updates, expected)
    # And the next step takes the state back.
    new_params = optax.apply_updates(params, updates)
    update(grads, state, new_params)


@pytest.mark.parametrize('name', list(OPTIMIZERS))
@pytest.mark.parametrize('bad, dtype', [
    (jnp.arange(4), 'int32'), (jnp.ones(4, jnp.complex64), 'complex64'),
    (jnp.ones(4, bool), 'bool'), (3, 'int32')])
def test_integer_and_complex_params_are_refused_at_init(name, bad, dtype):
  params = {'w': _params()['w'], 'steps': bad}
  with pytest.raises(TypeError, match=re.escape("['steps']") + f'.*{dtype}'):
    OPTIMIZERS[name]().init(params)
  # Left out by the mask, the leaf is the base optimizer's business.
  OPTIMIZERS[name](mask={'w': True, 'steps': False}).init(params)


# Anchors.


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_anchor_of_another_dtype_is_refused_naming_both(name):
  params = _params()
  anchor = {**params, 'w': params['w'].astype(jnp.float16)}
  with pytest.raises(ValueError, match=re.escape("['w']") + '.*float16.*float32'):
    OPTIMIZERS[name](anchor=anchor).init(params)


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_anchor_none_leaf_says_it_is_none(name):
  params = _params()
  with pytest.raises(ValueError) as raised:
    OPTIMIZERS[name](anchor={**params, 'b': None}).init(params)
  message = str(raised.value)
  assert "['b']" in message and 'is None' in message, message
  # Masked out, the anchor may leave the leaf out.
  OPTIMIZERS[name](anchor={**params, 'b': None},
                   mask={'w': True, 'b': False}).init(params)


# Gradients.


@pytest.mark.parametrize('name', list(OPTIMIZERS))
@pytest.mark.parametrize('grad_shape', [(4, 3), (1, 4), (12,)])
def test_gradient_of_another_shape_is_refused_naming_the_leaf(name, grad_shape):
  params = _params()
  opt = OPTIMIZERS[name]()
  grads = {**_grads(params), 'w': jnp.ones(grad_shape)}
  for update in (opt.update, jax.jit(opt.update)):
    with pytest.raises(ValueError,
                       match=re.escape("['w']") + r'.*\(3, 4\)'):
      update(grads, opt.init(params), params)


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_gradient_of_another_structure_is_refused(name):
  params = _params()
  opt = OPTIMIZERS[name]()
  with pytest.raises(ValueError, match=re.escape("['b']")):
    opt.update({'w': _grads(params)['w']}, opt.init(params), params)


# The aliases follow optax.adam.


def _run(opt, params, steps=4):
  state = opt.init(params)
  history = []
  for seed in range(steps):
    updates, state = opt.update(_grads(params, seed), state, params)
    params = optax.apply_updates(params, updates)
    history.append(updates)
  return history, state


@pytest.mark.parametrize('options', [
    dict(eps_root=1e-3), dict(nesterov=True), dict(mu_dtype=jnp.bfloat16),
    dict(eps_root=1e-3, nesterov=True, mu_dtype=jnp.bfloat16)])
def test_adam_aliases_take_optax_adams_eps_root_mu_dtype_nesterov(options):
  params = _params()
  spd_run, spd_state = _run(spd.adam_spd(1e-2, 0.5, **options), params)
  expected, _ = _run(spd.selective_projection_decay(
      optax.adam(1e-2, **options), 0.5), params)
  chex.assert_trees_all_close(spd_run, expected)
  ftp_run, _ = _run(spd.adam_ftp(1e-2, weight_decay=0.1, **options), params)
  expected, _ = _run(spd.fast_trainable_projection(
      optax.adamw(1e-2, weight_decay=0.1, **options)), params)
  chex.assert_trees_all_close(ftp_run, expected)
  l2sp_run, _ = _run(spd.adamw_l2sp(1e-2, 0.1, **options), params)
  expected, _ = _run(optax.chain(
      optax.scale_by_adam(**options), spd.l2_sp(0.1),
      optax.scale_by_learning_rate(1e-2)), params)
  chex.assert_trees_all_close(l2sp_run, expected)
  # Each option changes the run.
  plain, _ = _run(spd.adam_spd(1e-2, 0.5), params)
  assert not np.allclose(plain[-1]['w'], spd_run[-1]['w'])
  if 'mu_dtype' in options:
    assert spd_state.base_optimizer_state[0].mu['w'].dtype == jnp.bfloat16


def test_adam_aliases_default_to_optax_adams_values():
  import inspect  # pylint: disable=g-import-not-at-top
  adam = inspect.signature(optax.adam).parameters
  for alias in (spd.adam_spd, spd.adam_ftp, spd.adamw_l2sp):
    parameters = inspect.signature(alias).parameters
    for name in ('b1', 'b2', 'eps', 'eps_root', 'mu_dtype', 'nesterov'):
      assert parameters[name].default == adam[name].default, (alias, name)


def test_adam_ftp_weight_decay_mask_is_adamws_mask_not_ftps():
  params = _params()
  decay_mask = {'w': True, 'b': False}
  run, state = _run(spd.adam_ftp(1e-2, weight_decay=0.1,
                                 weight_decay_mask=decay_mask), params)
  expected, _ = _run(spd.fast_trainable_projection(
      optax.adamw(1e-2, weight_decay=0.1, mask=decay_mask)), params)
  chex.assert_trees_all_close(run, expected)
  # FTP still projects both leaves.
  assert not isinstance(state.gamma['b'], optax.MaskedNode)
  decay_everywhere, _ = _run(spd.adam_ftp(1e-2, weight_decay=0.1), params)
  assert not np.allclose(decay_everywhere[-1]['b'], run[-1]['b'])
