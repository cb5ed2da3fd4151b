r"""How long does one optimizer step take, per method, on ViT parameter trees?

One jitted step (`update` + `apply_updates`, params and state donated) on the
parameter trees of ViT-Ti/16, S/16, B/16 and L/16 (224px, 1000 classes), for
every method of the registry (`_harness.METHODS`; FTP rows appear when
`spd_optax` has them) and `torch.optim.AdamW(foreach=True)` on the same shapes
when torch is installed. The methods run interleaved in one process, after
warm-up; each figure is a median of many steps, and each ratio is to
`optax.adamw` measured in the same rounds. Step time against parameter count
is fitted with a line per method. Methods that would not fit in memory
together run in groups, each with `optax.adamw`; a method that does not fit
even so is skipped with a note.

  python benchmarks/optimizer_step.py            # Ti..L float32, B/16 bfloat16
  python benchmarks/optimizer_step.py --quick    # a sanity run (Ti/16)
  python benchmarks/optimizer_step.py --models B/16 --dtypes float32 \
      --methods optax.adamw,adam_spd

Writes `benchmarks/results/optimizer_step.json` and `optimizer_step.png`.
"""

import argparse
import gc
import os
import sys

# torch's OpenMP threads otherwise spin while XLA's work, and on a small or
# busy machine a torch step then takes 10x longer than alone.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax
import jax.numpy as jnp
import numpy as np

import _harness  # pylint: disable=g-bad-import-order
import _vit_params

TORCH_ADAMW = 'torch AdamW(foreach)'


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def _random_tree(abstract, seed, scale):
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [(scale * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


class JaxRunner:
  """One method's compiled step and its own params and state."""

  def __init__(self, method, params_abstract, grads_abstract):
    self.method = method
    self.opt = _harness.make_optimizer(method)
    self.state_abstract = _harness.abstract_state(self.opt, params_abstract)
    step = _harness.optimizer_step(self.opt)
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params_abstract, self.state_abstract, grads_abstract).compile()
    self.param_bytes = _harness.tree_bytes(params_abstract)
    self.state_bytes = _harness.tree_bytes(self.state_abstract)
    analysis = self.compiled.memory_analysis()
    self.temp_bytes = int(getattr(analysis, 'temp_size_in_bytes', 0) or 0)
    self.params = self.state = None

  def resident_bytes(self):
    return self.param_bytes + self.state_bytes

  def start(self, params0, grads):
    self.grads = grads
    self.params = jax.tree.map(lambda x: x + 0, params0)
    self.state = jax.jit(self.opt.init)(self.params)
    jax.block_until_ready((self.params, self.state))

  def __call__(self):
    self.params, self.state = self.compiled(self.params, self.state,
                                            self.grads)
    jax.block_until_ready(self.params)

  def stop(self):
    self.params = self.state = self.grads = None


class TorchRunner:
  """`torch.optim.AdamW(foreach=True)` on the same shapes and dtype."""

  def __init__(self, torch, params_abstract, dtype):
    self.torch = torch
    self.shapes = [x.shape for x in jax.tree.leaves(params_abstract)]
    self.dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}[
        jnp.dtype(dtype).name]
    self.param_bytes = _harness.tree_bytes(params_abstract)
    self.state_bytes = 2 * self.param_bytes
    self.temp_bytes = self.param_bytes  # its own gradients
    self.opt = None

  def resident_bytes(self):
    return 2 * self.param_bytes + self.state_bytes

  def start(self, params0, grads):
    del params0, grads
    torch = self.torch
    torch.manual_seed(0)
    self.tensors = []
    for shape in self.shapes:
      p = (0.02 * torch.randn(shape)).to(self.dtype).requires_grad_()
      p.grad = (0.01 * torch.randn(shape)).to(self.dtype)
      self.tensors.append(p)
    self.opt = torch.optim.AdamW(self.tensors, lr=_harness.LEARNING_RATE,
                                 weight_decay=0.05, foreach=True)

  def __call__(self):
    self.opt.step()

  def stop(self):
    self.opt = self.tensors = None


