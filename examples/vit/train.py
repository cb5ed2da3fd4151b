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
"""

import argparse
from collections.abc import Iterator, Sequence
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

import spd_optax as spd

from examples.vit import configs
from examples.vit import input_pipeline
from examples.vit import models
from examples.vit import plots

METHOD_NAMES = {'adamw': 'AdamW', 'l2sp': 'L2-SP', 'spd': 'Adam-SPD',
                'ftp': 'Adam-FTP'}


class UsageError(ValueError):
  """Flags that cannot work together; the message says which."""


class TrainState(train_state.TrainState):
  """Flax's train state, plus the pre-trained weights to measure drift from.

  Attributes:
    anchor: the weights at the start of training (`params` then).
  """

  anchor: Any


def normalize(images: jax.Array) -> jax.Array:
  """uint8 images to [-1, 1], as the `vit_jax` checkpoints expect."""
  return images.astype(jnp.float32) / 127.5 - 1.0


@jax.jit
def train_step(state: TrainState, batch: dict[str, jax.Array]):
  """One optimizer step on `batch`; returns the new state and its metrics.

  Metrics: the loss and accuracy on the batch, each leaf's deviation
  `||p - anchor||` after the step, and the constraint's per-leaf state
  where the optimizer has one (SPD's `selected` and `ratio`, FTP's `gamma`).
  """
  images = normalize(batch['image'])

  def loss_fn(params):
    logits = state.apply_fn({'params': params}, images)
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
  for batch in input_pipeline.eval_batches(records, config.image_size,
                                           config.eval_batch_size):
    correct += int(eval_step(state.apply_fn, state.params, batch))
  return correct / len(records)


def layer_values(tree) -> dict[str, Any]:
  """`{"embedding/kernel": value, ...}`; masked leaves are left out."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path, simple=True, separator='/'):
              np.asarray(value).tolist()
          for path, value in leaves}


def train(state: TrainState, batches: Iterator[dict[str, np.ndarray]],
          steps: int, config: configs.Config, desc: str):
  """Runs `steps` of `train_step`; returns the state and the logged history.

  Every `config.log_every` steps the history gets the step, the mean loss
  and accuracy of the window, each leaf's deviation and FTP radius at that
  step, and SPD's per-leaf selection rate and mean ratio over the window.
  """
  history: dict[str, Any] = {'step': [], 'loss': [], 'accuracy': []}
  window = []
  bar = tqdm.tqdm(total=steps, desc=desc, disable=config.quiet, leave=True,
                  dynamic_ncols=True, file=sys.stderr)
  for step in range(1, steps + 1):
    state, metrics = train_step(state, next(batches))
    window.append(metrics)
    if step % config.log_every and step != steps:
      continue
    window = jax.device_get(window)
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
    for name, tree in averaged.items():
      for layer, value in layer_values(tree).items():
        history.setdefault(name, {}).setdefault(layer, []).append(value)
    bar.set_postfix(loss=f'{history["loss"][-1]:.3f}',
                    acc=f'{history["accuracy"][-1]:.2f}')
    bar.update(step - bar.n)
    window = []
  bar.close()
  return state, history


def make_optimizer(method: str, config: configs.Config
                   ) -> optax.GradientTransformation:
  """The fine-tuning optimizer of `method`; the new head is not constrained."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.lr, min(config.warmup_steps, config.steps // 2), config.steps)
  weight_decay = config.weight_decay[method]
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


def pretrain(model, domains: input_pipeline.Domains, config: configs.Config):
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
      augment=True)
  state, _ = train(state, batches, config.pretrain_steps, config, 'pre-train')
  return state.params


def cached_pretrain(model, domains, config: configs.Config):
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
  params = pretrain(model, domains, config)
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  with open(path + '.json', 'w') as f:
    json.dump(recipe, f, indent=1)
  return params, path, False


def fine_tune(method: str, model, params, domains: input_pipeline.Domains,
              train_records, config: configs.Config) -> dict[str, Any]:
  """Fine-tunes `params` with `method`; returns its accuracies and history."""
  start = time.time()
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=make_optimizer(method, config), anchor=params)
  batches = input_pipeline.train_batches(
      train_records, config.image_size, config.batch_size, config.seed + 1)
  state, history = train(state, batches, config.steps, config,
                         f'fine-tune {METHOD_NAMES[method]}')
  accuracy = {d: evaluate(state, domains.splits[d]['test'], config)
              for d in domains.names}
  ood = {d: a for d, a in accuracy.items() if d != config.train_domain}
  backbone = [np.square(v[-1]) for layer, v in history['deviation'].items()
              if not layer.startswith('head/')]
  return {
      'name': METHOD_NAMES[method],
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
               'pretrain_batch_size'):
    if getattr(config, flag) <= 0:
      raise UsageError(f'--{flag.replace("_", "-")} must be positive.')
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

  model = models.VisionTransformer(len(domains.class_names),
                                   models.VIT_CONFIGS[config.model])
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
    params, path, reused = cached_pretrain(model, domains, config)
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
  results['methods'] = {
      method: fine_tune(method, model, params, domains, train_records, config)
      for method in methods}
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study with the flags in `argv`; returns what results.json holds.

  A usage or data error prints one line on stderr and exits with status 2.
  """
  try:
    config = parse_config(argv)
    results = run_study(config)
  except (UsageError, models.CheckpointError,
          input_pipeline.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None
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
