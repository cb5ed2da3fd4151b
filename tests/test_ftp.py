"""Tests for `fast_trainable_projection`, `adam_ftp` and `sgd_ftp`.

The contract is ../shared/ALGORITHMS.md; `reference_ftp.py` is its float64
NumPy transcription in PyTorch's `(out, in)` layout. The library runs on
Flax-layout `(in, out)` leaves; the tests transpose to compare, and require
agreement to 1e-10 over 60 steps.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax._src import base as optax_base
import pytest

import spd_optax as spd
import reference_ftp as ref

STEPS = 60
ATOL = 1e-10


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# The network: two pre-trained Dense layers and a new head, in Flax's layout.

FLAX_NAMES = {
    'w0': ('Dense_0', 'kernel'), 'b0': ('Dense_0', 'bias'),
    'w1': ('Dense_1', 'kernel'), 'b1': ('Dense_1', 'bias'),
    'head_w': ('head', 'kernel'), 'head_b': ('head', 'bias'),
}
HEAD_EXCLUDED = {'Dense_0': True, 'Dense_1': True, 'head': False}


def to_flax(flat, dtype=None):
  """Reference (PyTorch-layout) params as nested Flax-layout jnp arrays."""
  params = {}
  for name, (module, leaf) in FLAX_NAMES.items():
    params.setdefault(module, {})[leaf] = jnp.asarray(flat[name].T, dtype)
  return params


def to_torch(params):
  return {name: np.asarray(params[module][leaf]).T
          for name, (module, leaf) in FLAX_NAMES.items()}


def mlp_loss(params, x, labels):
  hidden = jnp.tanh(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'])
  hidden = jnp.tanh(
      hidden @ params['Dense_1']['kernel'] + params['Dense_1']['bias'])
  logits = hidden @ params['head']['kernel'] + params['head']['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_problem(dtype=None):
  """Flax params, loss and reference (params, loss_and_grads) of one task."""
  pretrained, x, labels = ref.mlp_problem()
  loss = functools.partial(mlp_loss, x=jnp.asarray(x, dtype),
                           labels=jnp.asarray(labels))
  ref_loss_and_grads = functools.partial(ref.mlp_loss_and_grads, x=x,
                                         labels=labels)
  return to_flax(pretrained, dtype), loss, pretrained, ref_loss_and_grads


def fine_tune(opt, params, loss, steps, wrap=jax.jit):
  """`steps` steps of `opt` on `loss`: params before/after each step, states.

  The whole step is `wrap`ped (jitted by default): one compilation per test.
  """

  @wrap
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  history, states = [params], []
  for _ in range(steps):
    params, state = step(params, state)
    history.append(params)
    states.append(state)
  return history, states


def assert_mlp_matches_reference(history, states, reference, ftp):
  """Params (every step) and projected leaves' gamma equal the reference's."""
  assert len(history) == len(reference)
  for t, (params, expected) in enumerate(zip(history, reference)):
    chex.assert_trees_all_close(
        to_torch(params), expected, atol=ATOL, rtol=0,
        custom_message=f'params after step {t}')
  for t, (state, expected) in enumerate(zip(states, ftp.gamma_history)):
    gamma = {name: state.gamma[module][leaf]
             for name, (module, leaf) in FLAX_NAMES.items() if name in expected}
    chex.assert_trees_all_close(gamma, expected, atol=ATOL, rtol=0,
                                custom_message=f'gamma after step {t + 1}')


# Trajectories against the reference: (options, reference base optimizer).

TRAJECTORIES = {
    'adam': (dict(learning_rate=1e-2),
             lambda: ref.AdamW(1e-2)),
    'adamw_k_half': (dict(learning_rate=1e-2, weight_decay=0.05, k=0.5,
                          mu=3e-2),
                     lambda: ref.AdamW(1e-2, weight_decay=0.05)),
    'sgd_momentum_l2': (dict(learning_rate=0.1, momentum=0.9,
                             weight_decay=1e-3),
                        lambda: ref.SGD(0.1, 0.9, weight_decay=1e-3)),
    'sgd_nesterov_k_half': (dict(learning_rate=0.1, momentum=0.9,
                                 nesterov=True, weight_decay=1e-3, k=0.5,
                                 mu=2e-2),
                            lambda: ref.SGD(0.1, 0.9, True, 1e-3)),
}


@functools.cache
def trajectory(name):
  """Library and reference runs of one configuration, with the head excluded.

  Cached: several tests look at the same runs.
  """
  kwargs, make_reference_base = TRAJECTORIES[name]
  make = spd.adam_ftp if name.startswith('adam') else spd.sgd_ftp
  with jax.enable_x64(True):
    params, loss, pretrained, ref_loss_and_grads = mlp_problem()
    history, states = fine_tune(make(**kwargs, mask=HEAD_EXCLUDED), params,
                                loss, STEPS)
    loss = jax.jit(loss)
    loss_decreased = bool(loss(history[-1]) < loss(history[0]))
    # As NumPy: tests outside x64 read them.
    history, states = jax.device_get((history, states))
  ftp = ref.FTP(k=kwargs.get('k', 1.0), mu=kwargs.get('mu', 1e-2))
  reference = ref.run(
      ref.Optimizer(make_reference_base(), ftp, excluded=('head_w', 'head_b')),
      pretrained, ref_loss_and_grads, STEPS)
  return history, states, reference, ftp, loss_decreased


@pytest.mark.parametrize('name', list(TRAJECTORIES))
def test_trajectory_matches_reference(name):
  history, states, reference, ftp, loss_decreased = trajectory(name)
  assert_mlp_matches_reference(history, states, reference, ftp)
  if TRAJECTORIES[name][0].get('k', 1.0) < 1:
    # A positive h occurred, so k was exercised.
    assert any(h > 0 for step in ftp.h_history for h in step.values())
  # The projection still binds at the end.
  final, gamma = reference[-1], ftp.gamma
  assert any(np.any(ref.rownorm(final[leaf] - reference[0][leaf]) - 1e-8
                    > 0.999 * gamma[leaf]) for leaf in gamma)
  assert loss_decreased


@pytest.mark.parametrize('name', list(TRAJECTORIES))
def test_rows_stay_within_gamma(name):
  history, states, _, _, _ = trajectory(name)
  for t, (params, state) in enumerate(zip(history[1:], states), start=1):
    for module in ('Dense_0', 'Dense_1'):
      gamma = state.gamma[module]
      deviation = jax.tree.map(lambda p, a: np.abs(p - a), params[module],
                               history[0][module])
      kernel_rows = deviation['kernel'].sum(0)  # one per output unit
      bias_row = deviation['bias'].sum()        # a bias is one row
      assert np.all(kernel_rows <= gamma['kernel'] * (1 + 1e-9)), (t, module)
      assert bias_row <= gamma['bias'] * (1 + 1e-9), (t, module)
      if t == 1:  # gamma starts at 1e-8: the first step barely moves
        assert np.all(kernel_rows <= 1e-8 * (1 + 1e-6)), module


def test_plain_sgd_projected_head_and_zero_anchor_match_reference(x64):
  del x64
  params, loss, pretrained, ref_loss_and_grads = mlp_problem()
  history, states = fine_tune(
      spd.sgd_ftp(0.3, anchor='zero', mu=5e-2), params, loss, STEPS)
  ftp = ref.FTP(mu=5e-2)
  reference = ref.run(ref.Optimizer(ref.SGD(0.3), ftp, anchor='zero'),
                      pretrained, ref_loss_and_grads, STEPS)

  assert states[-1].anchor is None
  assert states[-1].base_optimizer_state[1][0] == optax.EmptyState()  # no trace
  assert set(ftp.gamma) == set(FLAX_NAMES)
  assert_mlp_matches_reference(history, states, reference, ftp)


# Leaves with more axes: a Conv kernel and attention kernels.


def general_problem():
  """Pre-trained leaves and an elementwise loss, in Flax's layout."""
  rng = np.random.default_rng(3)
  shapes = {'conv': (3, 3, 2, 4), 'query': (6, 2, 3), 'out': (2, 3, 6),
            'scale': (4,), 'bias': ()}
  pretrained = {k: rng.normal(size=s) for k, s in shapes.items()}
  # Per output unit scales differ, so the rows' norms differ.
  weight = {k: rng.uniform(0.1, 2.0, size=s) for k, s in shapes.items()}
  # Targets at or near the anchor for some output units, far for others:
  # some rows end inside the radius, others on it.
  spread = {'conv': np.array([0, 1, 0.02, 1]),
            'query': np.array([[0, 1, 0.02], [1, 0, 1]]),
            'out': np.array([0, 1, 0.02, 1, 0, 1]), 'scale': 1.0, 'bias': 1.0}
  target = {k: p + spread[k] * rng.normal(size=p.shape)
            for k, p in pretrained.items()}
  return pretrained, weight, target


