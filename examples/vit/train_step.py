"""The train state, the jitted train step, the logged metrics and evaluation.

The step donates the state: XLA writes the new params and optimizer state
over the old ones, so a step holds one copy of each. The pre-trained weights
are kept once: the optimizer's anchor where it has one (L2-SP, SPD, FTP),
else a copy in `TrainState.anchor` (AdamW; every method's new, unconstrained
head), and with LoRA none at all (the drift is the adapters' merged change).
The drift `||p - anchor||` of each leaf is a separate small jitted function,
run only on logged steps.
"""

import functools
from typing import Any

from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from examples.vit import configs
from examples.vit import devices
from examples.vit import input_pipeline
from examples.vit import lora
from examples.vit import models


class TrainState(train_state.TrainState):
  """Flax's train state, plus what the drift and LoRA need.

  Attributes:
    anchor: the pre-trained values of the leaves whose anchor the optimizer
      does not keep (every leaf with AdamW; the new head with L2-SP, SPD and
      FTP), None at the leaves where it does and at LoRA's adapters: with the
      optimizer's anchor, one copy of what the drift is measured from.
    frozen: with LoRA, the frozen backbone (`params` then holds the adapters
      and the head); None otherwise.
    lora_scale: LoRA's alpha / rank.
  """

  anchor: Any = None
  frozen: Any = None
  lora_scale: float = struct.field(pytree_node=False, default=0.0)

  def model_params(self, params=None):
    """The model's full params: `params` itself, or LoRA-merged."""
    params = self.params if params is None else params
    if self.frozen is None:
      return params
    merged = lora.merge(self.frozen, params['lora'], self.lora_scale)
    return dict(merged, head=params['head'])


def optimizer_anchor(opt_state, params) -> list[Any]:
  """Per leaf of `params`, the optimizer's anchor, or None where it keeps
  none (a masked leaf, PEFT mode, an optimizer without one)."""
  treedef = jax.tree.structure(params)
  anchor = optax.tree.get(opt_state, 'anchor')
  if anchor is None:
    return [None] * treedef.num_leaves
  return [None if isinstance(a, optax.MaskedNode) else a
          for a in treedef.flatten_up_to(anchor)]


def _init_state(apply_fn, params, tx, frozen, lora_scale) -> TrainState:
  state = TrainState.create(apply_fn=apply_fn, params=params, tx=tx,
                            frozen=frozen, lora_scale=lora_scale)
  leaves, treedef = jax.tree.flatten(params)
  kept = optimizer_anchor(state.opt_state, params)
  anchor = treedef.unflatten([p if k is None else None
                              for p, k in zip(leaves, kept)])
  if frozen is not None:  # The adapters' drift is their merged change.
    anchor = dict(anchor, lora=jax.tree.map(lambda _: None, params['lora']))
  return state.replace(anchor=anchor)


def create_state(apply_fn, params, tx: optax.GradientTransformation, *,
                 frozen=None, lora_scale: float = 0.0, mesh=None,
                 min_size: int = 2**16) -> TrainState:
  """A `TrainState` of fresh buffers, laid out on `mesh` if given.

  Built under `jax.jit`, so that no leaf shares a buffer with `params` (or
  with another leaf, as the optimizer's anchor would with eager `init`): the
  train step donates the state, and the caller keeps `params` (the study
  makes each method's state from the same pre-trained weights).

  Args:
    apply_fn: the model's `apply`.
    params: the trained params (with LoRA: `{"lora": adapters, "head"}`),
      arrays on the host or on devices.
    tx: the optimizer; `tx.init(params)` makes its state.
    frozen: with LoRA, the frozen backbone.
    lora_scale: LoRA's alpha / rank.
    mesh: the device mesh to lay the state out on (`devices.state_shardings`);
      None: the default device.
    min_size: the elements a leaf needs to be split over the fsdp axis.

  Returns:
    The state; `anchor` holds the pre-trained leaves the optimizer does not.
  """
  def init(params, frozen):
    return _init_state(apply_fn, params, tx, frozen, lora_scale)

  shardings = None
  if mesh is not None:
    shardings = devices.state_shardings(jax.eval_shape(init, params, frozen),
                                        mesh, min_size)
  return jax.jit(init, out_shardings=shardings)(params, frozen)


