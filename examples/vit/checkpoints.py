"""Public ViT checkpoints, read as their owners' code reads them.

Three families of `.npz` files, each keyed by "/"-joined module paths:

* `vit_jax` (google-research/vision_transformer: the ImageNet-21k "augreg"
  ViT-Ti/S/B/L files, `ViT-B_16.npz`, ...): blocks `encoderblock_{i}` with the
  published (pre-Linen) names `MultiHeadDotProductAttention_1`,
  `LayerNorm_2`, `MlpBlock_3`, or today's Linen names
  `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0` (vit_jax's own
  loader accepts both, through `flax.training.checkpoints.convert_pre_linen`);
  position embeddings `Transformer/posembed_input/pos_embedding` covering
  the class token's row when there is a `cls` ("token"), not when there is
  none ("gap").
* big_vision ViT (`big_vision/models/vit.py`): Linen names, a top-level
  `pos_embedding` over the patches only (added before the class token, which
  gets none), or none at all for fixed sin-cos embeddings; pooling by the
  class token (`cls`), the mean ("gap") or attention (`MAPHead_0`); blocks
  unrolled or stacked by `nn.scan` (`Transformer/encoderblock/...` with a
  leading layer axis); keys under `params/` in training checkpoints.
* big_vision SigLIP / SigLIP 2 (`proj/image_text/two_towers.py`): the image
  tower is a big_vision ViT under `params/img/` (the text tower, `t` and `b`
  beside it are ignored).

The architecture (patch, width, depth, heads, MLP width, pooling, position
embeddings) is read from the file's shapes. The checkpoint's own head and
`pre_logits` are dropped for a new zero head, as vit_jax's `load_pretrained`
does by default. Position embeddings are resized to the model's grid as both
`vit_jax.checkpoint.interpolate_posembed` and big_vision's `resample_posemb`
do: `scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)`, a
corner-aligned linear interpolation of each channel, the class token's row
kept apart.
"""

import dataclasses
import math
import os
import re
import zipfile
from typing import Any

import jax
import ml_dtypes
import numpy as np
import scipy.ndimage

from examples.vit import models

CheckpointError = models.CheckpointError

# Block modules, by the vit_jax published names the model uses, and Linen's.
_PUBLISHED = ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
              'MlpBlock_3')
_LINEN = ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
          'MlpBlock_0')
_TO_PUBLISHED = dict(zip(_LINEN, _PUBLISHED))
_MAP_MODULES = ('probe', 'MlpBlock_0', 'MultiHeadDotProductAttention_0',
                'LayerNorm_0')
_POSEMB_KEYS = ('Transformer/posembed_input/pos_embedding',
                'Transformer/pos_embedding', 'pos_embedding')
_ENCODER_POSEMB = _POSEMB_KEYS[0]
_UNROLLED = re.compile(r'^Transformer/encoderblock_(\d+)/(.+)$')
_STACKED = 'Transformer/encoderblock/'

