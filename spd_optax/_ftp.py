"""Fast Trainable Projection (FTP) as a wrapper around an optax optimizer."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from spd_optax import _common
from spd_optax import _spd

# The published code's constants: the floor added to every row norm, the
# radius's start and lower bound, and the epsilon of the radius's own Adam.
_ROW_NORM_FLOOR = 1e-8
_GAMMA_MIN = 1e-8
_GAMMA_EPS = 1e-8


class FastTrainableProjectionState(NamedTuple):
  """State of `fast_trainable_projection`.

  Every per-leaf field holds `optax.MaskedNode()` for leaves excluded by the
  mask. Statistics are float32 (float64 for float64 params).

  Attributes:
    count: steps taken, int32; the rule's step is `t = count + 1` (and
      `count` is the argument of a `mu` schedule).
    base_optimizer_state: the wrapped optimizer's state.
    anchor: the pre-trained weights, params-shaped; None in PEFT mode
      (`anchor="zero"`).
    gamma: per leaf, the projection radius: a scalar, or one per layer of a
      stacked leaf (shape: the `layer_axis` sizes). Log it.
    gamma_m: per leaf, the first moment of the radius's own Adam.
    gamma_v: per leaf, the second moment of the radius's own Adam.
    c_prev: per leaf, the last step's unconstrained deviation
      `p + u - anchor`, in the param's dtype.
    s_prev: per leaf, the inverse row norms of `c_prev`: one per output unit
      (and layer), the non-output axes dropped.
  """

  count: jax.Array
  base_optimizer_state: optax.OptState
  anchor: Any
  gamma: Any
  gamma_m: Any
  gamma_v: Any
  c_prev: Any
  s_prev: Any


def _row_and_layer_axes(shape, output_axes, layer_axis):
  """The axes a leaf's row norms keep (outputs and layers), and its layers'."""
  ndim = len(shape)
  layers = _common.normalize_axes(layer_axis, ndim, 'layer_axis')
  if ndim - len(layers) <= 1:
    # A bias or a LayerNorm scale (of each layer) is a single row.
    return layers, layers
  outputs = _common.normalize_axes(output_axes, ndim, 'output_axes')
  if set(outputs) & set(layers):
    raise ValueError(
        f'`output_axes` {outputs} and `layer_axis` {layers} share an axis of '
        f'a leaf of shape {tuple(shape)}; the output axes count from the '
        'stacked leaf: output_axes=-1, layer_axis=0 for (layers, in, out).')
  return tuple(sorted(outputs + layers)), layers


def fast_trainable_projection(
    base_optimizer: Optional[optax.GradientTransformation] = None,
    *,
    k: float = 1.0,
    mu: optax.ScalarOrSchedule = 1e-2,
    b1: float = 0.9,
    b2: float = 0.999,
    anchor: Any = 'init',
    mask: Any = None,
    output_axes: _common.PerLeafOption = (-1,),
    layer_axis: _common.PerLeafOption = None,
    axis_name: _common.PerLeafOption = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Fast Trainable Projection: keeps each output unit within a learned radius.

  Per leaf, with `u` the base optimizer's update, `g` the raw gradient, `a`
  the anchor and `t` the step (from 1); row norms are L1 over every axis but
  the output axes, plus 1e-8::

    c = p + u - a;   n = rownorm(c)
    h = <g, c_prev / n_prev>,  times k if h > 0
    gamma = clip(gamma - mu * adam_b1_b2(h), 1e-8, max(n))   (1e-8 at t = 1)
    u' = a + clip(gamma / n, 0, 1) * c - p

  The radius's Adam moments start at t = 2 but are bias-corrected with the
  global `t`, as in the published code. Call `init` with the pre-trained
  weights: with `anchor="init"` they are the anchor.

  Args:
    base_optimizer: the optimizer whose update FTP projects, e.g.
      `optax.adamw(lr)`. FTP needs both the raw gradient and this update, so
      it wraps the optimizer instead of sitting beside it in `optax.chain`.
    k: in [0, 1], scales the radius's gradient `h` where it is positive (a
      positive `h` asks to shrink the radius).
    mu: > 0, the radius's learning rate; a float or a schedule of the step
      count. A given value of any numeric type is checked (finite, > 0); a
      schedule's values are not: a negative value at a step would move the
      radius against its gradient that step (growing it where the
      constraint asks to shrink it), within the clip to `[1e-8, max(n)]`;
      zero freezes it.
    b1: the first-moment decay of the radius's Adam, in [0, 1).
    b2: the second-moment decay of the radius's Adam, in [0, 1).
    anchor: "init" (the params given to `init`), "zero" (PEFT mode, e.g. LoRA
      adapters: project toward 0, nothing stored) or a params-shaped pytree.
    mask: as in `optax.add_decayed_weights`: a bool pytree (or prefix) or a
      callable on the params; False leaves (a new head) get the base update
      unchanged and store nothing. Constrained params must be real floating
      point (a Python float is a float32 0-d leaf, as in `optax.adam`).
    output_axes: per leaf, the axes of the output units, each of which is a
      row with its own norm: the last axis by default (Flax's `(in, out)`
      and `(kh, kw, in, out)`; PyTorch's `(out, in)` layout would be 0),
      `(1, 2)` for an attention kernel `(in, heads, head_dim)`. 0-d and 1-d
      leaves are a single row. One value, a pytree (or prefix), or a callable
      `(path, shape) -> axes`. Under `optax.inject_hyperparams` name it (and
      `layer_axis`) in `static_args`.
    layer_axis: per leaf, the axis that stacks layers (`nn.scan`): each slice
      is its own layer, with its own radius; None (default) for an ordinary
      leaf. Specified like `output_axes`.
    axis_name: per leaf, inside `shard_map`: the leaf's `PartitionSpec` (the
      same tree of specs given to `shard_map` works), so that the row norms,
      `h` and `max(n)` are global however the leaf is split; or a mesh axis
      name, for a leaf split only along axes the row norms sum over (not its
      output units). None (default) outside `shard_map`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Tian, Liu, Smith, Kira, `Fast Trainable Projection for Robust Fine-Tuning
    <https://arxiv.org/abs/2310.19182>`_, NeurIPS 2023.
  """
  return _fast_trainable_projection(
      base_optimizer, k=k, mu=mu, b1=b1, b2=b2, anchor=anchor, mask=mask,
      output_axes=output_axes, layer_axis=layer_axis, axis_name=axis_name)