def normalize(images: jax.Array) -> jax.Array:
  """uint8 images to [-1, 1], as the `vit_jax` checkpoints expect."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def train_step(state: TrainState, batch: dict[str, jax.Array]):
  """One optimizer step on `batch`; returns the new state and its metrics.

  `make_train_step` jits it over the device mesh, donating `state`.

  Metrics: the loss and accuracy on the batch, and SPD's per-leaf `selected`
  and `ratio` (averaged over a logged window). The drift is not computed
  here: `logged_metrics` does it on logged steps.
  """
  images = normalize(batch['image'])

  def loss_fn(params):
    logits = state.apply_fn({'params': state.model_params(params)}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return loss, logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
  }
  for field in ('selected', 'ratio'):
    value = optax.tree.get(state.opt_state, field)
    if value is not None:
      metrics[field] = value
  return state, metrics


def make_train_step(shardings, data_sharding):
  """`train_step` jitted over the mesh, the state donated: in and out with
  `shardings`, its old buffers reused for the new state (deleted for the
  caller)."""
  return jax.jit(train_step, in_shardings=(shardings, data_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)


def _drift(path, p, a):
  """`||p - a||`; per block `(layers,)` for a scanned model's stacked leaf."""
  names = tuple(str(getattr(k, 'key', k)) for k in path)
  if models.vit_layer_axis(names, p.shape) == 0:
    return jnp.sqrt(jnp.sum(jnp.square(p - a), axis=tuple(range(1, p.ndim))))
  return jnp.linalg.norm(p - a)


def deviation(state: TrainState):
  """Each leaf's drift `||p - anchor||` from the pre-trained weights.

  The anchor is the optimizer's where it keeps one, else `state.anchor`'s.
  A scanned model's stacked leaf gets one drift per block. With LoRA, an
  adapter's drift is the norm of its change of the backbone
  kernel, `||scale * a @ b||` (keyed by the kernel), and the head's is
  `||head - head0||`.
  """
  treedef = jax.tree.structure(state.params)
  own = treedef.flatten_up_to(state.anchor)
  kept = optimizer_anchor(state.opt_state, state.params)
  anchor = treedef.unflatten([a if a is not None else k
                              for a, k in zip(own, kept)])
  drift = lambda p, a: jnp.linalg.norm(p - a)
  if state.frozen is None:
    return jax.tree_util.tree_map_with_path(_drift, state.params, anchor)
  return {
      'lora': {name: jnp.linalg.norm(state.lora_scale * (ab['a'] @ ab['b']))
               for name, ab in state.params['lora'].items()},
      'head': jax.tree.map(drift, state.params['head'], anchor['head']),
  }


@jax.jit
def logged_metrics(state: TrainState) -> dict[str, Any]:
  """What a logged step adds to the step's metrics: each leaf's `deviation`,
  and FTP's radius `gamma` where the optimizer has one."""
  metrics = {'deviation': deviation(state)}
  gamma = optax.tree.get(state.opt_state, 'gamma')
  if gamma is not None:
    metrics['gamma'] = gamma
  return metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_step(apply_fn, params, batch: dict[str, jax.Array]) -> jax.Array:
  """The number of correctly classified real (not padding) rows of `batch`."""
  logits = apply_fn({'params': params}, normalize(batch['image']))
  correct = (jnp.argmax(logits, -1) == batch['label']) & batch['valid']
  return jnp.sum(correct)


def evaluate(apply_fn, params, records, config: configs.Config) -> float:
  """Top-1 accuracy of the model `params` on `records`."""
  correct = 0
  for batch in input_pipeline.eval_batches(records, config.image_size,
                                           config.eval_batch_size):
    correct += int(eval_step(apply_fn, params, batch))
  return correct / len(records)