# (width, depth, heads, mlp) -> big_vision's variant name (`decode_variant`).
_VARIANTS = {
    (32, 1, 2, 128): 'mu', (192, 12, 3, 768): 'Ti', (384, 12, 6, 1536): 'S',
    (512, 12, 8, 2048): 'M', (768, 12, 12, 3072): 'B',
    (1024, 24, 16, 4096): 'L', (1152, 27, 16, 4304): 'So400m',
    (1280, 32, 16, 5120): 'H', (1408, 40, 16, 6144): 'g',
    (1536, 40, 16, 6144): 'g-opt', (1664, 48, 16, 8192): 'G',
    (1536, 48, 16, 8192): 'G-opt', (1792, 56, 16, 15360): 'e',
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """What a checkpoint file holds, read from its keys and shapes alone.

  Attributes:
    path: the file.
    family: "vit_jax", "big_vision ViT" or "big_vision SigLIP".
    config: the architecture, to build `models.VisionTransformer`.
    prefix: the key prefix of the vision model ("", "params/", "params/img/").
    stacked: whether the file's blocks are stacked (`nn.scan`).
    names: "published" or "linen", the blocks' module names in the file.
    grid: the side of the file's grid of position embeddings (None for
      sin-cos ones, which have no parameter).
    dropped: what of the file the model does not take, in words.
    sources: the model's unrolled key -> (the file's key, layer index or
      None), for every parameter the file gives.
    shapes: the file's key -> shape, for every key.
  """

  path: str
  family: str
  config: models.ViTConfig
  prefix: str
  stacked: bool
  names: str
  grid: int | None
  dropped: tuple[str, ...]
  sources: dict[str, tuple[str, int | None]]
  shapes: dict[str, tuple[int, ...]]

  def shape(self, key: str) -> tuple[int, ...]:
    """The shape of the model's (unrolled) parameter `key` in the file."""
    file_key, layer = self.sources[key]
    shape = self.shapes[file_key]
    return shape if layer is None else shape[1:]

  @property
  def image_size(self) -> int | None:
    """`grid * patch`: the checkpoint's resolution, to the patch (None: not
    in the file). So400m/14 trained at 384 px gives 378, the same grid."""
    return None if self.grid is None else self.grid * self.config.patch_size

  @property
  def variant(self) -> str:
    """big_vision's name of the shape, e.g. "B/16", or the sizes spelled out."""
    c = self.config
    name = _VARIANTS.get((c.hidden_size, c.num_layers, c.num_heads, c.mlp_dim))
    if name is None:
      return (f'ViT/{c.patch_size} (width {c.hidden_size}, {c.num_heads} '
              f'heads, MLP {c.mlp_dim})')
    return f'{name}/{c.patch_size}'


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A checkpoint loaded for fine-tuning.

  Attributes:
    config: the architecture: `models.VisionTransformer(num_classes, config,
      scan=scan)` takes `params`.
    params: NumPy arrays in that model's layout, the head new and zero.
    summary: one line saying what was loaded.
    checkpoint: what the file holds (`inspect`).
    num_classes: the new head's outputs.
    image_size: the model's resolution (the position embeddings' grid).
    scan: whether `params` are stacked for a scanned model.
  """

  config: models.ViTConfig
  params: Any
  summary: str
  checkpoint: Checkpoint
  num_classes: int
  image_size: int
  scan: bool

  def model(self, dtype: Any = None, remat: bool = False
            ) -> models.VisionTransformer:
    """The `models.VisionTransformer` these params are for."""
    return models.VisionTransformer(self.num_classes, self.config, dtype=dtype,
                                    remat=remat, scan=self.scan)


def resize_posemb(posemb: np.ndarray, num_tokens: int,
                  has_class_token: bool) -> np.ndarray:
  """Resizes position embeddings `(1, [1 +] g * g, d)` to `num_tokens` tokens.

  As `vit_jax.checkpoint.interpolate_posembed` and big_vision's
  `resample_posemb`: the class token's row (if any) is kept as it is; the
  `g x g` grid is zoomed to the new square grid with
  `scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)`, i.e.
  linear interpolation per channel with the corners of both grids aligned
  (new position `i` samples old position `i * (old - 1) / (new - 1)`).

  Args:
    posemb: the checkpoint's position embeddings, class token first if any.
    num_tokens: the model's number of position embeddings, class token
      included if any.
    has_class_token: whether the first row is the class token's.

  Returns:
    The position embeddings `(1, num_tokens, d)`, in `posemb`'s dtype.

  Raises:
    CheckpointError: a grid (old or new) that is not square.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise CheckpointError(f'position embeddings must be (1, tokens, width), '
                          f'got {posemb.shape}.')
  start = 1 if has_class_token else 0
  token, grid = posemb[:, :start], posemb[0, start:]
  num_patches = num_tokens - start
  old, new = math.isqrt(len(grid)), math.isqrt(max(num_patches, 0))
  if old * old != len(grid) or old == 0:
    raise CheckpointError(
        f'the checkpoint\'s {len(grid)} position embeddings'
        f'{" (class token apart)" if start else ""} are not a square grid.')
  if new * new != num_patches or new == 0:
    raise CheckpointError(
        f'position embeddings cannot be resized to {num_patches} patches: '
        'the target is not a square grid.')
  if new == old:
    return posemb
  dtype = posemb.dtype
  if dtype not in (np.float32, np.float64):
    grid = grid.astype(np.float32)
  grid = np.reshape(grid, (old, old, -1))
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  grid = np.reshape(grid, (1, new * new, -1)).astype(dtype)
  return np.concatenate([token, grid], axis=1)


