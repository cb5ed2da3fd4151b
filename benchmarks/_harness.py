"""What the benchmark scripts share: the methods, the machine, the timing.

The methods are a registry: each entry builds an optimizer for a params tree.
FTP's entries are there only when `spd_optax` has `adam_ftp` / `sgd_ftp`.
Timing interleaves the methods in one process (one step of each, in a
rotating order, round after round), so that a busy or throttled machine slows
them alike, and reports medians.
"""

import dataclasses
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

import spd_optax as spd  # pylint: disable=g-import-not-at-top,wrong-import-position
import _vit_params  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = os.path.join(_HERE, 'results')
LEARNING_RATE = 1e-4
BASELINE = 'optax.adamw'


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer of the comparison.

  Attributes:
    name: the row's name.
    make: `make(mask, output_axes) -> GradientTransformation`; `mask` is None
      (every leaf) or a callable on the params, `output_axes` FTP's per-leaf
      rule.
    base: the name of the base optimizer whose state it wraps (for the
      "beyond the base" memory column), or None.
    note: what it is, in a few words.
  """

  name: str
  make: Callable[..., optax.GradientTransformation]
  base: Optional[str]
  note: str


def _registry() -> dict[str, Method]:
  lr = LEARNING_RATE
  methods = [
      Method('optax.adamw', lambda mask, axes: optax.adamw(lr, weight_decay=0.05),
             None, 'the baseline'),
      Method('adam_spd', lambda mask, axes: spd.adam_spd(lr, 0.5, mask=mask),
             'optax.adam', 'anchor = initial params'),
      Method('adam_spd(zero)',
             lambda mask, axes: spd.adam_spd(lr, 0.5, anchor='zero', mask=mask),
             'optax.adam', 'PEFT mode, anchor 0'),
      Method('adamw_l2sp', lambda mask, axes: spd.adamw_l2sp(lr, 0.1, mask=mask),
             'optax.adam', 'L2-SP'),
  ]
  if hasattr(spd, 'adam_ftp'):
    methods.append(Method(
        'adam_ftp', lambda mask, axes: spd.adam_ftp(
            lr, mask=mask, output_axes=axes), 'optax.adamw', 'AdamP'))
    methods.append(Method(
        'ftp(optax.adamw)', lambda mask, axes: spd.fast_trainable_projection(
            optax.adamw(lr, weight_decay=0.0), mask=mask, output_axes=axes),
        'optax.adamw',
        'the generic wrapper: adam_ftp before its chunk loop'))
  if hasattr(spd, 'sgd_ftp'):
    methods.append(Method(
        'sgd_ftp', lambda mask, axes: spd.sgd_ftp(
            lr, momentum=0.9, mask=mask, output_axes=axes),
        'optax.sgd', 'SGDP, momentum 0.9'))
  methods.append(Method(
      'optax.sgd', lambda mask, axes: optax.sgd(lr, momentum=0.9), None,
      'momentum 0.9, sgd_ftp\'s base'))
  return {m.name: m for m in methods}


METHODS = _registry()


def pick_methods(text: Optional[str]) -> list[Method]:
  """The methods named in a comma-separated list (all when empty), baseline first."""
  if not text:
    names = list(METHODS)
  else:
    names = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
      raise SystemExit(f'unknown method(s) {unknown}; known: {list(METHODS)}')
  if BASELINE not in names:
    names.insert(0, BASELINE)
  names.sort(key=lambda n: n != BASELINE)
  return [METHODS[n] for n in names]


def make_optimizer(method: Method, masked: bool = False):
  mask = _vit_params.head_mask if masked else None
  return method.make(mask, _vit_params.output_axes)


# The machine.


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return None


def available_memory_bytes() -> int:
  """Memory a new buffer can take now: the device's, or the host's."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      return int(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 8 << 30


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'optax', 'flax', 'numpy', 'torch'):
    try:
      out[name] = importlib.import_module(name).__version__
    except Exception:  # pylint: disable=broad-except
      out[name] = 'not installed'
  return out


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return {
      'cpu': _cpu_model(),
      'cores': os.cpu_count(),
      'memory_gib': round(_mem_total_gib() or 0, 1),
      'backend': jax.default_backend(),
      'device': device.device_kind,
      'devices': jax.device_count(),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'load_average': os.getloadavg() if hasattr(os, 'getloadavg') else None,
      'versions': versions(),
  }


