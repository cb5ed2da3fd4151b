"""A Vision Transformer in the `vit_jax` parameter layout, and its checkpoints.

The module and parameter names follow `google-research/vision_transformer`
(`vit_jax/models_vit.py`), so the public `.npz` checkpoints (ViT-Ti/S/B/L/16,
ImageNet-21k "augreg") load as they are::

  embedding/kernel                                  (p, p, 3, hidden)
  cls                                               (1, 1, hidden)
  Transformer/posembed_input/pos_embedding          (1, 1 + tokens, hidden)
  Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/
      {query,key,value}/kernel                      (hidden, heads, head_dim)
      {query,key,value}/bias                        (heads, head_dim)
      out/kernel                                    (heads, head_dim, hidden)
  Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel,bias}
  Transformer/encoder_norm/{scale,bias}
  head/{kernel,bias}
"""

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The shape of a ViT: what a checkpoint must match (besides the head)."""

  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int


# The standard variants (Dosovitskiy et al. 2021; Steiner et al. 2022), and two
# small ones: `small` for the default study, `tiny` for the tests.
VIT_CONFIGS = {
    'Ti/16': ViTConfig(16, 192, 12, 3, 768),
    'S/16': ViTConfig(16, 384, 12, 6, 1536),
    'B/16': ViTConfig(16, 768, 12, 12, 3072),
    'L/16': ViTConfig(16, 1024, 24, 16, 4096),
    'small': ViTConfig(4, 64, 4, 4, 128),
    'tiny': ViTConfig(4, 16, 2, 2, 32),
}


class MlpBlock(nn.Module):
  """The transformer's feed-forward block: Dense, GELU, Dense."""

  mlp_dim: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    dense = lambda n, name: nn.Dense(
        n, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype,
        name=name)
    x = nn.gelu(dense(self.mlp_dim, 'Dense_0')(x))
    return dense(features, 'Dense_1')(x)


class Encoder1DBlock(nn.Module):
  """A pre-LayerNorm transformer block (names as in `vit_jax`)."""

  mlp_dim: int
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
        name='MultiHeadDotProductAttention_1')(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_2')(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, name='MlpBlock_3')(y)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (`pos_embedding`, `(1, tokens, d)`)."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
        'pos_embedding', nn.initializers.normal(stddev=0.02),
        (1,) + x.shape[1:])
    return x + pos_embedding


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and a final LayerNorm."""

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = AddPositionEmbs(name='posembed_input')(x)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i in range(self.num_layers):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dtype,
                         name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT classifier on the class token (`vit_jax`'s `classifier="token"`).

  Attributes:
    num_classes: outputs of the `head` (zero-initialised, as in `vit_jax`).
    config: the architecture, e.g. `VIT_CONFIGS["B/16"]`.
    dtype: the compute dtype of the activations (e.g. `jnp.bfloat16` for
      mixed precision); the params stay float32. None: float32. The logits
      are float32 either way.
  """

  num_classes: int
  config: ViTConfig
  dtype: Any = None

  @nn.compact
  def __call__(self, images):
    """Logits `(batch, classes)` for images `(batch, h, w, 3)` in [-1, 1]."""
    c = self.config
    x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                strides=(c.patch_size, c.patch_size), padding='VALID',
                dtype=self.dtype, name='embedding')(images)
    n, h, w, d = x.shape
    x = jnp.reshape(x, (n, h * w, d))
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x], axis=1)
    x = Encoder(c.num_layers, c.mlp_dim, c.num_heads, self.dtype,
                name='Transformer')(x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, name='head')(x[:, 0])
    return logits.astype(jnp.float32)


def _init(model: VisionTransformer, image_size: int, seed: int):
  # "rbg" keys: XLA compiles their random bits several times faster on CPU
  # than threefry's, and init is compiled once per model and image size.
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model.init(jax.random.key(seed, impl='rbg'), images)['params']


def init_params(model: VisionTransformer, image_size: int, seed: int = 0):
  """Randomly initialised parameters for `image_size` x `image_size` images."""
  return jax.jit(_init, static_argnums=(0, 1))(model, image_size, seed)


def abstract_params(model: VisionTransformer, image_size: int):
  """The parameters' shapes and dtypes, as `jax.ShapeDtypeStruct`s."""
  return jax.eval_shape(lambda: _init(model, image_size, 0))


# Per-leaf helpers for the optimizers' `mask` and `output_axes` arguments.

def backbone_mask(params) -> Any:
  """True for every leaf but the classification head: what SPD/FTP constrain."""
  return {name: jax.tree.map(lambda _, keep=name != 'head': keep, sub)
          for name, sub in params.items()}