def elementwise_loss(params, weight, target):
  return sum(jnp.sum(weight[k] * (params[k] - target[k]) ** 2 / 2
                     - 0.03 * jnp.cos(3 * params[k])) for k in params)


def elementwise_loss_and_grads(params, weight, target):
  grads = {k: weight[k] * (p - target[k]) + 0.09 * np.sin(3 * p)
           for k, p in params.items()}
  return 0.0, grads


def general_output_axes(path, shape):
  return (1, 2) if path[-1] == 'query' else -1


# Flax leaf -> PyTorch `(out, in, ...)` layout, and back.
TORCH_LAYOUT = {
    'conv': (lambda x: x.transpose(3, 2, 0, 1),
             lambda x: x.transpose(2, 3, 1, 0)),
    'query': (lambda x: x.reshape(6, 6).T, lambda x: x.T.reshape(6, 2, 3)),
    'out': (lambda x: x.reshape(6, 6).T, lambda x: x.T.reshape(2, 3, 6)),
    'scale': (lambda x: x, lambda x: x),
    'bias': (lambda x: x, lambda x: x),
}


def torch_layout(tree):
  return {k: TORCH_LAYOUT[k][0](np.asarray(x)) for k, x in tree.items()}


def flax_layout(tree):
  return {k: TORCH_LAYOUT[k][1](np.asarray(x)) for k, x in tree.items()}


