"""The command line: the flags, each one a `configs.Config` field, checked."""

import argparse
from collections.abc import Sequence
import os

from examples.llm import configs
from examples.llm import lora
from examples.llm import models
from examples.llm import scoring


def _method_values(flag: str, text: str, parse, defaults: dict) -> dict:
  """`"V"` (every method) or `"METHOD=V;METHOD=V"` (those methods)."""
  values = dict(defaults)
  try:
    if '=' not in text:
      return {method: parse(text) for method in values}
    for item in text.split(';'):
      method, _, value = item.partition('=')
      method = method.strip()
      if method not in values:
        raise configs.UsageError(
            f'{flag} names unknown method {method!r}; known: '
            f'{", ".join(configs.METHODS)}.')
      values[method] = parse(value)
  except ValueError as error:
    if isinstance(error, configs.UsageError):
      raise
    raise configs.UsageError(
        f'{flag} {text!r} is not V nor METHOD=V[;METHOD=V...] (V: '
        f'{"numbers A,B,..." if parse is _floats else "a number"}).') from None
  return values


def _floats(text: str) -> list[float]:
  values = [float(x) for x in text.split(',') if x.strip()]
  if not values:
    raise ValueError(text)
  return values


def parse_tasks(text: str) -> tuple[str, ...]:
  """`--eval-tasks`: "all" or a comma list of the eight tasks' names."""
  if text == 'all':
    return scoring.TASKS
  tasks = tuple(t.strip() for t in text.split(',') if t.strip())
  unknown = [t for t in tasks if t not in scoring.TASKS]
  if unknown or not tasks:
    raise configs.UsageError(f'--eval-tasks {text!r}: each task is one of '
                             f'{", ".join(scoring.TASKS)} (or "all").')
  return tasks


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
      prog='python -m examples.llm.train',
      description=(
          'Fine-tuning a decoder LLM (tunix models, qwix LoRA) with AdamW and '
          'Adam-SPD, on LoRA adapters and on every weight. Without flags: '
          'pre-trains a small byte-level Qwen 3-style decoder on the Python '
          'standard library\'s source (cached), fine-tunes it on the '
          'pydoc documentation topics with each method, strength and seed, '
          'and reports held-out loss on both texts (mean +- std over 3 '
          'seeds) and the distance from the pre-trained weights: 4 min 54 s '
          'on 2 CPU cores shared at a load of 4-5, pre-training included.'),
      formatter_class=_HelpFormatter)
  a = parser.add_argument
  a('--checkpoint', default=d.checkpoint, metavar='DIR',
    help='a Hugging Face model folder (config.json, *.safetensors, '
    'tokenizer.json) of the Qwen 3, Llama 3 or Gemma 3 family, read offline; '
    'one line says what was loaded. Without it the small decoder is '
    'pre-trained from scratch (and cached).')
  a('--family', default=d.family, choices=models.FAMILIES,
    help='the small decoder\'s family (without --checkpoint).')
  for name, what in (('num_layers', 'decoder blocks'),
                     ('embed_dim', 'residual width'),
                     ('hidden_dim', 'MLP width'),
                     ('num_heads', 'query heads'),
                     ('num_kv_heads', 'key/value heads'),
                     ('head_dim', 'width of a head')):
    a('--' + name.replace('_', '-'), type=int, default=getattr(d, name),
      help=f'the small decoder\'s {what}.')
  a('--seq-len', type=int, default=d.seq_len,
    help='tokens per window of the text corpora (training and held-out).')
  a('--pretrain-steps', type=int, default=d.pretrain_steps,
    help='pre-training steps (without --checkpoint).')
  a('--pretrain-lr', type=float, default=d.pretrain_lr,
    help='pre-training peak learning rate (AdamW, warm-up, cosine).')
  a('--pretrain-batch-size', type=int, default=d.pretrain_batch_size)
  a('--pretrain-bytes', type=int, default=d.pretrain_bytes,
    help='bytes of the standard library\'s source read (train and held-out '
    'together, split by file).')
  a('--data', default=d.data, metavar='FILE',
    help='instruction data in LLM-Adapters\' layout (commonsense_170k.json: '
    'a JSON list of {instruction, input, output, answer}); the loss is on '
    'the response. The last --heldout-records records give the ID held-out '
    'loss. Default: the pydoc topics.')
  a('--max-len', type=int, default=d.max_len,
    help='tokens per instruction row and per scored row of --eval-dir.')
  a('--truncate', action='store_true',
    help='cut longer rows to --max-len (LLM-Adapters\' cutoff_len); '
    'otherwise such a record stops the run, naming it.')
  a('--heldout-records', type=int, default=d.heldout_records,
    help='records of --data held out for the ID loss.')
  a('--eval-dir', default=d.eval_dir, metavar='DIR',
    help='LLM-Adapters\' dataset folder: <task>/test.json of the eight '
    'commonsense tasks; each model is scored by the log-likelihood of each '
    'answer choice (accuracy per task and the average).')
  a('--eval-tasks', default=d.eval_tasks,
    help='the --eval-dir tasks: "all" or a comma list of '
    + ', '.join(scoring.TASKS) + '.')
  a('--eval-max-records', type=int, default=d.eval_max_records, metavar='N',
    help='score only the first N records of each task (a quick look).')
  a('--eval-tokens', type=int, default=d.eval_tokens,
    help='held-out tokens of each text domain (0: all of them).')
  a('--optimizer', default=d.optimizer, choices=configs.METHODS + ('all',),
    help='adamw_lora, spd_lora (Adam-SPD on the adapters, anchor "zero"), '
    'adamw_full, spd_full (anchored at the pre-trained weights), or all '
    '(with --checkpoint: the two LoRA methods).')
  a('--trainer', default=d.trainer, choices=configs.TRAINERS,
    help='nnx: our jitted step (nnx.Optimizer), one compile per method for '
    'every strength and seed; peft: tunix\'s PeftTrainer with the same '
    'optimizer and loss (one compile per run).')
  a('--steps', type=int, default=d.steps, help='fine-tuning steps per run.')
  a('--batch-size', type=int, default=d.batch_size)
  a('--warmup-steps', type=int, default=d.warmup_steps)
  a('--lr', default=None, metavar='LR',
    help='peak fine-tuning learning rate: a number, or METHOD=LR;... . '
    'Defaults: ' + ', '.join(f'{k}={v:g}' for k, v in d.lr.items()) + '.')
  a('--weight-decay', default=None, metavar='GRID',
    help='each method\'s grid of strengths: "A,B" for every method, or '
    '"spd_lora=0.5,2;adamw_lora=0" . AdamW: decoupled decay toward 0 (times '
    'the lr); SPD: lambda (not times the lr). Defaults: '
    + '; '.join(f'{k}={",".join(f"{v:g}" for v in g)}'
                for k, g in d.weight_decay.items()) + '.')
  a('--seed', type=int, default=d.seed,
    help='seed of the initialization, pre-training and fine-tuning seeds.')
  a('--seeds', type=int, default=d.seeds,
    help='fine-tuning runs per method and strength (seed + 1000 i: data '
    'order, adapters\' init); the table shows mean +- std.')
  a('--lora-rank', type=int, default=d.lora_rank, metavar='R')
  a('--lora-alpha', type=float, default=d.lora_alpha,
    help='LoRA\'s alpha: the update is alpha / R * x a b.')
  a('--lora-targets', default=d.lora_targets,
    help='the adapted projections: a comma list of '
    + ', '.join(lora.TARGETS) + ' (Gemma 3\'s kv_einsum is k and v), or all.')
  a('--eval-batch-size', type=int, default=d.eval_batch_size)
  a('--log-every', type=int, default=d.log_every,
    help='steps between logged points (metrics JSONL, SPD diagnostics).')
  a('--results-dir', default=d.results_dir,
    help='where results.json, the metrics logs and the plots are written.')
  a('--cache-dir', default=d.cache_dir,
    help='where the pre-trained decoder is cached. Default: "cache" beside '
    '--results-dir.')
  a('--quiet', action='store_true', help='no progress bars.')
  g = parser.add_argument_group('scale: devices and precision')
  a = g.add_argument
  a('--fsdp', action='store_true',
    help='split weights of >= --fsdp-min-size elements, their adapters and '
    'optimizer state over every device (mesh (data, fsdp) = (1, n)); '
    'batches are split over both axes.')
  a('--mesh-fsdp', type=int, default=d.mesh_fsdp, metavar='N',
    help='the fsdp axis size (implies --fsdp); the data axis gets the rest.')
  a('--fsdp-min-size', type=int, default=d.fsdp_min_size)
  a('--dtype', default=d.dtype, choices=('float32', 'bfloat16'),
    help='the checkpoint\'s weights and activations; LoRA adapters and '
    'their optimizer state stay float32.')
  return parser


