r"""Robust fine-tuning of a ViT with AdamW, L2-SP, Adam-SPD and Adam-FTP.

The default study, from the repository root (about 6 minutes on 2 CPU cores)::

  python -m examples.vit.train

pre-trains a small ViT on scikit-learn's digits rendered in six domains (or
reuses the one cached by an earlier run), fine-tunes it with a new head on a
few labelled "clean" digits once per method (same data order, steps and
schedule), and evaluates each result on the fine-tuning domain (ID) and on
every other domain (OOD). It prints a table and writes `results.json` and
plots in `--results-dir`.

On a public `vit_jax` checkpoint and DomainNet-style data::

  python -m examples.vit.train --checkpoint ViT-B_16.npz --model B/16 \
      --data ~/domainnet --train-domain real --image-size 224

At scale: the train step is jitted over a `(data, fsdp)` mesh of every device
(`--fsdp`, `--mesh-fsdp`; `--dtype bfloat16` activations), `--workdir`
checkpoints and resumes, `--lora-rank` trains LoRA adapters on a frozen
backbone, every logged step goes to `metrics_<method>.jsonl`, and
`--distributed` runs one process per host.
"""

import argparse
from collections.abc import Iterator, Sequence
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

from etils import epath
from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

import spd_optax as spd

from examples.vit import configs
from examples.vit import input_pipeline
from examples.vit import lora
from examples.vit import models
from examples.vit import plots

METHOD_NAMES = {'adamw': 'AdamW', 'l2sp': 'L2-SP', 'spd': 'Adam-SPD',
                'ftp': 'Adam-FTP'}


class UsageError(ValueError):
  """Flags that cannot work together; the message says which."""


class ResumeError(ValueError):
  """A --workdir checkpoint that cannot be resumed; the message says why."""


class Stopped(Exception):
  """Raised by --stop-after once that step's checkpoint is written."""


class TrainState(train_state.TrainState):
  """Flax's train state, plus the pre-trained weights to measure drift from.

  Attributes:
    anchor: the weights at the start of training (`params` then).
    frozen: with LoRA, the frozen backbone (`params` then holds the adapters
      and the head); None otherwise.
    lora_scale: LoRA's alpha / rank.
  """

  anchor: Any
  frozen: Any = None
  lora_scale: float = struct.field(pytree_node=False, default=0.0)

  def model_params(self, params=None):
    """The model's full params: `params` itself, or LoRA-merged."""
    params = self.params if params is None else params
    if self.frozen is None:
      return params
    merged = lora.merge(self.frozen, params['lora'], self.lora_scale)
    return dict(merged, head=params['head'])


def normalize(images: jax.Array) -> jax.Array:
  """uint8 images to [-1, 1], as the `vit_jax` checkpoints expect."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def train_step(state: TrainState, batch: dict[str, jax.Array]):
  """One optimizer step on `batch`; returns the new state and its metrics.

  `train` jits it over the device mesh (`make_train_step`).

  Metrics: the loss and accuracy on the batch, each leaf's deviation
  `||p - anchor||` after the step, and the constraint's per-leaf state
  where the optimizer has one (SPD's `selected` and `ratio`, FTP's `gamma`).
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
      'deviation': jax.tree.map(lambda p, a: jnp.linalg.norm(p - a),
                                state.params, state.anchor),
  }
  for field in ('selected', 'ratio', 'gamma'):
    value = optax.tree.get(state.opt_state, field)
    if value is not None:
      metrics[field] = value
  return state, metrics


@functools.partial(jax.jit, static_argnums=0)
def eval_step(apply_fn, params, batch: dict[str, jax.Array]) -> jax.Array:
  """The number of correctly classified real (not padding) rows of `batch`."""
  logits = apply_fn({'params': params}, normalize(batch['image']))
  correct = (jnp.argmax(logits, -1) == batch['label']) & batch['valid']
  return jnp.sum(correct)


def evaluate(state: TrainState, records, config: configs.Config) -> float:
  """Top-1 accuracy of `state` on `records`."""
  correct = 0
  params = state.model_params()
  for batch in input_pipeline.eval_batches(records, config.image_size,
                                           config.eval_batch_size):
    correct += int(eval_step(state.apply_fn, params, batch))
  return correct / len(records)