def test_conv_and_attention_kernels_are_projected_per_output_unit(x64):
  del x64
  pretrained, weight, target = general_problem()
  opt = spd.adam_ftp(5e-2, mu=5e-2, output_axes=general_output_axes)
  history, states = fine_tune(
      opt, jax.tree.map(jnp.asarray, pretrained),
      functools.partial(elementwise_loss, weight=weight, target=target), STEPS)
  ftp = ref.FTP(mu=5e-2)
  reference = ref.run(
      ref.Optimizer(ref.AdamW(5e-2), ftp), torch_layout(pretrained),
      functools.partial(elementwise_loss_and_grads, weight=torch_layout(weight),
                        target=torch_layout(target)), STEPS)

  for t, (params, expected) in enumerate(zip(history, reference)):
    chex.assert_trees_all_close(params, flax_layout(expected), atol=ATOL,
                                rtol=0, custom_message=f'after step {t}')
  chex.assert_trees_all_close(states[-1].gamma, ftp.gamma, atol=ATOL, rtol=0)
  # One inverse norm per output unit: (out,), (heads, head_dim), (out,).
  chex.assert_shape(states[-1].s_prev['conv'], (4,))
  chex.assert_shape(states[-1].s_prev['query'], (2, 3))
  chex.assert_shape(states[-1].s_prev['out'], (6,))
  chex.assert_shape(states[-1].s_prev['scale'], ())
  final = torch_layout(history[-1])
  for name in ('conv', 'query', 'out'):
    rows = ref.rownorm(final[name] - torch_layout(pretrained)[name]).ravel()
    gamma = ftp.gamma[name]
    assert np.all(rows <= gamma * (1 + 1e-9) + 1e-8), name
    # Each output unit is projected on its own: some on the radius, some in.
    assert np.any(rows > 0.999 * gamma) and np.any(rows < 0.9 * gamma), name


