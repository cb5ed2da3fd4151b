"""Public ViT checkpoints (`examples/vit/checkpoints.py`), the model's options.

The files here are written key by key as vit_jax (`vit_jax/models_vit.py`,
its published `.npz` names and today's Linen ones) and big_vision
(`big_vision/models/vit.py`, SigLIP's `two_towers.py`) lay them out, not by
our saver. Logits are checked against a float64 NumPy forward pass written
from the owners' definitions, which reads the owners' key names directly and
resizes position embeddings with its own corner-aligned interpolation.
"""

import dataclasses
import functools
import itertools
import math
import tempfile
import zipfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from examples.vit import checkpoints
from examples.vit import models
import spd_optax as spd

WIDTH, DEPTH, HEADS, MLP, PATCH = 16, 2, 2, 32, 4
PUBLISHED = ('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2',
             'MlpBlock_3')
LINEN = ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1',
         'MlpBlock_0')


# Writers, in the owners' layouts.

def _shapes_of_block(prefix, names, width, heads, mlp):
  ln0, attention, ln1, mlp_block = names
  head_dim = width // heads
  shapes = {}
  for ln in (ln0, ln1):
    shapes.update({f'{prefix}{ln}/scale': (width,),
                   f'{prefix}{ln}/bias': (width,)})
  shapes.update(_shapes_of_attention(f'{prefix}{attention}/', width, heads,
                                     head_dim))
  shapes.update(_shapes_of_mlp(f'{prefix}{mlp_block}/', width, mlp))
  return shapes


def _shapes_of_attention(prefix, width, heads, head_dim):
  shapes = {}
  for name in ('query', 'key', 'value'):
    shapes[f'{prefix}{name}/kernel'] = (width, heads, head_dim)
    shapes[f'{prefix}{name}/bias'] = (heads, head_dim)
  shapes[f'{prefix}out/kernel'] = (heads, head_dim, width)
  shapes[f'{prefix}out/bias'] = (width,)
  return shapes


def _shapes_of_mlp(prefix, width, mlp):
  return {f'{prefix}Dense_0/kernel': (width, mlp),
          f'{prefix}Dense_0/bias': (mlp,),
          f'{prefix}Dense_1/kernel': (mlp, width),
          f'{prefix}Dense_1/bias': (width,)}


def vit_jax_shapes(grid, classifier='token', names=PUBLISHED, width=WIDTH,
                   depth=DEPTH, heads=HEADS, mlp=MLP, patch=PATCH,
                   classes=21843, representation=None):
  """vit_jax's `VisionTransformer` params, as its `.npz` files key them."""
  shapes = {'embedding/kernel': (patch, patch, 3, width),
            'embedding/bias': (width,)}
  tokens = grid * grid
  if classifier == 'token':
    shapes['cls'] = (1, 1, width)
    tokens += 1
  shapes['Transformer/posembed_input/pos_embedding'] = (1, tokens, width)
  for i in range(depth):
    shapes.update(_shapes_of_block(f'Transformer/encoderblock_{i}/', names,
                                   width, heads, mlp))
  shapes.update({'Transformer/encoder_norm/scale': (width,),
                 'Transformer/encoder_norm/bias': (width,)})
  features = width
  if representation:
    shapes.update({'pre_logits/kernel': (width, representation),
                   'pre_logits/bias': (representation,)})
    features = representation
  shapes.update({'head/kernel': (features, classes), 'head/bias': (classes,)})
  return shapes


