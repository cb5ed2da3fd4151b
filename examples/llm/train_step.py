"""The optimizers, the jitted train step, the drift and held-out evaluation.

One step function per method: `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`
trains LoRA's adapters (the frozen weights are an input of the step, never
an output), `wrt=nnx.Param` every weight. The learning rate and the weight
decay (SPD's lambda, AdamW's decay) live in the optimizer state under
`optax.inject_hyperparams`, so the schedule, a lambda grid and the seeds all
run through the one compiled step of their method: the learning rate is an
argument of the step (the host computes the schedule), lambda is set once in
the state of each run.

The step is pure (`nnx.split` / `nnx.merge` around a `jax.jit`), its
trainable part (adapters or weights, and the optimizer state) donated.
"""

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax as spd

from examples.llm import configs
from examples.llm import lora
from examples.llm import models

LORA_METHODS = ('adamw_lora', 'spd_lora')


def is_lora(method: str) -> bool:
  return method in LORA_METHODS


def make_optimizer(method: str) -> optax.GradientTransformation:
  """The fine-tuning optimizer of `method`, its lr and decay injected.

  `adamw_*`: `optax.adamw` (decoupled decay toward 0, times the lr).
  `spd_lora`: `spd.adam_spd(anchor="zero")` on the adapters alone (PEFT
  mode: the anchor is 0, nothing stored; the state is Adam's moments of the
  adapters plus SPD's per-leaf `selected` and `ratio`). `spd_full`:
  `spd.adam_spd` anchored at the weights it is initialized with, the
  pre-trained ones. Both start with `learning_rate = weight_decay = 0`; the
  study sets them (`set_hyperparams`).
  """
  if method in ('adamw_lora', 'adamw_full', 'pretrain'):
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0,
                                                 weight_decay=0.0)
  if method == 'spd_lora':
    return optax.inject_hyperparams(spd.adam_spd)(
        learning_rate=0.0, weight_decay=0.0, anchor='zero')
  if method == 'spd_full':
    return optax.inject_hyperparams(spd.adam_spd)(learning_rate=0.0,
                                                  weight_decay=0.0)
  raise configs.UsageError(f'unknown method {method!r}; known: '
                           f'{", ".join(configs.METHODS)}.')


def peft_optimizer(method: str, schedule: optax.Schedule,
                   weight_decay: float) -> optax.GradientTransformation:
  """`make_optimizer`'s optimizer for tunix's `PeftTrainer`: the schedule
  inside (`inject_hyperparams` evaluates it at each step's count, where our
  step gets the same value from the host), the decay fixed."""
  if method in ('adamw_lora', 'adamw_full'):
    return optax.inject_hyperparams(optax.adamw)(learning_rate=schedule,
                                                 weight_decay=weight_decay)
  if method == 'spd_lora':
    return optax.inject_hyperparams(spd.adam_spd)(
        learning_rate=schedule, weight_decay=weight_decay, anchor='zero')
  if method == 'spd_full':
    return optax.inject_hyperparams(spd.adam_spd)(learning_rate=schedule,
                                                  weight_decay=weight_decay)
  raise configs.UsageError(f'unknown method {method!r}.')


def wrt(method: str):
  """What `method` trains: the LoRA adapters, or every weight."""
  return nnx.LoRAParam if is_lora(method) else nnx.Param


def set_hyperparams(optimizer: nnx.Optimizer, **values) -> None:
  """Sets injected hyperparameters (`learning_rate`, `weight_decay`)."""
  hyperparams = optimizer.opt_state.hyperparams
  for name, value in values.items():
    hyperparams[name].set_value(
        jnp.asarray(value, hyperparams[name].get_value().dtype))


def loss_terms(model: nnx.Module, batch: dict[str, jax.Array]):
  """The summed next-token cross-entropy and the number of its targets.

  Target `t` (predicted from `tokens[:, :t]`) counts where `loss_mask[:, t]`
  and the token before it, `mask[:, t - 1]`, are set: on LM windows
  `loss_mask` is `mask`; on instruction rows, the response tokens.
  """
  logits = models.logits(model, batch['tokens'], batch['mask'])[:, :-1]
  weights = (batch['loss_mask'][:, 1:] & batch['mask'][:, :-1]).astype(
      jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch['tokens'][:, 1:])
  return jnp.sum(ce * weights), jnp.sum(weights)


def loss_fn(model: nnx.Module, batch: dict[str, jax.Array]):
  total, count = loss_terms(model, batch)
  return total / jnp.maximum(count, 1.0)