def _recover_dtype(array: np.ndarray) -> np.ndarray:
  # `np.save` writes bfloat16 as 2-byte void; big_vision reads it back so.
  if array.dtype.kind == 'V' and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def _read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Each array's shape from the `.npz`'s headers, without reading data."""
  if not os.path.isfile(path):
    raise CheckpointError(f'checkpoint {path} does not exist.')
  shapes = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for name in archive.namelist():
        if not name.endswith('.npy'):
          continue
        with archive.open(name) as f:
          version = np.lib.format.read_magic(f)
          if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
          else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
        shapes[name[:-len('.npy')]] = tuple(shape)
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    raise CheckpointError(
        f'{path} is not a readable .npz file: {error}') from None
  if not shapes:
    raise CheckpointError(f'{path} holds no arrays: not a .npz checkpoint.')
  return shapes


def _find_prefix(path, shapes) -> str:
  """The key prefix of the vision model: where `embedding/kernel` is."""
  suffix = 'embedding/kernel'
  prefixes = sorted(k[:-len(suffix)] for k in shapes if k.endswith(suffix)
                    and (k == suffix or k[-len(suffix) - 1] == '/'))
  if not prefixes:
    first = sorted(shapes)[:3]
    raise CheckpointError(
        f'{path} has no patch embedding (`embedding/kernel`) under any '
        f'prefix: not a ViT checkpoint (keys: {", ".join(first)}, ...).')
  if len(prefixes) > 1:
    raise CheckpointError(
        f'{path} holds {len(prefixes)} ViTs (under '
        f'{", ".join(repr(p) for p in prefixes)}); not one vision model.')
  return prefixes[0]


def _tower(path, shapes):
  """The vision model's keys (prefix stripped) and what else the file holds."""
  prefix = _find_prefix(path, shapes)
  local = {k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
  # Beside an image tower (`params/img/`): the text tower, `t`, `b`.
  parent = prefix[:prefix.rstrip('/').rfind('/') + 1] if prefix else ''
  outside = sorted({parent + k[len(parent):].split('/')[0] for k in shapes
                    if not k.startswith(prefix) and k.startswith(parent)}
                   | {k.split('/')[0] for k in shapes
                      if not k.startswith(parent)})
  # big_vision's MAP head was once inlined at the top (`fix_old_checkpoints`).
  if 'probe' in local and not any(k.startswith('MAPHead_0/') for k in local):
    local = {(f'MAPHead_0/{k}' if k.split('/')[0] in _MAP_MODULES else k): v
             for k, v in local.items()}
  dropped = []
  for group in ('head', 'pre_logits'):
    found = [k for k in local if k.split('/')[0] == group]
    if 'head/kernel' in local and group == 'head':
      dropped.append(f'its {shapes[local["head/kernel"]][-1]}-output head')
    elif found:
      dropped.append(group)
    for k in found:
      del local[k]
  return prefix, local, dropped + outside


def _blocks(path, shapes, local):
  """`local` with the blocks unrolled under the model's names.

  Returns:
    The model's key -> (file key, layer index or None); the depth; whether
    the file stacks its blocks; "published" or "linen" names.
  """
  stacked = {k: v for k, v in local.items() if k.startswith(_STACKED)}
  unrolled = {k: v for k, v in local.items() if _UNROLLED.match(k)}
  if stacked and unrolled:
    raise CheckpointError(
        f'{path} has both stacked (`Transformer/encoderblock/`) and unrolled '
        '(`Transformer/encoderblock_0/`) blocks.')
  blocks = {}  # (layer, module path in the block) -> (file key, index)
  if stacked:
    depths = {shapes[v][:1] for v in stacked.values()}
    if len(depths) != 1 or depths == {()}:
      raise CheckpointError(
          f'{path}: the stacked blocks\' leaves do not share one leading '
          f'layer axis (sizes {sorted(depths)}).')
    (depth,), = depths
    for k, v in stacked.items():
      for layer in range(depth):
        blocks[layer, k[len(_STACKED):]] = (v, layer)
  else:
    for k, v in unrolled.items():
      match = _UNROLLED.match(k)
      blocks[int(match.group(1)), match.group(2)] = (v, None)
    layers = sorted({layer for layer, _ in blocks})
    depth = len(layers)
    if layers != list(range(depth)):
      raise CheckpointError(
          f'{path}: blocks {layers} are not numbered 0 to {depth - 1}.')
  if not depth:
    raise CheckpointError(f'{path} has no transformer blocks '
                          '(`Transformer/encoderblock_0/...`).')

  modules = {name.split('/')[0] for _, name in blocks}
  published = modules & set(_PUBLISHED[1:])
  linen = modules & set(_LINEN[1:])
  if published and linen:
    raise CheckpointError(
        f'{path} mixes vit_jax\'s published block names '
        f'({", ".join(sorted(published))}) with Linen\'s '
        f'({", ".join(sorted(linen))}).')
  names = 'linen' if linen else 'published'
  sources = {k: (v, None) for k, v in local.items()
             if k not in stacked and k not in unrolled}
  for (layer, name), source in blocks.items():
    module, _, rest = name.partition('/')
    if names == 'linen':
      module = _TO_PUBLISHED.get(module, module)
    sources[f'Transformer/encoderblock_{layer}/{module}/{rest}'] = source
  return sources, depth, bool(stacked), names


def _position_embeddings(path, prefix, sources, shape_of, width):
  """The model's `posemb` for the file, its grid side, and the key it had.

  Moves `sources`' entry to where the model keeps that kind.
  """
  has_cls = 'cls' in sources
  present = [k for k in _POSEMB_KEYS if k in sources]
  if len(present) > 1:
    raise CheckpointError(f'{path} has position embeddings in more than one '
                          f'place: {", ".join(present)}.')
  if not present:
    if width % 4:
      raise CheckpointError(
          f'{path} has no position embeddings, and fixed sin-cos ones '
          f'(big_vision\'s "sincos2d") need a width divisible by 4, not '
          f'{width}.')
    return 'sincos2d', None, None
  key, = present
  shape = shape_of(key)
  if len(shape) != 3 or shape[0] != 1 or shape[2] != width:
    raise CheckpointError(
        f'{path}: {prefix}{key} is {shape}, not (1, tokens, {width}).')
  rows = shape[1]
  square = math.isqrt(rows) ** 2 == rows
  square_plus_one = rows > 1 and math.isqrt(rows - 1) ** 2 == rows - 1
  if key == _ENCODER_POSEMB:
    if has_cls and not square_plus_one:
      raise CheckpointError(
          f'{path} has a class token (`cls`), but its {rows} position '
          'embeddings are not a square grid plus the class token\'s row' +
          (' (they are a square grid alone).' if square else '.'))
    if not has_cls and not square:
      raise CheckpointError(
          f'{path} has no class token (`cls`), but its {rows} position '
          'embeddings are not a square grid of patches' +
          (' (they are a class token\'s row plus a square grid).'
           if square_plus_one else '.'))
    posemb = 'encoder'
  elif square:
    posemb = 'patches'
  elif square_plus_one and has_cls:
    # Older big_vision added them after the class token, as vit_jax does.
    posemb = 'encoder'
  else:
    raise CheckpointError(
        f'{path}: its {rows} position embeddings are not a square grid of '
        'patches' + (', and a class token\'s row plus a square grid needs '
                     'a class token (`cls`), which the file lacks.'
                     if square_plus_one else '.'))
  to = _ENCODER_POSEMB if posemb == 'encoder' else 'pos_embedding'
  sources[to] = sources.pop(key)
  return posemb, math.isqrt(rows - (posemb == 'encoder' and has_cls)), key


def inspect(path: str) -> Checkpoint:
  """What `path` holds: its family, architecture and layout, from its shapes.

  Reads only the arrays' headers, so it is cheap on any file.

  Args:
    path: a `.npz` checkpoint of the vit_jax, big_vision or SigLIP layout.

  Returns:
    A `Checkpoint`.

  Raises:
    CheckpointError: a file that is not one of these layouts, or not
      consistent; the message names the real reason.
  """
  shapes = _read_shapes(path)
  prefix, local, dropped = _tower(path, shapes)
  if any(k.startswith(('conv_root/', 'gn_root/')) for k in local):
    raise CheckpointError(f'{path} is a ResNet-ViT hybrid (R50+ViT): its '
                          'ResNet stem is not supported.')
  sources, depth, stacked, names = _blocks(path, shapes, local)

  def shape_of(key):
    file_key, layer = sources[key]
    shape = shapes[file_key]
    return shape if layer is None else shape[1:]

  def need(key, what):
    if key not in sources:
      raise CheckpointError(f'{path} has no {prefix}{key} ({what}).')
    return shape_of(key)

  kernel = need('embedding/kernel', 'the patch embedding')
  if len(kernel) != 4:
    raise CheckpointError(
        f'{path}: the patch embedding {prefix}embedding/kernel is {kernel}, '
        'not a convolution (p, p, 3, width); a Dense patch embedding, as in '
        'SigLIP 2 NaFlex, is not supported.')
  if kernel[0] != kernel[1] or kernel[2] != 3:
    raise CheckpointError(
        f'{path}: the patch embedding is {kernel}; the model needs square '
        'patches of 3-channel images, (p, p, 3, width).')
  patch, width = kernel[0], kernel[3]
  attention = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1'
  query = need(f'{attention}/query/kernel', "the first block's query kernel")
  mlp = need('Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel',
             "the first block's MLP")
  if len(query) != 3 or len(mlp) != 2:
    raise CheckpointError(
        f'{path}: the first block\'s query kernel {query} or MLP kernel {mlp} '
        'is not in the Flax layout (width, heads, head_dim), (width, mlp).')
  heads = query[1]
  if query[0] != width or query[1] * query[2] != width:
    raise CheckpointError(
        f'{path}: query kernels {query} do not map width {width} to '
        f'heads x head_dim = {width}.')

  posemb, grid, posemb_key = _position_embeddings(path, prefix, sources,
                                                  shape_of, width)
  has_cls = 'cls' in sources
  has_map = any(k.startswith('MAPHead_0/') for k in sources)
  if has_map and has_cls:
    raise CheckpointError(f'{path} has both a class token (`cls`) and a MAP '
                          'head (`MAPHead_0`): which one pools is unclear.')
  if has_map:
    map_query = need('MAPHead_0/MultiHeadDotProductAttention_0/query/kernel',
                     "the MAP head's query kernel")
    map_mlp = need('MAPHead_0/MlpBlock_0/Dense_0/kernel',
                   "the MAP head's MLP")
    if map_query[1:2] != (heads,) or map_mlp[-1:] != (mlp[1],):
      raise CheckpointError(
          f'{path}: the MAP head ({map_query[1:2]} heads, MLP {map_mlp[-1:]})'
          f' differs from the blocks ({heads} heads, MLP {mlp[1]}); the model '
          'gives it the blocks\' sizes, as big_vision does.')

  if posemb_key == _ENCODER_POSEMB:
    family = 'vit_jax'
  elif 'img/' in prefix:
    family = 'big_vision SigLIP'
  else:
    family = 'big_vision ViT'
  config = models.ViTConfig(
      patch, width, depth, heads, mlp[1],
      pool_type='map' if has_map else 'tok' if has_cls else 'gap',
      posemb=posemb)
  return Checkpoint(path=path, family=family, config=config, prefix=prefix,
                    stacked=stacked, names=names, grid=grid,
                    dropped=tuple(dropped), sources=sources, shapes=shapes)


class _Reader:
  """Reads each of the file's arrays once, slicing stacked ones per layer."""

  def __init__(self, checkpoint: Checkpoint):
    self._checkpoint = checkpoint
    self._cache = {}
    try:
      self._npz = np.load(checkpoint.path, allow_pickle=False)
    except (OSError, ValueError) as error:
      raise CheckpointError(
          f'{checkpoint.path} is not a readable .npz file: {error}') from None

  def __call__(self, key: str) -> np.ndarray:
    file_key, layer = self._checkpoint.sources[key]
    if file_key not in self._cache:
      try:
        self._cache[file_key] = _recover_dtype(self._npz[file_key])
      except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f'{self._checkpoint.path}: {file_key} cannot '
                              f'be read: {error}') from None
    value = self._cache[file_key]
    return value if layer is None else value[layer]

  def close(self):
    self._npz.close()