def big_vision_shapes(grid, pool='map', posemb='learn', width=WIDTH,
                      depth=DEPTH, heads=HEADS, mlp=MLP, patch=PATCH,
                      classes=None):
  """big_vision's `vit._Model` params (unrolled), keyed as it saves them."""
  shapes = {'embedding/kernel': (patch, patch, 3, width),
            'embedding/bias': (width,)}
  if posemb == 'learn':
    shapes['pos_embedding'] = (1, grid * grid, width)
  if pool == 'tok':
    shapes['cls'] = (1, 1, width)
  for i in range(depth):
    shapes.update(_shapes_of_block(f'Transformer/encoderblock_{i}/', LINEN,
                                   width, heads, mlp))
  shapes.update({'Transformer/encoder_norm/scale': (width,),
                 'Transformer/encoder_norm/bias': (width,)})
  if pool == 'map':
    shapes['MAPHead_0/probe'] = (1, 1, width)
    shapes.update(_shapes_of_attention(
        'MAPHead_0/MultiHeadDotProductAttention_0/', width, heads,
        width // heads))
    shapes.update({'MAPHead_0/LayerNorm_0/scale': (width,),
                   'MAPHead_0/LayerNorm_0/bias': (width,)})
    shapes.update(_shapes_of_mlp('MAPHead_0/MlpBlock_0/', width, mlp))
  classes = classes or width
  shapes.update({'head/kernel': (width, classes), 'head/bias': (classes,)})
  return shapes


def stacked(arrays, depth=DEPTH, stack=np.stack):
  """big_vision's `pyloop_to_scan`: blocks stacked under `encoderblock`."""
  out = {k: v for k, v in arrays.items()
         if not k.startswith('Transformer/encoderblock_')}
  first = 'Transformer/encoderblock_0/'
  for key in arrays:
    if key.startswith(first):
      rest = key[len(first):]
      out['Transformer/encoderblock/' + rest] = stack(
          [arrays[f'Transformer/encoderblock_{i}/{rest}']
           for i in range(depth)])
  return out


def siglip(arrays, text_width=8):
  """A two-towers (SigLIP) checkpoint: image tower under `params/img/`."""
  out = {'params/img/' + k: v for k, v in arrays.items()}
  rng = np.random.default_rng(9)
  out['params/txt/Embed_0/embedding'] = rng.normal(size=(11, text_width))
  out['params/txt/Transformer/encoderblock/LayerNorm_0/scale'] = np.ones(
      (2, text_width))
  out['params/txt/head/kernel'] = rng.normal(size=(text_width, WIDTH))
  out['params/t'] = np.array([2.3])
  out['params/b'] = np.array([-10.0])
  return out


def random_arrays(shapes, seed=0):
  """Values that make every part of the network matter."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for key, shape in sorted(shapes.items()):
    name = key.split('/')[-1]
    if name == 'scale':
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name == 'bias' or key.endswith(('pos_embedding', 'cls', 'probe')):
      value = 0.3 * rng.standard_normal(shape)
    else:
      fan_in = math.prod(shape[:-1]) if 'out/' not in key else math.prod(
          shape[:2])
      if '/query/' in key or '/key/' in key or '/value/' in key:
        fan_in = shape[0]
      value = rng.standard_normal(shape) / math.sqrt(fan_in)
    arrays[key] = value.astype(np.float32)
  return arrays


def rename(arrays, old, new):
  """vit_jax's published block names to Linen's (or back)."""
  table = dict(zip(old, new))
  def one(key):
    parts = key.split('/')
    if len(parts) > 2 and parts[1].startswith('encoderblock'):
      parts[2] = table.get(parts[2], parts[2])
    return '/'.join(parts)
  return {one(k): v for k, v in arrays.items()}


def write(path, arrays):
  np.savez(path, **arrays)
  return str(path)


# The owners' forward pass, in float64 NumPy.

def np_corner_aligned_resize(grid, new):
  """Linear interpolation of a `(g, g, d)` grid to `(new, new, d)`, corners on
  corners: new index `i` reads old position `i * (g - 1) / (new - 1)`."""
  old = grid.shape[0]
  where = np.arange(new) * ((old - 1) / (new - 1)) if new > 1 else np.zeros(1)
  low = np.minimum(np.floor(where).astype(int), old - 1)
  high = np.minimum(low + 1, old - 1)
  frac = where - low
  rows = (grid[low] * (1 - frac)[:, None, None]
          + grid[high] * frac[:, None, None])
  return (rows[:, low] * (1 - frac)[None, :, None]
          + rows[:, high] * frac[None, :, None])


def np_layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def np_gelu(x):  # Flax's nn.gelu: the tanh approximation.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_attention(p, inputs_q, inputs_kv):
  q, k, v = (np.einsum('nld,dhk->nlhk', x, p[name]['kernel']) + p[name]['bias']
             for name, x in (('query', inputs_q), ('key', inputs_kv),
                             ('value', inputs_kv)))
  logits = np.einsum('nqhk,nshk->nhqs', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('nhqs,nshk->nqhk', weights, v)
  return np.einsum('nqhk,hkd->nqd', out, p['out']['kernel']) + p['out']['bias']


def np_mlp(p, x):
  x = np_gelu(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  return x @ p['Dense_1']['kernel'] + p['Dense_1']['bias']


def np_sincos2d(h, w, width):
  """big_vision's `posemb_sincos_2d`, in NumPy."""
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / 1e4 ** (np.arange(width // 4) / (width // 4 - 1))
  y = y.flatten()[:, None] * omega[None]
  x = x.flatten()[:, None] * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], 1)[None]


def np_forward(arrays, images, head, family, pool, names=LINEN):
  """Logits of the owners' model for `arrays` (owners' keys, unrolled).

  `family`: "vit_jax" (cls, then posemb over every token) or "big_vision"
  (posemb over the patches, then cls). `head`: our new head's params.
  """
  tree = models.unflatten({k: np.asarray(v, np.float64)
                           for k, v in arrays.items()})
  kernel = tree['embedding']['kernel']
  patch, width = kernel.shape[0], kernel.shape[-1]
  n, size = images.shape[0], images.shape[1]
  side = size // patch
  x = images.astype(np.float64).reshape(n, side, patch, side, patch, 3)
  x = np.einsum('nipjqc,pqcd->nijd', x, kernel) + tree['embedding']['bias']
  x = x.reshape(n, side * side, width)
  has_cls = 'cls' in tree
  cls = np.tile(tree['cls'], (n, 1, 1)) if has_cls else None
  if family == 'vit_jax':
    posemb = tree['Transformer']['posembed_input']['pos_embedding']
    start = 1 if has_cls else 0
    old = math.isqrt(posemb.shape[1] - start)
    grid = np_corner_aligned_resize(posemb[0, start:].reshape(old, old, -1),
                                    side).reshape(1, side * side, -1)
    posemb = np.concatenate([posemb[:, :start], grid], axis=1)
    if has_cls:
      x = np.concatenate([cls, x], axis=1)
    x = x + posemb
  else:
    if 'pos_embedding' in tree:
      posemb = tree['pos_embedding']
      old = math.isqrt(posemb.shape[1])
      posemb = np_corner_aligned_resize(
          posemb[0].reshape(old, old, -1), side).reshape(1, side * side, -1)
    else:
      posemb = np_sincos2d(side, side, width)
    x = x + posemb
    if has_cls:
      x = np.concatenate([cls, x], axis=1)
  ln0, attention, ln1, mlp_block = names
  transformer = tree['Transformer']
  for i in range(sum(k.startswith('encoderblock_') for k in transformer)):
    block = transformer[f'encoderblock_{i}']
    y = np_layer_norm(block[ln0], x)
    x = x + np_attention(block[attention], y, y)
    x = x + np_mlp(block[mlp_block], np_layer_norm(block[ln1], x))
  x = np_layer_norm(transformer['encoder_norm'], x)
  if pool == 'tok':
    x = x[:, 0]
  elif pool == 'gap':
    x = x.mean(axis=1)
  else:
    p = tree['MAPHead_0']
    probe = np.tile(p['probe'], (n, 1, 1))
    x = np_attention(p['MultiHeadDotProductAttention_0'], probe, x)
    x = x + np_mlp(p['MlpBlock_0'], np_layer_norm(p['LayerNorm_0'], x))
    x = x[:, 0]
  return x @ head['kernel'] + head['bias']


def images(size, n=3, seed=5):
  return np.random.default_rng(seed).uniform(
      -1, 1, (n, size, size, 3)).astype(np.float32)


def with_random_head(params, seed=7):
  """`params` with a non-zero head, so the logits show the whole network."""
  rng = np.random.default_rng(seed)
  head = {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in params['head'].items()}
  return dict(params, head=head), head


@functools.lru_cache(maxsize=None)
def _apply(num_classes, config, scan):
  """One jitted forward per model, so that tests sharing it compile it once."""
  return jax.jit(models.VisionTransformer(num_classes, config,
                                          scan=scan).apply)


def logits_of(loaded, params, size):
  apply = _apply(loaded.num_classes, loaded.config, loaded.scan)
  return np.asarray(apply({'params': params}, images(size)))


REFERENCE = dict(rtol=2e-5, atol=2e-5)


class FileTest(parameterized.TestCase):
  """A test case with a temporary folder to write checkpoints in."""

  def setUp(self):
    super().setUp()
    folder = tempfile.TemporaryDirectory()
    self.addCleanup(folder.cleanup)
    self.tmp = folder.name
    self._count = itertools.count()

  def path(self, name='ckpt.npz'):
    return f'{self.tmp}/{next(self._count)}_{name}'


# Position embeddings.

class ResizePosembTest(parameterized.TestCase):

  @parameterized.product(sizes=((14, 24), (24, 14), (7, 14)),
                         has_class_token=(True, False))
  def test_resize_is_corner_aligned_linear_interpolation(
      self, sizes, has_class_token):
    old, new = sizes
    rng = np.random.default_rng(old * 100 + new)
    start = 1 if has_class_token else 0
    posemb = rng.standard_normal((1, start + old * old, 6)).astype(np.float32)

    resized = checkpoints.resize_posemb(posemb, start + new * new,
                                        has_class_token)

    chex.assert_shape(resized, (1, start + new * new, 6))
    self.assertEqual(resized.dtype, np.float32)
    np.testing.assert_array_equal(resized[:, :start], posemb[:, :start])
    expected = np_corner_aligned_resize(
        posemb[0, start:].reshape(old, old, 6).astype(np.float64), new)
    np.testing.assert_allclose(resized[0, start:].reshape(new, new, 6),
                               expected, rtol=1e-5, atol=1e-6)
    # The corners of both grids are the same embeddings.
    grid = resized[0, start:].reshape(new, new, 6)
    old_grid = posemb[0, start:].reshape(old, old, 6)
    np.testing.assert_allclose(grid[[0, 0, -1, -1], [0, -1, 0, -1]],
                               old_grid[[0, 0, -1, -1], [0, -1, 0, -1]],
                               rtol=1e-6)

  def test_resize_differs_from_half_pixel_bilinear(self):
    # What the example did before (jax.image.resize): not the owners' rule.
    posemb = np.random.default_rng(0).standard_normal(
        (1, 1 + 14 * 14, 4)).astype(np.float32)
    ours = checkpoints.resize_posemb(posemb, 1 + 24 * 24, True)
    half_pixel = np.asarray(jax.image.resize(
        posemb[0, 1:].reshape(14, 14, 4), (24, 24, 4), 'bilinear'))
    self.assertGreater(
        np.abs(ours[0, 1:] - half_pixel.reshape(-1, 4)).max(), 0.05)

  def test_non_square_grids_are_refused_with_the_reason(self):
    posemb = np.zeros((1, 1 + 16, 4), np.float32)
    with pytest.raises(models.CheckpointError,
                       match='target is not a square grid'):
      checkpoints.resize_posemb(posemb, 1 + 24, True)
    with pytest.raises(models.CheckpointError,
                       match=r'17 position embeddings are not a square'):
      checkpoints.resize_posemb(posemb, 1 + 25, False)


# vit_jax files.

class VitJaxTest(FileTest):

  @parameterized.product(classifier=('token', 'gap'), size=(16, 24))
  def test_file_gives_the_owners_logits_at_its_own_and_a_new_resolution(
      self, classifier, size):
    arrays = random_arrays(vit_jax_shapes(grid=4, classifier=classifier,
                                          representation=8))
    path = write(self.path(), arrays)

    loaded = checkpoints.load(path, image_size=size, num_classes=5)

    pool = 'tok' if classifier == 'token' else 'gap'
    self.assertEqual(loaded.config, models.ViTConfig(
        PATCH, WIDTH, DEPTH, HEADS, MLP, pool_type=pool, posemb='encoder'))
    np.testing.assert_array_equal(loaded.params['head']['kernel'],
                                  np.zeros((WIDTH, 5)))
    params, head = with_random_head(loaded.params)
    np.testing.assert_allclose(
        logits_of(loaded, params, size),
        np_forward(arrays, images(size), head, 'vit_jax', pool, PUBLISHED),
        **REFERENCE)

  def test_linen_names_load_exactly_as_the_published_names(self):
    arrays = random_arrays(vit_jax_shapes(grid=4))
    published = write(self.path(), arrays)
    linen = write(self.path(),
                  rename(arrays, PUBLISHED, LINEN))
    self.assertIn('Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias',
                  np.load(linen).files)

    a = checkpoints.load(published, image_size=24, num_classes=3)
    b = checkpoints.load(linen, image_size=24, num_classes=3)

    self.assertEqual(a.config, b.config)
    chex.assert_trees_all_equal(a.params, b.params)
    params, _ = with_random_head(a.params)
    np.testing.assert_array_equal(logits_of(a, params, 24),
                                  logits_of(b, params, 24))
    self.assertIn('linen names', b.summary)
    self.assertIn('published names', a.summary)

  def test_summary_says_what_was_loaded_and_dropped(self):
    arrays = random_arrays(vit_jax_shapes(grid=4, representation=8))
    path = write(self.path(), arrays)
    loaded = checkpoints.load(path, image_size=24, num_classes=3)
    self.assertEqual(
        loaded.summary,
        'vit_jax ViT/4 (width 16, 2 heads, MLP 32), tok pooling, 2 blocks, '
        'published names, 37 tokens (position embeddings resized 4x4 -> '
        '6x6); new 3-class head; dropped its 21843-output head, pre_logits')

  def test_models_load_npz_reads_any_family_into_the_models_layout(self):
    arrays = random_arrays(big_vision_shapes(grid=4, pool='map'))
    path = write(self.path(),
                 siglip(stacked(arrays)))
    config = checkpoints.inspect(path).config
    for scan in (False, True):
      init = models.abstract_params(
          models.VisionTransformer(3, config, scan=scan), 16)
      loaded = models.load_npz(path, init)
      chex.assert_trees_all_equal_shapes_and_dtypes(loaded, init)
      chex.assert_trees_all_equal(loaded, checkpoints.load(
          path, image_size=16, num_classes=3, scan=scan).params)


# big_vision and SigLIP files.

BIG_VISION_CASES = (
    dict(testcase_name='tok', pool='tok', posemb='learn', prefix=''),
    dict(testcase_name='gap_params', pool='gap', posemb='learn',
         prefix='params/'),
    dict(testcase_name='gap_sincos2d', pool='gap', posemb='sincos2d',
         prefix=''),
    dict(testcase_name='map_siglip', pool='map', posemb='learn',
         prefix='siglip'),
)


def big_vision_file(path, pool, posemb, prefix, stack=False, grid=4):
  arrays = random_arrays(big_vision_shapes(grid=grid, pool=pool,
                                           posemb=posemb))
  saved = stacked(arrays) if stack else arrays
  if prefix == 'siglip':
    saved = siglip(saved)
  else:
    saved = {prefix + k: v for k, v in saved.items()}
  return write(path, saved), arrays


class BigVisionTest(FileTest):

  @parameterized.named_parameters(*BIG_VISION_CASES)
  def test_file_gives_the_owners_logits_at_a_new_resolution(
      self, pool, posemb, prefix):
    path, arrays = big_vision_file(
        self.path(), pool, posemb, prefix)

    loaded = checkpoints.load(path, image_size=28, num_classes=4)

    self.assertEqual(loaded.config.pool_type, pool)
    self.assertEqual(loaded.config.posemb,
                     'patches' if posemb == 'learn' else 'sincos2d')
    if pool == 'map':
      chex.assert_shape(loaded.params['MAPHead_0']['probe'], (1, 1, WIDTH))
    self.assertEqual('pos_embedding' in loaded.params, posemb == 'learn')
    self.assertNotIn('posembed_input', loaded.params['Transformer'])
    params, head = with_random_head(loaded.params)
    np.testing.assert_allclose(
        logits_of(loaded, params, 28),
        np_forward(arrays, images(28), head, 'big_vision', pool), **REFERENCE)

  def test_stacked_and_unrolled_files_load_identically_either_way(self):
    unrolled_path, _ = big_vision_file(self.path(), 'map', 'learn', 'siglip')
    stacked_path, _ = big_vision_file(self.path(), 'map', 'learn', 'siglip',
                                      stack=True)

    unrolled = checkpoints.load(unrolled_path, image_size=16, num_classes=3)
    from_stacked = checkpoints.load(stacked_path, image_size=16, num_classes=3)
    scanned = checkpoints.load(stacked_path, image_size=16, num_classes=3,
                               scan=True)
    scanned_from_unrolled = checkpoints.load(
        unrolled_path, image_size=16, num_classes=3, scan=True)

    chex.assert_trees_all_equal(from_stacked.params, unrolled.params)
    chex.assert_trees_all_equal(scanned.params, scanned_from_unrolled.params)
    blocks = scanned.params['Transformer']['encoderblock']
    chex.assert_shape(blocks['MultiHeadDotProductAttention_1']['query'][
        'kernel'], (DEPTH, WIDTH, HEADS, WIDTH // HEADS))
    chex.assert_trees_all_equal(
        blocks, jax.tree.map(lambda *a: np.stack(a), *[
            unrolled.params['Transformer'][f'encoderblock_{i}']
            for i in range(DEPTH)]))
    params, _ = with_random_head(unrolled.params)
    np.testing.assert_array_equal(logits_of(unrolled, params, 16),
                                  logits_of(from_stacked, params, 16))
    scanned_params = dict(scanned.params, head=params['head'])
    np.testing.assert_allclose(logits_of(scanned, scanned_params, 16),
                               logits_of(unrolled, params, 16),
                               rtol=1e-5, atol=1e-5)

  def test_siglip_summary_names_the_tower_and_what_was_ignored(self):
    path, _ = big_vision_file(self.path(),
                              'map', 'learn', 'siglip', stack=True)
    loaded = checkpoints.load(path, image_size=16, num_classes=345)
    self.assertEqual(loaded.checkpoint.prefix, 'params/img/')
    self.assertEqual(
        loaded.summary,
        'big_vision SigLIP ViT/4 (width 16, 2 heads, MLP 32), map pooling, '
        '2 blocks, stacked, 16 tokens; new 345-class head; dropped its '
        '16-output head, params/b, params/t, params/txt')

  def test_image_size_off_the_patch_grid_uses_the_whole_patches(self):
    path, arrays = big_vision_file(self.path(), 'gap', 'learn', '')
    loaded = checkpoints.load(path, image_size=18, num_classes=2)
    chex.assert_shape(loaded.params['pos_embedding'], (1, 16, WIDTH))
    self.assertIn('16 tokens (2 px of each side unused)', loaded.summary)
    params, head = with_random_head(loaded.params)
    x = images(18)
    np.testing.assert_allclose(
        _apply(2, loaded.config, False)({'params': params}, x),
        np_forward(arrays, x[:, :16, :16], head, 'big_vision', 'gap'),
        **REFERENCE)

  def test_bfloat16_saved_as_void_is_read_back(self):
    arrays = random_arrays(big_vision_shapes(grid=4, pool='gap'))
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}
    path = write(self.path(), bf16)
    self.assertEqual(np.load(path)['embedding/kernel'].dtype.kind, 'V')
    loaded = checkpoints.load(path, image_size=16, num_classes=2)
    np.testing.assert_array_equal(
        loaded.params['embedding']['kernel'],
        bf16['embedding/kernel'].astype(np.float32))
    self.assertEqual(loaded.params['embedding']['kernel'].dtype, np.float32)


# The standard variants, by shape alone (headers, no data).

def write_headers_only(path, shapes):
  """An `.npz` of array headers without data: enough for `inspect`."""
  with zipfile.ZipFile(path, 'w') as archive:
    for key, shape in shapes.items():
      with archive.open(key + '.npy', 'w') as f:
        np.lib.format.write_array_header_1_0(f, {
            'descr': '<f4', 'fortran_order': False, 'shape': shape})
  return str(path)


VARIANTS = (('Ti/16', 224), ('S/16', 224), ('B/16', 384), ('L/16', 256),
            ('So400m/14', 384), ('So400m/16', 384), ('B/32', 256))


class VariantsTest(FileTest):

  @parameterized.product(variant=VARIANTS, layout=('vit_jax', 'siglip'))
  def test_inspect_reads_the_variant_and_the_model_has_its_shapes(
      self, variant, layout):
    name, size = variant
    c = models.VIT_CONFIGS[name]
    sizes = dict(width=c.hidden_size, depth=c.num_layers, heads=c.num_heads,
                 mlp=c.mlp_dim, patch=c.patch_size)
    grid = size // c.patch_size
    if layout == 'vit_jax':
      shapes = vit_jax_shapes(grid, **sizes, representation=c.hidden_size)
      local = shapes
    else:
      local = big_vision_shapes(grid, pool='map', **sizes)
      shapes = siglip(stacked(
          local, c.num_layers, stack=lambda s: (len(s),) + s[0]))
      shapes = {k: getattr(v, 'shape', v) for k, v in shapes.items()}
    path = write_headers_only(self.path(), shapes)

    found = checkpoints.inspect(path)

    self.assertEqual(found.variant, name)
    self.assertEqual(found.image_size, grid * c.patch_size)
    self.assertEqual(found.stacked, layout == 'siglip')
    self.assertEqual(found.config.pool_type,
                     'tok' if layout == 'vit_jax' else 'map')
    # The model built from it has the file's shapes, key by key.
    model = models.VisionTransformer(1000, found.config,
                                     scan=layout == 'siglip')
    ours = {k: tuple(v.shape) for k, v in models.flatten(
        models.abstract_params(model, size)).items() if not
            k.startswith('head/')}
    if layout == 'vit_jax':
      theirs = {k: v for k, v in local.items()
                if not k.startswith(('head/', 'pre_logits/'))}
    else:
      theirs = {k[len('params/img/'):]: v for k, v in shapes.items()
                if k.startswith('params/img/')
                and not k.startswith('params/img/head/')}
      theirs = rename_stacked(theirs)
    self.assertEqual(ours, theirs)


def rename_stacked(shapes):
  table = dict(zip(LINEN, PUBLISHED))
  out = {}
  for key, shape in shapes.items():
    parts = key.split('/')
    if parts[:2] == ['Transformer', 'encoderblock']:
      parts[2] = table[parts[2]]
    out['/'.join(parts)] = shape
  return out


# Refusals: one line naming the reason.

def _refusal(path, match, **kw):
  with pytest.raises(models.CheckpointError) as error:
    checkpoints.load(path, **{'image_size': 16, 'num_classes': 2, **kw})
  message = str(error.value)
  assert '\n' not in message, message
  assert match in message, message
  return message


class RefusalTest(FileTest):

  def _write(self, arrays, name='x.npz'):
    return write(f'{self.tmp}/{name}', arrays)

  def test_missing_or_unreadable_file(self):
    _refusal(f'{self.tmp}/none.npz', 'does not exist')
    with open(f'{self.tmp}/text.npz', 'w') as f:
      f.write('not a zip')
    _refusal(f'{self.tmp}/text.npz', 'not a readable .npz')

  def test_not_a_vit(self):
    _refusal(self._write({'Dense_0/kernel': np.zeros((2, 2))}),
             'no patch embedding')

  def test_class_token_row_without_a_class_token(self):
    arrays = random_arrays(vit_jax_shapes(grid=4))
    del arrays['cls']
    message = _refusal(self._write(arrays), 'no class token')
    assert 'class token\'s row plus a square grid' in message

  def test_class_token_without_its_row(self):
    arrays = random_arrays(vit_jax_shapes(grid=4, classifier='gap'))
    arrays['cls'] = np.zeros((1, 1, WIDTH), np.float32)
    _refusal(self._write(arrays), 'has a class token')

  def test_position_embeddings_that_are_no_grid(self):
    arrays = random_arrays(big_vision_shapes(grid=4, pool='gap'))
    arrays['pos_embedding'] = arrays['pos_embedding'][:, :15]
    _refusal(self._write(arrays), '15 position embeddings are not a square')

  def test_mixed_block_names(self):
    arrays = random_arrays(vit_jax_shapes(grid=4))
    arrays = rename(arrays, PUBLISHED, LINEN)
    arrays['Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias'] = (
        arrays.pop('Transformer/encoderblock_1/MlpBlock_0/Dense_0/bias'))
    _refusal(self._write(arrays), 'mixes vit_jax\'s published block names')

  def test_dense_patch_embedding(self):
    arrays = random_arrays(big_vision_shapes(grid=4))
    arrays['embedding/kernel'] = np.zeros((PATCH * PATCH * 3, WIDTH))
    _refusal(self._write(arrays), 'not a convolution')

  def test_resnet_hybrid(self):
    arrays = random_arrays(vit_jax_shapes(grid=4))
    arrays['conv_root/kernel'] = np.zeros((7, 7, 3, 8), np.float32)
    _refusal(self._write(arrays), 'ResNet-ViT hybrid')

  def test_no_position_embeddings_and_a_width_sincos_cannot_fill(self):
    arrays = random_arrays(big_vision_shapes(grid=4, pool='gap',
                                             posemb='sincos2d', width=18,
                                             heads=2))
    _refusal(self._write(arrays), 'has no position embeddings')

  def test_image_size_below_one_patch(self):
    path = self._write(random_arrays(big_vision_shapes(grid=4)))
    _refusal(path, 'smaller than the checkpoint\'s patch size 4',
             image_size=3)

  def test_model_of_another_shape(self):
    path = self._write(random_arrays(vit_jax_shapes(grid=4)))
    message = _refusal(path, '--model small has another shape', model='small')
    assert 'shape' in message
    # The same shape under its own name is accepted.
    checkpoints.load(path, image_size=16, num_classes=2, model='tiny')

  def test_missing_and_unknown_parameters(self):
    arrays = random_arrays(vit_jax_shapes(grid=4))
    missing = dict(arrays)
    del missing['Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias']
    _refusal(self._write(missing, 'm.npz'), 'has nothing for the model\'s '
             '\'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias\'')
    extra = dict(arrays)
    extra['Transformer/encoderblock_0/LayerScale_0/scale'] = np.ones(WIDTH)
    _refusal(self._write(extra, 'e.npz'), 'parameters the model lacks')

  def test_stacked_and_unrolled_blocks_together(self):
    arrays = random_arrays(big_vision_shapes(grid=4))
    both = dict(stacked(arrays))
    both['Transformer/encoderblock_0/LayerNorm_0/scale'] = np.ones(WIDTH)
    _refusal(self._write(both), 'both stacked')

  def test_load_npz_into_another_model_names_the_shape_and_model(self):
    path = self._write(random_arrays(vit_jax_shapes(grid=4)))
    init = models.abstract_params(
        models.VisionTransformer(2, models.VIT_CONFIGS['small']), 16)
    with pytest.raises(models.CheckpointError, match='shape.*--model'):
      models.load_npz(path, init)


# The model's options.

# Gap pooling: the MAP head is not stacked, and without it steps compile faster.
CONFIG = models.ViTConfig(PATCH, WIDTH, DEPTH, HEADS, MLP, pool_type='gap',
                          posemb='patches')


def _stack_blocks(params, depth):
  params = dict(params)
  transformer = dict(params['Transformer'])
  blocks = [transformer.pop(f'encoderblock_{i}') for i in range(depth)]
  transformer['encoderblock'] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  params['Transformer'] = transformer
  return params


def _unstack_blocks(params, depth, axis=0):
  params = dict(params)
  transformer = dict(params['Transformer'])
  blocks = transformer.pop('encoderblock')
  for i in range(depth):
    transformer[f'encoderblock_{i}'] = jax.tree.map(
        lambda a, i=i: np.take(np.asarray(a), i, axis), blocks)
  params['Transformer'] = transformer
  return params


@functools.lru_cache(maxsize=None)
def _pretrained():
  """Random params, perturbed so the zero head and biases are not zero."""
  params = models.init_params(models.VisionTransformer(4, CONFIG), 16, 1)
  rng = np.random.default_rng(2)
  return jax.tree.map(
      lambda a: (np.asarray(a) + 0.1 * rng.standard_normal(a.shape)).astype(
          np.float32), params)


@functools.lru_cache(maxsize=None)
def _logits_and_grads(scan, remat):
  """The model's logits and the grads of a loss, unrolled params' layout."""
  model = models.VisionTransformer(4, CONFIG, scan=scan, remat=remat)
  x = images(16)

  @jax.jit
  def run(params):
    loss = lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)
    return model.apply({'params': params}, x), jax.grad(loss)(params)
  params = _stack_blocks(_pretrained(), DEPTH) if scan else _pretrained()
  logits, grads = run(params)
  return np.asarray(logits), _unstack_blocks(grads, DEPTH) if scan else grads


class ModelOptionsTest(parameterized.TestCase):

  def test_remat_gives_identical_logits_and_grads(self):
    logits, grads = _logits_and_grads(scan=False, remat=False)
    remat_logits, remat_grads = _logits_and_grads(scan=False, remat=True)
    np.testing.assert_array_equal(remat_logits, logits)
    chex.assert_trees_all_equal(remat_grads, grads)

  @parameterized.parameters(False, True)
  def test_scan_stacks_the_blocks_and_computes_the_same_function(self, remat):
    model = models.VisionTransformer(4, CONFIG, scan=True, remat=remat)
    abstract = models.abstract_params(model, 16)
    self.assertNotIn('encoderblock_0', abstract['Transformer'])
    chex.assert_trees_all_equal_shapes(_stack_blocks(_pretrained(), DEPTH),
                                       abstract)
    logits, grads = _logits_and_grads(scan=False, remat=False)
    scan_logits, scan_grads = _logits_and_grads(scan=True, remat=remat)
    np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(scan_grads, grads, rtol=1e-4, atol=1e-5)

  def test_output_and_layer_axes_of_stacked_and_map_leaves(self):
    axes, layer = models.vit_output_axes, models.vit_layer_axis
    stacked_attention = ('Transformer', 'encoderblock',
                         'MultiHeadDotProductAttention_1')
    assert layer(stacked_attention + ('query', 'kernel'), (3, 16, 2, 8)) == 0
    assert layer(('Transformer', 'encoderblock_0', 'LayerNorm_0', 'scale'),
                 (16,)) is None
    assert layer(('MAPHead_0', 'probe'), (1, 1, 16)) is None
    assert axes(stacked_attention + ('query', 'kernel'), (3, 16, 2, 8)) == (
        2, 3)
    assert axes(stacked_attention + ('out', 'kernel'), (3, 2, 8, 16)) == (3,)
    assert axes(stacked_attention + ('key', 'bias'), (3, 2, 8)) == ()
    assert axes(('Transformer', 'encoderblock', 'MlpBlock_3', 'Dense_0',
                 'bias'), (3, 32)) == ()
    assert axes(('Transformer', 'encoderblock', 'MlpBlock_3', 'Dense_0',
                 'kernel'), (3, 16, 32)) == (2,)
    map_attention = ('MAPHead_0', 'MultiHeadDotProductAttention_0')
    assert axes(map_attention + ('query', 'kernel'), (16, 2, 8)) == (1, 2)
    assert axes(('MAPHead_0', 'probe'), (1, 1, 16)) == ()
    assert axes(('pos_embedding',), (1, 16, 16)) == ()
    mask = models.backbone_mask(models.abstract_params(
        models.VisionTransformer(4, dataclasses.replace(
            CONFIG, pool_type='map')), 16))
    assert all(jax.tree.leaves(mask['MAPHead_0']))
    assert not any(jax.tree.leaves(mask['head']))


# A scanned model, fine-tuned per layer, follows the unrolled one.

STEPS = 6


def _trajectory(opt, scan, params):
  model = models.VisionTransformer(4, CONFIG, scan=scan)
  x = images(16, n=8, seed=11)
  labels = jnp.arange(8) % 4

  @jax.jit
  def step(params, state):
    def loss(p):
      logits = model.apply({'params': p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, history = opt.init(params), []
  for _ in range(STEPS):
    params, state = step(params, state)
    history.append((params, state))
  return jax.tree.map(lambda *a: np.stack(a), *history)


METHODS = {
    'spd': lambda **kw: spd.adam_spd(1e-2, 1.0, mask=models.backbone_mask,
                                     **kw),
    'ftp': lambda **kw: spd.adam_ftp(1e-2, mu=1e-2, mask=models.backbone_mask,
                                     output_axes=models.vit_output_axes, **kw),
}


def _without_key_biases(tree):
  """`tree` without the attention key biases.

  A key bias adds `q . b` to every logit of a query alike, which the softmax
  cancels: its gradient is 0 in exact arithmetic and float round-off in
  practice, and Adam scales that noise to full steps. Scanned and unrolled
  models round differently, so those leaves (which change no output) follow
  their own noise.
  """
  return {k: v for k, v in models.flatten(tree).items()
          if '/key/bias' not in k}


@pytest.mark.parametrize('method', sorted(METHODS))
def test_scanned_model_with_layer_axis_trains_like_the_unrolled_model(method):
  pretrained = _pretrained()
  unrolled, unrolled_state = _trajectory(METHODS[method](), False, pretrained)
  scanned, scanned_state = _trajectory(
      METHODS[method](layer_axis=models.vit_layer_axis), True,
      _stack_blocks(pretrained, DEPTH))

  chex.assert_trees_all_close(
      _without_key_biases(_unstack_blocks(scanned, DEPTH, axis=1)),
      _without_key_biases(unrolled), rtol=1e-4, atol=1e-5)
  stats = lambda s: s.ratio if method == 'spd' else s.gamma
  # One decision per block (without `layer_axis`: one for the stack), each
  # the unrolled block's.
  ours = stats(scanned_state)['Transformer']['encoderblock']
  chex.assert_shape(ours['MlpBlock_3']['Dense_0']['kernel'], (STEPS, DEPTH))
  theirs = stats(unrolled_state)['Transformer']
  for i in range(DEPTH):
    chex.assert_trees_all_close(
        _without_key_biases(jax.tree.map(lambda a, i=i: a[:, i], ours)),
        _without_key_biases(theirs[f'encoderblock_{i}']), rtol=1e-4,
        atol=1e-6)
  moved = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(a[-1] - b).max()), unrolled, pretrained)))
  assert moved > 1e-3