def layer_values(tree) -> dict[str, Any]:
  """`{"embedding/kernel": value, ...}`; masked leaves are left out."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
              np.asarray(value).tolist()
          for path, value in leaves}


# Devices: a (data, fsdp) mesh, the params' and optimizer state's shardings.

def make_mesh(config: configs.Config) -> Mesh:
  """A `(data, fsdp)` mesh of the devices; batches are split over both axes.

  Without `--distributed`, as many devices as divide the batch sizes (all of
  them when the batch sizes are multiples of the device count; one CPU
  device: a mesh of one). `--fsdp` makes the fsdp axis every device of the
  mesh, `--mesh-fsdp N` N of them; params of at least `--fsdp-min-size`
  elements, and their optimizer state, are split over it.
  """
  devices = jax.devices()
  n = math.gcd(len(devices), config.batch_size, config.pretrain_batch_size)
  if config.distributed and n != len(devices):
    raise UsageError(f'--batch-size and --pretrain-batch-size must be '
                     f'multiples of the {len(devices)} devices.')
  fsdp = config.mesh_fsdp or (n if config.fsdp else 1)
  if n % fsdp:
    raise UsageError(f'--mesh-fsdp {fsdp} does not divide the {n} devices '
                     'used (as many as divide the batch sizes).')
  return Mesh(np.asarray(devices[:n]).reshape(n // fsdp, fsdp),
              ('data', 'fsdp'))


def param_shardings(params, mesh: Mesh, min_size: int):
  """Leaves of >= `min_size` elements split over `fsdp` along their largest
  divisible axis; the others (and every leaf without fsdp) replicated."""
  fsdp = mesh.shape['fsdp']

  def one(x):
    spec = [None] * len(x.shape)
    if fsdp > 1 and math.prod(x.shape) >= min_size:
      for axis in sorted(range(len(x.shape)), key=lambda a: -x.shape[a]):
        if x.shape[axis] % fsdp == 0:
          spec[axis] = 'fsdp'
          break
    return NamedSharding(mesh, P(*spec))
  return jax.tree.map(one, params)


def state_shardings(state: TrainState, mesh: Mesh, min_size: int):
  """`state`'s shardings: params, anchor and optimizer state alike."""
  params = param_shardings(state.params, mesh, min_size)
  return state.replace(
      step=NamedSharding(mesh, P()), params=params, anchor=params,
      opt_state=spd.state_sharding(state.opt_state, state.params, params),
      frozen=(None if state.frozen is None
              else param_shardings(state.frozen, mesh, min_size)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def global_batch(batch, sharding: NamedSharding):
  """This host's rows of a batch as one array over the whole mesh."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def make_train_step(shardings, data_sharding):
  """`train_step` jitted over the mesh: state in and out with `shardings`."""
  return jax.jit(train_step, in_shardings=(shardings, data_sharding),
                 out_shardings=(shardings, None))


def tree_bytes(tree) -> int:
  """The bytes of a pytree's arrays (e.g. an optimizer state's memory)."""
  return int(sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree) if hasattr(x, 'dtype')))


def is_writer() -> bool:
  """Only process 0 writes logs, results and plots (orbax: every process)."""
  return jax.process_index() == 0


# Checkpoints to resume from (--workdir).

def _checkpoint_item(state: TrainState, batches) -> dict[str, Any]:
  return {'step': state.step, 'params': state.params,
          'opt_state': state.opt_state,
          'data': {k: np.asarray(v, np.int64)
                   for k, v in batches.get_state().items()}}


def _fingerprint_differences(path: epath.Path, fingerprint) -> list[str]:
  recipe = path / 'run.json'
  if not recipe.exists():
    return []
  saved = json.loads(recipe.read_text())
  return [f'{k}={saved.get(k)!r} there, {fingerprint.get(k)!r} now'
          for k in sorted(set(saved) | set(fingerprint))
          if saved.get(k) != fingerprint.get(k)]


def open_workdir(workdir: str, fingerprint: dict[str, Any], state, batches,
                 shardings, mesh):
  """The checkpoint manager of `workdir`, and the state to start from.

  Returns `(manager, state, history or None)`: the latest checkpoint's
  params, optimizer state, step and data position if there is one (the
  iterator `batches` is moved to it), else `state` unchanged. A checkpoint
  of another run (other flags) or one that cannot be read raises
  `ResumeError`, never a silent fresh start.
  """
  path = epath.Path(os.path.abspath(workdir))
  differences = _fingerprint_differences(path, fingerprint)
  if differences:
    raise ResumeError(f'--workdir {path} holds another run\'s checkpoints ('
                      + '; '.join(differences[:4]) + '); use a new --workdir.')
  try:
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True))
    latest = manager.latest_step()
  except Exception as error:  # pylint: disable=broad-except
    raise ResumeError(f'cannot open the checkpoints in {path}: '
                      f'{_one_line(error)}') from None
  if is_writer() and not (path / 'run.json').exists():
    (path / 'run.json').write_text(json.dumps(fingerprint, sort_keys=True))
  if latest is None:
    return manager, state, None
  item = _checkpoint_item(state, batches)
  replicated = NamedSharding(mesh, P())
  item_shardings = {'step': replicated, 'params': shardings.params,
                    'opt_state': shardings.opt_state,
                    'data': jax.tree.map(lambda _: replicated, item['data'])}
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype
                                        if not hasattr(x, 'dtype') else x.dtype,
                                        sharding=s),
      item, item_shardings)
  try:
    restored = spd.restore_state(manager, latest, target)
  except Exception as error:  # pylint: disable=broad-except
    raise ResumeError(f'cannot resume from step {latest} in {path}: '
                      f'{_one_line(error)}') from None
  state = state.replace(step=restored['step'], params=restored['params'],
                        opt_state=restored['opt_state'])
  batches.set_state({k: int(v) for k, v in restored['data'].items()})
  saved_history = path / f'history_{latest}.json'
  history = (json.loads(saved_history.read_text())
             if saved_history.exists() else None)
  print(f'resumed from step {latest} in {path}', file=sys.stderr)
  return manager, state, history


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split())
  return text[:400] + ('...' if len(text) > 400 else '') or type(error).__name__


# Metrics (--log-every): a JSONL line per logged step, TensorBoard if there.

class MetricsLog:
  """Appends `{"step", "loss", "accuracy", "lr", "deviation": {layer: ..},
  "selection_rate": {layer: ..}, ...}` lines to `path` (process 0 only), and
  writes scalars to TensorBoard when `tensorboardX` is importable."""

  def __init__(self, path: str | None, start_step: int):
    self.path = path if path and is_writer() else None
    self.tensorboard = None
    if self.path is None:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    kept = []
    if start_step and os.path.exists(self.path):  # Resumed: drop later lines.
      with open(self.path) as f:
        kept = [line for line in f if json.loads(line)['step'] <= start_step]
    with open(self.path, 'w') as f:
      f.writelines(kept)
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self.tensorboard = tensorboardX.SummaryWriter(
          os.path.splitext(self.path)[0] + '_tensorboard')
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    if self.path is None:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tensorboard is not None:
      for name in ('loss', 'accuracy', 'lr'):
        self.tensorboard.add_scalar(name, record[name], record['step'])
      for name in ('deviation', 'selection_rate'):
        for layer, value in record.get(name, {}).items():
          self.tensorboard.add_scalar(f'{name}/{layer}', value, record['step'])
      self.tensorboard.flush()


def train(state: TrainState, batches, steps: int, config: configs.Config,
          desc: str, mesh: Mesh, schedule=None, workdir: str | None = None,
          fingerprint: dict[str, Any] | None = None,
          metrics_path: str | None = None):
  """Runs `steps` of `train_step`; returns the state and the logged history.

  Every `config.log_every` steps the history gets the step, the mean loss
  and accuracy of the window, each leaf's deviation and FTP radius at that
  step, and SPD's per-leaf selection rate and mean ratio over the window;
  the same goes to `metrics_path` (JSONL) with the learning rate. With
  `workdir`, a checkpoint is saved every `config.checkpoint_every` steps and
  at the end, and training resumes from the latest one there.
  """
  shardings = state_shardings(state, mesh, config.fsdp_min_size)
  data_sharding = batch_sharding(mesh)
  step_fn = make_train_step(shardings, data_sharding)
  state = jax.device_put(state, shardings)
  history: dict[str, Any] = {'step': [], 'loss': [], 'accuracy': []}
  manager = None
  if workdir is not None:
    manager, state, saved = open_workdir(workdir, fingerprint or {}, state,
                                         batches, shardings, mesh)
    history = saved or history
  start = int(state.step)
  log = MetricsLog(metrics_path, start)
  window = []
  bar = tqdm.tqdm(total=steps, initial=start, desc=desc, disable=config.quiet,
                  leave=True, dynamic_ncols=True, file=sys.stderr)
  for step in range(start + 1, steps + 1):
    state, metrics = step_fn(state, global_batch(next(batches), data_sharding))
    window.append(metrics)
    if step % config.log_every == 0 or step == steps:
      _log_window(history, jax.device_get(window), step, schedule, log)
      bar.set_postfix(loss=f'{history["loss"][-1]:.3f}',
                      acc=f'{history["accuracy"][-1]:.2f}')
      bar.update(step - bar.n)
      window = []
    if manager is not None and (step % config.checkpoint_every == 0
                                or step == steps):
      manager.save(step, args=ocp.args.StandardSave(
          _checkpoint_item(state, batches)), force=True)
      if is_writer():
        (epath.Path(os.path.abspath(workdir)) / f'history_{step}.json'
         ).write_text(json.dumps(history))
    if config.stop_after is not None and step - start == config.stop_after:
      if manager is not None:  # As if killed: later steps are not saved.
        manager.wait_until_finished()
        manager.close()
      bar.close()
      raise Stopped(step)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  bar.close()
  return state, history


def _log_window(history, window, step, schedule, log: MetricsLog) -> None:
  history['step'].append(step)
  for name in ('loss', 'accuracy'):
    history[name].append(float(np.mean([m[name] for m in window])))
  averaged = {'deviation': window[-1]['deviation']}
  if 'gamma' in window[-1]:
    averaged['gamma'] = window[-1]['gamma']
  for name in ('selected', 'ratio'):
    if name in window[-1]:
      averaged[name] = jax.tree.map(
          lambda *xs: np.mean(np.asarray(xs, np.float32)),
          *[m[name] for m in window])
  record = {'step': step, 'loss': history['loss'][-1],
            'accuracy': history['accuracy'][-1],
            'lr': float(schedule(step - 1)) if schedule is not None else None}
  for name, tree in averaged.items():
    values = layer_values(tree)
    record['selection_rate' if name == 'selected' else name] = values
    for layer, value in values.items():
      history.setdefault(name, {}).setdefault(layer, []).append(value)
  log.write(record)


def make_schedule(config: configs.Config) -> optax.Schedule:
  """Fine-tuning's learning rate: linear warm-up, cosine decay."""
  return optax.warmup_cosine_decay_schedule(
      0.0, config.lr, min(config.warmup_steps, config.steps // 2), config.steps)


LORA_METHODS = ('adamw', 'spd')


def make_optimizer(method: str, config: configs.Config
                   ) -> optax.GradientTransformation:
  """The fine-tuning optimizer of `method`; the new head is not constrained.

  With `--lora-rank`, the params it sees are `{"lora": adapters, "head"}`:
  AdamW decays both toward 0; SPD constrains the adapters toward zero
  (`anchor="zero"`), not the head.
  """
  schedule = make_schedule(config)
  weight_decay = config.weight_decay[method]
  if config.lora_rank:
    if method == 'adamw':
      return optax.adamw(schedule, weight_decay=weight_decay)
    if method == 'spd':
      return spd.adam_spd(schedule, weight_decay, anchor='zero',
                          mask=lora.adapter_mask)
    raise UsageError(f'--lora-rank works with --optimizer '
                     f'{", ".join(LORA_METHODS)} or all, not {method!r}.')
  if method == 'adamw':
    return optax.adamw(schedule, weight_decay=weight_decay)
  if method == 'l2sp':
    return spd.adamw_l2sp(schedule, weight_decay, mask=models.backbone_mask)
  if method == 'spd':
    return spd.adam_spd(schedule, weight_decay, mask=models.backbone_mask)
  if method == 'ftp':
    return spd.adam_ftp(schedule, weight_decay=weight_decay, k=config.ftp_k,
                        mask=models.backbone_mask,
                        output_axes=models.vit_output_axes)
  raise UsageError(f'unknown optimizer {method!r}.')


def pretrain(model, domains: input_pipeline.Domains, config: configs.Config,
             mesh: Mesh):
  """Trains `model` from scratch on the "pretrain" split of every domain."""
  records = [r for splits in domains.splits.values()
             for r in splits['pretrain']]
  params = models.init_params(model, config.image_size, config.seed)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(100, config.pretrain_steps // 2),
      config.pretrain_steps)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=optax.adamw(schedule, weight_decay=0.05),
                            anchor=params)
  batches = input_pipeline.train_batches(
      records, config.image_size, config.pretrain_batch_size, config.seed,
      augment=True, process_index=jax.process_index(),
      process_count=jax.process_count())
  state, _ = train(state, batches, config.pretrain_steps, config, 'pre-train',
                   mesh, schedule=schedule, metrics_path=os.path.join(
                       config.results_dir, 'metrics_pretrain.jsonl'))
  return state.params


def cached_pretrain(model, domains, config: configs.Config, mesh: Mesh):
  """`pretrain`, saved with orbax under the cache folder and reused if there."""
  recipe = {
      'model': dataclasses.asdict(model.config),
      'num_classes': model.num_classes,
      'image_size': config.image_size,
      'data': os.path.abspath(config.data) if config.data else 'digits',
      'domains': {d: len(s['pretrain']) for d, s in domains.splits.items()},
      'steps': config.pretrain_steps, 'lr': config.pretrain_lr,
      'batch_size': config.pretrain_batch_size, 'seed': config.seed,
  }
  digest = hashlib.sha256(
      json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.abspath(os.path.join(config.cache_dir, f'pretrain_{digest}'))
  checkpointer = ocp.StandardCheckpointer()
  if os.path.isdir(path):
    params = checkpointer.restore(
        path, models.abstract_params(model, config.image_size))
    return params, path, True
  params = pretrain(model, domains, config, mesh)
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  if is_writer():
    with open(path + '.json', 'w') as f:
      json.dump(recipe, f, indent=1)
  return params, path, False


def make_state(method: str, model, params, config: configs.Config
               ) -> TrainState:
  """The fine-tuning state of `method` from the pre-trained `params`.

  With `--lora-rank`: `params` of the state are `{"lora": adapters, "head"}`
  and the backbone is `frozen`, else the whole model is trained.
  """
  tx = make_optimizer(method, config)
  if not config.lora_rank:
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             anchor=params)
  trainable = {'lora': lora.init(params, config.lora_rank, config.seed + 2,
                                 config.lora_mlp),
               'head': params['head']}
  return TrainState.create(
      apply_fn=model.apply, params=trainable, tx=tx, anchor=trainable,
      frozen={k: v for k, v in params.items() if k != 'head'},
      lora_scale=config.lora_alpha / config.lora_rank)


# Flags that do not change a run's result (a resumed run may change them).
_NOT_IN_FINGERPRINT = ('optimizer', 'eval_batch_size', 'log_every',
                       'results_dir', 'cache_dir', 'quiet', 'workdir',
                       'checkpoint_every', 'stop_after', 'distributed',
                       'fsdp', 'mesh_fsdp', 'fsdp_min_size')


def fine_tune(method: str, model, params, domains: input_pipeline.Domains,
              train_records, config: configs.Config,
              mesh: Mesh | None = None) -> dict[str, Any]:
  """Fine-tunes `params` with `method`; returns its accuracies and history.

  With `--lora-rank`, the backbone is frozen and only LoRA adapters and the
  head are trained. With `--workdir`, checkpoints go to `WORKDIR/<method>`.
  """
  start = time.time()
  mesh = mesh if mesh is not None else make_mesh(config)
  state = make_state(method, model, params, config)
  suffix = '_lora' if config.lora_rank else ''
  memory = {'opt_state_bytes': tree_bytes(state.opt_state),
            'trainable_bytes': tree_bytes(state.params),
            'model_bytes': tree_bytes(params)}
  if config.lora_rank:
    memory['adapter_bytes'] = tree_bytes(state.params['lora'])
    memory['head_bytes'] = tree_bytes(state.params['head'])
    print(f'LoRA rank {config.lora_rank}: optimizer state '
          f'{memory["opt_state_bytes"]:,} bytes; adapters '
          f'{memory["adapter_bytes"]:,} + head {memory["head_bytes"]:,} '
          f'bytes; model {memory["model_bytes"]:,} bytes', file=sys.stderr)
  batches = input_pipeline.train_batches(
      train_records, config.image_size, config.batch_size, config.seed + 1,
      process_index=jax.process_index(), process_count=jax.process_count())
  fingerprint = {k: v for k, v in dataclasses.asdict(config).items()
                 if k not in _NOT_IN_FINGERPRINT}
  fingerprint.update(method=method, weight_decay=config.weight_decay[method])
  name = METHOD_NAMES[method] + ('+LoRA' if config.lora_rank else '')
  state, history = train(
      state, batches, config.steps, config, f'fine-tune {name}', mesh,
      schedule=make_schedule(config),
      workdir=(os.path.join(config.workdir, method + suffix)
               if config.workdir else None),
      fingerprint=fingerprint,
      metrics_path=os.path.join(config.results_dir,
                                f'metrics_{method}{suffix}.jsonl'))
  accuracy = {d: evaluate(state, domains.splits[d]['test'], config)
              for d in domains.names}
  ood = {d: a for d, a in accuracy.items() if d != config.train_domain}
  if config.lora_rank:  # The merged adapters' change of the backbone.
    merged = state.model_params()
    backbone = [np.sum([float(jnp.sum(jnp.square(m - p))) for m, p in zip(
        jax.tree.leaves(merged[k]), jax.tree.leaves(params[k]))])
                for k in params if k != 'head']
  else:
    backbone = [np.square(v[-1]) for layer, v in history['deviation'].items()
                if not layer.startswith('head/')]
  return {
      'name': name,
      'memory': memory,
      'weight_decay': config.weight_decay[method],
      'id_accuracy': accuracy[config.train_domain],
      'ood_accuracy': ood,
      'ood_mean': float(np.mean(list(ood.values()))) if ood else None,
      'deviation': float(np.sqrt(np.sum(backbone))),
      'wall_s': time.time() - start,
      'history': history,
  }


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table: accuracies in %, the backbone's drift."""
  ood_domains = [d for d in results['domains'] if d != results['train_domain']]
  header = (['method', f'ID ({results["train_domain"]})']
            + [f'{d}' for d in ood_domains] + ['OOD mean', '‖θ−θ0‖'])
  rows = []
  if results.get('pretrained_accuracy'):
    acc = results['pretrained_accuracy']
    ood = [acc[d] for d in ood_domains]
    rows.append(['pre-trained (its head)',
                 f'{100 * acc[results["train_domain"]]:.1f}']
                + [f'{100 * a:.1f}' for a in ood]
                + [f'{100 * np.mean(ood):.1f}' if ood else '-', '0'])
  for run in results['methods'].values():
    rows.append([run['name'], f'{100 * run["id_accuracy"]:.1f}']
                + [f'{100 * run["ood_accuracy"][d]:.1f}' for d in ood_domains]
                + [f'{100 * run["ood_mean"]:.1f}' if ood_domains else '-',
                   f'{run["deviation"]:.2f}'])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '| ' + ' | '.join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(r, widths))) + ' |'
  rule = '|' + '|'.join('-' * (w + 1) + (':' if i else '-')
                        for i, w in enumerate(widths)) + '|'
  return '\n'.join([line(header), rule] + [line(r) for r in rows])


