"""The command line: the flags, each one a `configs.Config` field, checked."""

import argparse
from collections.abc import Sequence
import os

from examples.vit import checkpoints
from examples.vit import configs
from examples.vit import models


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
        raise configs.UsageError(
            f'--weight-decay names unknown method {method!r}; '
            f'known: {", ".join(configs.METHODS)}.')
      values[method.strip()] = float(value)
  except ValueError as error:
    if isinstance(error, configs.UsageError):
      raise
    raise configs.UsageError(f'--weight-decay {text!r} is not a number nor '
                             'METHOD=NUMBER[,METHOD=NUMBER...].') from None
  return values


def parse_floats(flag: str, text: str) -> list[float]:
  """`"0.25,0.5"` as `[0.25, 0.5]` (as JSON keeps it); `""` as `[]`."""
  try:
    return [float(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise configs.UsageError(
        f'{flag} {text!r} is not a list of numbers A,B,... .') from None


def parse_sweep(text: str) -> dict[str, list[float]]:
  """`--sweep`'s grid: `"default"` or `"spd=0.3,1;wise=0.5"`."""
  if text == 'default':
    return {m: list(grid) for m, grid in configs.SWEEP_GRID.items()}
  grid = {}
  for item in text.split(';'):
    method, _, values = item.partition('=')
    method = method.strip()
    if method not in configs.SWEEP_GRID or not values:
      raise configs.UsageError(
          f'--sweep {text!r}: each item is METHOD=V,V,... with METHOD one '
          f'of {", ".join(configs.SWEEP_GRID)}.')
    grid[method] = parse_floats('--sweep', values)
  return grid


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
          'Adam-SPD, Adam-FTP and LP-FT (and WiSE-FT from AdamW). Without '
          'flags: pre-trains a small ViT on scikit-learn digits in six '
          'domains (cached), fine-tunes it on a few "clean" digits with each '
          'method for 3 seeds and reports accuracy on every domain (mean +- '
          'std): 4 minutes on 2 idle CPU cores, pre-training included '
          '(about 10 on busy ones).'),
      formatter_class=_HelpFormatter)
  a = parser.add_argument
  a('--model', default=d.model, choices=sorted(models.VIT_CONFIGS),
    help='ViT variant. Default: the checkpoint\'s shape (read from the '
    'file); given with --checkpoint, the file must have that shape. Without '
    'a checkpoint: "small" (the default study\'s); "tiny" is the tests\'.')
  a('--checkpoint', default=d.checkpoint, metavar='PATH.npz',
    help='a public ViT .npz to fine-tune: vit_jax (e.g. ViT-B_16.npz, the '
    'augreg files), big_vision ViT, or a SigLIP / SigLIP 2 image tower; its '
    'architecture is read from the file, its head replaced by a new zero '
    'one, one line says what was loaded. Without it a model is pre-trained '
    'on every domain first (and cached).')
  a('--image-size', type=int, default=None,
    help='image side; position embeddings are resized to image_size // '
    'patch (corner-aligned, as vit_jax and big_vision do). Default: the '
    'checkpoint\'s resolution (224 if it has fixed sin-cos embeddings); 16 '
    'for small/tiny. Without a checkpoint it must be a multiple of the patch.')
  a('--scan', action='store_true',
    help='stack the blocks as one nn.scan (params (layers, ...) under '
    'Transformer/encoderblock/): compiles one block, not all; SPD and FTP '
    'still decide per block (layer_axis). Same function.')
  a('--remat', action='store_true',
    help='recompute each block\'s activations in the backward pass (less '
    'memory, one more forward pass). Same function.')
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
    'the pre-trained weights), spd (Adam-SPD), ftp (Adam-FTP), lpft (a '
    'linear probe of the head, then AdamW on everything: half the steps '
    'each), or all. Where AdamW runs, WiSE-FT is evaluated too '
    '(--wise-alphas).')
  a('--lr', type=float, default=d.lr,
    help='peak fine-tuning learning rate (linear warm-up, cosine decay).')
  a('--weight-decay', default=None, metavar='WD',
    help='a number for every method run, or METHOD=NUMBER,... . AdamW: decay '
    'toward 0; L2-SP: toward the pre-trained weights (both times lr); SPD: '
    'lambda (not times lr); FTP: AdamW\'s decay inside Adam-FTP. Defaults: '
    + ', '.join(f'{k}={v:g}' for k, v in d.weight_decay.items()) + '.')
  a('--ftp-k', type=float, default=d.ftp_k,
    help='FTP\'s k in [0, 1]: the scale of a positive radius gradient.')
  a('--wise-alphas', default=','.join(f'{x:g}' for x in d.wise_alphas),
    metavar='A,A,...',
    help='WiSE-FT\'s alphas: (1 - alpha) theta_0 + alpha theta_AdamW with '
    'AdamW\'s head, evaluated (no training) whenever AdamW runs; "" for '
    'none.')
  a('--seeds', type=int, default=d.seeds,
    help='fine-tuning runs per method, each with its own few-shot draw and '
    'data order (seed + 1000 i), from the same pre-trained model; the table '
    'shows mean +- std, results.json every seed. The new head is zero, as in '
    'vit_jax, whatever the seed. Each seed costs one more run per method.')
  a('--sweep', nargs='?', const='default', default=None, metavar='GRID',
    help='also run each constrained method over a grid of its strength and '
    'draw ID vs OOD accuracy per method (tradeoff.png). GRID: '
    '"spd=0.3,1;l2sp=1,10;ftp=0.5,1;wise=0.25,0.5" (a method left out is '
    'not swept); without it: '
    + '; '.join(f'{m}={",".join(f"{v:g}" for v in g)}'
                for m, g in configs.SWEEP_GRID.items())
    + '. Cost: one fine-tuning run (--steps steps) per grid point and seed '
    'for SPD, L2-SP and FTP (like one method of the study); WiSE-FT points '
    'only evaluate (seconds).')
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
  g = parser.add_argument_group(
      'several processes (hosts), preemption, a lost host')
  a = g.add_argument
  a('--distributed', action='store_true',
    help='one process per host (or per GPU): call '
    'jax.distributed.initialize() with the flags below, or where they are '
    'left out with what JAX detects (TPU, SLURM, Open MPI); each process '
    'reads its slice of every batch and writes its part of each '
    'checkpoint; process 0 writes logs, results and plots. On one machine: '
    'python -m examples.vit.launch.')
  a('--coordinator-address', default=d.coordinator_address,
    metavar='HOST:PORT',
    help='process 0\'s address and a free port there (implies '
    '--distributed).')
  a('--num-processes', type=int, default=d.num_processes, metavar='N',
    help='how many processes (implies --distributed).')
  a('--process-id', type=int, default=d.process_id, metavar='I',
    help='this process, 0 to N - 1 (implies --distributed).')
  a('--local-device-ids', default=None, metavar='ID,ID,...',
    help='the local devices this process uses, e.g. "0" for one GPU per '
    'process (implies --distributed). Default: all of them.')
  a('--heartbeat-timeout', type=int, default=d.heartbeat_timeout,
    metavar='SECONDS',
    help='a process silent this long is taken as lost and the job stops '
    '(jax.distributed.initialize\'s heartbeat_timeout_seconds; JAX\'s '
    'default: 100). Implies --distributed.')
  return parser


