"""The study: a pre-trained decoder, one fine-tuning run per method, strength
and seed, each evaluated on both domains; the table.

Without a checkpoint, a small byte-level decoder is pre-trained from scratch
on the standard library's source (cached with orbax) and fine-tuned on the
pydoc documentation topics: the fine-tuning domain's held-out loss is "ID",
the standard library's held-out loss is what the fine-tuning kept of the
pre-training ("retention", the LLM analogue of OOD accuracy). With
`--checkpoint`, the model is a Hugging Face folder's, the fine-tuning data
the pydoc topics or `--data` (instruction records), and `--eval-dir` adds
the commonsense tasks' accuracies.
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Iterator

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from examples.llm import checkpoints
from examples.llm import cli
from examples.llm import configs
from examples.llm import data
from examples.llm import lora
from examples.llm import models
from examples.llm import scoring
from examples.llm import train_step
from examples.vit import devices as vit_devices


def make_schedule(config: configs.Config, peak: float,
                  steps: int | None = None) -> optax.Schedule:
  """Linear warm-up to `peak`, cosine decay to 0 over `steps`."""
  steps = config.steps if steps is None else steps
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, min(config.warmup_steps, steps // 2), steps)


def finetune_seed(config: configs.Config, index: int) -> int:
  """Run `index`'s seed: `--seed`, then 1000 apart. It draws the data order
  (`seed + 1`) and the LoRA adapters' `a` (`seed + 2`)."""
  return config.seed + 1000 * index


