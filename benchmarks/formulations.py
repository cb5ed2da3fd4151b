r"""Which formulation of the SPD / FTP step does XLA:CPU run fastest?

Prototypes of the Adam-SPD and Adam-FTP update as standalone functions with
the library's state layout, timed against `optax.adamw` on the ViT params
tree (donated jitted step, interleaved rounds, medians, ratios from the same
rounds), with the compiled program's kernels, bytes moved (`_hlo.py`),
temporaries (XLA's memory analysis) and minor page faults per step.

  python benchmarks/formulations.py                      # ViT-B/16 float32
  python benchmarks/formulations.py --only spd_lib,spd_barrier --repeats 10

Writes `benchmarks/results/formulations.json`.
"""

import argparse
import functools
import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _harness  # pylint: disable=g-bad-import-order
import _hlo
import _vit_params

spd = _harness.spd
from spd_optax import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

LR = _harness.LEARNING_RATE
DECAY = 0.5


def _leafwise(fn, *trees):
  return jax.tree.map(fn, *trees)


# --- SPD formulations ------------------------------------------------------
# Each takes the state of `spd.adam_spd(LR, DECAY)` and returns
# (new_updates, new_state) with the same layout.


def _spd_decision(progress, proposed_sq, deviation_sq):
  selected = progress > 0
  proposed_norm = jnp.sqrt(proposed_sq)
  ratio = jnp.clip(_common.safe_div(proposed_norm - jnp.sqrt(deviation_sq),
                                    proposed_norm), 0, 1)
  return selected, jnp.where(selected, ratio, 0)


def _sums_stacked(grad, param, anchor, update):
  """The three sums from one single-output reduction (XLA may give it to YNN)."""
  deviation = param - anchor
  proposed = deviation + update
  terms = jnp.stack([(grad * deviation).reshape(-1),
                     (proposed * proposed).reshape(-1),
                     (deviation * deviation).reshape(-1)], axis=-1)
  sums = jnp.sum(terms, axis=0)
  return sums[0], sums[1], sums[2]


def _sums_three(grad, param, anchor, update):
  """The three sums as three plain reductions."""
  deviation = param - anchor
  proposed = deviation + update
  return (jnp.sum(grad * deviation), jnp.sum(proposed * proposed),
          jnp.sum(deviation * deviation))


def _sums_two(grad, param, anchor, update):
  """<g, d> and ||d||^2 stacked (no u); ||d + u||^2 alone."""
  deviation = param - anchor
  proposed = deviation + update
  pair = jnp.sum(jnp.stack([(grad * deviation).reshape(-1),
                            (deviation * deviation).reshape(-1)], -1), 0)
  return pair[0], jnp.sum(proposed * proposed), pair[1]


def _sums_variadic(grad, param, anchor, update):
  """The library's reduction (`_common.reduce_sums`)."""
  deviation = param - anchor
  proposed = deviation + update
  return _common.reduce_sums(
      (grad * deviation, proposed * proposed, deviation * deviation), ())


SUMS = {'stacked': _sums_stacked, 'three': _sums_three, 'two': _sums_two,
        'variadic': _sums_variadic}