def vit_output_axes(path: tuple[str, ...], shape: tuple[int, ...]):
  """The axes holding output units of a leaf, for FTP's per-row norms.

  A "row" is one output unit. Dense and Conv kernels keep their outputs on the
  last axis (FTP's default). Attention kernels do not: query, key and value
  kernels are `(in, heads, head_dim)` (outputs on axes 1 and 2) and the out
  kernel `(heads, head_dim, out)`. Their `(heads, head_dim)` biases, like the
  1-d biases and the `cls` and position embeddings (one row in PyTorch's
  layout), are a single row: no output axis.

  Args:
    path: the leaf's key path as strings, e.g.
      `("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_1",
      "query", "kernel")`.
    shape: the leaf's shape.

  Returns:
    A tuple of axes; `()` for a leaf that is one row.
  """
  name = path[-1]
  if len(path) >= 2 and path[-2] in ('query', 'key', 'value'):
    return (1, 2) if name == 'kernel' and len(shape) == 3 else ()
  if name in ('cls', 'pos_embedding') or len(shape) <= 1:
    return ()
  return (len(shape) - 1,)


# `.npz` checkpoints, as `vit_jax` publishes them.

class CheckpointError(ValueError):
  """A checkpoint that does not fit the model; the message says why."""


def flatten(params) -> dict[str, Any]:
  """`{"Transformer/encoder_norm/scale": array, ...}`, the `.npz` key layout."""
  return traverse_util.flatten_dict(params, sep='/')


def unflatten(flat: dict[str, Any]):
  return traverse_util.unflatten_dict(flat, sep='/')


def save_npz(path: str, params) -> None:
  """Writes `params` as a `vit_jax`-style `.npz` (keys joined with "/")."""
  np.savez(path, **{k: np.asarray(v) for k, v in flatten(params).items()})


def resize_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Resizes `(1, 1 + g*g, d)` position embeddings to `num_tokens` tokens.

  The class token's embedding is kept; the `g x g` grid is resized
  bilinearly to the new grid, as `vit_jax` does when fine-tuning at another
  resolution.

  Args:
    posemb: the checkpoint's position embeddings, class token first.
    num_tokens: the new number of tokens, class token included.

  Returns:
    The position embeddings `(1, num_tokens, d)`.
  """
  cls_posemb, grid = posemb[:, :1], posemb[0, 1:]
  old_size, new_size = math.isqrt(len(grid)), math.isqrt(num_tokens - 1)
  if old_size ** 2 != len(grid) or new_size ** 2 != num_tokens - 1:
    raise CheckpointError(
        f'position embeddings of {len(grid)} patches cannot be resized to '
        f'{num_tokens - 1}: both must be square grids.')
  grid = np.reshape(grid, (old_size, old_size, -1))
  grid = jax.image.resize(
      grid, (new_size, new_size, grid.shape[-1]), method='bilinear')
  grid = np.reshape(np.asarray(grid, posemb.dtype), (1, new_size ** 2, -1))
  return np.concatenate([cls_posemb, grid], axis=1)


def load_npz(path: str, init) -> Any:
  """Loads a `vit_jax` `.npz` checkpoint into the layout of `init`.

  Every leaf of `init` but the head is taken from the checkpoint. Position
  embeddings are resized to the model's grid; the head keeps `init`'s value
  (a new head for the new classes). `pre_logits` (ImageNet-21k checkpoints'
  representation layer) and the checkpoint's own head are dropped.

  Args:
    path: the `.npz` file.
    init: the model's parameters (or anything with their structure and
      shapes, arrays or `jax.ShapeDtypeStruct`s), e.g. from `init_params`.

  Returns:
    The parameters, as NumPy arrays in `init`'s structure.

  Raises:
    CheckpointError: a missing file, or a checkpoint that does not match the
      model; the message names the first offending key.
  """
  if not os.path.isfile(path):
    raise CheckpointError(f'checkpoint {path} does not exist.')
  try:
    with np.load(path, allow_pickle=False) as npz:
      checkpoint = {key: npz[key] for key in npz.files}
  except (OSError, ValueError) as error:
    raise CheckpointError(
        f'{path} is not a readable .npz file: {error}') from None
  wanted = flatten(init)
  loaded = {}
  for key, like in wanted.items():
    if key.startswith('head/'):
      loaded[key] = np.zeros(like.shape, like.dtype)
      continue
    if key not in checkpoint:
      raise CheckpointError(
          f'{path} has no {key!r}: not a vit_jax ViT checkpoint of this model.')
    value = checkpoint[key]
    if key.endswith('pos_embedding') and value.shape != like.shape:
      if value.shape[0::2] != like.shape[0::2]:
        raise CheckpointError(
            f'{path}: {key} has shape {value.shape}, the model needs '
            f'{like.shape}; is --model right?')
      value = resize_posemb(value, like.shape[1])
    if value.shape != tuple(like.shape):
      raise CheckpointError(
          f'{path}: {key} has shape {value.shape}, the model needs '
          f'{tuple(like.shape)}; is --model right?')
    loaded[key] = value.astype(like.dtype)
  unused = sorted(k for k in checkpoint if k not in wanted
                  and not k.startswith(('head/', 'pre_logits/')))
  if unused:
    raise CheckpointError(
        f'{path} has {len(unused)} keys the model lacks (first: '
        f'{unused[0]!r}); is --model right?')
  return unflatten(loaded)
