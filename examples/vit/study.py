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
               mesh: Mesh | None = None,
               seed: int | None = None) -> train_step.TrainState:
  """The fine-tuning state of `method` from the pre-trained `params`.

  With `--lora-rank`: `params` of the state are `{"lora": adapters, "head"}`
  and the backbone is `frozen`, else the whole model is trained. The state
  is a fresh copy (laid out on `mesh` if given): `params` stay the caller's.
  """
  tx = make_optimizer(method, config)
  if not config.lora_rank:
    return train_step.create_state(model.apply, params, tx, mesh=mesh,
                                   min_size=config.fsdp_min_size)
  seed = config.seed if seed is None else seed
  trainable = {'lora': lora.init(params, config.lora_rank, seed + 2,
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


def finetune_seed(config: configs.Config, index: int) -> int:
  """The fine-tuning seed of run `index`: `--seed` for the first (the
  single-seed study's), then 1000 apart. It draws the few-shot examples
  (`seed`), the data order (`seed + 1`) and LoRA's adapters (`seed + 2`)."""
  return config.seed + 1000 * index


def evaluate_all(apply_fn, params, domains: input_pipeline.Domains,
                 config: configs.Config) -> dict[str, float]:
  """Accuracy on the test split of every domain."""
  return {d: train_step.evaluate(apply_fn, params, domains.splits[d]['test'],
                                 config)
          for d in domains.names}


def _scores(accuracy: dict[str, float], deviation: float,
            config: configs.Config) -> dict[str, Any]:
  ood = {d: a for d, a in accuracy.items() if d != config.train_domain}
  return {'id_accuracy': accuracy[config.train_domain],
          'ood_accuracy': ood,
          'ood_mean': float(np.mean(list(ood.values()))) if ood else None,
          'deviation': deviation}


def _backbone_drift(history) -> float:
  return float(np.sqrt(np.sum(
      [np.square(v[-1]) for layer, v in history['deviation'].items()
       if not layer.startswith('head/')])))


def fine_tune(method: str, model, params, domains: input_pipeline.Domains,
              train_records, config: configs.Config,
              mesh: Mesh | None = None, *, seed: int | None = None,
              tag: str = '', keep_params: bool = False) -> dict[str, Any]:
  """Fine-tunes `params` with `method`; returns its accuracies and history.

  `params` (the pre-trained weights, best on the host) are not changed: the
  state trained is a copy on the mesh. With `--lora-rank`, the backbone is
  frozen and only LoRA adapters and the head are trained. With
  `--workdir`, checkpoints go to `WORKDIR/<method><tag>`. `seed`: the data
  order's (`seed + 1`; default `--seed`). With `keep_params`, the result's
  `"params"` are the fine-tuned params on the host (for WiSE-FT).
  """
  if method == 'lpft':
    return lp_ft(model, params, domains, train_records, config, mesh,
                 seed=seed, tag=tag, keep_params=keep_params)
  start = time.time()
  seed = config.seed if seed is None else seed
  mesh = mesh if mesh is not None else devices.make_mesh(config)
  state = make_state(method, model, params, config, mesh, seed=seed)
  suffix = ('_lora' if config.lora_rank else '') + tag
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
      train_records, config.image_size, config.batch_size, seed + 1,
      process_index=jax.process_index(), process_count=jax.process_count())
  name = configs.METHOD_NAMES[method] + ('+LoRA' if config.lora_rank else '')
  fingerprint = checkpointing.fingerprint(config, method)
  if tag:
    fingerprint['finetune_seed'] = seed
  state, history = train_loop.train(
      state, batches, config.steps, config, f'fine-tune {name}{tag}', mesh,
      schedule=make_schedule(config),
      workdir=(os.path.join(config.workdir, method + suffix)
               if config.workdir else None),
      fingerprint=fingerprint,
      metrics_path=os.path.join(config.results_dir,
                                f'metrics_{method}{suffix}.jsonl'))
  merged = state.model_params()
  accuracy = evaluate_all(state.apply_fn, merged, domains, config)
  if config.lora_rank:  # The merged adapters' change of the backbone.
    backbone = [np.sum([float(jnp.sum(jnp.square(m - p))) for m, p in zip(
        jax.tree.leaves(merged[k]), jax.tree.leaves(params[k]))])
                for k in params if k != 'head']
    drift = float(np.sqrt(np.sum(backbone)))
  else:
    drift = _backbone_drift(history)
  run = {
      'name': name,
      'seed': seed,
      'memory': memory,
      'weight_decay': config.weight_decay[method],
      **_scores(accuracy, drift, config),
      'wall_s': time.time() - start,
      'history': history,
  }
  if keep_params:
    run['params'] = jax.device_get(merged)
  return run


def lp_ft(model, params, domains: input_pipeline.Domains, train_records,
          config: configs.Config, mesh: Mesh | None = None, *,
          seed: int | None = None, tag: str = '',
          keep_params: bool = False) -> dict[str, Any]:
  """LP-FT (Kumar et al., 2022): a linear probe, then AdamW on everything.

  The first `steps // 2` steps train the head alone (AdamW, the backbone
  frozen), the rest fine-tune the whole model with AdamW from the probed
  head; each stage has its own warm-up and cosine decay to `--lr`, and the
  data order runs on through both, as one run of `--steps` steps.
  """
  start = time.time()
  seed = config.seed if seed is None else seed
  mesh = mesh if mesh is not None else devices.make_mesh(config)
  probe_steps = config.steps // 2
  stages = (dataclasses.replace(config, steps=probe_steps),
            dataclasses.replace(config, steps=config.steps - probe_steps))
  weight_decay = config.weight_decay['lpft']
  batches = input_pipeline.train_batches(
      train_records, config.image_size, config.batch_size, seed + 1,
      process_index=jax.process_index(), process_count=jax.process_count())
  workdir = lambda stage: (os.path.join(config.workdir, f'lpft{stage}{tag}')
                           if config.workdir else None)
  metrics = lambda stage: os.path.join(config.results_dir,
                                       f'metrics_lpft{stage}{tag}.jsonl')
  fingerprint = dict(checkpointing.fingerprint(config, 'lpft'),
                     finetune_seed=seed)
  # The probe: the head alone, the backbone a frozen input of the step.
  probe = train_step.create_state(
      model.apply, {'lora': {}, 'head': params['head']},
      optax.adamw(make_schedule(stages[0]), weight_decay=weight_decay),
      frozen={k: v for k, v in params.items() if k != 'head'}, mesh=mesh,
      min_size=config.fsdp_min_size)
  probe, probe_history = train_loop.train(
      probe, batches, stages[0].steps, stages[0], f'LP-FT probe{tag}', mesh,
      schedule=make_schedule(stages[0]), workdir=workdir('_probe'),
      fingerprint=dict(fingerprint, stage='probe'),
      metrics_path=metrics('_probe'))
  probed = dict(params, head=jax.device_get(probe.params['head']))
  state = train_step.create_state(
      model.apply, probed,
      optax.adamw(make_schedule(stages[1]), weight_decay=weight_decay),
      mesh=mesh, min_size=config.fsdp_min_size)
  memory = {'opt_state_bytes': devices.tree_bytes(state.opt_state),
            'trainable_bytes': devices.tree_bytes(state.params),
            'model_bytes': devices.tree_bytes(params)}
  state, history = train_loop.train(
      state, batches, stages[1].steps, stages[1], f'LP-FT fine-tune{tag}',
      mesh, schedule=make_schedule(stages[1]), workdir=workdir(''),
      fingerprint=dict(fingerprint, stage='fine-tune'),
      metrics_path=metrics(''))
  # Steps counted over both stages; the drift is the backbone's from theta_0
  # (the probe does not move it).
  history['step'] = [probe_steps + s for s in history['step']]
  history['probe'] = {k: probe_history[k] for k in ('step', 'loss',
                                                     'accuracy')}
  accuracy = evaluate_all(state.apply_fn, state.params, domains, config)
  run = {
      'name': configs.METHOD_NAMES['lpft'],
      'seed': seed,
      'memory': memory,
      'weight_decay': weight_decay,
      **_scores(accuracy, _backbone_drift(history), config),
      'wall_s': time.time() - start,
      'history': history,
  }
  if keep_params:
    run['params'] = jax.device_get(state.params)
  return run


def wise_ft(model, params, finetuned, alpha: float,
            domains: input_pipeline.Domains,
            config: configs.Config) -> dict[str, Any]:
  """WiSE-FT (Wortsman et al., 2022): `(1 - alpha) theta_0 + alpha theta_ft`
  of the pre-trained and AdamW-fine-tuned backbones, the fine-tuned head (the
  pre-trained model has none for these classes); evaluated, not trained."""
  start = time.time()
  mixed = {k: (v if k == 'head' else jax.tree.map(
      lambda p0, p: (1 - alpha) * np.asarray(p0) + alpha * np.asarray(p),
      params[k], v)) for k, v in finetuned.items()}
  drift = float(np.sqrt(sum(
      float(np.sum(np.square(np.asarray(m, np.float64) - np.asarray(p0))))
      for k in params if k != 'head'
      for m, p0 in zip(jax.tree.leaves(mixed[k]), jax.tree.leaves(params[k])))))
  accuracy = evaluate_all(model.apply, mixed, domains, config)
  return {'name': f'WiSE-FT α={alpha:g}', 'alpha': alpha,
          **_scores(accuracy, drift, config), 'wall_s': time.time() - start,
          'history': None}


def _std(values) -> float:
  """The sample standard deviation; 0 for one value."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One method over its seeds: the first seed's run (its `history` for the
  figures), its accuracies and drift replaced by the mean over the seeds,
  with `*_std` beside them and every seed's run in `seeds`."""
  out = {k: v for k, v in runs[0].items() if k not in ('params', 'seed')}
  for key in ('id_accuracy', 'deviation'):
    values = [r[key] for r in runs]
    out[key], out[key.split('_')[0] + '_std'] = float(np.mean(values)), _std(
        values)
  ood = runs[0]['ood_accuracy']
  out['ood_accuracy'] = {d: float(np.mean([r['ood_accuracy'][d] for r in runs]))
                         for d in ood}
  out['ood_std'] = {d: _std([r['ood_accuracy'][d] for r in runs]) for d in ood}
  if runs[0]['ood_mean'] is not None:
    values = [r['ood_mean'] for r in runs]
    out['ood_mean'], out['ood_mean_std'] = float(np.mean(values)), _std(values)
  else:
    out['ood_mean_std'] = None
  out['wall_s'] = float(np.sum([r['wall_s'] for r in runs]))
  out['seeds'] = [{k: v for k, v in r.items() if k != 'params'} for r in runs]
  return out


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table: accuracies in %, the backbone's drift;
  with several seeds, mean ± standard deviation over them."""
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
  runs = list(results['methods'].values())
  spread = any(len(r.get('seeds', ())) > 1 for r in runs)

  def cell(value, std, scale=100, digits=1):
    text = f'{scale * value:.{digits}f}'
    return text + (f' ± {scale * std:.{digits}f}' if spread else '')

  for run in runs:
    rows.append([run['name'],
                 cell(run['id_accuracy'], run.get('id_std', 0))]
                + [cell(run['ood_accuracy'][d],
                        run.get('ood_std', {}).get(d, 0))
                   for d in ood_domains]
                + [cell(run['ood_mean'], run.get('ood_mean_std') or 0)
                   if ood_domains else '-',
                   cell(run['deviation'], run.get('deviation_std', 0),
                        scale=1, digits=2)])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '| ' + ' | '.join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(r, widths))) + ' |'
  rule = '|' + '|'.join('-' * (w + 1) + (':' if i else '-')
                        for i, w in enumerate(widths)) + '|'
  table = [line(header), rule] + [line(r) for r in rows]
  if spread:
    n = max(len(r.get('seeds', ())) for r in runs)
    table.append(f'\n(mean ± standard deviation over {n} fine-tuning seeds)')
  return '\n'.join(table)


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
  seeds = [finetune_seed(config, i) for i in range(config.seeds)]
  train_sets = [input_pipeline.few_shot(
      domains.splits[config.train_domain]['finetune'], config.shots, seed)
                for seed in seeds]
  if not train_sets[0]:
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
      'train_examples': len(train_sets[0]),
      'finetune_seeds': seeds,
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
  # WiSE-FT averages on the host: one process (several hold only shards).
  wise = ('adamw' in methods and not config.lora_rank
          and jax.process_count() == 1)
  runs: dict[str, list[dict[str, Any]]] = {}
  sweep = {m: {v: [] for v in grid} for m, grid in (config.sweep or {}).items()}
  for i, (seed, records) in enumerate(zip(seeds, train_sets)):
    tag = f'_seed{i}' if i else ''
    for method in methods:
      run = fine_tune(method, model, params, domains, records, config, mesh,
                      seed=seed, tag=tag, keep_params=wise and method == 'adamw')
      runs.setdefault(method, []).append(run)
      if 'params' in run:
        finetuned = run.pop('params')
        alphas = sorted(set(config.wise_alphas) | set(sweep.get('wise', ())))
        for alpha in alphas:
          mixed = wise_ft(model, params, finetuned, alpha, domains, config)
          if alpha in config.wise_alphas:
            runs.setdefault(f'wise{alpha:g}', []).append(mixed)
          if alpha in sweep.get('wise', {}):
            sweep['wise'][alpha].append(mixed)
        del finetuned
    for method, grid in sweep.items():
      if method == 'wise':
        continue
      for value in grid:
        swept = sweep_config(config, method, value)
        if method in methods and swept == config:  # The study's own run.
          sweep[method][value].append(runs[method][-1])
          continue
        sweep[method][value].append(fine_tune(
            method, model, params, domains, records, swept, mesh, seed=seed,
            tag=f'{tag}_sweep{value:g}'))
  order = list(methods) + sorted(m for m in runs if m not in methods)
  results['methods'] = {m: aggregate(runs[m]) for m in order}
  if config.sweep:
    # Every seed's scores at every point; the histories are in the metrics
    # logs (`metrics_<method>_sweep<value>.jsonl`).
    results['sweep'] = {
        method: [dict(aggregate([dict(run, history=None) for run in r]),
                      value=v)
                 for v, r in points.items() if r]
        for method, points in sweep.items()}
  return results


def sweep_config(config: configs.Config, method: str,
                 value: float) -> configs.Config:
  """`config` with `method`'s strength set to `value`: SPD's or L2-SP's
  lambda (`weight_decay`), FTP's k."""
  if method == 'ftp':
    return dataclasses.replace(config, ftp_k=value)
  return dataclasses.replace(
      config, weight_decay=dict(config.weight_decay, **{method: value}))