def spd_barrier(sums='stacked', second_from='barrier'):
  """Two passes for any base optimizer: the base update is evaluated twice.

  Pass 1 evaluates `base.update` only for the sums (XLA fuses the whole base
  update into the reduction: nothing leaf-sized is written); an
  optimization barrier then orders pass 2 after the sums, where `base.update`
  runs again on the same inputs: its state is the new state (written in
  place) and its update feeds the final write only.
  """
  base = optax.adam(LR)
  sums_fn = SUMS[sums]

  def update(grads, state, params):
    base_updates, _ = base.update(grads, state.base_optimizer_state, params)
    decay = DECAY

    def leaf_sums(g, p, a, u):
      return sums_fn(g, p, a, u)

    stats = jax.tree.map(leaf_sums, grads, params, state.anchor, base_updates)
    is_tuple = lambda x: isinstance(x, tuple)
    decisions = jax.tree.map(lambda s: _spd_decision(*s), stats,
                             is_leaf=is_tuple)
    if second_from == 'barrier':
      decisions, grads2, base_state2, params2, anchor2 = (
          jax.lax.optimization_barrier(
              (decisions, grads, state.base_optimizer_state, params,
               state.anchor)))
    else:
      grads2, base_state2, params2, anchor2 = (
          grads, state.base_optimizer_state, params, state.anchor)
    base_updates2, base_state = base.update(grads2, base_state2, params2)

    def final(u, p, a, decision):
      _, ratio = decision
      shrink = decay * ratio
      return u + shrink * ((a - p) - u)

    new_updates = jax.tree.map(final, base_updates2, params2, anchor2,
                               decisions, is_leaf=None)
    selected = jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple)
    ratio = jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count),
        base_optimizer_state=base_state, selected=selected, ratio=ratio)

  return update


def spd_recompute(sums='stacked'):
  """Adam-specific: pass 2 recomputes `u` from the NEW moments (barrier'd)."""
  base = optax.adam(LR)
  sums_fn = SUMS[sums]

  def adam_u(mu, nu, count):
    bc1 = 1 - 0.9 ** count.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count.astype(jnp.float32)
    return jax.tree.map(
        lambda m, v: -LR * ((m / bc1) / (jnp.sqrt(v / bc2) + 1e-8)), mu, nu)

  def update(grads, state, params):
    base_updates, base_state = base.update(grads, state.base_optimizer_state,
                                           params)
    stats = jax.tree.map(sums_fn, grads, params, state.anchor, base_updates)
    is_tuple = lambda x: isinstance(x, tuple)
    decisions = jax.tree.map(lambda s: _spd_decision(*s), stats,
                             is_leaf=is_tuple)
    adam_state = base_state[0]
    decisions, mu, nu, count, params2, anchor2 = jax.lax.optimization_barrier(
        (decisions, adam_state.mu, adam_state.nu, adam_state.count, params,
         state.anchor))
    updates2 = adam_u(mu, nu, count)

    def final(u, p, a, decision):
      return u + DECAY * decision[1] * ((a - p) - u)

    new_updates = jax.tree.map(final, updates2, params2, anchor2, decisions)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), base_optimizer_state=base_state,
        selected=jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple),
        ratio=jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple))

  return update


def spd_split(sums_from='new', separate=True):
  """Adam-specific: each sum its own single-output reduction (XLA:CPU gives
  those to YNNPACK, which vectorizes the divide and square root), each from
  its own copy of the inputs so no shared subexpression is materialized;
  pass 2 recomputes `u` from the new moments."""
  base = optax.adam(LR)

  def adam_u(mu, nu, count, tags):
    bc1 = 1 - 0.9 ** count.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count.astype(jnp.float32)

    def leaf(m, v, tag):
      # One set of scalars per leaf and use: a broadcast shared by two
      # fusions is written out leaf-sized for YNNPACK.
      zero = 0 * jnp.where(jnp.isfinite(tag), tag, 0).astype(jnp.float32)
      lr, eps, c1, c2 = (-LR + zero, 1e-8 + zero, bc1 + zero, bc2 + zero)
      return lr * ((m / c1) / (jnp.sqrt(v / c2) + eps))
    return jax.tree.map(leaf, mu, nu, tags)

  def fresh(*xs):
    return jax.lax.optimization_barrier(xs) if separate else xs

  def update(grads, state, params):
    _, base_state = base.update(grads, state.base_optimizer_state, params)
    adam_state = base_state[0]
    is_tuple = lambda x: isinstance(x, tuple)

    def leaf_sums(g, p, a, m, v):
      del m, v
      g1, p1, a1 = fresh(g, p, a)
      progress = jnp.sum(g1 * (p1 - a1))
      p2, a2 = fresh(p, a)
      deviation_sq = jnp.sum((p2 - a2) * (p2 - a2))
      return progress, deviation_sq

    stats = jax.tree.map(leaf_sums, grads, params, state.anchor,
                         adam_state.mu, adam_state.nu)
    mu3, nu3, count3, p3, a3 = fresh(adam_state.mu, adam_state.nu,
                                     adam_state.count, params, state.anchor)
    u3 = adam_u(mu3, nu3, count3, state.ratio)
    proposed_sq = jax.tree.map(
        lambda p, a, u: jnp.sum((p - a + u) * (p - a + u)), p3, a3, u3)
    decisions = jax.tree.map(
        lambda s, q: _spd_decision(s[0], q, s[1]), stats, proposed_sq,
        is_leaf=is_tuple)
    decisions, mu, nu, count, params2, anchor2 = jax.lax.optimization_barrier(
        (decisions, adam_state.mu, adam_state.nu, adam_state.count, params,
         state.anchor))
    updates2 = adam_u(mu, nu, count, jax.tree.map(
        lambda d: d[1], decisions, is_leaf=is_tuple))

    def final(u, p, a, decision):
      return u + DECAY * decision[1] * ((a - p) - u)

    new_updates = jax.tree.map(final, updates2, params2, anchor2, decisions)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), base_optimizer_state=base_state,
        selected=jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple),
        ratio=jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple))

  return update