def _fast_trainable_projection(
    base_optimizer, *, k, mu, b1, b2, anchor, mask, output_axes, layer_axis,
    axis_name, update_of_moments=None):
  """`fast_trainable_projection`; `update_of_moments` as `adam_ftp` gives it.

  `update_of_moments` is `_spd._adam_update_of_moments`'s: with it, a leaf
  the chunk loop takes (`_common.rows_per_chunk`) is read once for Adam's
  moments, the deviation `c` (written over `c_prev`) and its row norms,
  Adam's update recomputed from the new moments; `h` is the plain per-row
  reduction before it, the projected update a pass after it.
  """
  _common.require_base_optimizer(
      base_optimizer, 'fast_trainable_projection',
      'spd_optax.fast_trainable_projection(optax.adamw(lr), k=1.0)')
  _common.check_hyperparameter(k, 'k', low=0.0, high=1.0, schedule=False)
  _common.check_hyperparameter(mu, 'mu', low=0.0, low_open=True)
  _common.check_hyperparameter(b1, 'b1', low=0.0, high=1.0, high_open=True,
                               schedule=False)
  _common.check_hyperparameter(b2, 'b2', low=0.0, high=1.0, high_open=True,
                               schedule=False)
  base = optax.with_extra_args_support(base_optimizer)
  method = 'fast_trainable_projection'

  def leaf_axes(params):
    outputs = _common.resolve_per_leaf(output_axes, params, 'output_axes')
    layers = _common.resolve_per_leaf(layer_axis, params, 'layer_axis')
    return jax.tree.map(
        lambda p, out, layer: _row_and_layer_axes(p.shape, out, layer),
        params, outputs, layers)

  def leaf_layout(p, keep, axes):
    """A leaf's gamma, gamma_m, gamma_v, c_prev and s_prev: shapes, dtypes."""
    if not keep:
      return (_common.MaskedNode(),) * 5
    rows, layers = axes
    dtype = _common.stat_dtype(p.dtype)
    per_layer = jax.ShapeDtypeStruct(_common.kept_shape(p.shape, layers), dtype)
    return (per_layer, per_layer, per_layer,
            jax.ShapeDtypeStruct(p.shape, p.dtype),
            jax.ShapeDtypeStruct(_common.kept_shape(p.shape, rows), dtype))

  def stats_layout(params, mask_tree, axes_tree):
    stats = jax.tree.map(leaf_layout, params, mask_tree, axes_tree)
    return _common.unzip(stats, params, 5)

  def init_fn(params):
    params = _common.as_arrays(params)
    mask_tree = _common.resolve_mask(mask, params)
    _common.check_params(params, mask_tree, method)

    def empty_stats(p, keep, axes):
      if not keep:
        return (_common.MaskedNode(),) * 5
      gamma, moment, _, _, s_prev = leaf_layout(p, keep, axes)
      return (jnp.full(gamma.shape, _GAMMA_MIN, gamma.dtype),
              jnp.zeros(moment.shape, moment.dtype),
              jnp.zeros(moment.shape, moment.dtype),
              jnp.zeros_like(p),  # varying like p in shard_map: scans carry it
              jnp.zeros(s_prev.shape, s_prev.dtype))

    stats = jax.tree.map(empty_stats, params, mask_tree, leaf_axes(params))
    gamma, gamma_m, gamma_v, c_prev, s_prev = _common.unzip(stats, params, 5)
    return FastTrainableProjectionState(
        count=jnp.zeros([], jnp.int32),
        base_optimizer_state=base.init(params),
        anchor=_common.init_anchor(anchor, params, mask_tree),
        gamma=gamma,
        gamma_m=gamma_m,
        gamma_v=gamma_v,
        c_prev=c_prev,
        s_prev=s_prev,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    params, updates = _common.as_arrays(params), _common.as_arrays(updates)
    _common.check_like_params(updates, params, method, 'gradients')
    mask_tree = _common.resolve_mask(mask, params)
    axes_tree = leaf_axes(params)
    _common.check_state(method, state, dict(
        anchor=_common.anchor_layout(anchor, params, mask_tree),
        **dict(zip(('gamma', 'gamma_m', 'gamma_v', 'c_prev', 's_prev'),
                   stats_layout(params, mask_tree, axes_tree)))))
    base_updates, base_state = base.update(
        updates, state.base_optimizer_state, params, **extra_args)
    axis_names = _common.resolve_per_leaf(axis_name, params, 'axis_name')
    anchors = _common.anchor_leaves(state.anchor, params)
    first_step = state.count == 0
    rate = _common.scalar_or_schedule(mu, state.count)
    rule, moments = _common.moments_rule(
        update_of_moments, updates, state.base_optimizer_state, base_state,
        params)

    def project(param, grad, update, anchor, moment, gamma, gamma_m, gamma_v,
                c_prev, s_prev, keep, axes, name):
      if not keep:
        return (update,) + (_common.MaskedNode(),) * 5 + (None,)
      rows, layers = axes
      dtype = _common.stat_dtype(param.dtype)
      t = (state.count + 1).astype(dtype)
      within_layer = tuple(
          i for i, axis in enumerate(rows) if axis not in layers)
      summed = tuple(axis for axis in range(param.ndim) if axis not in rows)
      summed_names = _common.split_names(name, param.ndim, summed, summed=True)
      # Split output units: each device holds some rows, so `h` and `max(n)`
      # need its neighbours' rows too.
      row_names = _common.split_names(
          name, param.ndim, [rows[i] for i in within_layer], summed=False)
      # s_prev is constant along a row, so h needs only per-row sums. Two
      # plain reductions, not one variadic: they read disjoint inputs, and
      # XLA:CPU runs a two-operand reduce that keeps an axis ~30x slower.
      # (Inside adam_ftp's chunk loop h cost more than this pass of its
      # own: measured in benchmarks/README.md.)
      gamma_grad_rows, = _common.reduce_sums(
          (grad.astype(dtype) * c_prev.astype(dtype),), rows, summed_names)
      gamma_grad = jnp.sum(gamma_grad_rows * s_prev, axis=within_layer)
      if row_names:
        gamma_grad = jax.lax.psum(gamma_grad, row_names)
      # The added zero makes the new c_prev depend on h, so XLA reads the old
      # c_prev before writing the new one into its donated buffer, instead of
      # copying both (measured: a ~1.5x slower step on CPU).
      after_h = 0 * _common.expand_kept(gamma_grad, param.ndim, layers)
      chunk_rows = None
      if (moment is not None and param.dtype == dtype
          and c_prev.dtype == dtype):
        chunk_rows = _common.rows_per_chunk(param, rows, layers)
      written = None
      if chunk_rows is None:
        deviation = param.astype(dtype) + after_h + update.astype(dtype)
        if anchor is not None:
          deviation = deviation - anchor.astype(dtype)
        row_norm, = _common.reduce_sums(
            (jnp.abs(deviation),), rows, summed_names)
      else:
        # Adam's moments, the deviation (over c_prev) and its row norms in
        # one loop: one read of g, p, a, m, v, one write of m, v, c_prev,
        # Adam's update recomputed in cache from the moments just written.
        def moments(grad, param, *rest):
          return rule.moment_step(grad, *rest[-3:-1])

        def deviation_of(grad, param, *rest):
          *anchor_chunk, mu, nu, _ = rest
          deviation = (param + 0 * gamma_grad
                       + rule.leaf_update(mu, nu, grad, param))
          if anchor_chunk:
            deviation = deviation - anchor_chunk[0]
          return (deviation,)

        arrays = (grad, param) + (() if anchor is None else (anchor,))
        width = _common.num_elements(_common.kept_shape(param.shape, rows))
        (new_mu, new_nu, deviation), (row_norm,) = _common.reduce_rows_writing(
            ((2, moments), (1, deviation_of)), lambda *chunks: (),
            lambda *chunks: (jnp.abs(chunks[-1]),), arrays,
            (moment[2], moment[3], c_prev), width, chunk_rows)
        written = (new_mu, new_nu)
        row_norm = row_norm.reshape(_common.kept_shape(param.shape, rows))
        if summed_names:
          row_norm = jax.lax.psum(row_norm, summed_names)
      row_norm = row_norm + _ROW_NORM_FLOOR
      gamma_grad = jnp.where(gamma_grad > 0, k * gamma_grad, gamma_grad)
      new_m = b1 * gamma_m + (1 - b1) * gamma_grad
      new_v = b2 * gamma_v + (1 - b2) * gamma_grad * gamma_grad
      gamma_step = rate * (new_m / (1 - b1**t)) / (
          jnp.sqrt(new_v / (1 - b2**t)) + _GAMMA_EPS)
      max_norm = jnp.max(row_norm, axis=within_layer, initial=_ROW_NORM_FLOOR)
      if row_names:
        max_norm = jax.lax.pmax(max_norm, row_names)
      new_gamma = jnp.clip(gamma - gamma_step, _GAMMA_MIN, max_norm)
      gamma = jnp.where(first_step, _GAMMA_MIN, new_gamma).astype(dtype)
      gamma_m = jnp.where(first_step, gamma_m, new_m).astype(dtype)
      gamma_v = jnp.where(first_step, gamma_v, new_v).astype(dtype)
      layer_positions = tuple(rows.index(axis) for axis in layers)
      ratio = jnp.clip(
          _common.expand_kept(gamma, row_norm.ndim, layer_positions) / row_norm,
          0, 1)
      # p_new from the deviation alone, not from the base update: XLA then
      # computes the base update once, in the deviation's loop, and keeps no
      # leaf-sized temporary.
      projected = _common.expand_kept(ratio, param.ndim, rows) * deviation
      if anchor is not None:
        projected = projected + anchor.astype(dtype)
      new_update = projected - param.astype(dtype)
      return (new_update.astype(param.dtype), gamma, gamma_m, gamma_v,
              deviation.astype(c_prev.dtype), 1 / row_norm, written)

    results = jax.tree.map(
        project, params, updates, base_updates, anchors, moments, state.gamma,
        state.gamma_m, state.gamma_v, state.c_prev, state.s_prev, mask_tree,
        axes_tree, axis_names)
    new_updates, gamma, gamma_m, gamma_v, c_prev, s_prev, written = (
        _common.unzip(results, params, 7))
    if rule is not None:
      base_state = rule.with_written(base_state, params, written)
    return new_updates, FastTrainableProjectionState(
        count=optax.safe_increment(state.count),
        base_optimizer_state=base_state,
        anchor=state.anchor,
        gamma=gamma,
        gamma_m=gamma_m,
        gamma_v=gamma_v,
        c_prev=c_prev,
        s_prev=s_prev,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_ftp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    k: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    mu: optax.ScalarOrSchedule = 1e-2,
    mask: Any = None,
    weight_decay_mask: Any = None,
    output_axes: _common.PerLeafOption = (-1,),
    layer_axis: _common.PerLeafOption = None,
    axis_name: _common.PerLeafOption = None,
    anchor: Any = 'init',
) -> optax.GradientTransformationExtraArgs:
  """Adam with FTP ("AdamP"): `fast_trainable_projection` around `optax.adamw`.

  Args:
    learning_rate: AdamW's learning rate >= 0, a float or a schedule.
    weight_decay: AdamW's decoupled weight decay >= 0 (toward 0, default
      none), a float or a schedule.
    k: FTP's scale of a positive radius gradient, in [0, 1].
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon >= 0, added to the root of the second moment.
    eps_root: Adam's epsilon >= 0 added inside the root, as in `optax.adam`.
    mu_dtype: the dtype of Adam's first moment, as in `optax.adam`.
    nesterov: whether Adam's step is Nesterov's, as in `optax.adam`.
    mu: FTP's radius learning rate > 0, a float or a schedule; see
      `fast_trainable_projection`.
    mask: FTP's mask, the leaves to project; see `fast_trainable_projection`.
    weight_decay_mask: AdamW's own mask (`optax.adamw`'s `mask`), the leaves
      its `weight_decay` applies to: None (default) for every leaf.
    output_axes: per leaf, the output-unit axes; see
      `fast_trainable_projection`.
    layer_axis: per leaf, the stacked-layer axis.
    axis_name: per leaf, the `shard_map` axis.
    anchor: "init", "zero" or a params-shaped pytree.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Tian, Liu, Smith, Kira, `Fast Trainable Projection for Robust Fine-Tuning
    <https://arxiv.org/abs/2310.19182>`_, NeurIPS 2023.
  """
  _common.check_learning_rate(learning_rate)
  _common.check_adam(b1, b2, eps, eps_root)
  _common.check_hyperparameter(weight_decay, 'weight_decay', low=0.0)
  # Adam's update can be recomputed from its moments where AdamW's decay
  # is unmasked (a masked decay is `optax.masked`'s tree, not a leaf's).
  update_of_moments = None
  if weight_decay_mask is None:
    update_of_moments = _spd._adam_update_of_moments(  # pylint: disable=protected-access
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov,
        weight_decay=weight_decay)
  return _fast_trainable_projection(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                  mu_dtype=mu_dtype, weight_decay=weight_decay,
                  mask=weight_decay_mask, nesterov=nesterov),
      k=k, mu=mu, b1=0.9, b2=0.999, anchor=anchor, mask=mask,
      output_axes=output_axes, layer_axis=layer_axis, axis_name=axis_name,
      update_of_moments=update_of_moments)


