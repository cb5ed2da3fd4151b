r"""How much memory does each method keep, and how much does a step need?

Optimizer-state bytes per method as a multiple of the parameter bytes,
computed from the state pytree (`jax.eval_shape(opt.init, params)`: nothing
is allocated), on a ViT parameter tree: every leaf constrained, and with the
classification head masked (its leaves must add nothing beyond the base
optimizer's state). Then the peak memory of one jitted step (params and state
donated) from XLA's memory analysis of the compiled step, and on a GPU also
the allocator's peak (`device.memory_stats()`) over a few real steps.

  python benchmarks/memory.py                 # ViT-B/16, float32
  python benchmarks/memory.py --model L/16 --dtype bfloat16
  python benchmarks/memory.py --quick         # ViT-Ti/16

Writes `benchmarks/results/memory.json`.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax
from spd_optax import _common

import _harness  # pylint: disable=g-bad-import-order
import _vit_params

# Names of the base optimizer's part of a state (SPD/FTP wrap it as
# `base_optimizer_state`; in L2-SP's chain it is Adam's `mu` and `nu`).
_BASE_FIELDS = ('base_optimizer_state', 'mu', 'nu', 'trace')
_BASES = {
    'optax.adam': lambda: optax.adam(_harness.LEARNING_RATE),
    'optax.adamw': lambda: optax.adamw(_harness.LEARNING_RATE),
    'optax.sgd': lambda: optax.sgd(_harness.LEARNING_RATE, momentum=0.9),
}


def head_bytes_beyond_base(state) -> int:
  """Bytes of state leaves that belong to the head, outside the base's state."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    keys = list(_common.path_names(path))
    if 'head' in keys and not any(k in _BASE_FIELDS for k in keys):
      total += _harness.tree_bytes(leaf)
  return total


def state_rows(params_abstract, methods):
  param_bytes = _harness.tree_bytes(params_abstract)
  rows = []
  for method in methods:
    row = {'method': method.name}
    for masked in (False, True):
      opt = _harness.make_optimizer(method, masked=masked)
      state = _harness.abstract_state(opt, params_abstract)
      state_bytes = _harness.tree_bytes(state)
      base_bytes = 0
      if method.base:
        base_bytes = _harness.tree_bytes(
            _harness.abstract_state(_BASES[method.base](), params_abstract))
      suffix = '_masked' if masked else ''
      row['state_x' + suffix] = state_bytes / param_bytes
      row['beyond_base_x' + suffix] = (state_bytes - base_bytes) / param_bytes
      row['beyond_base_bytes' + suffix] = state_bytes - base_bytes
      if masked:
        row['head_bytes_beyond_base'] = head_bytes_beyond_base(state)
      else:
        # The per-leaf scalars and per-row statistics beyond whole copies.
        whole = round((state_bytes - base_bytes) / param_bytes)
        row['beyond_base_small_bytes'] = (
            state_bytes - base_bytes - whole * param_bytes)
    rows.append(row)
  return rows


