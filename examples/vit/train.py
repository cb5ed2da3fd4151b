r"""Robust fine-tuning of a ViT with AdamW, L2-SP, Adam-SPD, Adam-FTP, LP-FT.

The default study, from the repository root (4 minutes on 2 idle CPU cores,
pre-training included; about 10 on busy ones)::

  python -m examples.vit.train

pre-trains a small ViT on scikit-learn's digits rendered in six domains (or
reuses the one cached by an earlier run), fine-tunes it with a new head on a
few labelled "clean" digits once per method and seed (`--seeds 3`; per seed
the same data order, steps and schedule for every method), evaluates
WiSE-FT from each AdamW run, and evaluates each result on the fine-tuning
domain (ID) and on every other domain (OOD). It prints a table (mean ± std
over the seeds) and writes `results.json` and plots in `--results-dir`
(`--sweep`: also each method over a grid of its strength, `tradeoff.png`).

On a public checkpoint (vit_jax, big_vision ViT, a SigLIP image tower; the
architecture is read from the file) and DomainNet-style data::

  python -m examples.vit.train --checkpoint ViT-B_16.npz \
      --data ~/domainnet --train-domain real --image-size 384

(`--scan` keeps a large model's blocks stacked, `--remat` recomputes their
activations in the backward pass.)

At scale: the train step is jitted over a `(data, fsdp)` mesh of every device
(`--fsdp`, `--mesh-fsdp`; `--dtype bfloat16` activations), `--workdir`
checkpoints and resumes, `--lora-rank` trains LoRA adapters on a frozen
backbone, every logged step goes to `metrics_<method>.jsonl`, and
`--distributed` runs one process per host.

The files, one job each: `cli.py` (the flags), `study.py` (pre-training,
the fine-tuning runs, the table), `train_loop.py` (the loop and its logs),
`train_step.py` (the state, the donated train step, the drift, evaluation),
`devices.py` (mesh and shardings), `checkpointing.py` (resuming),
`models.py`, `checkpoints.py` (public checkpoints), `input_pipeline.py`,
`lora.py`, `plots.py`.
"""

from collections.abc import Sequence
import json
import os
import sys
from typing import Any

import jax

from examples.vit import checkpointing
from examples.vit import cli
from examples.vit import configs
from examples.vit import devices
from examples.vit import input_pipeline
from examples.vit import models
from examples.vit import plots
from examples.vit import study
from examples.vit import train_loop


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study with the flags in `argv`; returns what results.json holds.

  A usage or data error prints one line on stderr and exits with status 2.
  """
  try:
    config = cli.parse_config(argv)
    if config.distributed:
      jax.distributed.initialize()
    results = study.run_study(config)
  except (configs.UsageError, models.CheckpointError,
          input_pipeline.DataError, checkpointing.ResumeError) as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None
  except train_loop.Stopped as stop:
    print(f'stopped after step {stop.args[0]} (--stop-after); run the same '
          'command again to resume.', file=sys.stderr)
    raise SystemExit(3) from None
  if not devices.is_writer():
    return results
  os.makedirs(config.results_dir, exist_ok=True)
  with open(os.path.join(config.results_dir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  figures = plots.plot_all(results, config.results_dir)
  print(study.format_table(results))
  print(f'\nresults: {os.path.abspath(config.results_dir)} '
        f'(results.json, {", ".join(os.path.basename(p) for p in figures)})')
  return results


if __name__ == '__main__':
  main()
