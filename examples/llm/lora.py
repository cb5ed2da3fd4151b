"""LoRA adapters with qwix on a tunix decoder's attention and MLP projections.

`qwix.LoraProvider` intercepts the projections' `einsum` / `dot_general` and
adds `x @ a @ b * alpha / rank` to each, with `a` (fan-in, rank) drawn by
qwix's he-uniform initialiser and `b` (rank, fan-out) zero, both
`nnx.LoRAParam`s living in the module beside the frozen weight. With `b = 0`
the adapted model computes exactly the base model's function: `res + 0`.

The three tunix families name their projections differently (Gemma 3 fuses
k and v in `kv_einsum`, or q, k and v in `qkv_einsum`); `TARGETS` maps each
of our target names to every family's module names.
"""

from collections.abc import Sequence
import re

import jax
import jax.numpy as jnp
from flax import nnx
import qwix

from examples.llm import configs

# Target -> the tunix module names that compute it (all three families).
TARGETS = {
    'q': ('q_proj', 'q_einsum', 'qkv_einsum'),
    'k': ('k_proj', 'kv_einsum', 'qkv_einsum'),
    'v': ('v_proj', 'kv_einsum', 'qkv_einsum'),
    'o': ('o_proj', 'attn_vec_einsum'),
    'gate': ('gate_proj',),
    'up': ('up_proj',),
    'down': ('down_proj',),
}
DEFAULT_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def parse_targets(text: str) -> tuple[str, ...]:
  """`"q,k,v,o"` as `('q', 'k', 'v', 'o')`; `"all"` as every target."""
  if text == 'all':
    return DEFAULT_TARGETS
  names = tuple(t.strip() for t in text.split(',') if t.strip())
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    raise configs.UsageError(
        f'--lora-targets {text!r}: each target is one of '
        f'{", ".join(TARGETS)} (or "all").')
  return names


def module_path(targets: Sequence[str]) -> str:
  """qwix's `module_path` regex (full match) for the targets' modules."""
  names = sorted({n for t in targets for n in TARGETS[t]})
  return r'.*/(attn|mlp)/(' + '|'.join(map(re.escape, names)) + ')'


def apply(model: nnx.Module, *, rank: int, alpha: float,
          targets: Sequence[str] = DEFAULT_TARGETS,
          seed: int = 0) -> nnx.Module:
  """The model with rank-`rank` LoRA adapters on `targets`; `model` is kept.

  Args:
    model: a tunix decoder (Qwen 3, Llama 3 or Gemma 3).
    rank: the adapters' rank r.
    alpha: LoRA's alpha; the update is `alpha / r * x @ a @ b`.
    targets: the projections to adapt (keys of `TARGETS`).
    seed: draws the `a` matrices (`b` starts at zero).

  Returns:
    A new module of the same family whose adapters are `nnx.LoRAParam`s.
  """
  provider = qwix.LoraProvider(module_path=module_path(targets), rank=rank,
                               alpha=alpha)
  lora_model = qwix.apply_lora_to_model(model, provider,
                                        rngs=nnx.Rngs(seed),
                                        **model.get_model_input())
  if not jax.tree.leaves(nnx.state(lora_model, nnx.LoRAParam)):
    raise configs.UsageError(
        f'--lora-targets {",".join(targets)} matched no projection of this '
        f'{type(model).__name__} model.')
  return lora_model


def _adapted(model: nnx.Module):
  """`(path, module, weight name)` of every module that qwix adapted."""
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    for name in ('kernel', 'w'):
      if (isinstance(getattr(node, name + '_lora_a', None), nnx.Variable)
          and isinstance(getattr(node, name, None), nnx.Variable)):
        yield path, node, name


def _delta(module, name: str, scale: float) -> jax.Array:
  """The adapter's change of the weight, `scale * a b`, shaped as the weight."""
  a = getattr(module, name + '_lora_a')[...]
  b = getattr(module, name + '_lora_b')[...]
  weight = getattr(module, name)[...]
  spec = getattr(module, name + '_lora_einsum_str', None)
  if spec is not None:  # Einsum: 'BTD,Dr,rNH->BTNH' with the weight's 'DNH'.
    _, a_dims, b_dims = spec.split('->')[0].split(',')
    weight_dims = module.einsum_str.split('->')[0].split(',')[1]
    delta = jnp.einsum(f'{a_dims},{b_dims}->{weight_dims}', a, b)
  else:  # dot_general (nnx.Linear): a (in, r), b (r, out).
    delta = (a @ b).reshape(weight.shape)
  return scale * delta


def merged_params(model: nnx.Module, scale: float) -> dict:
  """The base model's params with every adapted weight `W + scale a b`.

  A pure nested dict with the base model's `nnx.Param` layout (no adapters):
  put it into a base model with `nnx.update`, or compare it to the
  pre-trained weights. Jittable.
  """
  params = nnx.to_pure_dict(
      nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  for path, module, name in _adapted(model):
    node = params
    for key in path:
      node = node[key]
    node[name] = node[name] + _delta(module, name, scale).astype(
        node[name].dtype)
  return params


def delta_norms(model: nnx.Module, scale: float) -> dict[str, jax.Array]:
  """`||scale a b||` of every adapted weight, keyed `layers/0/attn/q_proj/w`."""
  return {'/'.join(map(str, path + (name,))): jnp.linalg.norm(
      _delta(module, name, scale))
          for path, module, name in _adapted(model)}
