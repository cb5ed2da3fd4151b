"""The LLM example's decoders: tunix's own Qwen 3, Llama 3 and Gemma 3.

The transformers are tunix's (`tunix.models.{qwen3,llama3,gemma3}.model`,
google-tunix 0.1.7); this file only hides their different call signatures
behind one `logits(model, tokens, mask)` and mends one part each of the
first two get wrong:

* RoPE. tunix 0.1.7's Qwen 3 and Llama 3 attention call their `apply_rope`
  without the config's `rope_theta`, so both rotate with the default base
  10^6 whatever `ModelConfig.rope_theta` says, and neither knows Llama 3.1's
  frequency scaling (`rope_type: "llama3"`). Every Llama 3 checkpoint
  (base 5 * 10^5) would give wrong logits. `Qwen3` and `Llama3` below are
  tunix's classes whose `__call__` swaps that one module-level function, for
  the length of the call, for one with the frequencies Hugging Face computes
  (`transformers.modeling_rope_utils`: "default" and "llama3"); the rotation
  itself is tunix's (split halves). Gemma 3's RoPE (local and global bases,
  linear scaling) is tunix's own and right.
* Initial weights. tunix initializes the MLP kernels to zeros (its models
  are meant to be loaded); from scratch, `silu(0) * 0` gives those kernels
  zero gradients forever, so `create` draws them like the attention's
  (LeCun normal).

Gemma 3's other details are tunix's and match Hugging Face's: embeddings
scaled by sqrt(width), RMSNorm as `x * (1 + scale)` (eps 1e-6), q/k norms,
the query pre-attention scalar (head_dim or width / heads), five sliding
window layers (`sliding_window_size`) then one global, the tanh GELU, tied
embeddings; Gemma 3 has no logit soft-caps (Gemma 2 had).
"""

import contextlib
import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.llama3 import model as llama3_lib
from tunix.models.qwen3 import model as qwen3_lib

FAMILIES = ('qwen3', 'llama3', 'gemma3')
# Hugging Face's RoPE types the Qwen 3 / Llama 3 models here compute.
ROPE_TYPES = ('default', 'llama3')