def _sum_rows8(terms):
  """Sums of same-shaped terms, XLA:CPU-vectorized: rows of 8, then the rest.

  A fused reduction whose inner loop is 8 long is unrolled by LLVM and its
  outer loop vectorized (divide and square root included); any longer, or
  nested, and the loop runs scalar.
  """
  size = terms[0].size
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  add = lambda x, y: tuple(a + b for a, b in zip(x, y))
  terms = tuple(t.reshape(-1) for t in terms)
  while size >= 1 << 12 and size % 8 == 0:
    terms = jax.lax.reduce(tuple(t.reshape(-1, 8) for t in terms), zeros, add,
                           (1,))
    size //= 8
  return jax.lax.reduce(terms, zeros, add, (0,))


def spd_rows8(chain=False):
  """Adam-specific: pass 1 one native variadic reduction in rows of 8 (the
  divide and square root vectorized), pass 2 recomputes `u` from the new
  moments."""
  base = optax.adam(LR)

  def adam_u(mu, nu, count):
    bc1 = 1 - 0.9 ** count.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count.astype(jnp.float32)
    return jax.tree.map(
        lambda m, v: -LR * ((m / bc1) / (jnp.sqrt(v / bc2) + 1e-8)), mu, nu)

  def update(grads, state, params):
    base_updates, base_state = base.update(grads, state.base_optimizer_state,
                                           params)
    adam_state = base_state[0]
    is_tuple = lambda x: isinstance(x, tuple)

    def leaf_sums(g, p, a, u):
      d = p - a
      w = d + u
      return _sum_rows8((g * d, w * w, d * d))

    if chain:
      # Each leaf's sums before the next leaf's: the partial sums of one
      # leaf at a time are live, so XLA reuses one small buffer for them.
      leaves_g, treedef = jax.tree.flatten(grads)
      leaves_p = treedef.flatten_up_to(params)
      leaves_a = treedef.flatten_up_to(state.anchor)
      leaves_u = treedef.flatten_up_to(base_updates)
      out, previous = [], None
      for g, p, a, u in zip(leaves_g, leaves_p, leaves_a, leaves_u):
        if previous is not None:
          previous, g, p, a, u = jax.lax.optimization_barrier(
              (previous, g, p, a, u))
        previous = leaf_sums(g, p, a, u)
        out.append(previous)
      stats = jax.tree.unflatten(treedef, out)
    else:
      stats = jax.tree.map(leaf_sums, grads, params, state.anchor,
                           base_updates)
    decisions = jax.tree.map(lambda s: _spd_decision(*s), stats,
                             is_leaf=is_tuple)
    decisions, mu, nu, count, params2, anchor2 = jax.lax.optimization_barrier(
        (decisions, adam_state.mu, adam_state.nu, adam_state.count, params,
         state.anchor))
    updates2 = adam_u(mu, nu, count)

    def final(u, p, a, decision):
      return u + DECAY * decision[1] * ((a - p) - u)

    new_updates = jax.tree.map(final, updates2, params2, anchor2, decisions)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), base_optimizer_state=base_state,
        selected=jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple),
        ratio=jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple))

  return update