def _unrolled_wanted(init_flat) -> tuple[dict[str, Any], int | None]:
  """`init`'s keys with stacked blocks spelled out per layer, and the depth."""
  wanted, depth = {}, None
  for key, like in init_flat.items():
    if key.startswith(_STACKED):
      depth = like.shape[0]
      for layer in range(depth):
        wanted[f'Transformer/encoderblock_{layer}/{key[len(_STACKED):]}'] = (
            jax.ShapeDtypeStruct(like.shape[1:], like.dtype))
    else:
      wanted[key] = like
  return wanted, depth


def _fill(checkpoint: Checkpoint, init, dtype=None, hint='is --model right?'):
  """The file's arrays in `init`'s layout, a zero head, posemb resized."""
  path = checkpoint.path
  init_flat = models.flatten(init)
  wanted, depth = _unrolled_wanted(init_flat)
  # Shapes first, from the headers: a wrong model fails before any read.
  missing = []
  for key, like in wanted.items():
    if key.split('/')[0] == 'head':
      continue
    if key not in checkpoint.sources:
      missing.append(key)
      continue
    have, shape = checkpoint.shape(key), tuple(like.shape)
    resizable = (key.endswith('pos_embedding') and len(shape) == 3
                 and have[0::2] == shape[0::2])
    if have != shape and not resizable:
      raise CheckpointError(
          f'{path}: {key} has shape {have}, the model needs {shape}; {hint}')
  if missing:
    more = f' and {len(missing) - 1} more' if missing[1:] else ''
    raise CheckpointError(
        f'{path} ({checkpoint.family} layout) has nothing for the model\'s '
        f'{missing[0]!r}{more}; {hint}')
  unused = sorted(k for k in checkpoint.sources if k not in wanted)
  if unused:
    raise CheckpointError(
        f'{path} has {len(unused)} parameters the model lacks (first: '
        f'{unused[0]!r}); {hint}')

  read = _Reader(checkpoint)
  loaded = {}
  try:
    for key, like in wanted.items():
      shape = tuple(like.shape)
      leaf_dtype = dtype if dtype is not None else like.dtype
      if key.split('/')[0] == 'head':
        loaded[key] = np.zeros(shape, leaf_dtype)
        continue
      value = read(key)
      if value.shape != shape:
        value = resize_posemb(
            value, shape[1],
            has_class_token=key == _ENCODER_POSEMB
            and checkpoint.config.pool_type == 'tok')
      loaded[key] = np.asarray(value, leaf_dtype)
  finally:
    read.close()
  if depth is not None:
    for key in init_flat:
      if key.startswith(_STACKED):
        rest = key[len(_STACKED):]
        names = [f'Transformer/encoderblock_{i}/{rest}' for i in range(depth)]
        loaded[key] = np.stack([loaded.pop(n) for n in names])
  return models.unflatten(loaded)


