"""Selective Projection Decay (SPD) as a wrapper around an optax optimizer."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from spd_optax import _common


class SelectiveProjectionDecayState(NamedTuple):
  """State of `selective_projection_decay`.

  Attributes:
    count: steps taken, int32 (the argument of a `weight_decay` schedule).
    base_optimizer_state: the wrapped optimizer's state.
    anchor: the pre-trained weights, params-shaped; `optax.MaskedNode()` for
      leaves excluded by the mask; None in PEFT mode (`anchor="zero"`).
    selected: per leaf (per layer of a stacked leaf), whether the decay was
      applied at the last step; `optax.MaskedNode()` where masked.
    ratio: per leaf (per layer), the deviation ratio `r` applied at the last
      step, 0 where not selected; `optax.MaskedNode()` where masked.
  """

  count: jax.Array
  base_optimizer_state: optax.OptState
  anchor: Any
  selected: Any
  ratio: Any


def selective_projection_decay(
    base_optimizer: Optional[optax.GradientTransformation] = None,
    weight_decay: Optional[optax.ScalarOrSchedule] = None,
    *,
    anchor: Any = 'init',
    mask: Any = None,
    layer_axis: _common.PerLeafOption = None,
    axis_name: _common.PerLeafOption = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Selective Projection Decay: pulls back layers that make no consistent progress.

  Per leaf (one tensor is one layer), with `u` the base optimizer's update,
  `g` the raw gradient and `a` the anchor::

    d = p - a;   c = <g, d>
    r = clip((||d + u|| - ||d||) / ||d + u||, 0, 1)     (0 if ||d + u|| = 0)
    u' = u - weight_decay * r * (d + u)   if c > 0   else u

  `weight_decay` is not multiplied by the learning rate. Call `init` with the
  pre-trained weights: with `anchor="init"` they are the anchor.

  Args:
    base_optimizer: the optimizer whose update SPD constrains, e.g.
      `optax.adam(lr)`. SPD needs both the raw gradient and this update, so it
      wraps the optimizer instead of sitting beside it in `optax.chain`.
    weight_decay: lambda >= 0, a float or a schedule of the step count. A
      given value of any numeric type is checked (finite, >= 0); a schedule's
      values are not: a negative value at a step would push the selected
      layers away from the anchor that step (`u + |lambda| r (d + u)`), the
      opposite of the decay.
    anchor: "init" (the params given to `init`), "zero" (PEFT mode, e.g. LoRA
      adapters: decay toward 0, nothing stored) or a params-shaped pytree.
    mask: as in `optax.add_decayed_weights`: a bool pytree (or prefix) or a
      callable on the params; False leaves get the base update unchanged and
      store nothing. Constrained params must be real floating point (a
      Python float is a float32 0-d leaf, as in `optax.adam`).
    layer_axis: per leaf, the axis that stacks layers (`nn.scan`), so each
      slice is its own layer; None (default) for an ordinary leaf. One value,
      a pytree (or prefix), or a callable `(path, shape) -> axis`.
    axis_name: per leaf, inside `shard_map`: the mesh axis the leaf is split
      over, or the leaf's `PartitionSpec` (the same tree of specs given to
      `shard_map` works), so the per-layer sums are global; None (default)
      outside `shard_map`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Tian, Huang, Kira, `Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models <https://arxiv.org/abs/2411.01713>`_, NeurIPS 2024.
  """
  return _selective_projection_decay(
      base_optimizer, weight_decay, anchor=anchor, mask=mask,
      layer_axis=layer_axis, axis_name=axis_name)