def _sum_chunked(terms_fn, arrays, chunk):
  """`_sum_rows8(terms_fn(*arrays))`, a chunk of the leaf at a time.

  The row sums of one chunk live in cache; the leaf-sized work is one read of
  each array, in a `fori_loop` over chunks.
  """
  size = arrays[0].size
  if size % chunk or size < 2 * chunk:
    return _sum_rows8(terms_fn(*arrays))
  rows = tuple(x.reshape(size // chunk, chunk) for x in arrays)
  dtype = jnp.result_type(*arrays)
  n_terms = len(jax.eval_shape(terms_fn, *[
      jax.ShapeDtypeStruct((chunk,), x.dtype) for x in arrays]))

  def body(i, sums):
    pieces = tuple(jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
                   for x in rows)
    part = _sum_rows8(terms_fn(*pieces))
    return tuple(s + q for s, q in zip(sums, part))

  zeros = tuple(jnp.zeros((), dtype) for _ in range(n_terms))
  return jax.lax.fori_loop(0, size // chunk, body, zeros)


def spd_chunked(chunk=1 << 17):
  """Adam-specific: as `spd_rows8`, the sums pass a loop over chunks."""
  base = optax.adam(LR)

  def adam_u(mu, nu, count):
    bc1 = 1 - 0.9 ** count.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count.astype(jnp.float32)
    return jax.tree.map(
        lambda m, v: -LR * ((m / bc1) / (jnp.sqrt(v / bc2) + 1e-8)), mu, nu)

  def terms(g, p, a, m, v, bc1, bc2):
    d = p - a
    w = d + (-LR * ((m / bc1) / (jnp.sqrt(v / bc2) + 1e-8)))
    return (g * d, w * w, d * d)

  def update(grads, state, params):
    _, base_state = base.update(grads, state.base_optimizer_state, params)
    adam_state = base_state[0]
    is_tuple = lambda x: isinstance(x, tuple)
    count = adam_state.count
    bc1 = 1 - 0.9 ** count.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count.astype(jnp.float32)

    def leaf_sums(g, p, a, m, v):
      fn = lambda g, p, a, m, v: terms(g, p, a, m, v, bc1, bc2)
      return _sum_chunked(fn, (g, p, a, m, v), chunk)

    stats = jax.tree.map(leaf_sums, grads, params, state.anchor,
                         adam_state.mu, adam_state.nu)
    decisions = jax.tree.map(lambda s: _spd_decision(*s), stats,
                             is_leaf=is_tuple)
    decisions, mu, nu, count, params2, anchor2 = jax.lax.optimization_barrier(
        (decisions, adam_state.mu, adam_state.nu, adam_state.count, params,
         state.anchor))
    updates2 = adam_u(mu, nu, count)

    def final(u, p, a, decision):
      return u + DECAY * decision[1] * ((a - p) - u)

    new_updates = jax.tree.map(final, updates2, params2, anchor2, decisions)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), base_optimizer_state=base_state,
        selected=jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple),
        ratio=jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple))

  return update