def plan_groups(runners, budget, grads_bytes):
  """Groups of runners that fit in `budget` bytes, each with the baseline.

  A runner that does not fit beside the baseline runs alone (its ratio is
  then to the baseline timed alone just before it); one that does not fit
  even alone is skipped.
  """
  baseline, others = runners[0], runners[1:]
  fixed = 2 * grads_bytes + baseline.resident_bytes()  # + the initial params
  groups, current, used, alone, skipped = [], [], fixed, [], []
  for runner in others:
    need = runner.resident_bytes()
    peak = max([runner.temp_bytes, baseline.temp_bytes] +
               [r.temp_bytes for r in current])
    if fixed + need + peak > budget:
      if 2 * grads_bytes + need + runner.temp_bytes > budget:
        skipped.append(runner)
      else:
        alone.append(runner)
      continue
    if used + need + peak > budget:
      groups.append(current)
      current, used = [], fixed
    current.append(runner)
    used += need
  if current or not groups:
    groups.append(current)
  groups = [[baseline] + g for g in groups]
  for runner in alone:
    groups += [[baseline], [runner]]
  return groups, skipped


def run_size(model, dtype, methods, args, torch):
  params_abstract = _vit_params.abstract_params(model, dtype)
  grads_abstract = params_abstract
  num_params = _vit_params.num_params(model)
  param_bytes = _harness.tree_bytes(params_abstract)
  print(f'\n## {model} {jnp.dtype(dtype).name}: {num_params / 1e6:.1f}M params, '
        f'{param_bytes / 2**20:.0f} MiB', flush=True)
  runners = []
  for method in methods:
    runners.append(JaxRunner(method, params_abstract, grads_abstract))
  if torch is not None:
    runners.append(TorchRunner(torch, params_abstract, dtype))
  budget = int(args.memory_fraction * _harness.available_memory_bytes())
  groups, skipped = plan_groups(runners, budget, param_bytes)
  notes = [f'{_name(r)}: skipped, needs more than {budget / 2**30:.1f} GiB '
           'even alone' for r in skipped]
  notes += [f'{_name(g[0])}: timed alone (does not fit in {budget / 2**30:.1f} '
            'GiB beside optax.adamw); its ratio is to optax.adamw timed alone '
            'just before' for g in groups if _name(g[0]) != _harness.BASELINE]
  for note in notes:
    print('# ' + note)
  repeats = args.repeats or (10 if num_params > 1e8 else 20)
  rows = []
  params0 = _random_tree(params_abstract, 0, 0.02)
  grads = _random_tree(grads_abstract, 1, 0.01)
  base = None
  for index, group in enumerate(groups):
    for runner in group:
      runner.start(params0, grads)
    times = _harness.interleaved({_name(r): r for r in group}, repeats,
                                 args.warmup, args.min_seconds)
    for runner in group:
      runner.stop()
    gc.collect()
    if _harness.BASELINE in times:
      base = times[_harness.BASELINE]
    base_median = np.median(base)
    for runner in group:
      name = _name(runner)
      if any(r['method'] == name for r in rows):
        continue
      t = times[name]
      paired = (np.median(np.asarray(t) / np.asarray(base))
                if len(group) > 1 else np.median(t) / base_median)
      rows.append(dict(
          model=model, dtype=jnp.dtype(dtype).name, method=name,
          params=num_params, group=index, **_harness.summary(t),
          ratio=float(np.median(t) / base_median), paired_ratio=float(paired),
          state_x=runner.state_bytes / param_bytes,
          temp_mib=runner.temp_bytes / 2**20,
          timed_alone=len(group) == 1 and name != _harness.BASELINE))
  del params0, grads
  gc.collect()
  header = ['method', 'median ms', 'p10-p90 ms', 'x adamw', 'state / params']
  table = [[r['method'] + (' (alone)' if r['timed_alone'] else ''),
            r['median_ms'], f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
            f"{r['ratio']:.2f}",
            f"{r['state_x']:.2f}"] for r in rows]
  print(_harness.markdown_table(header, table), flush=True)
  return rows, notes


def _name(runner):
  return TORCH_ADAMW if isinstance(runner, TorchRunner) else runner.method.name


def fit_lines(rows):
  """Per (method, dtype) over the models: time = intercept + slope * params."""
  fits = []
  keys = sorted({(r['method'], r['dtype']) for r in rows})
  for method, dtype in keys:
    pts = sorted((r['params'], r['median_ms']) for r in rows
                 if r['method'] == method and r['dtype'] == dtype)
    if len(pts) < 3:
      continue
    x = np.array([p for p, _ in pts], float)
    y = np.array([t for _, t in pts], float)
    slope, intercept = np.polyfit(x, y, 1)
    predicted = intercept + slope * x
    ss_res = float(np.sum((y - predicted) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2)) or 1.0
    fits.append(dict(
        method=method, dtype=dtype, points=len(pts),
        ms_per_100M=slope * 1e8, intercept_ms=intercept,
        r2=1 - ss_res / ss_tot,
        max_rel_residual=float(np.max(np.abs(y - predicted) / y))))
  return fits