def with_loss_mask(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`batch` with a `loss_mask` (its `mask` where it has none)."""
  if 'loss_mask' in batch:
    return dict(batch)
  return dict(batch, loss_mask=batch['mask'])


def _pure(tree):
  """The arrays of a tree of `nnx.Variable`s."""
  return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v,
                      tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


def spd_diagnostics(optimizer: nnx.Optimizer) -> dict[str, Any]:
  """SPD's per-leaf `selected` and `ratio` of the last step ({} without)."""
  out = {}
  for name in ('selected', 'ratio'):
    value = optax.tree.get(optimizer.opt_state, name)
    if value is not None:
      out[name] = nnx.to_pure_dict(value) if isinstance(
          value, nnx.State) else _pure(value)
  return out


@dataclasses.dataclass
class Run:
  """One model and optimizer, split for the pure step.

  Attributes:
    method: one of `configs.METHODS` (or "pretrain").
    graphdef: the `(model, optimizer)` graph; equal for every run of a
      method with the same model shape, so one compiled step serves them.
    trainable: the trained leaves (adapters or weights) and the optimizer
      state: what the step donates and returns.
    frozen: the rest (the frozen weights under LoRA).
    lora_scale: LoRA's alpha / rank (0 without LoRA).
  """

  method: str
  graphdef: Any
  trainable: Any
  frozen: Any
  lora_scale: float = 0.0

  def merge(self):
    """The `(model, optimizer)` of the run's current state."""
    return nnx.merge(self.graphdef, self.trainable, self.frozen)


def trainable_filter(method: str):
  return nnx.Any(wrt(method), nnx.optimizer.OptState)


@jax.jit
def fresh(tree):
  """Copies of every leaf (the step donates them; no buffer is shared with
  the pre-trained weights, nor between the weights and SPD's anchor)."""
  return jax.tree.map(jnp.copy, tree)


def make_run(method: str, model: nnx.Module, tx: optax.GradientTransformation,
             *, weight_decay: float, lora_scale: float = 0.0,
             shardings=None) -> Run:
  """The run of `method` on `model` (already LoRA-adapted for LoRA methods).

  `tx` must be the method's one optimizer (`make_optimizer`), shared by all
  its runs: it is part of the graph, so a new one would compile anew.
  `shardings`: a function from a state to its shardings (`None`: the
  default device).
  """
  optimizer = nnx.Optimizer(model, tx, wrt=wrt(method))
  set_hyperparams(optimizer, weight_decay=weight_decay)
  graphdef, trainable, frozen = nnx.split((model, optimizer),
                                          trainable_filter(method), ...)
  trainable = fresh(trainable)
  if shardings is not None:
    trainable = jax.device_put(trainable, shardings(trainable))
    frozen = jax.device_put(frozen, shardings(frozen))
  return Run(method, graphdef, trainable, frozen, lora_scale)


def make_train_step(run: Run, shardings=None) -> Callable:
  """The jitted step `(trainable, frozen, batch, lr) -> (trainable, metrics)`.

  `trainable` is donated. Metrics: the batch's loss and, for SPD, each
  leaf's `selected` and `ratio` at this step. `shardings(tree)`: the mesh
  layout of the states (the batch is split over every device), or None.
  """
  graphdef, method = run.graphdef, run.method
  filter_ = trainable_filter(method)

  def step(trainable, frozen, batch, learning_rate):
    model, optimizer = nnx.merge(graphdef, trainable, frozen)
    set_hyperparams(optimizer, learning_rate=learning_rate)
    loss, grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, wrt(method)))(model, batch)
    optimizer.update(model, grads)
    metrics = {'loss': loss, **spd_diagnostics(optimizer)}
    _, trainable, _ = nnx.split((model, optimizer), filter_, ...)
    return trainable, metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  t_shard, f_shard = shardings(run.trainable), shardings(run.frozen)
  return jax.jit(step, donate_argnums=0,
                 in_shardings=(t_shard, f_shard, shardings('batch'), None),
                 out_shardings=(t_shard, None))


def trained_params(run: Run):
  """The run's model weights as a pure dict in the base model's layout:
  LoRA merged into the frozen weights (`W + scale a b`), or the weights."""
  model, _ = run.merge()
  if run.lora_scale:
    return lora.merged_params(model, run.lora_scale)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@jax.jit
def _sq_distance(params, reference):
  return sum(jnp.sum(jnp.square(p.astype(jnp.float32) - r.astype(jnp.float32)))
             for p, r in zip(jax.tree.leaves(params),
                             jax.tree.leaves(reference)))


def distances(run: Run, pretrained, start_adapters=None) -> dict[str, float]:
  """How far the run went: `distance` = ||W - W0|| of the model's weights
  (LoRA: `sqrt(sum ||scale a b||^2)` over the adapted weights, computed from
  the adapters, not by subtraction); with LoRA also `adapter_distance` =
  ||phi - phi0|| of the adapters from their start and `adapter_norm` =
  ||phi|| (what SPD's zero anchor measures)."""
  model, _ = run.merge()
  if not run.lora_scale:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {'distance': float(np.sqrt(_sq_distance(params, pretrained)))}
  norms = lora.delta_norms(model, run.lora_scale)
  adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  zero = jax.tree.map(jnp.zeros_like, adapters)
  out = {'distance': float(np.sqrt(sum(float(v) ** 2
                                       for v in norms.values()))),
         'adapter_norm': float(np.sqrt(_sq_distance(adapters, zero)))}
  if start_adapters is not None:
    out['adapter_distance'] = float(np.sqrt(_sq_distance(adapters,
                                                         start_adapters)))
  return out


def make_eval_step(graphdef) -> Callable:
  """`(params, rest, batch) -> (summed cross-entropy, targets)`, jitted, for
  the base model `graphdef` (params a pure dict, e.g. `trained_params`)."""

  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    return loss_terms(model, batch)

  return jax.jit(eval_step)


def evaluate(eval_step, params, rest, batches) -> float:
  """The mean next-token cross-entropy (nats per token) over `batches`."""
  total, count = 0.0, 0.0
  for batch in batches:
    t, c = eval_step(params, rest, with_loss_mask(batch))
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)
