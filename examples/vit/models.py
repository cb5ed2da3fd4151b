"""A Vision Transformer in the `vit_jax` parameter layout, and its checkpoints.

The module and parameter names follow `google-research/vision_transformer`
(`vit_jax/models_vit.py`, as its `.npz` files are published), so the public
checkpoints (ViT-Ti/S/B/L/16, ImageNet-21k "augreg") load as they are::

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

big_vision's ViT (`big_vision/models/vit.py`, also SigLIP's image tower) is
the same network with three options, each a `ViTConfig` field: its position
embeddings are a top-level `pos_embedding` over the patches only, added
before the class token is prepended (`posemb="patches"`), or fixed sin-cos
ones (`"sincos2d"`); it pools by the class token (`pool_type="tok"`), the
mean of the tokens (`"gap"`) or multi-head attention pooling
(`"map"`: a `MAPHead_0` with a learned `probe`). The blocks keep the names
above whatever the checkpoint calls them (`checkpoints.py` renames).

With `scan=True` the blocks are one `nn.scan` and their params are stacked,
`(num_layers, ...)` per leaf, under `Transformer/encoderblock/` (big_vision's
scanned layout); `remat=True` recomputes each block's activations in the
backward pass instead of storing them. Neither changes the function.
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

POOL_TYPES = ('tok', 'gap', 'map')
POSEMB_TYPES = ('encoder', 'patches', 'sincos2d')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The shape of a ViT: what a checkpoint must match (besides the head).

  Attributes:
    patch_size: the side of the square patches.
    hidden_size: the width of the tokens.
    num_layers: the number of transformer blocks.
    num_heads: the attention heads of each block (and of the MAP head).
    mlp_dim: the hidden width of each MLP (and of the MAP head's).
    pool_type: what the head sees: "tok" the class token (`cls`, vit_jax's
      `classifier="token"`), "gap" the mean of the tokens, "map" multi-head
      attention pooling (`MAPHead_0`, big_vision's).
    posemb: "encoder": learned `Transformer/posembed_input/pos_embedding`,
      added to every token, the class token's included (vit_jax);
      "patches": learned top-level `pos_embedding`, added to the patches
      before the class token is prepended (big_vision's "learn");
      "sincos2d": fixed 2-d sin-cos embeddings of the patches (big_vision's),
      no parameter.
  """

  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  pool_type: str = 'tok'
  posemb: str = 'encoder'

  def __post_init__(self):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'pool_type must be one of {POOL_TYPES}, got '
                       f'{self.pool_type!r}.')
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'posemb must be one of {POSEMB_TYPES}, got '
                       f'{self.posemb!r}.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of '
                       f'num_heads {self.num_heads}.')
    if self.posemb == 'sincos2d' and self.hidden_size % 4:
      raise ValueError(f'posemb="sincos2d" needs a hidden_size that is a '
                       f'multiple of 4, got {self.hidden_size}.')