def check_distributed(config: configs.Config) -> None:
  """Any of the process flags implies `--distributed`; checks them."""
  given = [flag for flag in ('coordinator_address', 'num_processes',
                             'process_id', 'local_device_ids',
                             'heartbeat_timeout')
           if getattr(config, flag) is not None]
  if given:
    config.distributed = True
  for flag in ('num_processes', 'heartbeat_timeout'):
    if getattr(config, flag) is not None and getattr(config, flag) <= 0:
      raise configs.UsageError(
          f'--{flag.replace("_", "-")} must be positive.')
  if config.process_id is not None:
    if config.num_processes is None:
      raise configs.UsageError('--process-id needs --num-processes.')
    if not 0 <= config.process_id < config.num_processes:
      raise configs.UsageError(
          f'--process-id {config.process_id} is not in [0, '
          f'{config.num_processes}).')
  if config.local_device_ids is not None and not config.local_device_ids:
    raise configs.UsageError('--local-device-ids names no device.')


def parse_config(argv: Sequence[str] | None) -> configs.Config:
  """The flags as a `configs.Config`, checked."""
  args = make_parser().parse_args(argv)
  values = vars(args)
  weight_decay = values.pop('weight_decay')
  values['wise_alphas'] = parse_floats('--wise-alphas', values['wise_alphas'])
  if values['sweep'] is not None:
    values['sweep'] = parse_sweep(values['sweep'])
  if values['local_device_ids'] is not None:
    try:
      values['local_device_ids'] = [
          int(x) for x in values['local_device_ids'].split(',') if x.strip()]
    except ValueError:
      raise configs.UsageError(
          f'--local-device-ids {values["local_device_ids"]!r} is not a list '
          'of device numbers ID,ID,... .') from None
  config = configs.Config(**values)
  check_distributed(config)
  if weight_decay is not None:
    config.weight_decay = parse_weight_decay(weight_decay, config.weight_decay)
  if config.checkpoint is not None:
    if not os.path.isfile(config.checkpoint):
      raise configs.UsageError(
          f'checkpoint {config.checkpoint} does not exist.')
    # The header only: the patch and resolution (the weights come later).
    header = checkpoints.inspect(config.checkpoint)
    patch = header.config.patch_size
    if config.image_size is None:
      config.image_size = header.image_size or 224
    # No multiple-of-patch rule: as the owners' VALID convolution does, the
    # pixels left over at the edge are not used.
    if config.image_size < patch:
      raise configs.UsageError(
          f'--image-size {config.image_size} is smaller than the '
          f'checkpoint\'s patch size {patch}.')
  else:
    if config.model is None:
      config.model = 'small'
    patch = models.VIT_CONFIGS[config.model].patch_size
    if config.image_size is None:
      config.image_size = 16 if patch < 16 else 224
    if config.image_size <= 0 or config.image_size % patch:
      raise configs.UsageError(
          f'--image-size {config.image_size} is not a positive multiple of '
          f'{config.model}\'s patch size {patch}.')
  if config.seeds <= 0:
    raise configs.UsageError('--seeds must be positive.')
  if config.steps < 2 and config.optimizer in ('lpft', 'all'):
    raise configs.UsageError('LP-FT needs --steps >= 2 (a probe, then '
                             'fine-tuning).')
  for flag in ('steps', 'batch_size', 'eval_batch_size', 'log_every',
               'pretrain_batch_size', 'checkpoint_every', 'fsdp_min_size'):
    if getattr(config, flag) <= 0:
      raise configs.UsageError(
          f'--{flag.replace("_", "-")} must be positive.')
  for flag in ('mesh_fsdp', 'stop_after'):
    if getattr(config, flag) is not None and getattr(config, flag) <= 0:
      raise configs.UsageError(
          f'--{flag.replace("_", "-")} must be positive.')
  if config.lora_rank < 0:
    raise configs.UsageError('--lora-rank must be >= 0.')
  if (config.lora_rank
      and config.optimizer not in configs.LORA_METHODS + ('all',)):
    raise configs.UsageError(f'--lora-rank works with --optimizer '
                             f'{", ".join(configs.LORA_METHODS)} or all, not '
                             f'{config.optimizer!r}.')
  if config.sweep and config.lora_rank:
    raise configs.UsageError('--sweep does not work with --lora-rank.')
  if config.lora_rank and config.scan:
    raise configs.UsageError('--lora-rank does not work with --scan (the '
                             'adapters are for unrolled kernels); leave '
                             '--scan out.')
  if config.lora_mlp and not config.lora_rank:
    raise configs.UsageError('--lora-mlp needs --lora-rank.')
  if config.stop_after is not None and config.workdir is None:
    raise configs.UsageError('--stop-after needs --workdir (to resume from).')
  if config.data is not None and not os.path.isdir(config.data):
    raise configs.UsageError(f'data folder {config.data} does not exist.')
  if config.cache_dir is None:
    config.cache_dir = os.path.join(
        os.path.dirname(os.path.abspath(config.results_dir)), 'cache')
  return config