def test_output_axes_as_pytree_or_value_set_the_rows():
  params = jax.tree.map(jnp.asarray, general_problem()[0])
  row_shapes = lambda opt: jax.tree.map(
      lambda s: s.shape, jax.eval_shape(opt.init, params).s_prev)
  by_callable = row_shapes(spd.adam_ftp(1e-2, output_axes=general_output_axes))
  by_tree = row_shapes(spd.adam_ftp(1e-2, output_axes={
      'conv': 3, 'query': (1, 2), 'out': -1, 'scale': 0, 'bias': None}))
  assert by_callable == by_tree == {
      'conv': (4,), 'query': (2, 3), 'out': (6,), 'scale': (), 'bias': ()}
  # PyTorch's layout: the output units on the first axis.
  assert row_shapes(spd.adam_ftp(1e-2, output_axes=0)) == {
      'conv': (3,), 'query': (6,), 'out': (2,), 'scale': (), 'bias': ()}


# Stacked layers (nn.scan) and sharded leaves.


def chain_loss(kernels, biases, x):
  for kernel, bias in zip(kernels, biases):
    x = jnp.tanh(x @ kernel + bias)
  return jnp.mean((x - 0.5) ** 2)


def test_stacked_layers_match_separate_leaves(x64):
  del x64
  rng = np.random.default_rng(5)
  layers, width = 3, 5
  kernels = jnp.asarray(rng.normal(size=(layers, width, width)) / 2)
  biases = jnp.asarray(0.1 * rng.normal(size=(layers, width)))
  x = jnp.asarray(rng.normal(size=(16, width)))
  separate = {f'layer_{i}': {'kernel': kernels[i], 'bias': biases[i]}
              for i in range(layers)}
  stacked = {'kernel': kernels, 'bias': biases}

  def separate_loss(params):
    return chain_loss([params[f'layer_{i}']['kernel'] for i in range(layers)],
                      [params[f'layer_{i}']['bias'] for i in range(layers)], x)

  def stacked_loss(params):
    return chain_loss(params['kernel'], params['bias'], x)

  separate_history, separate_states = fine_tune(
      spd.adam_ftp(3e-2), separate, separate_loss, 30)
  stacked_history, stacked_states = fine_tune(
      spd.adam_ftp(3e-2, layer_axis=0), stacked, stacked_loss, 30)

  def stack(tree):
    return {leaf: jnp.stack([tree[f'layer_{i}'][leaf] for i in range(layers)])
            for leaf in ('kernel', 'bias')}

  for t in range(31):
    chex.assert_trees_all_close(stacked_history[t], stack(separate_history[t]),
                                atol=1e-12, rtol=0, custom_message=f'step {t}')
  for field in ('gamma', 'gamma_m', 'gamma_v', 's_prev'):
    chex.assert_trees_all_close(
        getattr(stacked_states[-1], field),
        stack(getattr(separate_states[-1], field)), atol=1e-12, rtol=0,
        custom_message=field)
  chex.assert_shape(stacked_states[-1].gamma['kernel'], (layers,))
  gammas = stacked_states[-1].gamma['kernel']
  assert np.ptp(np.asarray(gammas)) > 1e-3  # each layer its own radius