def spd_loop(chunk=1 << 16):
  """Adam-specific, pass 1 one loop over chunks that writes Adam's moments
  in place (dynamic_update_slice) and sums the chunk: a multi-output pass
  XLA:CPU's fusion cannot make (12 words instead of 16)."""
  adam = optax.scale_by_adam()

  def update(grads, state, params):
    adam_state = state.base_optimizer_state[0]
    count_inc = optax.safe_increment(adam_state.count)
    is_tuple = lambda x: isinstance(x, tuple)

    bc1 = 1 - 0.9 ** count_inc.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count_inc.astype(jnp.float32)

    def leaf(g, p, a, m, v):
      shape = g.shape
      size = g.size
      fl = [x.reshape(-1) for x in (g, p, a, m, v)]
      if size % chunk or size < 2 * chunk:
        u, st = adam.update(g, optax.ScaleByAdamState(adam_state.count, m, v))
        u = -LR * u
        d = p - a
        w = d + u
        return st.mu, st.nu, _sum_rows8((g * d, w * w, d * d))

      def body(i, carry):
        m_all, v_all, sums = carry
        start = i * chunk
        gs, ps, as_, ms, vs = (jax.lax.dynamic_slice_in_dim(x, start, chunk)
                               for x in (fl[0], fl[1], fl[2], m_all, v_all))
        _, st = adam.update(gs, optax.ScaleByAdamState(adam_state.count, ms,
                                                        vs))
        m_all = jax.lax.dynamic_update_slice_in_dim(m_all, st.mu, start, 0)
        v_all = jax.lax.dynamic_update_slice_in_dim(v_all, st.nu, start, 0)
        # Read back the chunk just written: no reader of the old chunk is
        # left after the in-place write, so XLA copies nothing.
        ms, vs = (jax.lax.dynamic_slice_in_dim(x, start, chunk)
                  for x in (m_all, v_all))
        u = -LR * ((ms / bc1) / (jnp.sqrt(vs / bc2) + 1e-8))
        d = ps - as_
        w = d + u
        part = _sum_rows8((gs * d, w * w, d * d))
        return m_all, v_all, tuple(s + q for s, q in zip(sums, part))

      zeros = (jnp.zeros((), g.dtype),) * 3
      m_all, v_all, sums = jax.lax.fori_loop(0, size // chunk, body,
                                             (fl[3], fl[4], zeros))
      return m_all.reshape(shape), v_all.reshape(shape), sums

    out = jax.tree.map(leaf, grads, params, state.anchor, adam_state.mu,
                       adam_state.nu)
    mu = jax.tree.map(lambda o: o[0], out, is_leaf=is_tuple)
    nu = jax.tree.map(lambda o: o[1], out, is_leaf=is_tuple)
    decisions = jax.tree.map(lambda o: _spd_decision(*o[2]), out,
                             is_leaf=is_tuple)
    bc1 = 1 - 0.9 ** count_inc.astype(jnp.float32)
    bc2 = 1 - 0.999 ** count_inc.astype(jnp.float32)

    def final(m, v, p, a, decision):
      u = -LR * ((m / bc1) / (jnp.sqrt(v / bc2) + 1e-8))
      return u + DECAY * decision[1] * ((a - p) - u)

    new_updates = jax.tree.map(final, mu, nu, params, state.anchor, decisions)
    base_state = (optax.ScaleByAdamState(count_inc, mu, nu),
                  state.base_optimizer_state[1])
    return new_updates, state._replace(
        count=optax.safe_increment(state.count), base_optimizer_state=base_state,
        selected=jax.tree.map(lambda d: d[0], decisions, is_leaf=is_tuple),
        ratio=jax.tree.map(lambda d: d[1], decisions, is_leaf=is_tuple))

  return update


# --- the registry ------------------------------------------------------------


def _library(name):
  method = _harness.METHODS[name]
  opt = _harness.make_optimizer(method)
  return opt, opt.update


def _prototype(update, like='adam_spd'):
  opt = _harness.make_optimizer(_harness.METHODS[like])
  return opt, update


def _library_chunk(name, chunk, unroll=None):
  """The library's method, its CPU sums loop over `chunk`-element chunks."""

  def make():
    opt, update = _library(name)

    def chunked_update(*args):
      saved = _common._SUM_CHUNK  # pylint: disable=protected-access
      _common._SUM_CHUNK = chunk  # pylint: disable=protected-access
      try:
        return update(*args)
      finally:
        _common._SUM_CHUNK = saved  # pylint: disable=protected-access

    return opt, chunked_update

  return make