def make_mesh(config: configs.Config) -> Mesh | None:
  """A `(data, fsdp)` mesh with `--fsdp` / `--mesh-fsdp`, or on several
  accelerators; None (the default device) otherwise."""
  devs = jax.devices()
  if not (config.fsdp or config.mesh_fsdp) and (
      len(devs) == 1 or devs[0].platform == 'cpu'):
    return None
  n = math.gcd(len(devs), config.batch_size, config.eval_batch_size,
               config.pretrain_batch_size)
  fsdp = config.mesh_fsdp or n
  if n % fsdp:
    raise configs.UsageError(
        f'--mesh-fsdp {fsdp} does not divide the {n} devices used (as many '
        'as divide the batch sizes).')
  if not (config.fsdp or config.mesh_fsdp):
    fsdp = 1
  return Mesh(np.asarray(devs[:n]).reshape(n // fsdp, fsdp), ('data', 'fsdp'))


def make_shardings(mesh: Mesh | None, config: configs.Config):
  """`shardings(tree)`: every leaf of >= `--fsdp-min-size` elements split
  over `fsdp` along its largest divisible axis (`examples.vit.devices`'
  rule). Adam's moments and SPD's anchor have their param's shape, so they
  get their param's layout, as `spd.state_sharding` gives them; SPD's
  per-leaf scalars are replicated. `shardings("batch")`: rows over both
  axes."""
  if mesh is None:
    return None

  def shardings(tree):
    if isinstance(tree, str):
      return NamedSharding(mesh, P(('data', 'fsdp')))
    return vit_devices.param_shardings(tree, mesh, config.fsdp_min_size)
  return shardings


@dataclasses.dataclass
class Domains:
  """The token streams and held-out batches of a study.

  Attributes:
    tokenizer: the byte tokenizer or the checkpoint's.
    finetune: a function of a seed giving endless training batches.
    finetune_name: what the fine-tuning domain is, for the table.
    id_eval: the fine-tuning domain's held-out batches (a list).
    retention_eval: the standard library's held-out batches (a list).
    pretrain_tokens: the standard library's training tokens (pre-training).
    sizes: tokens / records of each part, for results.json.
  """

  tokenizer: Any
  finetune: Any
  finetune_name: str
  id_eval: list
  retention_eval: list
  pretrain_tokens: np.ndarray | None
  sizes: dict[str, int]


def _capped(tokens: np.ndarray, config: configs.Config) -> np.ndarray:
  return tokens[:config.eval_tokens] if config.eval_tokens else tokens


def load_domains(config: configs.Config, tokenizer) -> Domains:
  """The pre-training and fine-tuning texts, tokenized, and their batches."""
  stdlib_train, stdlib_heldout = data.stdlib_source_text(
      max_bytes=config.pretrain_bytes)
  retention = _capped(data.token_array(stdlib_heldout, tokenizer), config)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  eval_batches = lambda tokens: [train_step.with_loss_mask(b) for b in
                                 data.lm_eval_batches(
                                     tokens, batch_size=config.eval_batch_size,
                                     seq_len=config.seq_len, pad_id=pad)]
  pretrain_tokens = None
  if config.checkpoint is None:
    pretrain_tokens = data.token_array(stdlib_train, tokenizer)
  sizes = {'retention_eval_tokens': int(len(retention))}
  if config.data is None:
    topics_train, topics_heldout = data.pydoc_topics_text()
    train_tokens = data.token_array(topics_train, tokenizer)
    heldout = _capped(data.token_array(topics_heldout, tokenizer), config)
    finetune = lambda seed: (train_step.with_loss_mask(b) for b in
                             data.lm_batches(
                                 train_tokens, batch_size=config.batch_size,
                                 seq_len=config.seq_len, seed=seed))
    id_eval = eval_batches(heldout)
    sizes.update(finetune_tokens=int(len(train_tokens)),
                 id_eval_tokens=int(len(heldout)))
    name = 'pydoc topics'
  else:
    records = data.load_instructions(config.data)
    n_heldout = min(config.heldout_records, len(records) // 2)
    train_records = records[:len(records) - n_heldout]
    heldout_records = records[len(records) - n_heldout:]
    if not train_records:
      raise configs.DataError(f'{config.data} has no records to train on.')
    examples = data.sft_examples(train_records, tokenizer,
                                 max_len=config.max_len,
                                 truncate=config.truncate)
    finetune = lambda seed: data.sft_batches(
        examples, batch_size=config.batch_size, seed=seed)
    id_eval = []
    if heldout_records:
      held = data.sft_examples(heldout_records, tokenizer,
                               max_len=config.max_len, truncate=config.truncate)
      for first in range(0, len(heldout_records), config.eval_batch_size):
        batch = {k: v[first:first + config.eval_batch_size]
                 for k, v in held.items()}
        empty = config.eval_batch_size - len(batch['tokens'])
        if empty:  # Fill the last batch with empty rows (one shape).
          batch = {k: np.concatenate([v, np.zeros((empty,) + v.shape[1:],
                                                  v.dtype)])
                   for k, v in batch.items()}
        id_eval.append(batch)
    sizes.update(finetune_records=len(train_records),
                 id_eval_records=len(heldout_records))
    name = os.path.basename(config.data)
  return Domains(tokenizer, finetune, name, id_eval, eval_batches(retention),
                 pretrain_tokens, sizes)


class Evaluator:
  """Held-out losses (and task accuracies) of models in the base layout,
  through one compiled evaluation step for every method."""

  def __init__(self, base_model: nnx.Module, domains: Domains,
               config: configs.Config, mesh: Mesh | None):
    self.graphdef, _, self.rest = nnx.split(base_model, nnx.Param, ...)
    self.eval_step = train_step.make_eval_step(self.graphdef)
    self.domains, self.config, self.mesh = domains, config, mesh
    self.tasks = cli.parse_tasks(config.eval_tasks)
    self.logits = jax.jit(
        lambda params, rest, tokens, mask: jax.nn.log_softmax(models.logits(
            nnx.merge(self.graphdef, params, rest), tokens, mask)))

  def _batches(self, batches):
    if self.mesh is None:
      return batches
    sharding = NamedSharding(self.mesh, P(('data', 'fsdp')))
    return (jax.device_put(b, sharding) for b in batches)

  def __call__(self, params) -> dict[str, Any]:
    out = {'retention_loss': train_step.evaluate(
        self.eval_step, params, self.rest,
        self._batches(self.domains.retention_eval))}
    out['id_loss'] = (train_step.evaluate(
        self.eval_step, params, self.rest,
        self._batches(self.domains.id_eval))
                      if self.domains.id_eval else None)
    if self.config.eval_dir is not None:
      logprob = lambda tokens, mask: self.logits(params, self.rest, tokens,
                                                 mask)
      out['tasks'] = scoring.evaluate_tasks(
          logprob, self.domains.tokenizer, self.config.eval_dir, self.tasks,
          batch_size=self.config.eval_batch_size, max_len=self.config.max_len,
          max_records=self.config.eval_max_records,
          truncate=self.config.truncate)
    return out


def leaf_values(tree) -> dict[str, Any]:
  """`{"layers/0/attn/q_proj/w_lora_a": value, ...}` of a nested dict."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


class MetricsLog:
  """Appends `{"step", "loss", "lr", "selection_rate": {leaf: ..},
  "ratio": {leaf: ..}}` lines to `path`."""

  def __init__(self, path: str | None):
    self.path = path
    if path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      open(path, 'w').close()

  def write(self, record: dict[str, Any]) -> None:
    if self.path is not None:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')


class Trainer:
  """The compiled steps of a study: one per method (and one for
  pre-training), reused by every strength and seed of the method."""

  def __init__(self, config: configs.Config, mesh: Mesh | None):
    self.config, self.mesh = config, mesh
    self.shardings = make_shardings(mesh, config)
    self.optimizers: dict[str, optax.GradientTransformation] = {}
    self.steps: dict[str, tuple[Any, Any]] = {}
    self.compile_s: dict[str, float] = {}

  def optimizer(self, method: str) -> optax.GradientTransformation:
    if method not in self.optimizers:
      self.optimizers[method] = train_step.make_optimizer(method)
    return self.optimizers[method]

  def step(self, run: train_step.Run, batch):
    """The method's compiled step (compiled on its first run; a run whose
    state has another structure gets its own)."""
    structure = (jax.tree.structure(run.trainable),
                 jax.tree.structure(run.frozen))
    cached = self.steps.get(run.method)
    if cached is not None and cached[0] == structure:
      return cached[1]
    start = time.time()
    jitted = train_step.make_train_step(run, self.shardings)
    compiled = jitted.lower(run.trainable, run.frozen, batch,
                            jnp.float32(0)).compile()
    key = run.method if cached is None else f'{run.method} (again)'
    self.compile_s[key] = time.time() - start
    self.steps[run.method] = (structure, compiled)
    return compiled

  def train(self, run: train_step.Run, batches: Iterator, steps: int,
            schedule, desc: str, metrics_path: str | None = None):
    """`steps` steps of `run` (its state replaced); returns the history:
    every `--log-every` steps the window's mean loss and SPD's mean
    selection rate and ratio per leaf."""
    config = self.config
    history: dict[str, Any] = {'step': [], 'loss': []}
    log = MetricsLog(metrics_path)
    window = []
    first = next(batches)
    step_fn = self.step(run, first)
    bar = tqdm.tqdm(total=steps, desc=desc, disable=config.quiet, leave=False,
                    dynamic_ncols=True, file=sys.stderr)
    batch = first
    for step in range(1, steps + 1):
      if step > 1:
        batch = next(batches)
      lr = jnp.float32(schedule(step - 1))
      run.trainable, metrics = step_fn(run.trainable, run.frozen, batch, lr)
      window.append(metrics)
      if step % config.log_every == 0 or step == steps:
        window = jax.device_get(window)
        record = {'step': step,
                  'loss': float(np.mean([m['loss'] for m in window])),
                  'lr': float(schedule(step - 1))}
        history['step'].append(step)
        history['loss'].append(record['loss'])
        for name, key in (('selected', 'selection_rate'), ('ratio', 'ratio')):
          if name not in window[-1]:
            continue
          per_step = [leaf_values(m[name]) for m in window]
          values = {leaf: float(np.mean([v[leaf] for v in per_step]))
                    for leaf in per_step[-1]}
          record[key] = values
          for leaf, value in values.items():
            history.setdefault(key, {}).setdefault(leaf, []).append(value)
        log.write(record)
        bar.set_postfix(loss=f'{record["loss"]:.3f}')
        bar.update(step - bar.n)
        window = []
    bar.close()
    return history


def _recipe(config: configs.Config, vocab_size: int) -> dict[str, Any]:
  return {'family': config.family, 'vocab_size': vocab_size,
          **{k: getattr(config, k) for k in (
              'num_layers', 'embed_dim', 'hidden_dim', 'num_heads',
              'num_kv_heads', 'head_dim', 'seq_len', 'pretrain_steps',
              'pretrain_lr', 'pretrain_batch_size', 'pretrain_bytes',
              'seed')}}


def pretrain(model: nnx.Module, domains: Domains, config: configs.Config,
             trainer: Trainer) -> tuple[dict, dict]:
  """Trains `model` from scratch on the standard library's source (AdamW,
  decay 0.1, warm-up and cosine); returns its params and history."""
  run = train_step.make_run('pretrain', model, trainer.optimizer('pretrain'),
                            weight_decay=0.1, shardings=trainer.shardings)
  batches = (train_step.with_loss_mask(b) for b in data.lm_batches(
      domains.pretrain_tokens, batch_size=config.pretrain_batch_size,
      seq_len=config.seq_len, seed=config.seed))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.pretrain_lr, min(50, config.pretrain_steps // 2),
      config.pretrain_steps)
  history = trainer.train(
      run, batches, config.pretrain_steps, schedule, 'pre-train',
      os.path.join(config.results_dir, 'metrics_pretrain.jsonl'))
  return jax.device_get(train_step.trained_params(run)), history


def cached_pretrain(model: nnx.Module, domains: Domains,
                    config: configs.Config, trainer: Trainer):
  """`pretrain`, saved with orbax in the cache folder and reused if there."""
  recipe = _recipe(config, domains.tokenizer.vocab_size)
  digest = hashlib.sha256(
      json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
  path = os.path.abspath(os.path.join(config.cache_dir, f'pretrain_{digest}'))
  target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpointer = ocp.StandardCheckpointer()
  if os.path.isdir(path):
    params = checkpointer.restore(path, jax.tree.map(
        ocp.utils.to_shape_dtype_struct, target))
    return jax.device_get(params), path, True, None
  params, history = pretrain(model, domains, config, trainer)
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  with open(path + '.json', 'w') as f:
    json.dump(recipe, f, indent=1)
  return params, path, False, history


def _peft_train(method: str, model: nnx.Module, weight_decay: float,
                schedule, batches, config: configs.Config):
  """The same fine-tuning through tunix's `PeftTrainer` (its own loop and
  jitted step); returns the `Run` of the trained model and optimizer."""
  from tunix.sft import peft_trainer  # pylint: disable=g-import-not-at-top
  if not train_step.is_lora(method):
    # PeftTrainer updates the model in place: train a copy, never the
    # pre-trained model the other runs start from.
    model = nnx.clone(model)
    nnx.update(model, train_step.fresh(nnx.state(model, nnx.Param)))
  tx = train_step.peft_optimizer(method, schedule, weight_decay)
  trainer = peft_trainer.PeftTrainer(
      model, tx, peft_trainer.TrainingConfig(
          eval_every_n_steps=config.steps + 1, max_steps=config.steps,
          pbar_description=None if config.quiet else f'PeftTrainer {method}'))
  # Its step donates the optimizer: SPD's anchor must not be the weights'
  # own buffers.
  nnx.update(trainer.optimizer, train_step.fresh(
      nnx.state(trainer.optimizer, nnx.optimizer.OptState)))
  trainer = trainer.with_loss_fn(train_step.loss_fn).with_gen_model_input_fn(
      lambda batch: {'batch': batch})
  trainer.train(batches)
  graphdef, trainable, frozen = nnx.split(
      (model, trainer.optimizer), train_step.trainable_filter(method), ...)
  return train_step.Run(method, graphdef, trainable, frozen)


def fine_tune(method: str, weight_decay: float, seed: int, index: int,
              base_model: nnx.Module, pretrained, domains: Domains,
              evaluator: Evaluator, trainer: Trainer,
              config: configs.Config) -> dict[str, Any]:
  """One fine-tuning run of `method` at strength `weight_decay`, from the
  pre-trained `base_model` (not changed), and its evaluation."""
  start = time.time()
  lora_scale = 0.0
  model = base_model
  if train_step.is_lora(method):
    model = lora.apply(base_model, rank=config.lora_rank,
                       alpha=config.lora_alpha,
                       targets=lora.parse_targets(config.lora_targets),
                       seed=seed + 2)
    # The adapters (and their moments) in float32 whatever the weights'.
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32),
                                   nnx.state(model, nnx.LoRAParam)))
    lora_scale = config.lora_alpha / config.lora_rank
  start_adapters = (nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
                    if lora_scale else None)
  schedule = make_schedule(config, config.lr[method])
  batches = domains.finetune(seed + 1)
  decay_tag = f'{weight_decay:g}'
  tag = f'_{decay_tag}' + (f'_seed{index}' if index else '')
  desc = (f'{configs.METHOD_NAMES[method]} '
          f'{configs.DECAY_NAMES[method]}={decay_tag} seed {index}')
  if config.trainer == 'peft':
    run = _peft_train(method, model, weight_decay, schedule, batches, config)
    run.lora_scale = lora_scale
    history = {'step': [], 'loss': []}
  else:
    run = train_step.make_run(method, model, trainer.optimizer(method),
                              weight_decay=weight_decay, lora_scale=lora_scale,
                              shardings=trainer.shardings)
    history = trainer.train(
        run, batches, config.steps, schedule, desc,
        os.path.join(config.results_dir, f'metrics_{method}{tag}.jsonl'))
  scores = evaluator(train_step.trained_params(run))
  result = {
      'method': method, 'name': configs.METHOD_NAMES[method],
      'weight_decay': weight_decay, 'seed': seed, **scores,
      **train_step.distances(run, pretrained, start_adapters),
      'wall_s': time.time() - start, 'history': history,
  }
  del run
  return result


def _std(values) -> float:
  """The sample standard deviation; 0 for one value."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One method and strength over its seeds: means, `*_std` beside them,
  every seed's run in `seeds`, the first seed's history for the figures."""
  out = {k: v for k, v in runs[0].items() if k not in ('seed',)}
  for key in ('id_loss', 'retention_loss', 'distance', 'adapter_distance',
              'adapter_norm'):
    values = [r[key] for r in runs if r.get(key) is not None]
    if values:
      out[key], out[key + '_std'] = float(np.mean(values)), _std(values)
  if runs[0].get('tasks'):
    out['tasks'] = {t: float(np.mean([r['tasks'][t] for r in runs]))
                    for t in runs[0]['tasks']}
    out['tasks_std'] = {t: _std([r['tasks'][t] for r in runs])
                        for t in runs[0]['tasks']}
  out['wall_s'] = float(np.sum([r['wall_s'] for r in runs]))
  out['seeds'] = [{k: v for k, v in r.items() if k != 'history'}
                  for r in runs]
  return out


def format_table(results: dict[str, Any]) -> str:
  """The results as a Markdown table: held-out losses (nats per token) and
  distances; with several seeds, mean ± standard deviation over them."""
  runs = list(results['runs'].values())
  spread = any(len(r['seeds']) > 1 for r in runs)
  tasks = list((results['pretrained'].get('tasks') or {}).keys())
  header = (['method', 'λ / wd', f'ID loss ({results["finetune_domain"]})',
             'retention loss (stdlib)', '‖ΔW‖', '‖φ−φ0‖']
            + [('avg acc' if t == 'average' else t) for t in tasks])

  def cell(run, key, digits=3, scale=1.0):
    value = run.get(key)
    if value is None:
      return '-'
    text = f'{scale * value:.{digits}f}'
    if spread and key + '_std' in run:
      text += f' ± {scale * run[key + "_std"]:.{digits}f}'
    return text

  pre = results['pretrained']
  rows = [['pre-trained', '-', cell(pre, 'id_loss'),
           cell(pre, 'retention_loss'), '0', '-']
          + [f'{100 * pre["tasks"][t]:.1f}' for t in tasks]]
  for run in runs:
    row = [run['name'], f'{configs.DECAY_NAMES[run["method"]]}='
           f'{run["weight_decay"]:g}', cell(run, 'id_loss'),
           cell(run, 'retention_loss'), cell(run, 'distance', 2),
           cell(run, 'adapter_distance', 2)]
    for t in tasks:
      text = f'{100 * run["tasks"][t]:.1f}'
      if spread:
        text += f' ± {100 * run["tasks_std"][t]:.1f}'
      row.append(text)
    rows.append(row)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: '| ' + ' | '.join(
      c.ljust(w) if i < 2 else c.rjust(w)
      for i, (c, w) in enumerate(zip(r, widths))) + ' |'
  rule = '|' + '|'.join('-' * (w + 1) + ('-' if i < 2 else ':')
                        for i, w in enumerate(widths)) + '|'
  table = [line(header), rule] + [line(r) for r in rows]
  if spread:
    n = max(len(r['seeds']) for r in runs)
    table.append(f'\n(mean ± standard deviation over {n} fine-tuning seeds; '
                 'losses in nats per token, lower is better)')
  return '\n'.join(table)


def run_study(config: configs.Config) -> dict[str, Any]:
  """The study: pre-trained weights, one fine-tuning per method, strength and
  seed, evaluation of each."""
  study_start = time.time()
  mesh = make_mesh(config)
  dtype = jnp.dtype(config.dtype)
  if config.checkpoint is not None:
    loaded = checkpoints.load(config.checkpoint, dtype=dtype)
    base_model, tokenizer = loaded.model, loaded.tokenizer
    family = loaded.family
    summary = loaded.summary
  else:
    tokenizer = data.ByteTokenizer()
    family = config.family
    model_config = models.tiny_config(
        family, vocab_size=tokenizer.vocab_size, num_layers=config.num_layers,
        embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim)
    base_model = models.create(family, model_config, seed=config.seed)
    summary = (f'byte-level {family} decoder: {config.num_layers} layers, '
               f'width {config.embed_dim}, MLP {config.hidden_dim}, '
               f'{config.num_heads} heads ({config.num_kv_heads} key/value), '
               f'{models.count_params(base_model) / 1e6:.2f}M params')
  domains = load_domains(config, tokenizer)
  trainer = Trainer(config, mesh)
  results: dict[str, Any] = {
      'config': dataclasses.asdict(config), 'model': summary,
      'family': family, 'params': models.count_params(base_model),
      'finetune_domain': domains.finetune_name, 'sizes': domains.sizes,
      'devices': f'{len(jax.devices())} x {jax.devices()[0].device_kind}',
  }
  if config.checkpoint is None:
    start = time.time()
    params, path, reused, history = cached_pretrain(base_model, domains,
                                                    config, trainer)
    print(f'pre-trained model {"reused from" if reused else "saved to"} '
          f'{path}', file=sys.stderr)
    nnx.update(base_model, params)
    results['pretrain'] = {'path': path, 'reused': reused,
                           'wall_s': time.time() - start, 'history': history}
  pretrained = nnx.to_pure_dict(nnx.state(base_model, nnx.Param))
  if trainer.shardings is not None:
    pretrained = jax.device_put(pretrained, trainer.shardings(pretrained))
    nnx.update(base_model, pretrained)
  evaluator = Evaluator(base_model, domains, config, mesh)
  start = time.time()
  results['pretrained'] = evaluator(pretrained)
  results['eval_first_s'] = time.time() - start
  methods = (configs.METHODS if config.optimizer == 'all'
             else (config.optimizer,))
  if config.checkpoint is not None and config.optimizer == 'all':
    methods = configs.LORA_METHODS
  seeds = [finetune_seed(config, i) for i in range(config.seeds)]
  results['finetune_seeds'] = seeds
  runs: dict[str, list[dict[str, Any]]] = {}
  for index, seed in enumerate(seeds):
    for method in methods:
      for weight_decay in config.weight_decay[method]:
        run = fine_tune(method, weight_decay, seed, index, base_model,
                        pretrained, domains, evaluator, trainer, config)
        runs.setdefault(f'{method}@{weight_decay:g}', []).append(run)
  results['runs'] = {key: aggregate(r) for key, r in runs.items()}
  results['compile_s'] = trainer.compile_s
  results['wall_s'] = time.time() - study_start
  return results