def load_into(path: str, init) -> Any:
  """Loads the checkpoint at `path` into the layout and dtypes of `init`.

  Args:
    path: a `.npz` checkpoint (see `inspect`).
    init: the model's params (arrays or `jax.ShapeDtypeStruct`s), unrolled or
      stacked (`scan=True`).

  Returns:
    NumPy arrays in `init`'s structure; the head zero.

  Raises:
    CheckpointError: the file does not fit `init`; the message says why.
  """
  return _fill(inspect(path), init)


def _describe(config: models.ViTConfig) -> str:
  return (f'patch {config.patch_size}, width {config.hidden_size}, '
          f'{config.num_layers} blocks, {config.num_heads} heads, MLP '
          f'{config.mlp_dim}')


def load(path: str, *, image_size: int, num_classes: int,
         model: str | models.ViTConfig | None = None, scan: bool = False,
         dtype: Any = np.float32) -> Loaded:
  """Loads a public ViT checkpoint for fine-tuning at `image_size`.

  The architecture comes from the file (`inspect`); the params come back in
  the layout of `models.VisionTransformer(num_classes, loaded.config,
  scan=scan)`, the position embeddings resized to `image_size`, the head new
  and zero. A stacked file loads unrolled and an unrolled one stacked as
  `scan` asks.

  Args:
    path: the `.npz` file (vit_jax, big_vision ViT, or SigLIP / SigLIP 2).
    image_size: the side of the images the model will see. The patch grid is
      `image_size // patch`; the pixels beyond it are unused, as by the
      owners' VALID convolution (SigLIP So400m/14 at 384 px: 27 x 27).
    num_classes: the new head's outputs.
    model: optional, a `models.VIT_CONFIGS` name or a `ViTConfig` the file
      must have the shape of (patch, width, depth, heads, MLP width); its
      pooling and position embeddings are the file's whatever it says.
    scan: return the blocks stacked, for `VisionTransformer(scan=True)`.
    dtype: the params' dtype.

  Returns:
    A `Loaded`; print its `summary`.

  Raises:
    CheckpointError: one line naming why the file cannot be loaded so.
  """
  checkpoint = inspect(path)
  config = checkpoint.config
  if model is not None:
    if isinstance(model, str):
      if model not in models.VIT_CONFIGS:
        raise CheckpointError(f'unknown --model {model!r}; one of '
                              f'{", ".join(sorted(models.VIT_CONFIGS))}.')
      name, expected = model, models.VIT_CONFIGS[model]
    else:
      name, expected = str(model), model
    shape = lambda c: (c.patch_size, c.hidden_size, c.num_layers, c.num_heads,
                       c.mlp_dim)
    if shape(expected) != shape(config):
      raise CheckpointError(
          f'{path} holds a {checkpoint.variant} ({_describe(config)}), but '
          f'--model {name} has another shape ({_describe(expected)}); leave '
          '--model out to take the checkpoint\'s.')
  if image_size < config.patch_size:
    raise CheckpointError(
        f'image size {image_size} is smaller than the checkpoint\'s patch '
        f'size {config.patch_size}.')
  vit = models.VisionTransformer(num_classes, config, scan=scan)
  init = models.abstract_params(vit, image_size)
  params = _fill(checkpoint, init, dtype=np.dtype(dtype),
                 hint='the file is incomplete or not of its family.')

  side = image_size // config.patch_size
  tokens = side * side + (config.pool_type == 'tok')
  unused = image_size - side * config.patch_size
  if unused:
    # As the owners' VALID convolution does (SigLIP So400m/14 at 384 px).
    tokens = f'{tokens} tokens ({unused} px of each side unused)'
  else:
    tokens = f'{tokens} tokens'
  if config.posemb == 'sincos2d':
    posemb = ' (fixed sin-cos position embeddings)'
  elif checkpoint.grid != side:
    posemb = (f' (position embeddings resized {checkpoint.grid}x'
              f'{checkpoint.grid} -> {side}x{side})')
  else:
    posemb = ''
  layout = ', stacked' if checkpoint.stacked else ''
  if checkpoint.family == 'vit_jax':
    layout += f', {checkpoint.names} names'
  dropped = f'; dropped {", ".join(checkpoint.dropped)}' if (
      checkpoint.dropped) else ''
  summary = (f'{checkpoint.family} {checkpoint.variant}, '
             f'{config.pool_type} pooling, {config.num_layers} blocks'
             f'{layout}, {tokens}{posemb}; new {num_classes}-class '
             f'head{dropped}')
  return Loaded(config=config, params=params, summary=summary,
                checkpoint=checkpoint, num_classes=num_classes,
                image_size=image_size, scan=scan)