def rope_frequencies(head_dim: int, theta: float,
                     scaling: tuple[tuple[str, Any], ...] = ()) -> np.ndarray:
  """RoPE's inverse frequencies `theta^(-2i/d)`, as Hugging Face computes them.

  Llama 3.1's scaling (`rope_type: "llama3"`) divides by `factor` the
  frequencies whose wavelength exceeds `original_max_position_embeddings /
  low_freq_factor`, keeps those shorter than `... / high_freq_factor`, and
  interpolates smoothly between (`_compute_llama3_parameters`).

  Args:
    head_dim: the rotated width (even).
    theta: the base.
    scaling: Hugging Face's `rope_parameters` minus `rope_theta`, as sorted
      (name, value) pairs; `()` or `rope_type: "default"` for none.

  Returns:
    float32 `(head_dim // 2,)`.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                             / head_dim)
  params = dict(scaling)
  rope_type = params.get('rope_type', 'default')
  if rope_type == 'llama3':
    factor = params['factor']
    low, high = params['low_freq_factor'], params['high_freq_factor']
    context = params['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    inv_freq = np.where(medium, smoothed, scaled)
  elif rope_type != 'default':
    raise ValueError(f'rope_type {rope_type!r} is not one of {ROPE_TYPES}.')
  return inv_freq.astype(np.float32)


def _apply_rope(inputs, positions, head_dim, rope_theta=None, *, inv_freq,
                cast_to_inputs):
  """tunix's `apply_rope` (split halves), with `inv_freq` for its base."""
  del head_dim, rope_theta  # Fixed by `inv_freq`.
  angle = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angle = angle[..., None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  if cast_to_inputs:  # Qwen 3's tunix code rotates in the inputs' dtype.
    sin, cos = sin.astype(inputs.dtype), cos.astype(inputs.dtype)
  first_half, second_half = jnp.split(inputs, 2, axis=-1)
  out = jnp.concatenate([first_half * cos - second_half * sin,
                         second_half * cos + first_half * sin], axis=-1)
  return out.astype(inputs.dtype)


@contextlib.contextmanager
def _rope(module, inv_freq, cast_to_inputs):
  """Makes `module.apply_rope` use `inv_freq` while the model is traced.

  The swap is of a module attribute: two models of one family traced at
  once from two threads would see each other's frequencies.
  """
  original = module.apply_rope

  def apply_rope(*args, **kwargs):
    return _apply_rope(*args, inv_freq=inv_freq,
                       cast_to_inputs=cast_to_inputs, **kwargs)
  module.apply_rope = apply_rope
  try:
    yield
  finally:
    module.apply_rope = original


class Qwen3(qwen3_lib.Qwen3):
  """tunix's Qwen 3, rotating with `config.rope_theta` (tunix: always 10^6)."""

  def __call__(self, *args, **kwargs):
    inv_freq = rope_frequencies(self.config.head_dim, self.config.rope_theta)
    with _rope(qwen3_lib, inv_freq, cast_to_inputs=True):
      return super().__call__(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Llama3Config(llama3_lib.ModelConfig):
  """tunix's Llama 3 config, plus the RoPE scaling it has no field for.

  Attributes:
    rope_scaling: Hugging Face's `rope_parameters` minus `rope_theta`, as
      sorted (name, value) pairs; `()` for plain RoPE.
  """

  rope_scaling: tuple[tuple[str, Any], ...] = ()


class Llama3(llama3_lib.Llama3):
  """tunix's Llama 3, rotating with the config's RoPE (tunix: always 10^6)."""

  def __call__(self, *args, **kwargs):
    inv_freq = rope_frequencies(self.config.head_dim, self.config.rope_theta,
                                getattr(self.config, 'rope_scaling', ()))
    with _rope(llama3_lib, inv_freq, cast_to_inputs=False):
      return super().__call__(*args, **kwargs)


Gemma3 = gemma3_lib.Gemma3
MODEL_CLASSES = {'qwen3': Qwen3, 'llama3': Llama3, 'gemma3': Gemma3}


def family_of(model: nnx.Module) -> str:
  """The family of a tunix model (also of its qwix LoRA subclass)."""
  for family, base in (('qwen3', qwen3_lib.Qwen3),
                       ('llama3', llama3_lib.Llama3),
                       ('gemma3', gemma3_lib.Gemma3)):
    if isinstance(model, base):
      return family
  raise ValueError(f'{type(model).__name__} is not a tunix Qwen 3, Llama 3 or '
                   'Gemma 3 model.')


def _check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}.')


def tiny_config(family: str, *, vocab_size: int, num_layers: int = 2,
                embed_dim: int = 64, hidden_dim: int = 128, num_heads: int = 4,
                num_kv_heads: int = 2, head_dim: int = 16,
                weight_tying: bool = True, sliding_window: int = 64):
  """A small float32 config of the family's tunix `ModelConfig`.

  Args:
    family: one of `FAMILIES`.
    vocab_size: the embedding's rows.
    num_layers: decoder blocks.
    embed_dim: the residual width.
    hidden_dim: the MLP's hidden width.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention below
      `num_heads`).
    head_dim: each head's width.
    weight_tying: the output layer is the embedding (Gemma 3 always is).
    sliding_window: Gemma 3's local attention window (other families: unused).

  Returns:
    `Qwen3`'s, `Llama3Config` or Gemma 3's `ModelConfig`, float32, with the
    family's RoPE bases (10^6; 5 * 10^5; 10^4 local and 10^6 global).
  """
  _check_family(family)
  sizes = dict(num_layers=num_layers, embed_dim=embed_dim,
               hidden_dim=hidden_dim, num_heads=num_heads, head_dim=head_dim,
               num_kv_heads=num_kv_heads)
  if family == 'qwen3':
    return qwen3_lib.ModelConfig(
        vocab_size=vocab_size, rope_theta=1_000_000, norm_eps=1e-6,
        use_tied_embedding=weight_tying, **sizes)
  if family == 'llama3':
    return Llama3Config(vocab_size=vocab_size, rope_theta=500_000,
                        norm_eps=1e-5, weight_tying=weight_tying, **sizes)
  if not weight_tying:
    raise ValueError('Gemma 3 always ties its output layer to the embedding: '
                     'weight_tying=False is not a Gemma 3.')
  return gemma3_lib.ModelConfig(
      num_embed=vocab_size, sliding_window_size=sliding_window,
      local_base_frequency=10_000, global_base_frequency=1_000_000,
      param_dtype=jnp.float32, **sizes)


def _mlp_kernels(model: nnx.Module):
  """The MLP projections' `nnx.Linear` modules (tunix inits them to zero)."""
  return [module for path, module in nnx.iter_modules(model)
          if isinstance(module, nnx.Linear) and 'mlp' in path]


def create(family: str, config, *, seed: int) -> nnx.Module:
  """A randomly initialized model of the family, ready to train from scratch.

  tunix's own initialization, except the MLP kernels (zeros in tunix, which
  would never train): LeCun normal, from the same seed.

  Args:
    family: one of `FAMILIES`.
    config: the family's `ModelConfig` (e.g. `tiny_config`).
    seed: the initialization's seed.

  Returns:
    The nnx model.
  """
  _check_family(family)
  model = MODEL_CLASSES[family](config, rngs=nnx.Rngs(params=seed))
  rngs = nnx.Rngs(params=seed + 1)
  init = nnx.initializers.lecun_normal()
  for linear in _mlp_kernels(model):
    kernel = linear.kernel
    kernel.set_value(init(rngs.params(), kernel.shape, kernel.dtype))
  return model


def attention_mask(mask: jax.Array) -> jax.Array:
  """`[B, T, T]`: query t sees key s when s <= t and s is a real token."""
  length = mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  return causal[None] & mask[:, None, :].astype(jnp.bool_)


def call_args(tokens: jax.Array, mask: jax.Array) -> tuple:
  """The positional arguments of every family's `__call__`.

  `(tokens, positions, cache=None, attention_mask)`, the same for tunix's
  Qwen 3, Llama 3 and Gemma 3: what `qwix.apply_lora_to_model(model,
  provider, *call_args(tokens, mask), rngs=...)` needs to trace the model.

  Args:
    tokens: int32 `[B, T]`.
    mask: bool `[B, T]`, True for real tokens; padding on the right.

  Returns:
    The tuple.
  """
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                               (batch, length))
  return tokens, positions, None, attention_mask(mask)


def logits(model: nnx.Module, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Next-token logits of any of the three families.

  Args:
    model: a tunix Qwen 3, Llama 3 or Gemma 3 model (or its LoRA version).
    tokens: int32 `[B, T]`.
    mask: bool `[B, T]`, True for real tokens; padding on the right.

  Returns:
    float32 `[B, T, V]`: causal attention restricted to the real tokens,
    positions `0 .. T - 1`. Rows at padding positions are defined but
    meaningless.
  """
  family_of(model)
  out, _ = model(*call_args(tokens, mask))
  return out.astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
  """The number of parameters (`nnx.Param`, LoRA adapters included)."""
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.state(model, nnx.Param)))
