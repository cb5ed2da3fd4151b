r"""What does Adam-SPD cost in the LLM example's LoRA step?

The example's own train step (`examples/llm/train_step.py`: an
`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` inside one jitted function,
the adapters and the optimizer state donated, the frozen weights an input)
on a decoder shaped like Qwen3-0.6B (tunix's `qwen3` model: 28 layers, width
1024, MLP 3072, 16 query and 8 key/value heads of 128, the 151,936-token
embedding tied to the output; random weights), with rank-`r` LoRA on every
attention and MLP projection. Two methods, as the example builds them
(`train_step.make_optimizer`):

- `adamw_lora`: `optax.adamw` on the adapters;
- `spd_lora`: `spd.adam_spd(anchor="zero")` on the adapters (PEFT mode).

For each: the step time (the methods interleaved step by step in one
process, medians), and the memory of the compiled step from XLA's memory
analysis (`jit(step).lower(...).compile().memory_analysis()`), with the
optimizer state's bytes counted leaf by leaf.

  python benchmarks/llm_lora_step.py                   # Qwen3-0.6B shape
  python benchmarks/llm_lora_step.py --layers 4 --repeats 5   # quicker
  python benchmarks/llm_lora_step.py --quick           # tiny, a smoke test

Writes `benchmarks/results/llm_lora_step.json`.
"""

import argparse
import os
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax as spd

import _harness  # pylint: disable=g-bad-import-order

from examples.llm import lora  # pylint: disable=g-bad-import-order
from examples.llm import models
from examples.llm import train_step

METHODS = ('adamw_lora', 'spd_lora')

# Qwen3-0.6B's shape (its config.json), in `models.tiny_config`'s words.
QWEN3_0P6B = dict(num_layers=28, vocab_size=151_936, embed_dim=1024,
                  hidden_dim=3072, num_heads=16, num_kv_heads=8, head_dim=128,
                  weight_tying=True)
QUICK = dict(num_layers=2, vocab_size=512, embed_dim=64, hidden_dim=128,
             num_heads=4, num_kv_heads=2, head_dim=16, weight_tying=True)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--layers', type=int, default=None,
                 help='decoder blocks (default: 28, Qwen3-0.6B\'s)')
  p.add_argument('--batch-size', type=int, default=4)
  p.add_argument('--seq-len', type=int, default=256)
  p.add_argument('--lora-rank', type=int, default=16)
  p.add_argument('--repeats', type=int, default=7,
                 help='timed rounds (one step of each method per round)')
  p.add_argument('--update-repeats', type=int, default=41,
                 help='timed rounds of the optimizer update alone')
  p.add_argument('--quick', action='store_true',
                 help='a tiny model: checks the script runs')
  p.add_argument('--out', default=None)
  return p.parse_args(argv)


def state_bytes(run: train_step.Run) -> dict[str, int]:
  """The optimizer state's bytes: all of it, its leaf-sized part (leaves with
  an adapter's shape: Adam's moments), and the rest (scalars per leaf)."""
  adapters = jax.tree.leaves(train_step._pure(  # pylint: disable=protected-access
      run.trainable[0]))
  _, optimizer = run.merge()
  shapes = {tuple(a.shape) for a in adapters if np.ndim(a) >= 2}
  leaves = [x for x in jax.tree.leaves(train_step._pure(optimizer.opt_state))  # pylint: disable=protected-access
            if hasattr(x, 'dtype')]
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  big = sum(x.size * x.dtype.itemsize for x in leaves
            if tuple(x.shape) in shapes)
  return {'state_bytes': int(total), 'moment_bytes': int(big),
          'other_bytes': int(total - big),
          'other_leaves': sum(1 for x in leaves if tuple(x.shape) not in shapes),
          'adapter_bytes': int(sum(a.size * a.dtype.itemsize
                                   for a in adapters))}


