"""ViT-{Ti,S,B,L}/16 parameter trees (224px, 1000 classes) for the benchmarks.

The shapes come from the example's model (`examples/vit/models.py`, through
`jax.eval_shape`, so nothing is allocated) when it is importable and exposes
its configs; otherwise from the big_vision / vit_jax layout written out below,
which is the same tree. `SOURCE` says which one was used.
"""

import importlib.util
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

# name: (width D, depth, heads, mlp_dim); patch 16, 224px, 1000 classes.
CONFIGS = {
    'Ti/16': (192, 12, 3, 768),
    'S/16': (384, 12, 6, 1536),
    'B/16': (768, 12, 12, 3072),
    'L/16': (1024, 24, 16, 4096),
}
PATCH = 16
IMAGE = 224
NUM_CLASSES = 1000
TOKENS = (IMAGE // PATCH) ** 2 + 1  # 196 patches + the class token

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = 'vit_jax layout, built in benchmarks/_vit_params.py'


def _vit_jax_shapes(name):
  """The vit_jax `VisionTransformer` parameter shapes, written out."""
  width, depth, heads, mlp = CONFIGS[name]
  head_dim = width // heads

  def layer_norm():
    return {'scale': (width,), 'bias': (width,)}

  def attention():
    qkv = {'kernel': (width, heads, head_dim), 'bias': (heads, head_dim)}
    return {'query': dict(qkv), 'key': dict(qkv), 'value': dict(qkv),
            'out': {'kernel': (heads, head_dim, width), 'bias': (width,)}}

  def block():
    return {
        'LayerNorm_0': layer_norm(),
        'MultiHeadDotProductAttention_1': attention(),
        'LayerNorm_2': layer_norm(),
        'MlpBlock_3': {'Dense_0': {'kernel': (width, mlp), 'bias': (mlp,)},
                       'Dense_1': {'kernel': (mlp, width), 'bias': (width,)}},
    }

  transformer = {f'encoderblock_{i}': block() for i in range(depth)}
  transformer['posembed_input'] = {'pos_embedding': (1, TOKENS, width)}
  transformer['encoder_norm'] = layer_norm()
  return {
      'embedding': {'kernel': (PATCH, PATCH, 3, width), 'bias': (width,)},
      'cls': (1, 1, width),
      'Transformer': transformer,
      'head': {'kernel': (width, NUM_CLASSES), 'bias': (NUM_CLASSES,)},
  }


_EXAMPLE = []


def _load_example():
  """The example's models module, or None when it is not there (yet)."""
  if _EXAMPLE:
    return _EXAMPLE[0]
  _EXAMPLE.append(_import_example())
  return _EXAMPLE[0]


def _import_example():
  path = os.path.join(_ROOT, 'examples', 'vit', 'models.py')
  if not os.path.exists(path):
    return None
  try:
    if _ROOT not in sys.path:
      sys.path.insert(0, _ROOT)
    spec = importlib.util.spec_from_file_location('_vit_example_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  except Exception as error:  # pylint: disable=broad-except
    print(f'# examples/vit/models.py did not import ({error!r}); '
          'using the built-in vit_jax layout.', file=sys.stderr)
    return None


def _example_shapes(module, name):
  """Shapes from the example model through `jax.eval_shape`, or None."""
  try:
    model = module.VisionTransformer(num_classes=NUM_CLASSES,
                                     config=module.VIT_CONFIGS[name])
    images = jax.ShapeDtypeStruct((1, IMAGE, IMAGE, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x), images)
  except Exception as error:  # pylint: disable=broad-except
    print(f'# examples/vit/models.py has no usable {name} ({error!r}); '
          'using the built-in vit_jax layout.', file=sys.stderr)
    return None
  return jax.tree.map(lambda s: tuple(s.shape), variables['params'])


def example_module():
  """The example's models module (`examples/vit/models.py`), or None."""
  return _load_example()


def param_shapes(name):
  """The params tree of ViT-`name` as shape tuples, and where it came from."""
  if name not in CONFIGS:
    raise ValueError(f'unknown ViT config {name!r}; one of {list(CONFIGS)}.')
  module = _load_example()
  if module is not None:
    shapes = _example_shapes(module, name)
    if shapes is not None:
      return shapes, 'examples/vit/models.py (jax.eval_shape)'
  return _vit_jax_shapes(name), SOURCE


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(name, dtype=jnp.float32):
  """The params tree of ViT-`name` as `jax.ShapeDtypeStruct`s."""
  shapes, _ = param_shapes(name)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                      is_leaf=_is_shape)


def num_params(name) -> int:
  shapes, _ = param_shapes(name)
  return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


def random_params(name, dtype=jnp.float32, seed=0, scale=0.02):
  """Concrete params of ViT-`name`: small normal values, on the default device."""
  shapes, _ = param_shapes(name)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [(scale * jax.random.normal(k, s, jnp.float32)).astype(dtype)
         for k, s in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def head_mask(params):
  """The mask that excludes the classification head (True: constrained)."""
  return {k: jax.tree.map(lambda _, keep=k != 'head': keep, v)
          for k, v in params.items()}


def output_axes(path, shape):
  """FTP's output-unit axes of a ViT leaf: the example's rule where it exists.

  Dense and Conv kernels: the last axis; attention query/key/value kernels
  `(in, heads, head_dim)`: axes 1 and 2; their biases, 1-d leaves and the
  class and position embeddings: one row.
  """
  module = _load_example()
  if module is not None and hasattr(module, 'vit_output_axes'):
    return module.vit_output_axes(path, shape)
  name = path[-1]
  if len(path) >= 2 and path[-2] in ('query', 'key', 'value'):
    return (1, 2) if name == 'kernel' and len(shape) == 3 else ()
  if name in ('cls', 'pos_embedding') or len(shape) <= 1:
    return ()
  return (len(shape) - 1,)


if __name__ == '__main__':
  for config in CONFIGS:
    _, source = param_shapes(config)
    print(f'{config:6s} {num_params(config) / 1e6:8.2f}M params  ({source})')
