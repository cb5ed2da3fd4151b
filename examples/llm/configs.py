"""The LLM study's settings; every field is a `train.py` flag."""

import dataclasses

# Fine-tuning methods: LoRA adapters (qwix) or every weight.
METHODS = ('adamw_lora', 'spd_lora', 'adamw_full', 'spd_full')
LORA_METHODS = ('adamw_lora', 'spd_lora')
METHOD_NAMES = {'adamw_lora': 'AdamW+LoRA', 'spd_lora': 'Adam-SPD+LoRA',
                'adamw_full': 'AdamW (full)', 'spd_full': 'Adam-SPD (full)'}
# What `--weight-decay` is for each method: AdamW's decoupled decay toward 0
# (times the lr), SPD's lambda (not times the lr).
DECAY_NAMES = {'adamw_lora': 'wd', 'spd_lora': 'λ', 'adamw_full': 'wd',
               'spd_full': 'λ'}
TRAINERS = ('nnx', 'peft')


class UsageError(ValueError):
  """A flag, or a folder a flag names, that cannot work; the message says
  which and why, on one line."""


class DataError(ValueError):
  """A data file that cannot be used; the message names the file (and the
  record) and the problem, on one line."""


@dataclasses.dataclass
class Config:
  """Settings of a study: a pre-trained decoder (trained here from scratch
  on the standard library's source unless `checkpoint` is given), then one
  fine-tuning run per method, strength and seed.
  """

  # The model: a checkpoint folder, or the small byte-level decoder.
  checkpoint: str | None = None
  family: str = 'qwen3'
  num_layers: int = 2
  embed_dim: int = 128
  hidden_dim: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  seq_len: int = 128

  # Pre-training (without a checkpoint), on the stdlib source; cached.
  pretrain_steps: int = 500
  pretrain_lr: float = 3e-3
  pretrain_batch_size: int = 16
  pretrain_bytes: int = 3_000_000

  # Fine-tuning data: the pydoc topics, or an instruction JSON (`data`).
  data: str | None = None
  max_len: int = 256  # instruction rows and scored rows, in tokens
  truncate: bool = False  # cut longer instruction rows (else refused)
  heldout_records: int = 64  # of `data`, for the ID held-out loss
  eval_dir: str | None = None  # the eight commonsense test sets
  eval_tasks: str = 'all'
  eval_max_records: int | None = None
  eval_tokens: int = 8192  # held-out tokens per domain (0: all)

  # Fine-tuning: the same data order, steps and schedule for every method.
  optimizer: str = 'all'
  trainer: str = 'nnx'
  steps: int = 80
  batch_size: int = 8
  warmup_steps: int = 8
  # Peak learning rate per method (`--lr` sets all).
  lr: dict[str, float] = dataclasses.field(default_factory=lambda: {
      'adamw_lora': 3e-3, 'spd_lora': 3e-3, 'adamw_full': 1e-3,
      'spd_full': 1e-3})
  # The grid of each method's strength (`--weight-decay`).
  weight_decay: dict[str, list[float]] = dataclasses.field(
      default_factory=lambda: {'adamw_lora': [0.0, 10.0],
                               'spd_lora': [2.0, 8.0, 32.0],
                               'adamw_full': [0.0, 1.0],
                               'spd_full': [2.0, 8.0, 32.0]})
  seed: int = 0
  seeds: int = 3  # fine-tuning seeds (data order, adapters' init)

  # LoRA.
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_targets: str = 'q,k,v,o,gate,up,down'

  # Output.
  eval_batch_size: int = 16
  log_every: int = 10
  results_dir: str = 'results/llm_pydoc'
  cache_dir: str | None = None  # None: `cache/` beside `results_dir`
  quiet: bool = False

  # Scale: the device mesh and precision.
  fsdp: bool = False
  mesh_fsdp: int | None = None
  fsdp_min_size: int = 2**16
  dtype: str = 'float32'  # the model's weights; adapters stay float32
