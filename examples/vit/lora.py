"""LoRA adapters for the ViT's attention (and optionally MLP) kernels.

The adapters live outside the model, in their own pytree: a kernel `W`
(`in... x out...`) gets `a` `(in, rank)` (random) and `b` `(rank, out)`
(zero), and the model runs with `W + (alpha / rank) * a @ b` (reshaped to
`W`'s shape). That is the same function as LoRA's `W x + s * B A x`, needs no
change to the `vit_jax` module layout, and leaves the backbone a frozen
input of the train step. At the start `b = 0`, so the model is the
pre-trained one.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

# Adapters are keyed by their kernel's path joined with SEP (not "/", which
# orbax would take for folders).
SEP = '-'


def targets(params, mlp: bool = False) -> dict[str, tuple[int, int]]:
  """`{"Transformer-encoderblock_0-...-query-kernel": (fan_in, fan_out)}`.

  The attention query/key/value kernels `(hidden, heads, head_dim)`, the out
  kernel `(heads, head_dim, hidden)`, and with `mlp` the MLP's Dense kernels.
  """
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(str(getattr(k, 'key', k)) for k in path)
    if names[-1] != 'kernel' or names[0] != 'Transformer':
      continue
    shape = tuple(leaf.shape)
    if names[-2] in ('query', 'key', 'value'):
      split = 1
    elif names[-2] == 'out':
      split = 2
    elif mlp and names[-3:-1] in (('MlpBlock_3', 'Dense_0'),
                                  ('MlpBlock_3', 'Dense_1')):
      split = 1
    else:
      continue
    found[SEP.join(names)] = (math.prod(shape[:split]),
                              math.prod(shape[split:]))
  return found


def init(params, rank: int, seed: int, mlp: bool = False) -> dict[str, Any]:
  """Adapters `{path: {"a": (in, rank), "b": (rank, out)}}`; `b` is zero.

  `a` is drawn from N(0, 1/in) (so `x @ a` keeps `x`'s scale), as float32.
  """
  adapters = {}
  key = jax.random.key(seed)
  for i, (path, (fan_in, fan_out)) in enumerate(
      sorted(targets(params, mlp).items())):
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, rank),
                          jnp.float32) / math.sqrt(fan_in)
    adapters[path] = {'a': a, 'b': jnp.zeros((rank, fan_out), jnp.float32)}
  return adapters


def merge(backbone, adapters: dict[str, Any], scale: float):
  """The backbone with every adapted kernel `W` replaced by `W + s a @ b`."""
  def one(path, leaf):
    name = SEP.join(str(getattr(k, 'key', k)) for k in path)
    if name not in adapters:
      return leaf
    ab = adapters[name]
    delta = scale * (ab['a'] @ ab['b'])
    return leaf + delta.reshape(leaf.shape).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(one, backbone)


def adapter_mask(trainable) -> Any:
  """True on the adapters, False on the head: what SPD constrains."""
  return {name: jax.tree.map(lambda _, keep=name == 'lora': keep, sub)
          for name, sub in trainable.items()}
