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
`--distributed` runs one process per host (`--coordinator-address`,
`--num-processes`, `--process-id`, or what JAX detects; on one machine
`python -m examples.vit.launch --num-processes 2 -- FLAGS`). SIGTERM (a
preemption notice) saves the step every process stops at and exits with
status 4; the same command resumes. A lost process ends the others within
`--heartbeat-timeout` seconds (status 5 where this program sees it).

Exit statuses: 0 done, 1 an unexpected error (its traceback), 2 a usage,
data or resume error (one line), 3 `--stop-after`, 4 preempted (the
checkpoint of the step written), 5 another process lost.

The files, one job each: `cli.py` (the flags), `study.py` (pre-training,
the fine-tuning runs, the table), `train_loop.py` (the loop and its logs),
`train_step.py` (the state, the donated train step, the drift, evaluation),
`devices.py` (mesh, shardings, joining the other processes),
`checkpointing.py` (resuming), `launch.py` (N processes on one machine),
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
from examples.vit import launch
from examples.vit import models
from examples.vit import plots
from examples.vit import study
from examples.vit import train_loop


# Exit statuses besides 0 (and 1, an unexpected error's traceback).
USAGE = 2  # a usage, data or resume error: one line on stderr
STOPPED = 3  # --stop-after
PREEMPTED = 4  # SIGTERM: the step's checkpoint written; the command resumes
LOST = 5  # another process was lost: resume from the last checkpoint


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study with the flags in `argv`; returns what results.json holds.

  A usage or data error prints one line on stderr and exits with status 2.
  On SIGTERM (a preemption notice), every process finishes its step, the
  step's checkpoint is written (`--workdir`) and the program exits with
  status 4 and one line; the same command resumes. When another process is
  lost (its collectives fail), one line names it and the last complete
  checkpoint, and the process exits at once with status 5.
  """
  config = None
  try:
    config = cli.parse_config(argv)
    if config.distributed:
      devices.initialize_distributed(config)
    with train_loop.preemption.listening():
      results = study.run_study(config)
  except (configs.UsageError, models.CheckpointError,
          input_pipeline.DataError, checkpointing.ResumeError) as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(USAGE) from None
  except train_loop.Stopped as stop:
    print(f'stopped after step {stop.args[0]} (--stop-after); run the same '
          'command again to resume.', file=sys.stderr)
    raise SystemExit(STOPPED) from None
  except train_loop.Preempted as preempted:
    step, workdir = preempted.args
    if workdir is None:
      print(f'preempted at step {step} of a run not checkpointed '
            '(pre-training, or no --workdir); the same command starts it '
            'again.', file=sys.stderr)
    else:
      print(f'preempted at step {step}; run the same command to resume.',
            file=sys.stderr)
    raise SystemExit(PREEMPTED) from None
  except jax.errors.JaxRuntimeError as error:
    if jax.process_count() == 1:
      raise
    print(lost_process_line(error, config), file=sys.stderr)
    # Not `exit`: its shutdown would wait for the lost process, then abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST)  # pylint: disable=protected-access
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


def lost_process_line(error: BaseException,
                      config: configs.Config | None) -> str:
  """The one line a process prints when a collective with the others fails:
  what failed and the last complete checkpoint to resume from."""
  what = ' '.join(str(error).split())[:200]
  where = 'no --workdir: nothing to resume from'
  if config is not None and config.workdir is not None:
    latest = launch.last_complete_checkpoint(config.workdir)
    where = (f'no complete checkpoint yet in {os.path.abspath(config.workdir)}'
             if latest is None else
             f'last complete checkpoint: step {latest[1]} in {latest[0]}')
  return (f'process {jax.process_index()}: a collective with the other '
          f'processes failed, one is likely lost ({what}); {where}; run the '
          'same command to resume.')


if __name__ == '__main__':
  main()