def _selective_projection_decay(
    base_optimizer, weight_decay, *, anchor, mask, layer_axis, axis_name,
    update_of_moments=None):
  """`selective_projection_decay`; `update_of_moments` as `adam_spd` gives it.

  `update_of_moments(grads, base_state, new_base_state)`, when given,
  returns a params-shaped tree of the new moments `(mu, nu)` of each leaf
  (None where the base update cannot be recomputed from them exactly) and
  `leaf_update(mu, nu, grad)`, the base update of a leaf computed from them.
  Those leaves' sums are computed from the moments, the base update
  recomputed in the same pass, instead of from the base update written out
  leaf-sized.
  """
  _common.require_base_optimizer(
      base_optimizer, 'selective_projection_decay',
      'spd_optax.selective_projection_decay(optax.adam(lr), weight_decay=...)')
  if weight_decay is None:
    raise TypeError('selective_projection_decay needs `weight_decay`.')
  _common.check_hyperparameter(weight_decay, 'weight_decay', low=0.0)
  _common.check_anchor(anchor)
  base = optax.with_extra_args_support(base_optimizer)
  method = 'selective_projection_decay'

  def leaf_layers(params):
    layer_axes = _common.resolve_per_leaf(layer_axis, params, 'layer_axis')
    return jax.tree.map(
        lambda p, axes: _common.normalize_axes(axes, p.ndim, 'layer_axis'),
        params, layer_axes)

  def stats_layout(params, mask_tree, kept_axes):
    """The shapes and dtypes of `selected` and `ratio`, as `init` builds them."""

    def leaf_stats(p, keep, kept):
      if not keep:
        return _common.MaskedNode(), _common.MaskedNode()
      shape = _common.kept_shape(p.shape, kept)
      return (jax.ShapeDtypeStruct(shape, jnp.bool_),
              jax.ShapeDtypeStruct(shape, _common.stat_dtype(p.dtype)))

    stats = jax.tree.map(leaf_stats, params, mask_tree, kept_axes)
    return _common.unzip(stats, params, 2)

  def init_fn(params):
    params = _common.as_arrays(params)
    mask_tree = _common.resolve_mask(mask, params)
    _common.check_params(params, mask_tree, method)
    selected, ratio = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        stats_layout(params, mask_tree, leaf_layers(params)))
    return SelectiveProjectionDecayState(
        count=jnp.zeros([], jnp.int32),
        base_optimizer_state=base.init(params),
        anchor=_common.init_anchor(anchor, params, mask_tree),
        selected=selected,
        ratio=ratio,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    params, updates = _common.as_arrays(params), _common.as_arrays(updates)
    _common.check_like_params(updates, params, method, 'gradients')
    mask_tree = _common.resolve_mask(mask, params)
    kept_axes = leaf_layers(params)
    selected, ratio = stats_layout(params, mask_tree, kept_axes)
    _common.check_state(method, state, {
        'anchor': _common.anchor_layout(anchor, params, mask_tree),
        'selected': selected, 'ratio': ratio})
    base_updates, base_state = base.update(
        updates, state.base_optimizer_state, params, **extra_args)
    axis_names = _common.resolve_per_leaf(axis_name, params, 'axis_name')
    anchors = _common.anchor_leaves(state.anchor, params)
    decay = _common.scalar_or_schedule(weight_decay, state.count)
    rule, moments = _common.moments_rule(
        update_of_moments, updates, state.base_optimizer_state, base_state,
        params)

    def project(param, grad, update, anchor, moment, keep, kept, name):
      if not keep:
        return update, _common.MaskedNode(), _common.MaskedNode(), None
      dtype = _common.stat_dtype(param.dtype)

      def terms(grad, param, anchor, update):
        deviation = param.astype(dtype)
        if anchor is not None:
          deviation = deviation - anchor.astype(dtype)
        proposed = deviation + update.astype(dtype)
        return (grad.astype(dtype) * deviation, proposed * proposed,
                deviation * deviation)

      summed = tuple(axis for axis in range(param.ndim) if axis not in kept)
      names = _common.split_names(name, param.ndim, summed, summed=True)
      written = None
      if moment is None:
        arrays, terms_fn = (grad, param, anchor, update), terms
      else:
        # The base update again, from the moments, inside the sums' pass:
        # XLA keeps no leaf-sized copy of it between the two passes.
        arrays = (grad, param, anchor) + moment[:2]
        terms_fn = lambda g, p, a, m, v: terms(
            g, p, a, rule.leaf_update(m, v, g))
      if anchor is None:
        arrays = arrays[:2] + arrays[3:]
        terms_fn = lambda g, p, *rest, fn=terms_fn: fn(g, p, None, *rest)
      if moment is not None and _common.loops_over_chunks(param, kept):
        # The moments too are written in the sums' loop, a chunk at a time:
        # one read of the gradient, params, anchor and old moments, one
        # write of the new moments.
        written, sums = _common.reduce_leaf_writing(
            lambda g, *rest: rule.moment_step(g, *rest[-2:]), terms_fn,
            arrays[:-2], moment[2:], names)
        update = rule.leaf_update(*written, grad)
      else:
        sums = _common.reduce_leaf(terms_fn, arrays, kept, names)
      progress, proposed_sq, deviation_sq = sums
      selected = progress > 0
      proposed_norm = jnp.sqrt(proposed_sq)
      ratio = jnp.clip(
          _common.safe_div(proposed_norm - jnp.sqrt(deviation_sq),
                           proposed_norm), 0, 1)
      ratio = jnp.where(selected, ratio, 0)
      shrink = decay * _common.expand_kept(ratio, param.ndim, kept)
      # `u - shrink * proposed`, bit for bit, but built from the inputs: were
      # `proposed` shared with the sums, XLA would write it to a leaf-sized
      # temporary and read it back (measured on CPU: 21 -> 17 leaf-sized
      # reads and writes per step, one temporary fewer).
      toward_anchor = -param.astype(dtype)
      if anchor is not None:
        toward_anchor = anchor.astype(dtype) - param.astype(dtype)
      new_update = update.astype(dtype) + shrink.astype(dtype) * (
          toward_anchor - update.astype(dtype))
      return new_update.astype(param.dtype), selected, ratio, written

    results = jax.tree.map(project, params, updates, base_updates, anchors,
                           moments, mask_tree, kept_axes, axis_names)
    new_updates, selected, ratio, written = _common.unzip(results, params, 4)
    if rule is not None:
      base_state = rule.with_written(base_state, params, written)
    return new_updates, SelectiveProjectionDecayState(
        count=optax.safe_increment(state.count),
        base_optimizer_state=base_state,
        anchor=state.anchor,
        selected=selected,
        ratio=ratio,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_spd(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: bool = False,
    anchor: Any = 'init',
    mask: Any = None,
    layer_axis: _common.PerLeafOption = None,
    axis_name: _common.PerLeafOption = None,
) -> optax.GradientTransformationExtraArgs:
  """Adam-SPD: `selective_projection_decay` around `optax.adam`.

  The same rule, in two passes over each leaf: the first writes Adam's
  moments and takes SPD's sums, recomputing Adam's update from the moments;
  the second writes the constrained update. Nothing leaf-sized is kept
  between them (the generic wrapper keeps the base update).

  Args:
    learning_rate: Adam's learning rate >= 0, a float or a schedule.
    weight_decay: SPD's lambda >= 0 (not scaled by the learning rate), a
      float or a schedule; see `selective_projection_decay`.
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon >= 0, added to the root of the second moment.
    eps_root: Adam's epsilon >= 0 added inside the root, as in `optax.adam`.
    mu_dtype: the dtype of Adam's first moment, as in `optax.adam`.
    nesterov: whether Adam's step is Nesterov's, as in `optax.adam`.
    anchor: "init", "zero" or a params-shaped pytree; see
      `selective_projection_decay`.
    mask: leaves to constrain; see `selective_projection_decay`.
    layer_axis: per leaf, the stacked-layer axis.
    axis_name: per leaf, the `shard_map` axis.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Tian, Huang, Kira, `Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models <https://arxiv.org/abs/2411.01713>`_, NeurIPS 2024.
  """
  _common.check_learning_rate(learning_rate)
  _common.check_adam(b1, b2, eps, eps_root)
  return _selective_projection_decay(
      optax.adam(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                 mu_dtype=mu_dtype, nesterov=nesterov),
      weight_decay, anchor=anchor, mask=mask, layer_axis=layer_axis,
      axis_name=axis_name,
      update_of_moments=_adam_update_of_moments(
          learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov))


class _MomentsRule(NamedTuple):
  """What `_selective_projection_decay` needs to fuse Adam into its passes.

  Attributes:
    moments: params-shaped: per leaf `(new_mu, new_nu, old_mu, old_nu)`, or
      None where the base update cannot be recomputed from the new moments.
    leaf_update: `(mu, nu, grad, param=None) -> update`, the base update
      from new moments (AdamW's needs the params).
    moment_step: `(grad, mu, nu) -> (mu, nu)`, the moments' own update.
    with_written: `(base_state, params, written) -> base_state`, the moments
      a loop wrote (per leaf `(mu, nu)`, None where it wrote none) in place
      of the base optimizer's.
  """

  moments: Any
  leaf_update: Any
  moment_step: Any
  with_written: Any


def _adam_update_of_moments(learning_rate, b1, b2, eps, eps_root, mu_dtype,
                            nesterov, weight_decay=None):
  """`optax.adam`'s update, leaf by leaf, from the moments it has just stored.

  The same operations as `optax.scale_by_adam` then
  `optax.scale_by_learning_rate` (XLA may still round a scalar factor
  differently inside the sums' loop than in the update: last bits of the
  sums). A leaf whose stored moments were cast from the values the update
  used (`mu_dtype`, or a gradient wider than the moments) gets None: its sums
  read the base update instead. With `weight_decay`, the update is
  `optax.adamw`'s (unmasked): `leaf_update` then needs the leaf's params.
  """
  scale = optax.scale_by_learning_rate(learning_rate)
  decayed = (None if weight_decay is None
             else optax.add_decayed_weights(weight_decay))
  adam = optax.scale_by_adam(b1, b2, eps, eps_root, mu_dtype=mu_dtype,
                             nesterov=nesterov)

  def update_of_moments(grads, base_state, new_base_state):
    adam_state, scale_state = base_state[0], base_state[-1]
    new_adam_state = new_base_state[0]
    count = new_adam_state.count

    def leaf_update(mu, nu, grad, param=None):
      if nesterov:
        mu_hat = (b1 * optax.tree.bias_correction(
            mu, b1, optax.safe_increment(count))
                  + (1 - b1) * optax.tree.bias_correction(grad, b1, count))
      else:
        mu_hat = optax.tree.bias_correction(mu, b1, count)
      nu_hat = optax.tree.bias_correction(nu, b2, count)
      update = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
      if decayed is not None:
        update = decayed.update(update, base_state[1], param)[0]
      return scale.update(update, scale_state)[0]

    def moment_step(grad, mu, nu):
      state = adam.update(grad, adam_state._replace(mu=mu, nu=nu))[1]
      return state.mu, state.nu

    def leaf_moments(grad, new_mu, new_nu, old_mu, old_nu):
      exact = (new_mu.dtype == jnp.promote_types(grad.dtype, old_mu.dtype)
               and new_nu.dtype == jnp.promote_types(grad.dtype, old_nu.dtype))
      return (new_mu, new_nu, old_mu, old_nu) if exact else None

    def with_written(state, params, written):
      mu = jax.tree.map(lambda _, w, m: m if w is None else w[0],
                        params, written, state[0].mu)
      nu = jax.tree.map(lambda _, w, v: v if w is None else w[1],
                        params, written, state[0].nu)
      return (state[0]._replace(mu=mu, nu=nu),) + tuple(state[1:])

    moments = jax.tree.map(leaf_moments, grads, new_adam_state.mu,
                           new_adam_state.nu, adam_state.mu, adam_state.nu)
    return _MomentsRule(moments, leaf_update, moment_step, with_written)

  return update_of_moments
