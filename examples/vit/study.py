"""The study: pre-trained weights, one fine-tuning run per method, the table.

Pre-trains a ViT on every domain (cached with orbax) unless a checkpoint is
given, fine-tunes it once per method (same data order, steps and schedule),
and evaluates each result on the fine-tuning domain (ID) and on every other
domain (OOD).
"""

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax
import orbax.checkpoint as ocp

import spd_optax as spd

from examples.vit import checkpointing
from examples.vit import checkpoints
from examples.vit import configs
from examples.vit import devices
from examples.vit import input_pipeline
from examples.vit import lora
from examples.vit import models
from examples.vit import train_loop
from examples.vit import train_step


def make_schedule(config: configs.Config) -> optax.Schedule:
  """Fine-tuning's learning rate: linear warm-up, cosine decay."""
  return optax.warmup_cosine_decay_schedule(
      0.0, config.lr, min(config.warmup_steps, config.steps // 2), config.steps)


def make_optimizer(method: str, config: configs.Config
                   ) -> optax.GradientTransformation:
  """The fine-tuning optimizer of `method`; the new head is not constrained.

  With `--lora-rank`, the params it sees are `{"lora": adapters, "head"}`:
  AdamW decays both toward 0; SPD constrains the adapters toward zero
  (`anchor="zero"`), not the head.
  """
  # `layer_axis`: a scanned model's stacked blocks are decided on (SPD) and
  # projected (FTP) per block; on the unrolled model it changes nothing.
  schedule = make_schedule(config)
  weight_decay = config.weight_decay[method]
  if config.lora_rank:
    if method == 'adamw':
      return optax.adamw(schedule, weight_decay=weight_decay)
    if method == 'spd':
      return spd.adam_spd(schedule, weight_decay, anchor='zero',
                          mask=lora.adapter_mask)
    raise configs.UsageError(
        f'--lora-rank works with --optimizer '
        f'{", ".join(configs.LORA_METHODS)} or all, not {method!r}.')
  if method == 'adamw':
    return optax.adamw(schedule, weight_decay=weight_decay)
  if method == 'l2sp':
    return spd.adamw_l2sp(schedule, weight_decay, mask=models.backbone_mask)
  if method == 'spd':
    return spd.adam_spd(schedule, weight_decay, mask=models.backbone_mask,
                        layer_axis=models.vit_layer_axis)
  if method == 'ftp':
    return spd.adam_ftp(schedule, weight_decay=weight_decay, k=config.ftp_k,
                        mask=models.backbone_mask,
                        output_axes=models.vit_output_axes,
                        layer_axis=models.vit_layer_axis)
  raise configs.UsageError(f'unknown optimizer {method!r}.')


def make_state(method: str, model, params, config: configs.Config,
               mesh: Mesh | None = None) -> train_step.TrainState:
  """The fine-tuning state of `method` from the pre-trained `params`.

  With `--lora-rank`: `params` of the state are `{"lora": adapters, "head"}`
  and the backbone is `frozen`, else the whole model is trained. The state
  is a fresh copy (laid out on `mesh` if given): `params` stay the caller's.
  """
  tx = make_optimizer(method, config)
  if not config.lora_rank:
    return train_step.create_state(model.apply, params, tx, mesh=mesh,
                                   min_size=config.fsdp_min_size)
  trainable = {'lora': lora.init(params, config.lora_rank, config.seed + 2,
                                 config.lora_mlp),
               'head': params['head']}
  return train_step.create_state(
      model.apply, trainable, tx,
      frozen={k: v for k, v in params.items() if k != 'head'},
      lora_scale=config.lora_alpha / config.lora_rank, mesh=mesh,
      min_size=config.fsdp_min_size)


def pretrain(model, domains: input_pipeline.Domains, config: configs.Config,
             mesh: Mesh):
  """Trains `model` from scratch on the "pretrain" split of every domain."""
  records = [r for splits in domains.splits.values()
             for r in splits['pretrain']]
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(100, config.pretrain_steps // 2),
      config.pretrain_steps)
  state = train_step.create_state(
      model.apply, models.init_params(model, config.image_size, config.seed),
      optax.adamw(schedule, weight_decay=0.05), mesh=mesh,
      min_size=config.fsdp_min_size)
  batches = input_pipeline.train_batches(
      records, config.image_size, config.pretrain_batch_size, config.seed,
      augment=True, process_index=jax.process_index(),
      process_count=jax.process_count())
  state, _ = train_loop.train(
      state, batches, config.pretrain_steps, config, 'pre-train', mesh,
      schedule=schedule, metrics_path=os.path.join(
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
  if config.scan:  # Another layout of the params (remat changes nothing).
    recipe['scan'] = True
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
  if devices.is_writer():
    with open(path + '.json', 'w') as f:
      json.dump(recipe, f, indent=1)
  return params, path, False


def fine_tune(method: str, model, params, domains: input_pipeline.Domains,
              train_records, config: configs.Config,
              mesh: Mesh | None = None) -> dict[str, Any]:
  """Fine-tunes `params` with `method`; returns its accuracies and history.

  `params` (the pre-trained weights, best on the host) are not changed: the
  state trained is a copy on the mesh. With `--lora-rank`, the backbone is
  frozen and only LoRA adapters and the head are trained. With
  `--workdir`, checkpoints go to `WORKDIR/<method>`.
  """
  start = time.time()
  mesh = mesh if mesh is not None else devices.make_mesh(config)
  state = make_state(method, model, params, config, mesh)
  suffix = '_lora' if config.lora_rank else ''
  memory = {'opt_state_bytes': devices.tree_bytes(state.opt_state),
            'trainable_bytes': devices.tree_bytes(state.params),
            'model_bytes': devices.tree_bytes(params)}
  if config.lora_rank:
    memory['adapter_bytes'] = devices.tree_bytes(state.params['lora'])
    memory['head_bytes'] = devices.tree_bytes(state.params['head'])
    print(f'LoRA rank {config.lora_rank}: optimizer state '
          f'{memory["opt_state_bytes"]:,} bytes; adapters '
          f'{memory["adapter_bytes"]:,} + head {memory["head_bytes"]:,} '
          f'bytes; model {memory["model_bytes"]:,} bytes', file=sys.stderr)
  batches = input_pipeline.train_batches(
      train_records, config.image_size, config.batch_size, config.seed + 1,
      process_index=jax.process_index(), process_count=jax.process_count())
  name = configs.METHOD_NAMES[method] + ('+LoRA' if config.lora_rank else '')
  state, history = train_loop.train(
      state, batches, config.steps, config, f'fine-tune {name}', mesh,
      schedule=make_schedule(config),
      workdir=(os.path.join(config.workdir, method + suffix)
               if config.workdir else None),
      fingerprint=checkpointing.fingerprint(config, method),
      metrics_path=os.path.join(config.results_dir,
                                f'metrics_{method}{suffix}.jsonl'))
  merged = state.model_params()
  accuracy = {d: train_step.evaluate(state.apply_fn, merged,
                                     domains.splits[d]['test'], config)
              for d in domains.names}
  ood = {d: a for d, a in accuracy.items() if d != config.train_domain}
  if config.lora_rank:  # The merged adapters' change of the backbone.
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
    raise configs.UsageError(
        f'--train-domain {config.train_domain!r} is not one of the domains: '
        f'{", ".join(domains.names)}.')
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

  mesh = devices.make_mesh(config)
  dtype = None if config.dtype == 'float32' else jnp.dtype(config.dtype)
  if pretraining:
    model = models.VisionTransformer(
        len(domains.class_names), models.VIT_CONFIGS[config.model],
        dtype=dtype, remat=config.remat, scan=config.scan)
  else:
    loaded = checkpoints.load(
        config.checkpoint, image_size=config.image_size,
        num_classes=len(domains.class_names), model=config.model,
        scan=config.scan)
    print(loaded.summary, file=sys.stderr)
    model = loaded.model(dtype=dtype, remat=config.remat)
  results: dict[str, Any] = {
      'config': dataclasses.asdict(config),
      'domains': list(domains.names),
      'train_domain': config.train_domain,
      'class_names': list(domains.class_names),
      'train_examples': len(train_records),
      'test_examples': {d: len(s['test']) for d, s in domains.splits.items()},
      'pretrained_accuracy': None,
      'checkpoint_summary': None if pretraining else loaded.summary,
  }
  if pretraining:
    params, path, reused = cached_pretrain(model, domains, config, mesh)
    print(f'pre-trained model {"reused from" if reused else "saved to"} {path}',
          file=sys.stderr)
    results['pretrained_accuracy'] = {
        d: train_step.evaluate(model.apply, params, domains.splits[d]['test'],
                               config)
        for d in domains.names}
    # A new head for the fine-tuning task, as in real transfer.
    params = dict(params, head=jax.tree.map(jnp.zeros_like, params['head']))
  else:
    params = loaded.params
  # The pre-trained weights stay on the host (one host: all of them), and
  # each method's state is made from them on the devices and donated there,
  # so the devices hold one copy. With several hosts they stay global arrays
  # (a host holds only its shards).
  if jax.process_count() == 1:
    params = jax.device_get(params)

  methods = (configs.METHODS if config.optimizer == 'all'
             else (config.optimizer,))
  if config.lora_rank and config.optimizer == 'all':
    methods = configs.LORA_METHODS
  results['methods'] = {
      method: fine_tune(method, model, params, domains, train_records, config,
                        mesh)
      for method in methods}
  return results
