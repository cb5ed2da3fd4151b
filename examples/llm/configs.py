"""The LLM study's settings; every field is a `train.py` flag."""

import dataclasses

# Fine-tuning methods: LoRA adapters (qwix) or every weight.
METHODS = ('adamw_lora', 'spd_lora', 'adamw_full', 'spd_full')
METHOD_NAMES = {'adamw_lora': 'AdamW+LoRA', 'spd_lora': 'Adam-SPD+LoRA',
                'adamw_full': 'AdamW (full)', 'spd_full': 'Adam-SPD (full)'}


class UsageError(ValueError):
  """A flag, or a folder a flag names, that cannot work; the message says
  which and why, on one line."""


class DataError(ValueError):
  """A data file that cannot be used; the message names the file (and the
  record) and the problem, on one line."""