def test_shard_map_split_leaves_match_unsharded(x64):
  del x64
  mesh = jax.make_mesh((4,), ('data',))
  P = jax.sharding.PartitionSpec
  rng = np.random.default_rng(7)
  shapes = {'kernel': (8, 4), 'query': (8, 2, 3), 'bias': (4,)}
  pretrained = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
  weight = {k: jnp.asarray(rng.uniform(0.1, 2, size=s))
            for k, s in shapes.items()}
  target = {k: p + jnp.asarray(rng.normal(size=p.shape))
            for k, p in pretrained.items()}
  output_axes = lambda path, shape: (1, 2) if len(shape) == 3 else -1
  # The kernels split along their input axis, the bias replicated.
  specs = {'kernel': P('data'), 'query': P('data'), 'bias': P()}
  place = lambda tree: jax.tree.map(
      lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec)),
      tree, specs)

  def train(params, weight, target, axis_name):
    opt = spd.adam_ftp(5e-2, mu=2e-2, output_axes=output_axes,
                       axis_name=axis_name)

    def step(_, carry):
      params, state = carry
      # Leaf by leaf: the gradient of a replicated leaf from a loss summed over
      # split leaves would be summed over the devices.
      grads = jax.tree.map(
          lambda p, w, y: jax.grad(elementwise_loss)({'p': p}, {'p': w},
                                                     {'p': y})['p'],
          params, weight, target)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    params, state = jax.lax.fori_loop(0, 8, step, (params, opt.init(params)))
    return params, state.gamma

  expected = jax.jit(functools.partial(train, axis_name=None))(
      pretrained, weight, target)
  sharded = jax.jit(jax.shard_map(
      functools.partial(train, axis_name={'kernel': 'data', 'query': 'data',
                                          'bias': None}),
      mesh=mesh, in_specs=(specs, specs, specs),
      out_specs=(specs, {k: P() for k in shapes})))(
          place(pretrained), place(weight), place(target))
  chex.assert_trees_all_close(sharded, expected, atol=1e-12, rtol=0)


# Hyper-parameters: validation, schedules, inject_hyperparams.


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=-0.1), '`k`'),
    (dict(k=1.5), '`k`'),
    (dict(mu=0.0), '`mu`'),
    (dict(mu=-1e-2), '`mu`'),
])
def test_invalid_hyperparameters_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spd.fast_trainable_projection(optax.adam(1e-3), **kwargs)
  with pytest.raises(ValueError, match=message):
    spd.adam_ftp(1e-3, **kwargs)


def test_missing_base_optimizer_raises_at_once():
  with pytest.raises(TypeError, match='fast_trainable_projection wraps'):
    spd.fast_trainable_projection()
  with pytest.raises(TypeError, match='base optimizer'):
    spd.fast_trainable_projection(k=0.5)
  with pytest.raises(TypeError, match='base optimizer'):
    spd.fast_trainable_projection(0.5)


def test_update_without_params_raises():
  params = {'kernel': jnp.ones((3, 4))}
  # Around Adam, which needs no params itself (AdamW would raise first).
  opt = spd.fast_trainable_projection(optax.adam(1e-2))
  with pytest.raises(ValueError, match=optax_base.NO_PARAMS_MSG):
    opt.update(params, opt.init(params))


def test_invalid_axes_raise():
  params = {'kernel': jnp.ones((3, 4)), 'stacked': jnp.ones((2, 3, 4))}
  with pytest.raises(ValueError, match='`output_axes`'):
    spd.adam_ftp(1e-2, output_axes=2).init(params)
  with pytest.raises(ValueError, match='`layer_axis`'):
    spd.adam_ftp(1e-2, layer_axis={'kernel': None, 'stacked': 0},
                 output_axes=0).init(params)
  with pytest.raises(TypeError, match='static_args'):
    spd.adam_ftp(1e-2, output_axes=jnp.asarray(-1)).init(params)