def _library_patched(name, **constants):
  """The library's method traced with `_common`'s constants patched."""

  def make():
    opt, update = _library(name)

    def patched_update(*args):
      saved = {k: getattr(_common, k) for k in constants}
      for k, v in constants.items():
        setattr(_common, k, v)
      try:
        return update(*args)
      finally:
        for k, v in saved.items():
          setattr(_common, k, v)

    return opt, patched_update

  return make


FORMULATIONS = {
    'optax.adamw': lambda: _library('optax.adamw'),
    'spd_lib': lambda: _library('adam_spd'),
    'spd_lib_c15': _library_chunk('adam_spd', 1 << 15),
    # The moments written by their own (threaded) kernels, the chunk loop
    # only summing: 16 words instead of 12.
    'spd_lib_sums_loop': _library_patched(
        'adam_spd', loops_over_chunks=lambda leaf, kept: False),
    'spd_lib_c17': _library_chunk('adam_spd', 1 << 17),
    'spd_lib_c18': _library_chunk('adam_spd', 1 << 18),
    'spd_lib_c20': _library_chunk('adam_spd', 1 << 20),
    'ftp_lib': lambda: _library('adam_ftp'),
    'spd_barrier_stacked': lambda: _prototype(spd_barrier('stacked')),
    'spd_barrier_three': lambda: _prototype(spd_barrier('three')),
    'spd_barrier_two': lambda: _prototype(spd_barrier('two')),
    'spd_barrier_variadic': lambda: _prototype(spd_barrier('variadic')),
    'spd_recompute_stacked': lambda: _prototype(spd_recompute('stacked')),
    'spd_recompute_three': lambda: _prototype(spd_recompute('three')),
    'spd_split': lambda: _prototype(spd_split()),
    'spd_rows8': lambda: _prototype(spd_rows8()),
    'spd_rows8_chain': lambda: _prototype(spd_rows8(chain=True)),
    'spd_chunk17': lambda: _prototype(spd_chunked(1 << 17)),
    'spd_loop': lambda: _prototype(spd_loop()),
    'spd_loop18': lambda: _prototype(spd_loop(1 << 18)),
    'spd_chunk15': lambda: _prototype(spd_chunked(1 << 15)),
    'spd_split_shared': lambda: _prototype(spd_split(separate=False)),
}


