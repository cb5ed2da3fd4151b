"""The two-pass Adam-SPD step: moments and sums in one pass, nothing between.

`adam_spd` writes Adam's moments and takes SPD's per-leaf sums in one pass,
recomputing Adam's update from the moments (on CPU a large leaf's pass is a
loop over chunks: `_common.reduce_leaf_writing`), and writes the constrained
update in a second. These tests prove that this is still SPD around
`optax.adam` (the same decisions as the generic wrapper and its values to
the last bits in float32, to 1e-10 in float64 and against the float64
reference), that the chunked sums are the sums, and that the compiled step
keeps no leaf-sized temporary. `adam_ftp`'s loop (moments, the deviation
and its row norms, `_common.reduce_rows_writing`) is checked against
`fast_trainable_projection(optax.adamw(...))` the same way; and a leaf split
across devices is never looped over (XLA would gather it on every device).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax as spd
from spd_optax import _common
import reference_spd as ref

# Smaller chunks than the library's, so the leaves that loop stay small.
CHUNK = 1 << 14


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  monkeypatch.setattr(_common, '_SUM_CHUNK', CHUNK)
  # CI fakes 8 devices, where the loops are off: these leaves are not split.
  monkeypatch.setattr(_common, '_LOOP_ON_MANY_DEVICES', True)

# Leaves of more than two chunks (the loop runs), one with a tail of whole
# 8-element rows, one with a ragged tail, and a small one (no loop).
SHAPES = {'w': (CHUNK // 256 * 2 + 37, 256), 'v': (3, CHUNK + 1001),
          'b': (17,)}
LEARNING_RATE = 0.05


def leaf_values(seed, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {name: np.asarray(scale * rng.normal(size=shape), dtype)
          for name, shape in SHAPES.items()}


def gradients(params, anchor, noise, step):
  """Along the deviation from the anchor, the sign flipping: SPD fires on
  the steps where it points away from the anchor (and not at the first)."""
  sign = -1.0 if step % 3 == 2 else 1.0
  return {name: sign * (params[name] - anchor[name] + 0.05 * noise[name])
          for name in params}


def run(opt, steps, dtype, zero_anchor=False, params=None, noise=None):
  """`steps` jitted updates of `opt` (params and noise: `leaf_values`'s
  unless given); the params and state after each step."""
  params = leaf_values(0, 0.02, dtype) if params is None else params
  anchor = jax.tree.map(np.zeros_like, params) if zero_anchor else params
  noise = leaf_values(1, 1.0, dtype) if noise is None else noise
  state = opt.init(jax.tree.map(jnp.asarray, params))
  step_fn = jax.jit(opt.update)
  history, states = [], []
  for t in range(steps):
    grads = jax.tree.map(lambda g: np.asarray(g, dtype),
                         gradients(params, anchor, noise, t))
    updates, state = step_fn(grads, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u, dtype), params,
                          updates)
    history.append(params)
    states.append(state)
  return history, states


def assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close(a, b, atol, rtol=0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64),
                               np.asarray(y, np.float64), rtol=rtol, atol=atol)


# The alias against the generic wrapper in float32: the same decisions every
# step, and the same values up to the last bits (XLA rounds Adam's scalar
# factors differently in the two programs: a few ulps of the params).
@pytest.mark.parametrize('config', [
    dict(),
    dict(learning_rate=optax.linear_schedule(0.05, 0.01, 5)),
    dict(mu_dtype=jnp.bfloat16),  # moments cast: Adam's own update is used
    dict(mask={'w': True, 'v': False, 'b': True}),
])
def test_adam_spd_is_spd_around_optax_adam(config):
  config = dict(config)
  learning_rate = config.pop('learning_rate', LEARNING_RATE)
  wrapper_args = {k: config.pop(k) for k in ('anchor', 'mask') if k in config}
  fused = spd.adam_spd(learning_rate, 0.8, **config, **wrapper_args)
  generic = spd.selective_projection_decay(
      optax.adam(learning_rate, **config), 0.8, **wrapper_args)
  history, states = run(fused, 6, np.float32)
  expected, expected_states = run(generic, 6, np.float32)
  fired = [bool(s) for st in states for s in jax.tree.leaves(st.selected)]
  assert any(fired) and not all(fired), fired
  for got, want in zip(states, expected_states):
    assert_bitwise(got.selected, want.selected)
    assert_close(got.base_optimizer_state, want.base_optimizer_state, 1e-6)
    assert_close(got.ratio, want.ratio, 1e-5)
  assert_close(history, expected, 1e-6)


@pytest.mark.parametrize('config', [
    dict(), dict(nesterov=True), dict(eps_root=1e-10), dict(anchor='zero')])
def test_adam_spd_on_large_leaves_matches_float64(config):
  steps = 8
  zero = config.get('anchor') == 'zero'
  with jax.enable_x64(True):
    history, states = run(spd.adam_spd(LEARNING_RATE, 0.8, **config), steps,
                          np.float64, zero)
    # The reference has no Nesterov nor eps_root: those are compared with
    # the generic wrapper around optax.adam, which test_spd checks.
    adam_args = {k: v for k, v in config.items() if k != 'anchor'}
    expected, expected_states = run(spd.selective_projection_decay(
        optax.adam(LEARNING_RATE, **adam_args), 0.8,
        anchor=config.get('anchor', 'init')), steps, np.float64, zero)
  fired = []
  for t in range(steps):
    for name in SHAPES:
      np.testing.assert_allclose(history[t][name], expected[t][name], rtol=0,
                                 atol=1e-10)
      selected = bool(states[t].selected[name])
      assert selected == bool(expected_states[t].selected[name]), (t, name)
      fired.append(selected)
  assert any(fired) and not all(fired), fired
  if config and not zero:
    return
  params = leaf_values(0, 0.02, np.float64)
  noise = leaf_values(1, 1.0, np.float64)
  anchor = jax.tree.map(np.zeros_like, params) if zero else params
  reference = ref.Spd(ref.Adam(LEARNING_RATE), 0.8,
                      anchor=config.get('anchor', 'init'))
  reference.init(params)
  for t in range(steps):
    step = reference.update(gradients(params, anchor, noise, t), params)
    params = {name: p + step.updates[name] for name, p in params.items()}
    for name in SHAPES:
      np.testing.assert_allclose(history[t][name], params[name], rtol=0,
                                 atol=1e-10)
      assert bool(states[t].selected[name]) == step.selected[name], (t, name)


@pytest.mark.parametrize('size', [2 * CHUNK, 2 * CHUNK + 8 * 77,
                                  3 * CHUNK + 5, CHUNK])
def test_chunked_sums_are_the_sums(size):
  rng = np.random.default_rng(size)
  with jax.enable_x64(True):
    x, y = (jnp.asarray(rng.normal(size=size)) for _ in range(2))
    terms = lambda x, y: (x * y, jnp.sqrt(jnp.abs(x)) / (y * y + 1.0))
    got = jax.jit(lambda x, y: _common.reduce_leaf(terms, (x, y), ()))(x, y)
    want = (np.sum(np.asarray(x) * np.asarray(y)),
            np.sum(np.sqrt(np.abs(np.asarray(x)))
                   / (np.asarray(y) ** 2 + 1.0)))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_chunked_sums_keep_axes_and_psum_like_reduce_sums():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3 * CHUNK // 4)),
                  jnp.float32)
  terms = lambda x: (x * x, jnp.abs(x))
  got = _common.reduce_leaf(terms, (x,), (0,))
  want = _common.reduce_sums(terms(x), (0,))
  assert_bitwise(got, want)
  mesh = jax.make_mesh((2,), ('data',))
  split = jax.jit(jax.shard_map(
      lambda x: _common.reduce_leaf(terms, (x,), (), 'data'),
      mesh=mesh, in_specs=jax.P('data'), out_specs=jax.P()))
  flat = jax.device_put(x.reshape(-1), jax.NamedSharding(mesh, jax.P('data')))
  np.testing.assert_allclose(split(flat),
                             [np.sum(np.square(x)), np.sum(np.abs(x))],
                             rtol=1e-5)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU layout')
def test_donated_step_keeps_no_leaf_sized_temporary():
  params = {'kernel': jax.ShapeDtypeStruct((768, 3072), jnp.float32)}
  leaf_bytes = 768 * 3072 * 4

  def temporaries(opt):
    state = jax.eval_shape(opt.init, params)

    def step(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
    jaxpr = jax.make_jaxpr(step)(params, state, params)
    assert 'callback' not in str(jaxpr)
    return lowered.compile().memory_analysis().temp_size_in_bytes

  # The generic wrapper must keep Adam's update between its passes; the
  # alias recomputes it in the sums' pass and keeps nothing leaf-sized.
  assert temporaries(spd.selective_projection_decay(optax.adam(1e-3), 0.5)
                     ) >= leaf_bytes
  assert temporaries(spd.adam_spd(1e-3, 0.5)) < leaf_bytes // 50


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (faked) devices')
@pytest.mark.parametrize('axis_type', ['Auto', 'Explicit'])
@pytest.mark.parametrize('spec', [jax.P(None, 'fsdp'), jax.P('fsdp', None)])
def test_sharded_step_gathers_no_leaf(monkeypatch, axis_type, spec):
  """An FSDP-split leaf is not gathered onto every device (SPD and FTP).

  The chunk loops index a leaf as one flat buffer, which XLA's partitioner
  can only do by gathering it (and its moments) whole on each device; with
  more than one device they are off, and each device reads its own block.
  """
  monkeypatch.setattr(_common, '_LOOP_ON_MANY_DEVICES', False)
  mesh = jax.make_mesh((8,), ('fsdp',),
                       axis_types=(getattr(jax.sharding.AxisType, axis_type),))
  shape = (256, 8 * CHUNK // 256)  # 8 chunks: the loop's size
  leaf_elements = shape[0] * shape[1]
  params = {'kernel': jax.device_put(jnp.full(shape, 0.01, jnp.float32),
                                     jax.NamedSharding(mesh, spec))}
  for opt in (spd.adam_spd(1e-3, 0.5),
              spd.selective_projection_decay(optax.adam(1e-3), 0.5),
              spd.adam_ftp(1e-3)):
    state = opt.init(params)

    def step(params, state, grads, opt=opt):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, params).compile()
    hlo = compiled.as_text()
    gathered = [
        np.prod([int(d) for d in dims.split(',') if d], dtype=np.int64)
        for dims in re.findall(r'= \w+\[([\d,]*)\]\S* all-gather\(', hlo)]
    assert all(size < leaf_elements // 8 for size in gathered), gathered
    assert (compiled.memory_analysis().temp_size_in_bytes
            < leaf_elements * 4 // 4)
    new_params, _ = jax.jit(step)(params, state, params)
    # Adam's first step is -lr sign(g); SPD does not decay at the first
    # step, and FTP's radius starts at 1e-8 (the params stay at the anchor).
    moved = 0.0 if isinstance(state, spd.FastTrainableProjectionState) else 1e-3
    np.testing.assert_allclose(np.asarray(new_params['kernel']), 0.01 - moved,
                               rtol=1e-4)


def test_chunk_loops_run_only_on_one_device(monkeypatch):
  """With several devices and the switch off, no leaf is looped over; with
  one device, or the switch on, a large unsplit leaf is."""
  leaf = jnp.zeros((8 * CHUNK,), jnp.float32)
  assert _common.loops_over_chunks(leaf, ())
  monkeypatch.setattr(_common, '_LOOP_ON_MANY_DEVICES', False)
  assert _common.loops_over_chunks(leaf, ()) == (jax.device_count() == 1)


# adam_ftp's leaves: a Dense kernel and an attention kernel (output axes
# (1, 2)) the chunk loop takes, one whose leading axis does not split into
# equal chunks, and a bias (a single row).
FTP_SHAPES = {'dense': (CHUNK // 256 * 2 + 37, 256), 'att': (64, 8, 64),
              'ragged': (3, CHUNK + 1001), 'b': (17,)}
FTP_AXES = lambda path, shape: (1, 2) if path[-1] == 'att' else -1


def run_ftp(opt, steps, dtype, zero_anchor=False):
  rng = np.random.default_rng(0)
  params = {k: np.asarray(0.02 * rng.normal(size=s), dtype)
            for k, s in FTP_SHAPES.items()}
  noise = {k: np.asarray(rng.normal(size=s), dtype)
           for k, s in FTP_SHAPES.items()}
  return run(opt, steps, dtype, zero_anchor, params=params, noise=noise)


@pytest.mark.parametrize('config', [
    dict(), dict(weight_decay=0.01), dict(anchor='zero'),
    dict(nesterov=True, learning_rate=optax.linear_schedule(0.05, 0.01, 5))])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_adam_ftp_is_ftp_around_optax_adamw(config, dtype):
  """The looped adam_ftp is FTP around optax.adamw: same radii and params to
  float32 rounding (1e-10 in float64), on leaves the loop takes and not."""
  config = dict(config)
  learning_rate = config.pop('learning_rate', 0.05)
  anchor = config.pop('anchor', 'init')
  fused = spd.adam_ftp(learning_rate, output_axes=FTP_AXES, anchor=anchor,
                       **config)
  # adam_ftp's decay defaults to none, optax.adamw's to 1e-4.
  generic = spd.fast_trainable_projection(
      optax.adamw(learning_rate, **{'weight_decay': 0.0, **config}),
      output_axes=FTP_AXES, anchor=anchor)
  with jax.enable_x64(dtype == np.float64):
    params = {k: jnp.zeros(s, dtype) for k, s in FTP_SHAPES.items()}
    jaxpr = str(jax.make_jaxpr(fused.update)(params, fused.init(params),
                                             params))
    loops = jaxpr.count('while[') + jaxpr.count('scan[')
    assert loops == 2, 'dense and att loop, the others not'
    history, states = run_ftp(fused, 6, dtype, anchor == 'zero')
    expected, expected_states = run_ftp(generic, 6, dtype, anchor == 'zero')
  # Float32: XLA rounds Adam's scalar factors differently in the two
  # programs (as for adam_spd); the inverse norms of short rows (3 elements
  # in `ragged`) amplify that.
  atol = 1e-6 if dtype == np.float32 else 1e-10
  for got, want in zip(states, expected_states):
    assert_close(got.gamma, want.gamma, atol)
    assert_close(got.s_prev, want.s_prev, 0, rtol=100 * atol)
    assert_close(got.c_prev, want.c_prev, atol)
    assert_close(got.base_optimizer_state, want.base_optimizer_state, atol)
  assert_close(history, expected, atol)
  # The radius moved: the comparison is not of two frozen projections.
  assert len({float(np.asarray(s.gamma['dense'])) for s in states}) > 3