def test_mu_schedule_matches_reference(x64):
  del x64
  schedule = lambda count: 5e-2 * 0.95 ** count
  params, loss, pretrained, ref_loss_and_grads = mlp_problem()
  history, states = fine_tune(
      spd.adam_ftp(1e-2, mu=schedule, mask=HEAD_EXCLUDED), params, loss, 30)
  ftp = ref.FTP(mu=schedule)
  reference = ref.run(
      ref.Optimizer(ref.AdamW(1e-2), ftp, excluded=('head_w', 'head_b')),
      pretrained, ref_loss_and_grads, 30)
  assert_mlp_matches_reference(history, states, reference, ftp)


def test_inject_hyperparams_matches_reference(x64):
  del x64
  kwargs, _ = TRAJECTORIES['adamw_k_half']
  params, loss, _, _ = mlp_problem()
  opt = optax.inject_hyperparams(spd.adam_ftp)(**kwargs, mask=HEAD_EXCLUDED)
  injected, states = fine_tune(opt, params, loss, 20)
  # k and mu arrive as arrays, traced under jit.
  assert isinstance(states[-1].hyperparams['k'], jax.Array)
  assert isinstance(states[-1].hyperparams['mu'], jax.Array)
  history, _, reference, _, _ = trajectory('adamw_k_half')
  chex.assert_trees_all_close(injected, history[:21], atol=1e-12, rtol=0)
  chex.assert_trees_all_close(to_torch(injected[-1]), reference[20],
                              atol=ATOL, rtol=0)

  # Integer axis options must be static there.
  stacked = {'kernel': jnp.ones((2, 3, 4))}
  with pytest.raises(TypeError, match='static_args'):
    jax.eval_shape(optax.inject_hyperparams(spd.adam_ftp)(
        1e-2, layer_axis=0).init, stacked)
  opt = optax.inject_hyperparams(spd.adam_ftp, static_args=('layer_axis',))(
      1e-2, layer_axis=0)
  chex.assert_shape(
      jax.eval_shape(opt.init, stacked).inner_state.gamma['kernel'], (2,))


class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_match_reference(self):
    pretrained, weight, target = general_problem()
    pretrained = {'conv': pretrained['conv']}
    with jax.enable_x64(True):
      history, states = fine_tune(
          spd.adam_ftp(5e-2, mu=0.1), jax.tree.map(jnp.asarray, pretrained),
          functools.partial(elementwise_loss, weight=weight, target=target),
          3, wrap=self.variant)
    ftp = ref.FTP(mu=0.1)
    reference = ref.run(
        ref.Optimizer(ref.AdamW(5e-2), ftp), torch_layout(pretrained),
        functools.partial(elementwise_loss_and_grads,
                          weight=torch_layout(weight),
                          target=torch_layout(target)), 3)
    for params, expected in zip(history, reference):
      chex.assert_trees_all_close(params, flax_layout(expected), atol=ATOL,
                                  rtol=0)
    chex.assert_trees_all_close(states[-1].gamma, ftp.gamma, atol=ATOL, rtol=0)


# State, masks, dtypes and degenerate steps.


def test_masked_head_gets_base_update_and_no_state():
  params, loss, _, _ = mlp_problem()
  opt, base = spd.adam_ftp(1e-2, mask=HEAD_EXCLUDED), optax.adamw(
      1e-2, weight_decay=0.0)
  # Each update jitted on its own, so both round alike.
  update, base_update = jax.jit(opt.update), jax.jit(base.update)
  grad = jax.jit(jax.grad(loss))
  state, base_state = opt.init(params), base.init(params)
  for field in ('anchor', 'gamma', 'gamma_m', 'gamma_v', 'c_prev', 's_prev'):
    for leaf in ('kernel', 'bias'):
      assert isinstance(getattr(state, field)['head'][leaf], optax.MaskedNode)
    assert not isinstance(getattr(state, field)['Dense_0']['kernel'],
                          optax.MaskedNode)
  chex.assert_shape(state.gamma['Dense_0']['kernel'], ())
  for _ in range(5):
    grads = grad(params)
    updates, state = update(grads, state, params)
    expected, base_state = base_update(grads, base_state, params)
    chex.assert_trees_all_equal(updates['head'], expected['head'])
    chex.assert_trees_all_equal(state.base_optimizer_state, base_state)
    assert not np.allclose(updates['Dense_0']['kernel'],
                           expected['Dense_0']['kernel'])
    params = optax.apply_updates(params, updates)


