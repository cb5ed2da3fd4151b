r"""Fine-tuning a decoder LLM with LoRA and Adam-SPD, on tunix and qwix.

The default study, from the repository root (4 min 54 s wall, 5 min 26 s
of CPU, on 2 CPU cores shared at a load of 4-5, pre-training included)::

  python -m examples.llm.train

pre-trains a small byte-level Qwen 3-style decoder (tunix's model) on the
Python standard library's source (or reuses the one cached by an earlier
run), fine-tunes it on the `pydoc_data` documentation topics with AdamW and
Adam-SPD, on qwix LoRA adapters (`spd.adam_spd(anchor="zero")`) and on every
weight (anchored at the pre-trained ones), for each strength of a small grid
and 3 seeds, and evaluates each result on both texts' held-out parts: the
fine-tuning domain's loss (ID) and the standard library's (what was kept
of the pre-training). It prints a table (mean ± std over the seeds) and
writes `results.json`, the metrics logs (SPD's selection rate and ratio per
adapter) and the figures in `--results-dir`.

On a Hugging Face checkpoint and LLM-Adapters' data::

  python -m examples.llm.train --checkpoint ~/Qwen3-0.6B \
      --data commonsense_170k.json --eval-dir LLM-Adapters/dataset \
      --steps 1000 --batch-size 16 --dtype bfloat16

The files, one job each: `cli.py` (the flags), `study.py` (pre-training,
the runs, evaluation, the table), `train_step.py` (the optimizers, the
jitted step, distances, held-out loss), `lora.py` (qwix LoRA), `models.py`
(tunix's decoders), `checkpoints.py` (Hugging Face folders), `data.py` (the
corpora and instruction data), `scoring.py` (the commonsense tasks),
`plots.py`.
"""

from collections.abc import Sequence
import json
import os
import sys
from typing import Any

from examples.llm import cli
from examples.llm import configs
from examples.llm import plots
from examples.llm import study


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the study with the flags in `argv`; returns what results.json holds.

  A usage or data error prints one line on stderr and exits with status 2.
  """
  try:
    config = cli.parse_config(argv)
    results = study.run_study(config)
  except (configs.UsageError, configs.DataError) as error:
    print(f'error: {error}', file=sys.stderr)
    raise SystemExit(2) from None
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