# The command line.

def parse_weight_decay(text: str,
                       defaults: dict[str, float]) -> dict[str, float]:
  """`"0.5"` (every method) or `"spd=1.0,l2sp=0.1"` (those methods)."""
  values = dict(defaults)
  try:
    if '=' not in text:
      return {method: float(text) for method in values}
    for item in text.split(','):
      method, value = item.split('=')
      if method.strip() not in values:
        raise UsageError(f'--weight-decay names unknown method {method!r}; '
                         f'known: {", ".join(configs.METHODS)}.')
      values[method.strip()] = float(value)
  except ValueError as error:
    if isinstance(error, UsageError):
      raise
    raise UsageError(f'--weight-decay {text!r} is not a number nor '
                     'METHOD=NUMBER[,METHOD=NUMBER...].') from None
  return values


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows a flag's default unless it is None or False (the help says it)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
  """The flags; each one sets the `configs.Config` field of the same name."""
  d = configs.Config()
  parser = argparse.ArgumentParser(
      prog='python -m examples.vit.train',
      description=(
          'Robust fine-tuning of a Vision Transformer with AdamW, L2-SP, '
          'Adam-SPD and Adam-FTP. Without flags: pre-trains a small ViT on '
          'scikit-learn digits in six domains (cached), fine-tunes it on a '
          'few "clean" digits with each method and reports accuracy on every '
          'domain, about 6 minutes on 2 CPU cores (2 to 3 once cached).'),
      formatter_class=_HelpFormatter)
  a = parser.add_argument
  a('--model', default=d.model, choices=sorted(models.VIT_CONFIGS),
    help='ViT variant; must match --checkpoint. "small" is the default '
    'study\'s, "tiny" the tests\'.')
  a('--checkpoint', default=d.checkpoint, metavar='PATH.npz',
    help='a vit_jax .npz checkpoint (e.g. ViT-B_16.npz) to fine-tune; '
    'without it a model is pre-trained on every domain first (and cached).')
  a('--image-size', type=int, default=None,
    help='image side, a multiple of the patch size; position embeddings are '
    'resized to it. Default: 16 for small/tiny, 224 for the /16 variants.')
  a('--data', default=d.data, metavar='DIR',
    help='DomainNet-style data: DIR/<domain>/<class>/<image>, the same class '
    'folders in every domain. Default: scikit-learn digits in six domains.')
  a('--train-domain', default=d.train_domain,
    help='the domain to fine-tune on (ID); every other domain is OOD. '
    'Default: "clean" for digits, else the first domain.')
  a('--shots', type=int, default=d.shots,
    help='labelled fine-tuning examples per class (0: the whole fine-tuning '
    'split).')
  a('--optimizer', default=d.optimizer, choices=configs.METHODS + ('all',),
    help='fine-tuning method: adamw (baseline), l2sp (AdamW decaying toward '
    'the pre-trained weights), spd (Adam-SPD), ftp (Adam-FTP), or all.')
  a('--lr', type=float, default=d.lr,
    help='peak fine-tuning learning rate (linear warm-up, cosine decay).')
  a('--weight-decay', default=None, metavar='WD',
    help='a number for every method run, or METHOD=NUMBER,... . AdamW: decay '
    'toward 0; L2-SP: toward the pre-trained weights (both times lr); SPD: '
    'lambda (not times lr); FTP: AdamW\'s decay inside Adam-FTP. Defaults: '
    + ', '.join(f'{k}={v:g}' for k, v in d.weight_decay.items()) + '.')
  a('--ftp-k', type=float, default=d.ftp_k,
    help='FTP\'s k in [0, 1]: the scale of a positive radius gradient.')
  a('--steps', type=int, default=d.steps, help='fine-tuning steps per method.')
  a('--batch-size', type=int, default=d.batch_size,
    help='fine-tuning batch size.')
  a('--warmup-steps', type=int, default=d.warmup_steps,
    help='fine-tuning warm-up steps.')
  a('--pretrain-steps', type=int, default=d.pretrain_steps,
    help='pre-training steps (without --checkpoint).')
  a('--pretrain-lr', type=float, default=d.pretrain_lr,
    help='pre-training peak learning rate.')
  a('--pretrain-batch-size', type=int, default=d.pretrain_batch_size,
    help='pre-training batch size.')
  a('--seed', type=int, default=d.seed,
    help='seed of the splits, initialisation and data order.')
  a('--eval-batch-size', type=int, default=d.eval_batch_size,
    help='evaluation batch size.')
  a('--log-every', type=int, default=d.log_every,
    help='steps between logged points of the training curves.')
  a('--results-dir', default=d.results_dir,
    help='where results.json and the plots are written.')
  a('--cache-dir', default=d.cache_dir,
    help='where pre-trained models are cached (orbax). Default: "cache" '
    'beside --results-dir.')
  a('--quiet', action='store_true', help='no progress bars.')
  g = parser.add_argument_group('scale: devices, precision, resuming, LoRA')
  a = g.add_argument
  a('--fsdp', action='store_true',
    help='split params of >= --fsdp-min-size elements and their optimizer '
    'state (anchor included) over every device (mesh (data, fsdp) = (1, n)); '
    'without it they are replicated and batches split over the devices.')
  a('--mesh-fsdp', type=int, default=d.mesh_fsdp, metavar='N',
    help='the fsdp axis size (implies --fsdp); the data axis gets the rest.')
  a('--fsdp-min-size', type=int, default=d.fsdp_min_size,
    help='elements a param needs to be split over the fsdp axis.')
  a('--dtype', default=d.dtype, choices=('float32', 'bfloat16'),
    help='compute dtype of the activations; params and optimizer state stay '
    'float32.')
  a('--workdir', default=d.workdir, metavar='DIR',
    help='save checkpoints (params, optimizer state, step, data position) in '
    'DIR/<method> and resume from the latest one when run again.')
  a('--checkpoint-every', type=int, default=d.checkpoint_every, metavar='N',
    help='steps between checkpoints (with --workdir; also at the end).')
  a('--stop-after', type=int, default=d.stop_after, metavar='STEPS',
    help='stop (exit status 3) after STEPS steps of this run, as if killed: '
    'steps after the last checkpoint are lost; running the same command '
    'again resumes from that checkpoint (needs --workdir).')
  a('--lora-rank', type=int, default=d.lora_rank, metavar='R',
    help='freeze the backbone and train rank-R LoRA adapters on the '
    'attention query/key/value/out kernels, and the head (0: off). With '
    '--optimizer all: AdamW+LoRA and Adam-SPD+LoRA (anchor "zero").')
  a('--lora-alpha', type=float, default=d.lora_alpha,
    help='LoRA scale alpha (the update is alpha / R * A @ B).')
  a('--lora-mlp', action='store_true',
    help='adapters on the MLP kernels too.')
  a('--distributed', action='store_true',
    help='multi-host: call jax.distributed.initialize(); each host reads '
    'its slice of every batch; process 0 writes logs, results and plots.')
  return parser


