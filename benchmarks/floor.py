r"""How far is each method's step from the memory-bandwidth floor?

An optimizer step is memory-bound: its floor is the time to read every input
it uses once and write every output it changes once (AdamW: read p, g, m, v,
write p, m, v: 7 words a parameter), at the bandwidth this machine achieves.
This script
  1. measures that bandwidth with jitted reference kernels on arrays the size
     of the params (`x * 2 + y` written into x's donated buffer: 2 reads and a
     write; `sum(x)`: a read),
  2. derives each method's minimum bytes from its step's jaxpr (each input the
     step uses read once, each output that is not an input passed through
     written once),
  3. reads the bytes the compiled step actually moves, and its number of
     passes over memory, off the optimized HLO (`_hlo.py`), on the whole tree
     and on one ViT-B/16 MLP kernel (768 x 3072) alone,
  4. times the steps, interleaved, and reports achieved bandwidth (minimum
     bytes / time) and time / floor time.

  python benchmarks/floor.py                  # ViT-B/16, float32
  python benchmarks/floor.py --quick          # ViT-Ti/16, few rounds

Writes `benchmarks/results/floor.json`.
"""

import argparse
import os
import resource
import sys

import jax
import jax.numpy as jnp
import numpy as np

import _harness  # pylint: disable=g-bad-import-order
import _hlo
import _vit_params

LEAF_SHAPE = (768, 3072)  # ViT-B/16 MlpBlock_3/Dense_0/kernel


def bandwidth(num_elements, dtype, repeats, warmup):
  """GB/s of reference kernels on `num_elements`-long arrays."""
  x = jnp.full((num_elements,), 1.0, dtype)
  y = jnp.full((num_elements,), 0.5, dtype)
  itemsize = jnp.dtype(dtype).itemsize
  axpy = jax.jit(lambda x, y: x * 2 + y, donate_argnums=0)
  total = jax.jit(jnp.sum)
  scale = jax.jit(lambda x: x * 0.5, donate_argnums=0)
  holder = {'x': x, 'z': jnp.full((num_elements,), 1.0, dtype)}

  def run_axpy():
    holder['x'] = axpy(holder['x'], y)
    holder['x'].block_until_ready()

  def run_scale():
    holder['z'] = scale(holder['z'])
    holder['z'].block_until_ready()

  def run_sum():
    total(y).block_until_ready()

  times = _harness.interleaved(
      {'x*2+y (2 reads, 1 write)': run_axpy,
       'x*0.5 (1 read, 1 write)': run_scale,
       'sum(x) (1 read)': run_sum}, repeats, warmup)
  words = {'x*2+y (2 reads, 1 write)': 3, 'x*0.5 (1 read, 1 write)': 2,
           'sum(x) (1 read)': 1}
  out = {}
  for name, t in times.items():
    median = float(np.median(t))
    out[name] = dict(median_ms=median * 1e3,
                     gb_per_s=words[name] * num_elements * itemsize / median / 1e9)
  return out


