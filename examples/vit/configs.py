"""The default study's settings; every field is a `train.py` flag."""

import dataclasses

METHODS = ('adamw', 'l2sp', 'spd', 'ftp', 'lpft')
# The methods that run with `--lora-rank` (SPD in PEFT mode: anchor "zero").
LORA_METHODS = ('adamw', 'spd')
METHOD_NAMES = {'adamw': 'AdamW', 'l2sp': 'L2-SP', 'spd': 'Adam-SPD',
                'ftp': 'Adam-FTP', 'lpft': 'LP-FT', 'wise': 'WiSE-FT'}
# `--sweep`'s default grid of each method's strength: SPD's and L2-SP's
# lambda, FTP's k, WiSE-FT's alpha.
SWEEP_GRID = {'l2sp': (1.0, 10.0, 30.0), 'spd': (0.3, 1.0, 3.0),
              'ftp': (0.5, 1.0), 'wise': (0.25, 0.5, 0.75)}


class UsageError(ValueError):
  """Flags that cannot work together; the message says which."""


@dataclasses.dataclass
class Config:
  """Settings of a study: pre-training (unless a checkpoint is given), then one
  fine-tuning run per method on `train_domain`, evaluated on every domain.
  """

  # Model and data.
  model: str | None = None  # None: the checkpoint's, else 'small'.
  image_size: int | None = None  # None: the checkpoint's; 16 for small/tiny.
  checkpoint: str | None = None
  scan: bool = False  # the blocks stacked as one nn.scan
  remat: bool = False  # recompute the blocks' activations in the backward
  data: str | None = None
  train_domain: str | None = None  # None: "clean" (digits), else the first.
  shots: int = 10  # labelled fine-tuning examples per class; 0: all
  seed: int = 0
  # Fine-tuning seeds (few-shot draw, data order) from one pre-trained model.
  seeds: int = 3

  # Pre-training on every domain (when no checkpoint is given).
  pretrain_steps: int = 3000
  pretrain_lr: float = 1e-3
  pretrain_batch_size: int = 128

  # Fine-tuning: the same data order, steps and schedule for every method.
  optimizer: str = 'all'
  steps: int = 300
  batch_size: int = 32
  lr: float = 1e-3
  warmup_steps: int = 20
  # Per method; `--weight-decay` overrides. AdamW's decays toward 0, L2-SP's
  # toward the pre-trained weights (both times lr); SPD's lambda is not
  # scaled by lr; FTP's is AdamW's decay inside Adam-FTP (its constraint is k).
  weight_decay: dict[str, float] = dataclasses.field(default_factory=lambda: {
      'adamw': 0.1, 'l2sp': 1.0, 'spd': 1.0, 'ftp': 0.0, 'lpft': 0.1})
  ftp_k: float = 1.0
  # WiSE-FT: (1 - alpha) theta_0 + alpha theta_AdamW, AdamW's head; no
  # training. Evaluated whenever AdamW runs (without LoRA).
  wise_alphas: list[float] = dataclasses.field(
      default_factory=lambda: [0.25, 0.5, 0.75])
  # `--sweep`: each method's grid of strengths (None: no sweep).
  sweep: dict[str, list[float]] | None = None

  # Output.
  eval_batch_size: int = 256
  log_every: int = 5
  results_dir: str = 'results/vit_digits'
  cache_dir: str | None = None  # None: `cache/` beside `results_dir`.
  quiet: bool = False

  # Scale: the device mesh, mixed precision, checkpoints, LoRA, multi-host.
  fsdp: bool = False  # params >= fsdp_min_size split over every device
  mesh_fsdp: int | None = None  # the fsdp axis size (implies fsdp)
  fsdp_min_size: int = 2**16
  dtype: str = 'float32'  # activations; params and optimizer state: float32
  workdir: str | None = None  # checkpoints to resume from
  checkpoint_every: int = 100
  stop_after: int | None = None  # stop as if killed once this step is saved
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_mlp: bool = False
  # Several processes (`jax.distributed.initialize`); None: JAX's own cluster
  # detection (TPU, SLURM, Open MPI) or its default.
  distributed: bool = False
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: list[int] | None = None
  heartbeat_timeout: int | None = None  # seconds; JAX's default is 100