def torch_state_x(params_abstract):
  """`torch.optim.AdamW`'s state bytes / param bytes, after one real step."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  shapes = [x.shape for x in jax.tree.leaves(params_abstract)]
  tensors = [torch.zeros(s, requires_grad=True) for s in shapes]
  for t in tensors:
    t.grad = torch.ones_like(t)
  opt = torch.optim.AdamW(tensors, lr=1e-4, foreach=True)
  opt.step()
  state = sum(v.numel() * v.element_size() for s in opt.state.values()
              for v in s.values() if torch.is_tensor(v))
  params = sum(t.numel() * t.element_size() for t in tensors)
  return state / params


def step_rows(params_abstract, methods, measure_device):
  param_bytes = _harness.tree_bytes(params_abstract)
  rows = []
  for method in methods:
    opt = _harness.make_optimizer(method)
    state = _harness.abstract_state(opt, params_abstract)
    step = _harness.optimizer_step(opt)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params_abstract, state, params_abstract).compile()
    sizes = _harness.compiled_memory(compiled)
    peak = sizes['peak_bytes']
    row = dict(method=method.name,
               arguments_x=sizes['argument_bytes'] / param_bytes,
               temp_x=sizes['temp_bytes'] / param_bytes,
               peak_x=peak / param_bytes, peak_mib=peak / 2**20)
    if measure_device:
      row['device_peak_x'] = _device_peak(compiled, opt, params_abstract) / (
          param_bytes)
    rows.append(row)
  return rows


def _device_peak(compiled, opt, params_abstract):
  """The allocator's peak over 3 steps (GPU/TPU), minus what was in use."""
  device = jax.devices()[0]
  before = (device.memory_stats() or {}).get('bytes_in_use', 0)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params_abstract)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, x.dtype),
                       params_abstract)
  state = opt.init(params)
  for _ in range(3):
    params, state = compiled(params, state, grads)
  jax.block_until_ready(params)
  peak = (device.memory_stats() or {}).get('peak_bytes_in_use', 0)
  del params, grads, state
  return peak - before


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='B/16')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--methods', help='comma-separated (default: all)')
  parser.add_argument('--quick', action='store_true', help='ViT-Ti/16')
  parser.add_argument('--out', default=None)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  model = 'Ti/16' if args.quick else args.model
  dtype = jnp.dtype(args.dtype)
  methods = _harness.pick_methods(args.methods)
  info = _harness.machine()
  print('# ' + _harness.describe_machine(info))
  params_abstract = _vit_params.abstract_params(model, dtype)
  param_bytes = _harness.tree_bytes(params_abstract)
  head_bytes = _harness.tree_bytes(params_abstract['head'])
  print(f'# ViT-{model} {dtype.name}: {_vit_params.num_params(model) / 1e6:.1f}M '
        f'params, {param_bytes / 2**20:.0f} MiB, head {head_bytes / 2**20:.2f} '
        f'MiB ({_vit_params.param_shapes(model)[1]})')

  states = state_rows(params_abstract, methods)
  torch_x = torch_state_x(params_abstract)
  print('\n## Optimizer state, as a multiple of the parameter bytes')
  wraps = {m.name: m.base for m in methods}
  table = [[r['method'], f"{r['state_x']:.4f}",
            f"{r['beyond_base_x']:.4f}" if wraps[r['method']] else '-',
            r['beyond_base_small_bytes'] if wraps[r['method']] else '-',
            f"{r['state_x_masked']:.4f}",
            r['head_bytes_beyond_base'] if wraps[r['method']] else '-']
           for r in states]
  if torch_x is not None:
    table.append(['torch AdamW(foreach)', f'{torch_x:.4f}', '-', '-', '-', '-'])
  print(_harness.markdown_table(
      ['method', 'state / params', 'beyond base / params',
       'beyond base, small stats (bytes)', 'head masked: state / params',
       'head masked: head bytes beyond base'], table))

  measure_device = jax.default_backend() != 'cpu'
  steps = step_rows(params_abstract, methods, measure_device)
  print('\n## One step (params and state donated), XLA memory analysis, '
        'x parameter bytes')
  header = ['method', 'arguments', 'temporaries', 'peak', 'peak MiB']
  if measure_device:
    header.append('device peak')
  print(_harness.markdown_table(header, [
      [r['method'], r['arguments_x'], r['temp_x'], r['peak_x'], r['peak_mib']]
      + ([r['device_peak_x']] if measure_device else []) for r in steps]))
  if not measure_device:
    print('# GPU allocator peak: not measured (no GPU here)')
  out = args.out or os.path.join(
      _harness.RESULTS_DIR, 'memory_quick.json' if args.quick else 'memory.json')
  _harness.write_json(os.path.basename(out), dict(
      machine=info, model=model, dtype=dtype.name, param_bytes=param_bytes,
      head_bytes=head_bytes, states=states, torch_adamw_state_x=torch_x,
      steps=steps,
      gpu='measured' if measure_device else 'not measured'), out)


if __name__ == '__main__':
  main(sys.argv[1:])