def test_bfloat16_params_keep_dtype_and_stay_finite():
  params, loss, _, _ = mlp_problem(jnp.bfloat16)
  opt = spd.adam_ftp(1e-2, mask=HEAD_EXCLUDED)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state, updates

  state, current = opt.init(params), params
  for _ in range(10):
    current, state, updates = step(current, state)
    chex.assert_trees_all_equal_dtypes(updates, params)
  chex.assert_trees_all_equal_dtypes(current, params)
  chex.assert_tree_all_finite((current, state))
  assert state.gamma['Dense_0']['kernel'].dtype == jnp.float32
  assert state.c_prev['Dense_0']['kernel'].dtype == jnp.bfloat16
  assert float(state.gamma['Dense_0']['kernel']) > 1e-3
  assert not np.array_equal(np.asarray(current['Dense_0']['kernel'], float),
                            np.asarray(params['Dense_0']['kernel'], float))


@pytest.mark.parametrize('make', [
    lambda: spd.adam_ftp(1e-2, layer_axis=lambda path, shape: (
        0 if path[-1] == 'stacked' else None)),
    lambda: spd.sgd_ftp(0.0, momentum=0.9),  # zero updates
])
def test_zero_and_empty_steps_produce_no_nan(make):
  params = {
      'kernel': jnp.zeros((3, 4)).at[:, 1].set(1.0),  # zero rows
      'empty_rows': jnp.zeros((0, 5)),
      'no_rows': jnp.zeros((5, 0)),
      'empty': jnp.zeros((0,)),
      'scalar': jnp.ones(()),
      'stacked': jnp.zeros((2, 3, 4)),
  }
  opt = make()
  update = jax.jit(opt.update)
  state = opt.init(params)
  rng = np.random.default_rng(0)
  for step in range(4):
    # Two zero gradients first (no update from Adam, h = 0), then real ones.
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * (step >= 2), p.dtype),
        params)
    updates, state = update(grads, state, params)
    chex.assert_tree_all_finite((updates, state))
    params = optax.apply_updates(params, updates)
  chex.assert_tree_all_finite(params)


def test_apply_if_finite_skips_a_nan_step_with_state_unchanged():
  params, loss, _, _ = mlp_problem()
  inner = spd.adam_ftp(1e-2, mask=HEAD_EXCLUDED)
  opt = optax.apply_if_finite(inner, 3)
  update, grad = jax.jit(opt.update), jax.jit(jax.grad(loss))
  state = opt.init(params)
  for _ in range(3):
    updates, state = update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
  # One NaN, in a projected leaf: FTP must let it show in the updates.
  bad_grads = grad(params)
  bad_grads['Dense_0']['kernel'] = bad_grads['Dense_0']['kernel'].at[0, 0].set(
      jnp.nan)
  skipped_updates, skipped_state = update(bad_grads, state, params)
  chex.assert_trees_all_equal(skipped_updates,
                              jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(skipped_state.inner_state, state.inner_state)
  assert int(skipped_state.notfinite_count) == 1
  # apply_if_finite tests the gradients; FTP's own updates show the NaN too,
  # for checks made on the updates (MultiSteps' should_skip_update_fn).
  bad_updates, _ = jax.jit(inner.update)(bad_grads, state.inner_state, params)
  assert not np.all(np.isfinite(bad_updates['Dense_0']['kernel']))
  updates, resumed = update(grad(params), skipped_state, params)
  chex.assert_tree_all_finite(updates)
  assert int(resumed.inner_state.count) == 4