def plot(rows, fits, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('# matplotlib not installed: no plot')
    return None
  fig, ax = plt.subplots(figsize=(7.5, 5))
  methods = sorted({r['method'] for r in rows},
                   key=lambda m: (m != _harness.BASELINE, m))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, method in enumerate(methods):
    for dtype, style, marker in (('float32', '-', 'o'), ('bfloat16', '--', 's')):
      pts = sorted((r['params'], r['median_ms']) for r in rows
                   if r['method'] == method and r['dtype'] == dtype)
      if not pts:
        continue
      x = np.array([p for p, _ in pts]) / 1e6
      y = np.array([t for _, t in pts])
      ax.plot(x, y, style, marker=marker, color=colors[i % len(colors)],
              label=f'{method} ({dtype})')
  ax.set_xlabel('parameters (millions): ViT-Ti/16, S/16, B/16, L/16 '
                '(squares: bfloat16)')
  ax.set_ylabel('one step, median (ms)')
  ax.set_title('Optimizer step time vs parameter count')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f'# wrote {os.path.relpath(path, _harness.ROOT)}')
  return path


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', help='comma-separated, of '
                      f'{list(_vit_params.CONFIGS)} (default: all)')
  parser.add_argument('--dtypes', help='comma-separated: float32,bfloat16 '
                      '(default: float32 for every model, and bfloat16 for '
                      'B/16)')
  parser.add_argument('--methods', help='comma-separated, of '
                      f'{list(_harness.METHODS)} (default: all)')
  parser.add_argument('--repeats', type=int, default=0,
                      help='timed rounds (default 20; 10 above 100M params)')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--min-seconds', type=float, default=0.0,
                      help='keep timing rounds until this many seconds')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--memory-fraction', type=float, default=0.8,
                      help='share of the free memory a group may use')
  parser.add_argument('--quick', action='store_true',
                      help='sanity run: Ti/16 float32, 3 rounds')
  parser.add_argument('--out', default=None, help='JSON path')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.quick:
    pairs = [('Ti/16', 'float32')]
    args.repeats, args.warmup = args.repeats or 3, 1
  else:
    models = (args.models.split(',') if args.models
              else list(_vit_params.CONFIGS))
    if args.dtypes:
      dtypes = args.dtypes.split(',')
      pairs = [(m, d) for d in dtypes for m in models]
    else:
      pairs = [(m, 'float32') for m in models]
      if args.models is None or 'B/16' in models:
        pairs.append(('B/16', 'bfloat16'))
  methods = _harness.pick_methods(args.methods)
  torch = None if args.no_torch else _torch()
  info = _harness.machine()
  print('# ' + _harness.describe_machine(info))
  print(f'# params: {_vit_params.param_shapes("B/16")[1]}')
  if torch is None:
    print('# torch not installed (or --no-torch): no torch rows')
  else:
    torch.set_num_threads(os.cpu_count() or 1)
  rows, notes = [], []
  for model, dtype in pairs:
    size_rows, size_notes = run_size(model, jnp.dtype(dtype), methods, args,
                                     torch)
    rows += size_rows
    notes += [f'{model} {dtype}: {n}' for n in size_notes]
  fits = fit_lines(rows)
  if fits:
    print('\n## Step time vs parameter count: time = intercept + slope * params')
    print(_harness.markdown_table(
        ['method', 'dtype', 'ms per 100M params', 'intercept ms', 'R^2',
         'max |residual| / time'],
        [[f['method'], f['dtype'], f['ms_per_100M'], f['intercept_ms'],
          f"{f['r2']:.4f}", f"{f['max_rel_residual']:.1%}"] for f in fits]))
  out = args.out or os.path.join(
      _harness.RESULTS_DIR,
      'optimizer_step_quick.json' if args.quick else 'optimizer_step.json')
  png = os.path.splitext(out)[0] + '.png'
  plotted = plot(rows, fits, png) if len({r['model'] for r in rows}) > 1 else None
  _harness.write_json(os.path.basename(out), dict(
      machine=info, params_source=_vit_params.param_shapes('B/16')[1],
      gpu='not measured' if info['backend'] == 'cpu' else 'measured',
      args=vars(args), rows=rows, fits=fits, notes=notes, plot=plotted),
      out)
  return rows, fits


if __name__ == '__main__':
  main(sys.argv[1:])