def describe_machine(info: dict[str, Any]) -> str:
  v = info['versions']
  return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; "
          f"backend {info['backend']} ({info['device']}); jax {v['jax']}, "
          f"jaxlib {v['jaxlib']}, optax {v['optax']}, torch {v['torch']}; "
          f"{info['date']}; load average at start "
          f"{', '.join(f'{x:.1f}' for x in info['load_average'] or ())}")


def write_json(name: str, payload: dict[str, Any], path: Optional[str] = None):
  path = path or os.path.join(RESULTS_DIR, name)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(payload, f, indent=1, default=_jsonable)
  print(f'# wrote {os.path.relpath(path, ROOT)}')
  return path


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# Trees.


def tree_bytes(tree) -> int:
  return sum(math.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def optimizer_step(opt):
  """`step(params, state, grads) -> (params, state)`: update + apply."""

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled program, and its peak.

  Peak = arguments + outputs - the outputs aliased to (donated) arguments +
  temporaries.
  """
  analysis = compiled.memory_analysis()
  sizes = dict(argument_bytes=analysis.argument_size_in_bytes,
               output_bytes=analysis.output_size_in_bytes,
               alias_bytes=analysis.alias_size_in_bytes,
               temp_bytes=analysis.temp_size_in_bytes)
  sizes['peak_bytes'] = (sizes['argument_bytes'] + sizes['output_bytes']
                         - sizes['alias_bytes'] + sizes['temp_bytes'])
  return sizes


def abstract_state(opt, params):
  return jax.eval_shape(opt.init, params)


def floor_bytes(step, params, state, grads) -> dict[str, int]:
  """The bytes a step must move: each input it uses read once, each output
  that is not an input passed through written once (from its jaxpr)."""
  closed = jax.make_jaxpr(step)(params, state, grads)
  jaxpr = closed.jaxpr
  used = set()
  for eqn in jaxpr.eqns:
    for var in eqn.invars:
      if isinstance(var, jax_core.Var):
        used.add(var)

  def nbytes(var):
    aval = var.aval
    return math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize

  invars = set(jaxpr.invars)
  read = sum(nbytes(v) for v in jaxpr.invars if v in used)
  written = sum(nbytes(v) for v in jaxpr.outvars
                if isinstance(v, jax_core.Var) and v not in invars)
  return {'read': read, 'written': written, 'total': read + written}


# Timing.


def block(tree):
  jax.block_until_ready(tree)
  return tree


def interleaved(runners: dict[str, Callable[[], Any]], repeats: int,
                warmup: int = 2, min_seconds: float = 0.0
                ) -> dict[str, list[float]]:
  """Seconds per call of each runner, the runners interleaved round by round.

  Each round runs every runner once, in an order rotated by one each round.
  `warmup` untimed rounds come first. At least `repeats` rounds are timed,
  more while the timed rounds took less than `min_seconds`.
  """
  names = list(runners)
  for _ in range(warmup):
    for name in names:
      runners[name]()
  times = {name: [] for name in names}
  start = time.perf_counter()
  round_index = 0
  while round_index < repeats or time.perf_counter() - start < min_seconds:
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - t0)
    round_index += 1
    if round_index >= 10 * max(repeats, 1):
      break
  return times


def summary(seconds: list[float]) -> dict[str, float]:
  qs = np.percentile(seconds, [10, 50, 90])
  return {'median_ms': statistics.median(seconds) * 1e3,
          'p10_ms': qs[0] * 1e3, 'p90_ms': qs[2] * 1e3,
          'min_ms': min(seconds) * 1e3, 'runs': len(seconds)}


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  def cell(x):
    if isinstance(x, float):
      if x == 0:
        return '0'
      return f'{x:.3g}' if abs(x) < 10 else f'{x:.1f}'
    return str(x)

  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(cell(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)