# The standard variants (Dosovitskiy et al. 2021; Steiner et al. 2022;
# big_vision's `decode_variant`, which also gives SigLIP's So400m), and two
# small ones: `small` for the default study, `tiny` for the tests.
VIT_CONFIGS = {
    'Ti/16': ViTConfig(16, 192, 12, 3, 768),
    'S/16': ViTConfig(16, 384, 12, 6, 1536),
    'S/32': ViTConfig(32, 384, 12, 6, 1536),
    'B/8': ViTConfig(8, 768, 12, 12, 3072),
    'B/16': ViTConfig(16, 768, 12, 12, 3072),
    'B/32': ViTConfig(32, 768, 12, 12, 3072),
    'L/14': ViTConfig(14, 1024, 24, 16, 4096),
    'L/16': ViTConfig(16, 1024, 24, 16, 4096),
    'So400m/14': ViTConfig(14, 1152, 27, 16, 4304),
    'So400m/16': ViTConfig(16, 1152, 27, 16, 4304),
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


class ScannedEncoder1DBlock(Encoder1DBlock):
  """`Encoder1DBlock` in the `(carry, x) -> (carry, y)` form of `nn.scan`."""

  def __call__(self, x, _):
    return super().__call__(x), None


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings (`pos_embedding`, `(1, tokens, d)`)."""

  @nn.compact
  def __call__(self, x):
    pos_embedding = self.param(
        'pos_embedding', nn.initializers.normal(stddev=0.02),
        (1,) + x.shape[1:])
    return x + pos_embedding


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 1e4):
  """big_vision's fixed 2-d sin-cos position embeddings, `(1, h * w, width)`.

  As `big_vision.models.vit.posemb_sincos_2d` (the MoCo v3 recipe): a
  quarter of the channels each for sin and cos of the column, then of the
  row, at frequencies `temperature ** -(i / (width / 4 - 1))`.
  """
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature ** omega)
  y = jnp.einsum('m,d->md', y.flatten(), omega)
  x = jnp.einsum('m,d->md', x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)],
                       axis=1)
  return jnp.asarray(pe, jnp.float32)[None, :, :]


class Encoder(nn.Module):
  """Position embeddings (vit_jax's), the blocks and a final LayerNorm.

  Attributes:
    num_layers: the number of blocks.
    mlp_dim: each block's MLP width.
    num_heads: each block's attention heads.
    dtype: the compute dtype (None: float32).
    add_position_embedding: add `posembed_input` (vit_jax's placement) here.
    remat: recompute each block's activations in the backward pass.
    scan: one `nn.scan` over the blocks; their params are stacked under
      `encoderblock` with a leading layer axis.
  """

  num_layers: int
  mlp_dim: int
  num_heads: int
  dtype: Any = None
  add_position_embedding: bool = True
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, x):
    if self.add_position_embedding:
      x = AddPositionEmbs(name='posembed_input')(x)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    if self.scan:
      block = ScannedEncoder1DBlock
      if self.remat:
        block = nn.remat(block, prevent_cse=False)
      x, _ = nn.scan(block, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=self.num_layers)(
                         self.mlp_dim, self.num_heads, self.dtype,
                         name='encoderblock')(x, None)
    else:
      block = nn.remat(Encoder1DBlock) if self.remat else Encoder1DBlock
      for i in range(self.num_layers):
        x = block(self.mlp_dim, self.num_heads, self.dtype,
                  name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision's `MAPHead`).

  A learned `probe` token attends to every token; a LayerNorm and an MLP
  with a residual follow; the probe's output is the pooled feature.
  """

  mlp_dim: int
  num_heads: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.tile(probe, (n, 1, 1)).astype(x.dtype)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
        name='MultiHeadDotProductAttention_0')(probe, x)
    y = nn.LayerNorm(dtype=self.dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(self.mlp_dim, self.dtype, name='MlpBlock_0')(y)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier; by default on the class token (`vit_jax`'s "token").

  Attributes:
    num_classes: outputs of the `head` (zero-initialised, as in `vit_jax`).
    config: the architecture, e.g. `VIT_CONFIGS["B/16"]`.
    dtype: the compute dtype of the activations (e.g. `jnp.bfloat16` for
      mixed precision); the params stay float32. None: float32. The logits
      are float32 either way.
    remat: recompute the blocks' activations in the backward pass
      (`nn.remat`): less memory, one more forward pass; the same function.
    scan: the blocks as one `nn.scan`, params stacked `(num_layers, ...)`
      under `Transformer/encoderblock/` (compiles once per block, not once
      per layer); train it with `layer_axis=vit_layer_axis`.
  """

  num_classes: int
  config: ViTConfig
  dtype: Any = None
  remat: bool = False
  scan: bool = False

  @nn.compact
  def __call__(self, images):
    """Logits `(batch, classes)` for images `(batch, h, w, 3)` in [-1, 1]."""
    c = self.config
    x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size),
                strides=(c.patch_size, c.patch_size), padding='VALID',
                dtype=self.dtype, name='embedding')(images)
    n, h, w, d = x.shape
    x = jnp.reshape(x, (n, h * w, d))
    if c.posemb != 'encoder':
      # big_vision: position embeddings for the patches, before the class
      # token (which gets none).
      if c.posemb == 'patches':
        posemb = self.param('pos_embedding',
                            nn.initializers.normal(stddev=1 / np.sqrt(d)),
                            (1, h * w, d))
      else:
        posemb = posemb_sincos_2d(h, w, d)
      x = x + posemb
      if self.dtype is not None:
        x = x.astype(self.dtype)
    if c.pool_type == 'tok':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)).astype(x.dtype), x],
                          axis=1)
    x = Encoder(c.num_layers, c.mlp_dim, c.num_heads, self.dtype,
                add_position_embedding=c.posemb == 'encoder',
                remat=self.remat, scan=self.scan, name='Transformer')(x)
    if c.pool_type == 'tok':
      x = x[:, 0]
    elif c.pool_type == 'gap':
      x = jnp.mean(x, axis=1)
    else:
      x = MAPHead(c.mlp_dim, c.num_heads, self.dtype, name='MAPHead_0')(x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, name='head')(x)
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


# Per-leaf helpers for the optimizers' `mask`, `output_axes` and `layer_axis`.

STACKED_BLOCKS = ('Transformer', 'encoderblock')


def backbone_mask(params) -> Any:
  """True for every leaf but the classification head: what SPD/FTP constrain."""
  return {name: jax.tree.map(lambda _, keep=name != 'head': keep, sub)
          for name, sub in params.items()}


def vit_layer_axis(path: tuple[str, ...], shape: tuple[int, ...]):
  """The axis stacking the layers of a leaf: 0 for a scanned block's, else None.

  For `spd.adam_spd(..., layer_axis=vit_layer_axis)` and the FTP wrappers, so
  that a scanned model's stacked leaves are decided on (SPD) and projected
  (FTP) per block, as the unrolled model's separate leaves are.

  Args:
    path: the leaf's key path as strings.
    shape: the leaf's shape.

  Returns:
    0 under `Transformer/encoderblock/` (the `(num_layers, ...)` leaves of
    `VisionTransformer(scan=True)`), None elsewhere.
  """
  del shape
  return 0 if tuple(path[:2]) == STACKED_BLOCKS else None


def vit_output_axes(path: tuple[str, ...], shape: tuple[int, ...]):
  """The axes holding output units of a leaf, for FTP's per-row norms.

  A "row" is one output unit. Dense and Conv kernels keep their outputs on the
  last axis (FTP's default). Attention kernels do not: query, key and value
  kernels are `(in, heads, head_dim)` (outputs on axes 1 and 2) and the out
  kernel `(heads, head_dim, out)`. Their `(heads, head_dim)` biases, like the
  1-d biases and the `cls`, position embeddings and MAP `probe` (one row in
  PyTorch's layout), are a single row: no output axis. A scanned block's
  leaves (`vit_layer_axis`) have the layer axis in front: the axes count on
  the stacked leaf, so its query kernels `(layers, in, heads, head_dim)` have
  outputs on axes 2 and 3, and a `(layers, d)` bias is one row per layer.

  Args:
    path: the leaf's key path as strings, e.g.
      `("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_1",
      "query", "kernel")`.
    shape: the leaf's shape.

  Returns:
    A tuple of axes; `()` for a leaf that is one row (per layer).
  """
  name = path[-1]
  stacked = 1 if vit_layer_axis(path, shape) == 0 else 0
  if len(path) >= 2 and path[-2] in ('query', 'key', 'value'):
    if name == 'kernel' and len(shape) == 3 + stacked:
      return (1 + stacked, 2 + stacked)
    return ()
  if name in ('cls', 'pos_embedding', 'probe') or len(shape) <= 1 + stacked:
    return ()
  return (len(shape) - 1,)


# `.npz` checkpoints, as `vit_jax` publishes them (other layouts: see
# `checkpoints.py`).

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

  The class token's embedding is kept; the grid is resized as `vit_jax`
  does (`checkpoints.resize_posemb`: corner-aligned linear interpolation).

  Args:
    posemb: the checkpoint's position embeddings, class token first.
    num_tokens: the new number of tokens, class token included.

  Returns:
    The position embeddings `(1, num_tokens, d)`.
  """
  from examples.vit import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.resize_posemb(posemb, num_tokens, has_class_token=True)


def load_npz(path: str, init) -> Any:
  """Loads a ViT `.npz` checkpoint into the layout of `init`.

  Every leaf of `init` but the head is taken from the checkpoint, whichever
  layout it is in (`checkpoints.py`: vit_jax, big_vision, SigLIP; stacked or
  not). Position embeddings are resized to the model's grid; the head keeps
  a zero value of `init`'s shape (a new head for the new classes).
  `pre_logits` (ImageNet-21k checkpoints' representation layer) and the
  checkpoint's own head are dropped.

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
  from examples.vit import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_into(path, init)
