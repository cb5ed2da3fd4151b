"""L2-SP: weight decay toward the pre-trained weights (the papers' baseline)."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from spd_optax import _common


class L2SPState(NamedTuple):
  """State of `l2_sp`: the step count (for schedules) and the anchor."""

  count: jax.Array
  anchor: Any


def l2_sp(
    weight_decay: optax.ScalarOrSchedule,
    *,
    anchor: Any = 'init',
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds `weight_decay * (params - anchor)` to the updates.

  The decoupled form of L2-SP: placed between a scaling and the learning rate
  (as `add_decayed_weights` is in `optax.adamw`), the step becomes
  `u <- u - lr * weight_decay * (p - a)`. Call `init` with the pre-trained
  weights: with `anchor="init"` they are the anchor.

  Args:
    weight_decay: lambda >= 0, a float or a schedule of the step count. A
      given value of any numeric type is checked (finite, >= 0); a schedule's
      values are not: a negative value at a step would push every leaf away
      from the anchor that step.
    anchor: "init" (the params given to `init`), "zero" (plain decoupled weight
      decay) or a params-shaped pytree.
    mask: as in `optax.add_decayed_weights`; False leaves are not decayed.
      Decayed params must be real floating point (a Python float is a
      float32 0-d leaf, as in `optax.adam`).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Li, Grandvalet, Davoine, `Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks <https://arxiv.org/abs/1802.01483>`_, ICML 2018.
  """
  _common.check_hyperparameter(weight_decay, 'weight_decay', low=0.0)
  _common.check_anchor(anchor)
  method = 'l2_sp'

  def init_fn(params):
    params = _common.as_arrays(params)
    mask_tree = _common.resolve_mask(mask, params)
    _common.check_params(params, mask_tree, method)
    return L2SPState(count=jnp.zeros([], jnp.int32),
                     anchor=_common.init_anchor(anchor, params, mask_tree))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    params, updates = _common.as_arrays(params), _common.as_arrays(updates)
    _common.check_like_params(updates, params, method, 'updates')
    mask_tree = _common.resolve_mask(mask, params)
    _common.check_state(method, state, {
        'anchor': _common.anchor_layout(anchor, params, mask_tree)})
    anchors = _common.anchor_leaves(state.anchor, params)
    decay = _common.scalar_or_schedule(weight_decay, state.count)

    def decay_leaf(update, param, anchor, keep):
      if not keep:
        return update
      deviation = param if anchor is None else param - anchor
      return (update + decay * deviation).astype(update.dtype)

    updates = jax.tree.map(decay_leaf, updates, params, anchors, mask_tree)
    return updates, L2SPState(optax.safe_increment(state.count), state.anchor)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw_l2sp(
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
) -> optax.GradientTransformation:
  """AdamW whose decoupled decay pulls toward the anchor: Adam + L2-SP.

  Args:
    learning_rate: >= 0, a float or a schedule.
    weight_decay: lambda >= 0, multiplied by the learning rate as in AdamW; a
      float or a schedule, see `l2_sp`.
    b1: Adam's first-moment decay, in [0, 1).
    b2: Adam's second-moment decay, in [0, 1).
    eps: Adam's epsilon >= 0, added to the root of the second moment.
    eps_root: Adam's epsilon >= 0 added inside the root, as in `optax.adam`.
    mu_dtype: the dtype of Adam's first moment, as in `optax.adam`.
    nesterov: whether Adam's step is Nesterov's, as in `optax.adam`.
    anchor: "init", "zero" or a params-shaped pytree; see `l2_sp`.
    mask: leaves to decay; see `l2_sp`.

  Returns:
    An `optax.GradientTransformation`.

  References:
    Li, Grandvalet, Davoine, `Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks <https://arxiv.org/abs/1802.01483>`_, ICML 2018.
  """
  _common.check_learning_rate(learning_rate)
  _common.check_adam(b1, b2, eps, eps_root)
  return optax.chain(
      _common.checking_gradients(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                              mu_dtype=mu_dtype, nesterov=nesterov),
          'adamw_l2sp'),
      l2_sp(weight_decay, anchor=anchor, mask=mask),
      optax.scale_by_learning_rate(learning_rate),
  )