def parse_config(argv: Sequence[str] | None) -> configs.Config:
  """The flags as a `configs.Config`, checked."""
  args = make_parser().parse_args(argv)
  values = vars(args)
  weight_decay = values.pop('weight_decay')
  config = configs.Config(**values)
  if weight_decay is not None:
    config.weight_decay = parse_weight_decay(weight_decay, config.weight_decay)
  patch = models.VIT_CONFIGS[config.model].patch_size
  if config.image_size is None:
    config.image_size = 16 if patch < 16 else 224
  if config.image_size <= 0 or config.image_size % patch:
    raise UsageError(f'--image-size {config.image_size} is not a positive '
                     f'multiple of {config.model}\'s patch size {patch}.')
  for flag in ('steps', 'batch_size', 'eval_batch_size', 'log_every',
               'pretrain_batch_size', 'checkpoint_every', 'fsdp_min_size'):
    if getattr(config, flag) <= 0:
      raise UsageError(f'--{flag.replace("_", "-")} must be positive.')
  for flag in ('mesh_fsdp', 'stop_after'):
    if getattr(config, flag) is not None and getattr(config, flag) <= 0:
      raise UsageError(f'--{flag.replace("_", "-")} must be positive.')
  if config.lora_rank < 0:
    raise UsageError('--lora-rank must be >= 0.')
  if config.lora_rank and config.optimizer not in LORA_METHODS + ('all',):
    raise UsageError(f'--lora-rank works with --optimizer '
                     f'{", ".join(LORA_METHODS)} or all, not '
                     f'{config.optimizer!r}.')
  if config.lora_mlp and not config.lora_rank:
    raise UsageError('--lora-mlp needs --lora-rank.')
  if config.stop_after is not None and config.workdir is None:
    raise UsageError('--stop-after needs --workdir (to resume from).')
  if config.checkpoint is not None and not os.path.isfile(config.checkpoint):
    raise UsageError(f'checkpoint {config.checkpoint} does not exist.')
  if config.data is not None and not os.path.isdir(config.data):
    raise UsageError(f'data folder {config.data} does not exist.')
  if config.cache_dir is None:
    config.cache_dir = os.path.join(
        os.path.dirname(os.path.abspath(config.results_dir)), 'cache')
  return config