def sgd_ftp(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    k: float = 1.0,
    mu: optax.ScalarOrSchedule = 1e-2,
    mask: Any = None,
    output_axes: _common.PerLeafOption = (-1,),
    layer_axis: _common.PerLeafOption = None,
    axis_name: _common.PerLeafOption = None,
    anchor: Any = 'init',
) -> optax.GradientTransformationExtraArgs:
  """SGD with FTP ("SGDP"): `fast_trainable_projection` around SGD.

  The SGD is PyTorch's: L2 weight decay added to the gradient before the
  momentum buffer (`optax.add_decayed_weights` then `optax.sgd`).

  Args:
    learning_rate: SGD's learning rate >= 0, a float or a schedule.
    momentum: SGD's momentum >= 0; 0 (default) keeps no buffer.
    nesterov: whether the momentum is Nesterov's.
    weight_decay: SGD's coupled L2 weight decay >= 0 (toward 0, default
      none), a float or a schedule.
    k: FTP's scale of a positive radius gradient, in [0, 1].
    mu: FTP's radius learning rate > 0, a float or a schedule.
    mask: leaves to project; see `fast_trainable_projection`.
    output_axes: per leaf, the output-unit axes; see
      `fast_trainable_projection`.
    layer_axis: per leaf, the stacked-layer axis.
    axis_name: per leaf, the `shard_map` axis.
    anchor: "init", "zero" or a params-shaped pytree.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Tian, Liu, Smith, Kira, `Fast Trainable Projection for Robust Fine-Tuning
    <https://arxiv.org/abs/2310.19182>`_, NeurIPS 2023.
  """
  _common.check_learning_rate(learning_rate)
  _common.check_hyperparameter(momentum, 'momentum', low=0.0, schedule=False)
  _common.check_hyperparameter(weight_decay, 'weight_decay', low=0.0)
  # A zero momentum given as a plain number needs no buffer (optax.sgd's None).
  no_momentum = isinstance(momentum, (int, float)) and momentum == 0
  return fast_trainable_projection(
      optax.chain(
          optax.add_decayed_weights(weight_decay),
          optax.sgd(learning_rate, momentum=None if no_momentum else momentum,
                    nesterov=nesterov)),
      k=k, mu=mu, anchor=anchor, mask=mask, output_axes=output_axes,
      layer_axis=layer_axis, axis_name=axis_name)