def parse_config(argv: Sequence[str] | None) -> configs.Config:
  """The flags as a `configs.Config`, checked."""
  args = make_parser().parse_args(argv)
  values = vars(args)
  lr = values.pop('lr')
  weight_decay = values.pop('weight_decay')
  config = configs.Config(**values)
  if lr is not None:
    config.lr = _method_values('--lr', lr, float, config.lr)
  if weight_decay is not None:
    config.weight_decay = _method_values('--weight-decay', weight_decay,
                                         _floats, config.weight_decay)
  for flag in ('steps', 'batch_size', 'eval_batch_size', 'log_every',
               'pretrain_batch_size', 'pretrain_bytes', 'seeds', 'lora_rank',
               'max_len', 'fsdp_min_size', 'num_layers', 'embed_dim',
               'hidden_dim', 'num_heads', 'num_kv_heads', 'head_dim'):
    if getattr(config, flag) <= 0:
      raise configs.UsageError(
          f'--{flag.replace("_", "-")} must be positive.')
  for flag in ('pretrain_steps', 'warmup_steps', 'eval_tokens',
               'heldout_records'):
    if getattr(config, flag) < 0:
      raise configs.UsageError(f'--{flag.replace("_", "-")} must be >= 0.')
  for flag in ('mesh_fsdp', 'eval_max_records'):
    if getattr(config, flag) is not None and getattr(config, flag) <= 0:
      raise configs.UsageError(
          f'--{flag.replace("_", "-")} must be positive.')
  if config.seq_len < 2:
    raise configs.UsageError('--seq-len must be at least 2.')
  if config.checkpoint is None and config.pretrain_steps == 0:
    raise configs.UsageError('--pretrain-steps 0 needs --checkpoint (there '
                             'is nothing else to fine-tune).')
  for method, values in config.weight_decay.items():
    if any(v < 0 for v in values):
      raise configs.UsageError(f'--weight-decay of {method} must be >= 0.')
  for method, value in config.lr.items():
    if value <= 0:
      raise configs.UsageError(f'--lr of {method} must be positive.')
  lora.parse_targets(config.lora_targets)
  parse_tasks(config.eval_tasks)
  if config.checkpoint is not None and not os.path.isdir(config.checkpoint):
    raise configs.UsageError(
        f'--checkpoint {config.checkpoint} is not a folder.')
  if config.data is not None and not os.path.isfile(config.data):
    raise configs.UsageError(f'--data {config.data} does not exist.')
  if config.eval_dir is not None and not os.path.isdir(config.eval_dir):
    raise configs.UsageError(f'--eval-dir {config.eval_dir} is not a '
                             'folder.')
  if config.dtype != 'float32' and config.checkpoint is None:
    raise configs.UsageError(f'--dtype {config.dtype} is for --checkpoint; '
                             'the small decoder trains in float32.')
  if config.trainer == 'peft' and (config.fsdp or config.mesh_fsdp):
    raise configs.UsageError('--trainer peft runs on tunix\'s own mesh '
                             'handling; use --trainer nnx with --fsdp.')
  if config.cache_dir is None:
    config.cache_dir = os.path.join(
        os.path.dirname(os.path.abspath(config.results_dir)), 'cache')
  return config