def run_study(config: configs.Config) -> dict[str, Any]:
  """The study: pre-trained weights, one fine-tuning per method, evaluation."""
  pretraining = config.checkpoint is None
  fractions = (0.5, 0.2) if pretraining else (0.0, 0.7)
  if config.data is None:
    domains = input_pipeline.digits_domains(fractions=fractions,
                                            seed=config.seed)
  else:
    domains = input_pipeline.folder_domains(
        config.data, fractions=fractions, seed=config.seed)
  if config.train_domain is None:
    config.train_domain = ('clean' if 'clean' in domains.names
                           else domains.names[0])
  if config.train_domain not in domains.names:
    raise UsageError(f'--train-domain {config.train_domain!r} is not one of '
                     f'the domains: {", ".join(domains.names)}.')
  for name, splits in domains.splits.items():
    if not splits['test'] or (pretraining and not splits['pretrain']):
      raise input_pipeline.DataError(
          f'domain {name!r} has too few images to split for this study.')
  train_records = input_pipeline.few_shot(
      domains.splits[config.train_domain]['finetune'], config.shots,
      config.seed)
  if not train_records:
    raise input_pipeline.DataError(
        f'domain {config.train_domain!r} has no images left to fine-tune on.')

  mesh = make_mesh(config)
  model = models.VisionTransformer(
      len(domains.class_names), models.VIT_CONFIGS[config.model],
      dtype=None if config.dtype == 'float32' else jnp.dtype(config.dtype))
  results: dict[str, Any] = {
      'config': dataclasses.asdict(config),
      'domains': list(domains.names),
      'train_domain': config.train_domain,
      'class_names': list(domains.class_names),
      'train_examples': len(train_records),
      'test_examples': {d: len(s['test']) for d, s in domains.splits.items()},
      'pretrained_accuracy': None,
  }
  if pretraining:
    params, path, reused = cached_pretrain(model, domains, config, mesh)
    print(f'pre-trained model {"reused from" if reused else "saved to"} {path}',
          file=sys.stderr)
    state = TrainState.create(apply_fn=model.apply, params=params,
                              tx=optax.identity(), anchor=params)
    results['pretrained_accuracy'] = {
        d: evaluate(state, domains.splits[d]['test'], config)
        for d in domains.names}
    # A new head for the fine-tuning task, as in real transfer.
    params = dict(params, head=jax.tree.map(jnp.zeros_like, params['head']))
  else:
    params = jax.tree.map(jnp.asarray,
                          models.load_npz(config.checkpoint,
                                          models.abstract_params(
                                              model, config.image_size)))

  methods = (configs.METHODS if config.optimizer == 'all'
             else (config.optimizer,))
  if config.lora_rank and config.optimizer == 'all':
    methods = LORA_METHODS
  results['methods'] = {
      method: fine_tune(method, model, params, domains, train_records, config,
                        mesh)
      for method in methods}
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study with the flags in `argv`; returns what results.json holds.

  A usage or data error prints one line on stderr and exits with status 2.
  """
  try:
    config = parse_config(argv)
    if config.distributed:
      jax.distributed.initialize()
    results = run_study(config)
  except (UsageError, models.CheckpointError, input_pipeline.DataError,
          ResumeError) as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None
  except Stopped as stop:
    print(f'stopped after step {stop.args[0]} (--stop-after); run the same '
          'command again to resume.', file=sys.stderr)
    raise SystemExit(3) from None
  if not is_writer():
    return results
  os.makedirs(config.results_dir, exist_ok=True)
  with open(os.path.join(config.results_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  figures = plots.plot_all(results, config.results_dir)
  print(format_table(results))
  print(f'\nresults: {os.path.abspath(config.results_dir)} '
        f'(results.json, {", ".join(os.path.basename(p) for p in figures)})')
  return results


if __name__ == '__main__':
  main()