def leaf_passes(method, dtype):
  """Kernels and traffic of the compiled step on one large leaf alone."""
  params = {'kernel': jax.ShapeDtypeStruct(LEAF_SHAPE, dtype)}
  opt = method.make(None, lambda path, shape: (len(shape) - 1,))
  state = _harness.abstract_state(opt, params)
  compiled = jax.jit(_harness.optimizer_step(opt), donate_argnums=(0, 1)).lower(
      params, state, params).compile()
  nbytes = _harness.tree_bytes(params)
  kernels = _hlo.kernel_traffic(compiled.as_text(), large_bytes=nbytes // 2)
  return dict(
      passes=len(kernels),
      read_words=sum(k[2] for k in kernels) / nbytes,
      written_words=sum(k[3] for k in kernels) / nbytes,
      kernels=[f'{k[0]}: R {k[2] / nbytes:.2g} W {k[3] / nbytes:.2g}'
               for k in kernels])


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='B/16')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--methods', help='comma-separated (default: all)')
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=None)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.quick:
    args.model, args.repeats, args.warmup = 'Ti/16', 3, 1
  dtype = jnp.dtype(args.dtype)
  methods = _harness.pick_methods(args.methods)
  info = _harness.machine()
  print('# ' + _harness.describe_machine(info))
  params_abstract = _vit_params.abstract_params(args.model, dtype)
  num_params = _vit_params.num_params(args.model)
  param_bytes = _harness.tree_bytes(params_abstract)
  print(f'# ViT-{args.model} {dtype.name}: {num_params / 1e6:.1f}M params, '
        f'{param_bytes / 2**20:.0f} MiB')

  reference = bandwidth(num_params, dtype, args.repeats, args.warmup)
  print('\n## Reference kernels on arrays of the params\' size')
  print(_harness.markdown_table(
      ['kernel', 'median ms', 'GB/s'],
      [[k, v['median_ms'], v['gb_per_s']] for k, v in reference.items()]))
  peak_bw = reference['x*2+y (2 reads, 1 write)']['gb_per_s'] * 1e9

  params0 = jax.tree.map(
      lambda x: jnp.full(x.shape, 0.01, x.dtype), params_abstract)
  grads = jax.tree.map(
      lambda x: jnp.full(x.shape, 1e-3, x.dtype), params_abstract)
  runners, rows = {}, {}
  for method in methods:
    opt = _harness.make_optimizer(method)
    state_abstract = _harness.abstract_state(opt, params_abstract)
    step = _harness.optimizer_step(opt)
    floor = _harness.floor_bytes(step, params_abstract, state_abstract,
                                 params_abstract)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params_abstract, state_abstract, params_abstract).compile()
    traffic = _hlo.summarize(compiled.as_text(), param_bytes,
                             large_bytes=1 << 16)
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows[method.name] = dict(
        method=method.name, floor_words=floor['total'] / param_bytes,
        floor_bytes=floor['total'], compiled_words=traffic['total'],
        compiled_kernels=traffic['kernels'], temp_words=temp / param_bytes,
        **leaf_passes(method, dtype))
    params = jax.tree.map(lambda x: x + 0, params0)
    holder = {'p': params, 's': jax.jit(opt.init)(params), 'faults': []}

    def run(holder=holder, compiled=compiled):
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      holder['p'], holder['s'] = compiled(holder['p'], holder['s'], grads)
      jax.block_until_ready(holder['p'])
      holder['faults'].append(
          resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    runners[method.name] = (run, holder)
  times = _harness.interleaved({k: r for k, (r, _) in runners.items()},
                               args.repeats, args.warmup)
  base = np.median(times[_harness.BASELINE])
  for name, row in rows.items():
    median = float(np.median(times[name]))
    row.update(
        median_ms=median * 1e3, ratio=median / base,
        achieved_gb_per_s=row['floor_bytes'] / median / 1e9,
        compiled_gb_per_s=row['compiled_words'] * param_bytes / median / 1e9,
        floor_ms=row['floor_bytes'] / peak_bw * 1e3,
        page_faults_per_step=float(np.median(runners[name][1]['faults'])))
    row['x_floor'] = row['median_ms'] / row['floor_ms']
  print(f'\n## Steps on ViT-{args.model} {dtype.name}: words are multiples of '
        'the params\' bytes; floor time = minimum bytes / x*2+y bandwidth')
  print(_harness.markdown_table(
      ['method', 'minimum words', 'compiled words', 'passes per leaf',
       'temporaries (words)', 'median ms', 'x adamw', 'achieved GB/s',
       'floor ms', 'x floor', 'page faults / step'],
      [[r['method'], r['floor_words'], r['compiled_words'], r['passes'],
        r['temp_words'], r['median_ms'], f"{r['ratio']:.2f}",
        r['achieved_gb_per_s'], r['floor_ms'], f"{r['x_floor']:.2f}",
        int(r['page_faults_per_step'])] for r in rows.values()]))
  print(f'\n## Passes over one {LEAF_SHAPE} leaf (kernels that read or write '
        'it; R/W in leaf sizes)')
  for r in rows.values():
    print(f"- {r['method']}: {r['passes']} passes, {r['read_words']:.3g} reads "
          f"+ {r['written_words']:.3g} writes: " + '; '.join(r['kernels']))
  out = args.out or os.path.join(
      _harness.RESULTS_DIR, 'floor_quick.json' if args.quick else 'floor.json')
  _harness.write_json(os.path.basename(out), dict(
      machine=info, model=args.model, dtype=dtype.name, params=num_params,
      param_bytes=param_bytes, reference=reference, rows=list(rows.values()),
      gpu='not measured' if info['backend'] == 'cpu' else 'measured'), out)


if __name__ == '__main__':
  main(sys.argv[1:])