def _step(update):
  def step(params, state, grads):
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _kernels_summary(text, param_bytes):
  kernels = _hlo.kernel_traffic(text, large_bytes=1 << 16)
  kinds = {}
  for name, _, _, _ in kernels:
    kind = name.split('.')[0]
    kinds[kind] = kinds.get(kind, 0) + 1
  return dict(kernels=len(kernels),
              words=sum(k[2] + k[3] for k in kernels) / param_bytes,
              kinds=kinds)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='B/16')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--only', default=None)
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--check', action='store_true',
                      help='compare each SPD prototype to the library after '
                      '3 steps')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  names = (args.only.split(',') if args.only else list(FORMULATIONS))
  if 'optax.adamw' not in names:
    names.insert(0, 'optax.adamw')
  dtype = jnp.dtype(args.dtype)
  info = _harness.machine()
  print('# ' + _harness.describe_machine(info), flush=True)
  abstract = _vit_params.abstract_params(args.model, dtype)
  param_bytes = _harness.tree_bytes(abstract)
  params0 = _vit_params.random_params(args.model, dtype, seed=0)
  grads = _vit_params.random_params(args.model, dtype, seed=1, scale=0.01)
  runners, rows = {}, {}
  for name in names:
    opt, update = FORMULATIONS[name]()
    state_abstract = _harness.abstract_state(opt, abstract)
    compiled = jax.jit(_step(update), donate_argnums=(0, 1)).lower(
        abstract, state_abstract, abstract).compile()
    text = compiled.as_text()
    summary = _kernels_summary(text, param_bytes)
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows[name] = dict(name=name, temp_words=temp / param_bytes, **summary)
    params = jax.tree.map(lambda x: x + 0, params0)
    holder = {'p': params, 's': jax.jit(opt.init)(params), 'faults': [],
              'cpu': [], 'init': opt.init}

    def run(holder=holder, compiled=compiled):
      before = resource.getrusage(resource.RUSAGE_SELF)
      holder['p'], holder['s'] = compiled(holder['p'], holder['s'], grads)
      jax.block_until_ready((holder['p'], holder['s']))
      after = resource.getrusage(resource.RUSAGE_SELF)
      holder['faults'].append(after.ru_minflt - before.ru_minflt)
      holder['cpu'].append(after.ru_utime + after.ru_stime - before.ru_utime
                           - before.ru_stime)

    runners[name] = (run, holder, compiled)
    print(f'# compiled {name}: {summary["kernels"]} kernels, '
          f'{summary["words"]:.2f} words, temp {temp / param_bytes:.3f} '
          f'{summary["kinds"]}', flush=True)
  if args.check:
    reference = None
    for name in names:
      if not name.startswith('spd'):
        continue
      run, holder, compiled = runners[name]
      p = jax.tree.map(lambda x: x + 0, params0)
      s = jax.jit(holder['init'])(p)
      for i in range(3):
        g = jax.tree.map(lambda x, i=i: x * (1 + i) * (-1) ** i, grads)
        p, s = compiled(p, s, g)
      leaves = [np.asarray(x) for x in jax.tree.leaves(p)]
      if reference is None:
        reference = leaves
        print(f'# check: reference {name}')
      else:
        diff = max(float(np.max(np.abs(a - b))) for a, b in
                   zip(leaves, reference))
        same = all(np.array_equal(a, b) for a, b in zip(leaves, reference))
        print(f'# check {name}: bitwise equal {same}, max |diff| {diff:.3g}')
      del p, s
  load_before = os.getloadavg()
  times = _harness.interleaved({k: r for k, (r, _, _) in runners.items()},
                               args.repeats, args.warmup)
  load_after = os.getloadavg()
  base = np.asarray(times['optax.adamw'])
  warm = args.warmup
  base_cpu = np.median(runners['optax.adamw'][1]['cpu'][warm:])
  for name, row in rows.items():
    t = np.asarray(times[name])
    cpu = float(np.median(runners[name][1]['cpu'][warm:]))
    row.update(median_ms=float(np.median(t)) * 1e3,
               cpu_ms=cpu * 1e3, cpu_ratio=float(cpu / base_cpu),
               ratio=float(np.median(t) / np.median(base)),
               paired_ratio=float(np.median(t / base)),
               faults_per_step=float(np.median(runners[name][1]['faults'][
                   args.warmup:])))
  print(f'\n## ViT-{args.model} {dtype.name}, load {load_before} -> '
        f'{load_after}')
  print(_harness.markdown_table(
      ['formulation', 'kernels', 'words', 'temp words', 'median ms',
       'x adamw', 'paired x', 'CPU ms', 'CPU x adamw', 'faults/step'],
      [[r['name'], r['kernels'], r['words'], r['temp_words'], r['median_ms'],
        f"{r['ratio']:.2f}", f"{r['paired_ratio']:.2f}", r['cpu_ms'],
        f"{r['cpu_ratio']:.2f}", int(r['faults_per_step'])]
       for r in rows.values()]))
  out = args.out or os.path.join(_harness.RESULTS_DIR, 'formulations.json')
  _harness.write_json(os.path.basename(out), dict(
      machine=info, model=args.model, dtype=dtype.name,
      load=[load_before, load_after], rows=list(rows.values())), out)


if __name__ == '__main__':
  main(sys.argv[1:])