def update_alone(base, args, rows) -> dict:
  """The two optimizers' update of the adapters alone (optax, jitted, the
  adapters and state donated), interleaved: SPD's extra work in ms, set
  against the whole step, whose own round-to-round noise is larger than it."""
  model = lora.apply(base, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                     seed=1)
  adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  del model
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(
      adapters)) * 2))
  adapters = jax.tree.map(
      lambda a: a + 1e-2 * jax.random.normal(next(keys), a.shape), adapters)
  grads = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape),
                       adapters)
  txs = {'adamw': optax.inject_hyperparams(optax.adamw)(
             learning_rate=1e-4, weight_decay=0.01),
         'spd': optax.inject_hyperparams(spd.adam_spd)(
             learning_rate=1e-4, weight_decay=1.0, anchor='zero')}
  live = {}
  for name, tx in txs.items():
    step = jax.jit(_harness.optimizer_step(tx), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, adapters)
    live[name] = [step, params, tx.init(params)]

  def runner(name):
    def go():
      step, params, state = live[name]
      live[name][1:] = _harness.block(step(params, state, grads))
    return go

  times = _harness.interleaved({n: runner(n) for n in txs},
                               repeats=args.update_repeats, warmup=3)
  adamw_ms = float(np.median(times['adamw'])) * 1e3
  spd_ms = float(np.median(times['spd'])) * 1e3
  extra = float(np.median([s - a for a, s in zip(times['adamw'],
                                                 times['spd'])])) * 1e3
  return {'adamw_ms': adamw_ms, 'spd_ms': spd_ms, 'extra_ms': extra,
          'rounds': len(times['adamw']),
          'adapter_params': int(sum(a.size for a in jax.tree.leaves(adapters))),
          'extra_of_step': extra / rows['adamw_lora']['median_ms']}


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  shape = dict(QUICK if args.quick else QWEN3_0P6B)
  if args.layers:
    shape['num_layers'] = args.layers
  batch_size, seq_len = ((2, 32) if args.quick
                         else (args.batch_size, args.seq_len))
  info = _harness.machine()
  print('#', _harness.describe_machine(info))

  t0 = time.perf_counter()
  config = models.tiny_config('qwen3', **shape)
  base = models.create('qwen3', config, seed=0)
  n_params = models.count_params(base)
  print(f'# qwen3 {shape["num_layers"]} layers, width {shape["embed_dim"]}, '
        f'{n_params / 1e6:.1f}M params, batch {batch_size} x {seq_len}, '
        f'LoRA r={args.lora_rank} on q,k,v,o,gate,up,down '
        f'({time.perf_counter() - t0:.0f} s to build)')

  rng = np.random.default_rng(0)
  batch = {'tokens': jnp.asarray(rng.integers(0, shape['vocab_size'],
                                              (batch_size, seq_len)),
                                 jnp.int32),
           'mask': jnp.ones((batch_size, seq_len), bool)}
  batch['loss_mask'] = batch['mask']
  lr = jnp.asarray(1e-4, jnp.float32)

  runs, steps, rows = {}, {}, {}
  for method in METHODS:
    model = lora.apply(base, rank=args.lora_rank, alpha=2.0 * args.lora_rank,
                       seed=1)
    run = train_step.make_run(method, model,
                              train_step.make_optimizer(method),
                              weight_decay=1.0 if method == 'spd_lora'
                              else 0.01,
                              lora_scale=2.0)
    step = train_step.make_train_step(run)
    t0 = time.perf_counter()
    compiled = step.lower(run.trainable, run.frozen, batch, lr).compile()
    compile_s = time.perf_counter() - t0
    memory = _harness.compiled_memory(compiled)
    rows[method] = dict(compile_s=compile_s, **memory, **state_bytes(run))
    runs[method], steps[method] = run, compiled
    print(f'# {method}: compiled in {compile_s:.1f} s; peak '
          f'{memory["peak_bytes"] / 2**20:.1f} MiB')
    del model

  def runner(method):
    def go():
      run = runs[method]
      run.trainable, metrics = steps[method](run.trainable, run.frozen, batch,
                                             lr)
      jax.block_until_ready((run.trainable, metrics['loss']))
    return go

  times = _harness.interleaved({m: runner(m) for m in METHODS},
                               repeats=args.repeats, warmup=1)
  for method in METHODS:
    rows[method].update(_harness.summary(times[method]))
  ratios = [b / a for a, b in zip(times['adamw_lora'], times['spd_lora'])]
  update = update_alone(base, args, rows)
  base_row, spd_row = rows['adamw_lora'], rows['spd_lora']
  result = {
      'machine': info, 'shape': shape, 'params': n_params,
      'batch_size': batch_size, 'seq_len': seq_len,
      'lora_rank': args.lora_rank, 'methods': rows,
      'step_ratio_median': float(np.median(ratios)),
      'update_alone': update,
      'step_ratios': ratios,
      'peak_delta_bytes': spd_row['peak_bytes'] - base_row['peak_bytes'],
      'state_delta_bytes': spd_row['state_bytes'] - base_row['state_bytes'],
  }

  header = ['method', 'step median (ms)', 'p10-p90 (ms)', 'peak (MiB)',
            'temp (MiB)', 'opt state (MiB)', 'state beyond moments',
            'compile (s)']
  table = []
  for method in METHODS:
    r = rows[method]
    table.append([
        method, r['median_ms'], f'{r["p10_ms"]:.0f}-{r["p90_ms"]:.0f}',
        r['peak_bytes'] / 2**20, r['temp_bytes'] / 2**20,
        r['state_bytes'] / 2**20,
        f'{r["other_bytes"]} B in {r["other_leaves"]} leaves',
        r['compile_s']])
  print(_harness.markdown_table(header, table))
  print(f'# spd_lora / adamw_lora step time, median of the per-round ratios: '
        f'{result["step_ratio_median"]:.4f} ({len(ratios)} rounds)')
  print(f'# the optimizer update alone on the adapters (median of '
        f'{update["rounds"]} interleaved rounds): adamw {update["adamw_ms"]:.1f}'
        f' ms, adam_spd(zero) {update["spd_ms"]:.1f} ms; SPD\'s extra '
        f'{update["extra_ms"]:.1f} ms = {100 * update["extra_of_step"]:.2f}% '
        f'of the AdamW+LoRA step')
  print(f'# peak: spd_lora - adamw_lora = {result["peak_delta_bytes"]} B; '
        f'optimizer state: {result["state_delta_bytes"]} B')
  _harness.write_json('llm_lora_step.json' if not args.quick
                      else 'llm_lora_step_quick.json', result, args.out)
  return result


if __name__ == '__main__':
  main()
