"""Hugging Face model folders of Qwen 3, Llama 3 and Gemma 3, loaded offline.

A folder as `save_pretrained` (or the hub) leaves it: `config.json`,
`*.safetensors` (one file or shards), `tokenizer.json` with
`tokenizer_config.json` (and maybe `special_tokens_map.json`). Nothing is
fetched: the architecture is what `transformers`' own config class makes of
`config.json` (so its defaults and both the old `rope_theta` /
`rope_scaling` and the new `rope_parameters` spellings read as
`transformers` reads them), mapped onto the family's tunix `ModelConfig`;
what tunix's model cannot compute is refused in one line (a
`configs.UsageError`) rather than loaded into wrong logits.

`config.json`'s `model_type`:

* `qwen3`: tunix's Qwen 3 (dense; `qwen3_moe` is another type), RoPE of
  any base, no scaling, no sliding window, no attention biases.
* `llama`: tunix's Llama 3 (Llama 3, 3.1, 3.2, ...): RoPE of any base,
  plain or with Llama 3.1's scaling (`rope_type: "llama3"`), tied or untied
  embeddings, no attention or MLP biases.
* `gemma3_text`: tunix's Gemma 3 (Gemma 3 270M / 1B), and `gemma3`
  (the multimodal 4B / 12B / 27B): its text tower (`text_config`; the
  vision tower and projector in the files are left out, the model sees
  text only). tunix fixes what it computes: the five-local-one-global layer
  pattern, RMSNorm eps 1e-6, the tanh GELU, no soft-caps, a query scalar of
  head_dim or width / heads, linear RoPE scaling at most; a config asking
  for anything else is refused.

The weights go through tunix's safetensors loader
(`tunix.models.safetensors_loader.load_and_create_model`) with each family's
own key mapping and preprocessing (`tunix.models.{qwen3,llama3}.params`,
`tunix.models.gemma3.params_safetensors`); for Qwen 3 and Llama 3 the class
it builds is `models.Qwen3` / `models.Llama3` (tunix's, RoPE mended). Before
loading, every tensor's name and shape is checked from the files' headers
against the model, so a folder that does not fit is refused naming the
tensor. One thing in that loader is worked around: its fast path reads
each file as one array of the first tensor's dtype (a file mixing float32
and bfloat16 tensors fails to reshape, or would read garbage), so such a
file goes through its slow path ("original" mode) instead.
"""

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tunix.models import safetensors_loader
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.llama3 import params as llama3_params
from tunix.models.qwen3 import model as qwen3_lib
from tunix.models.qwen3 import params as qwen3_params
from tunix.utils import torch_utils

from examples.llm import configs
from examples.llm import models

UsageError = configs.UsageError

# config.json's model_type -> the family.
MODEL_TYPES = {'qwen3': 'qwen3', 'llama': 'llama3', 'gemma3_text': 'gemma3',
               'gemma3': 'gemma3'}
# Tensors in the files that the text model rightly has no place for.
_IGNORED = re.compile(
    r'(^|\.)rotary_emb\.inv_freq$'
    r'|^(model\.)?(vision_tower|multi_modal_projector)\.')
_GEMMA3_PATTERN = tuple(
    'sliding_attention' if t == gemma3_lib.AttentionType.LOCAL_SLIDING
    else 'full_attention' for t in gemma3_lib.GEMMA3_ATTENTION_PATTERN)
_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16,
           'F64': np.float64}


class Tokenizer:
  """A folder's `tokenizer.json`, with the interface of `data.ByteTokenizer`.

  Attributes:
    bos_id: the beginning-of-sequence token (None where the family has none,
      as Qwen 3).
    eos_id: the end-of-sequence token.
    pad_id: the padding token (the end-of-sequence one where the folder
      names none, as Llama 3).
    vocab_size: the tokenizer's tokens, added ones included (the model's
      embedding may have more rows).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None,
               eos_id: int, pad_id: int):
    self._tokenizer = tokenizer
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """The token ids of `text`, no special tokens added."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """The text of `ids` (special tokens kept)."""
    return self._tokenizer.decode([int(i) for i in ids],
                                  skip_special_tokens=False)


@dataclasses.dataclass
class Loaded:
  """A checkpoint folder, loaded.

  Attributes:
    model: the tunix nnx model, with the folder's weights.
    family: one of `models.FAMILIES`.
    config: its tunix `ModelConfig`.
    tokenizer: the folder's `Tokenizer`.
    summary: one line saying what was loaded (printed by `load`).
  """

  model: nnx.Module
  family: str
  config: Any
  tokenizer: Tokenizer
  summary: str


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as error:
    raise UsageError(f'{path}: cannot read {what}: {error}') from None
  if not isinstance(value, dict):
    raise UsageError(f'{path}: {what} is not a JSON object.')
  return value


def read_config(folder: str):
  """The folder's family and `transformers` text config.

  Args:
    folder: a Hugging Face model folder.

  Returns:
    `(family, text_config, multimodal)`: the family, `transformers`'
    config of the text model, and whether the folder is a multimodal Gemma 3
    of which only the text tower is taken.

  Raises:
    UsageError: no folder, no readable `config.json`, a `model_type` none of
      the families has.
  """
  if not os.path.isdir(folder):
    raise UsageError(f'--checkpoint {folder} is not a folder.')
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise UsageError(f'--checkpoint {folder} has no config.json: not a '
                     'Hugging Face model folder.')
  raw = _read_json(path, 'the model config')
  model_type = raw.get('model_type')
  if model_type not in MODEL_TYPES:
    raise UsageError(
        f'{path}: model_type {model_type!r} is none of the families this '
        f'example loads ({", ".join(sorted(MODEL_TYPES))}).')
  import transformers  # pylint: disable=g-import-not-at-top
  classes = {'qwen3': transformers.Qwen3Config,
             'llama': transformers.LlamaConfig,
             'gemma3_text': transformers.Gemma3TextConfig,
             'gemma3': transformers.Gemma3Config}
  try:
    config = classes[model_type].from_dict(raw)
  except (TypeError, ValueError, KeyError) as error:
    message = str(error).replace('\n', ' ')
    raise UsageError(f'{path}: transformers cannot read it as '
                     f'{model_type}: {message}') from None
  if model_type == 'gemma3':
    return 'gemma3', config.text_config, True
  return MODEL_TYPES[model_type], config, False


def _rope(hf, path, layer_type=None) -> dict:
  params = dict(hf.rope_parameters or {})
  if layer_type is not None and layer_type in params:
    params = dict(params[layer_type])
  if params.get('rope_theta') is None:
    raise UsageError(f'{path}: no RoPE base (rope_theta).')
  return params


def _refuse_if(condition: bool, path: str, what: str) -> None:
  if condition:
    raise UsageError(f'{path}: {what}')


def model_config(family: str, hf, path: str, dtype=jnp.float32):
  """The tunix `ModelConfig` for a `transformers` text config.

  Args:
    family: one of `models.FAMILIES`.
    hf: `transformers`' config of the text model (`read_config`).
    path: `config.json`, for the messages.
    dtype: the parameters' dtype (and Qwen 3's computation's).

  Returns:
    `qwen3`'s `ModelConfig`, `models.Llama3Config` or Gemma 3's.

  Raises:
    UsageError: what the family's tunix model cannot compute.
  """
  head_dim = getattr(hf, 'head_dim', None) or (
      hf.hidden_size // hf.num_attention_heads)
  kv_heads = getattr(hf, 'num_key_value_heads', None) or (
      hf.num_attention_heads)
  sizes = dict(num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
               hidden_dim=hf.intermediate_size,
               num_heads=hf.num_attention_heads, head_dim=head_dim,
               num_kv_heads=kv_heads)
  _refuse_if(hf.num_attention_heads % kv_heads != 0, path,
             f'{hf.num_attention_heads} heads are not a multiple of '
             f'{kv_heads} key/value heads.')
  _refuse_if(bool(getattr(hf, 'attention_bias', False)), path,
             'attention_bias is true; tunix\'s attention has no biases.')
  if family in ('qwen3', 'llama3'):
    _refuse_if(hf.hidden_act != 'silu', path,
               f'hidden_act {hf.hidden_act!r}; tunix\'s MLP is SiLU-gated.')
    _refuse_if(bool(getattr(hf, 'mlp_bias', False)), path,
               'mlp_bias is true; tunix\'s MLP has no biases.')
    rope = _rope(hf, path)
    theta = float(rope.pop('rope_theta'))
    rope_type = rope.get('rope_type', 'default')
    scaling = {'qwen3': ('default',), 'llama3': models.ROPE_TYPES}[family]
    _refuse_if(rope_type not in scaling, path,
               f'RoPE type {rope_type!r}; the {family} model here computes '
               f'{" and ".join(repr(t) for t in scaling)} only.')
    if family == 'qwen3':
      _refuse_if(bool(getattr(hf, 'use_sliding_window', False)), path,
                 'use_sliding_window is true; tunix\'s Qwen 3 attends to '
                 'every earlier token.')
      return qwen3_lib.ModelConfig(
          vocab_size=hf.vocab_size, rope_theta=theta,
          norm_eps=hf.rms_norm_eps, use_tied_embedding=hf.tie_word_embeddings,
          dtype=dtype, param_dtype=dtype, **sizes)
    keep = ('rope_type', 'factor', 'low_freq_factor', 'high_freq_factor',
            'original_max_position_embeddings')
    scaling = tuple(sorted((k, v) for k, v in rope.items() if k in keep)
                    ) if rope_type == 'llama3' else ()
    return models.Llama3Config(
        vocab_size=hf.vocab_size, rope_theta=theta, norm_eps=hf.rms_norm_eps,
        weight_tying=hf.tie_word_embeddings, rope_scaling=scaling, **sizes)

  # Gemma 3: what tunix's code fixes must be what the config says.
  activation = getattr(hf, 'hidden_activation', None) or hf.hidden_act
  _refuse_if(activation != 'gelu_pytorch_tanh', path,
             f'hidden_activation {activation!r}; tunix\'s Gemma 3 MLP is the '
             'tanh GELU.')
  _refuse_if(abs(hf.rms_norm_eps - 1e-6) > 1e-12, path,
             f'rms_norm_eps {hf.rms_norm_eps}; tunix\'s Gemma 3 uses 1e-6.')
  for cap in ('attn_logit_softcapping', 'final_logit_softcapping'):
    _refuse_if(getattr(hf, cap, None) is not None, path,
               f'{cap} {getattr(hf, cap)}; tunix\'s Gemma 3 has no soft-caps.')
  _refuse_if(bool(getattr(hf, 'use_bidirectional_attention', False)), path,
             'use_bidirectional_attention is true; tunix\'s Gemma 3 is '
             'causal.')
  _refuse_if(not hf.tie_word_embeddings, path,
             'tie_word_embeddings is false; tunix\'s Gemma 3 ties them.')
  scalar = hf.query_pre_attn_scalar
  norms = gemma3_lib.QueryPreAttentionNormalisation
  if scalar == head_dim:
    query_norm = norms.BY_ONE_OVER_SQRT_HEAD_DIM
  elif scalar == hf.hidden_size // hf.num_attention_heads:
    query_norm = norms.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  else:
    raise UsageError(
        f'{path}: query_pre_attn_scalar {scalar} is neither head_dim '
        f'{head_dim} nor width / heads; tunix\'s Gemma 3 scales by one of '
        'those.')
  layer_types = tuple(hf.layer_types)
  expected = tuple(_GEMMA3_PATTERN[i % len(_GEMMA3_PATTERN)]
                   for i in range(hf.num_hidden_layers))
  _refuse_if(layer_types != expected, path,
             f'layer_types {list(layer_types)} are not tunix\'s Gemma 3 '
             'pattern (five sliding-window layers, then one global).')
  frequencies, scales = {}, {}
  for kind in ('sliding_attention', 'full_attention'):
    rope = _rope(hf, path, kind)
    rope_type = rope.get('rope_type', 'default')
    _refuse_if(rope_type not in ('default', 'linear'), path,
               f'{kind} RoPE type {rope_type!r}; tunix\'s Gemma 3 computes '
               '\'default\' and \'linear\' only.')
    frequencies[kind] = rope['rope_theta']
    scales[kind] = float(rope.get('factor', 1.0)) if (
        rope_type == 'linear') else 1.0
  return gemma3_lib.ModelConfig(
      num_embed=hf.vocab_size, sliding_window_size=hf.sliding_window,
      local_base_frequency=frequencies['sliding_attention'],
      global_base_frequency=frequencies['full_attention'],
      local_scale_factor=scales['sliding_attention'],
      global_scale_factor=scales['full_attention'],
      query_pre_attn_norm=query_norm, param_dtype=dtype, **sizes)


def _token_id(tokenizer, token, path) -> int | None:
  if isinstance(token, dict):
    token = token.get('content')
  if token is None:
    return None
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise UsageError(f'{path} names the special token {token!r}, which '
                     'tokenizer.json does not have.')
  return token_id


def load_tokenizer(folder: str, hf_config: dict) -> Tokenizer:
  """The folder's `tokenizer.json` and its special tokens.

  bos / eos / pad come from `tokenizer_config.json`, else
  `special_tokens_map.json`, else `config.json`'s `*_token_id` (the first
  of a list); a pad token nowhere named is the eos token.

  Args:
    folder: the model folder.
    hf_config: its `config.json`, as read.

  Returns:
    The `Tokenizer`.

  Raises:
    UsageError: no `tokenizer.json`, or no eos token named anywhere.
  """
  path = os.path.join(folder, 'tokenizer.json')
  if not os.path.isfile(path):
    raise UsageError(f'--checkpoint {folder} has no tokenizer.json (a '
                     'tokenizers file; a sentencepiece tokenizer.model alone '
                     'is not read).')
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as error:  # pylint: disable=broad-except
    message = str(error).replace('\n', ' ')
    raise UsageError(f'{path} is not a tokenizers file: {message}') from None
  sources = []
  for name in ('tokenizer_config.json', 'special_tokens_map.json'):
    source = os.path.join(folder, name)
    if os.path.isfile(source):
      sources.append((source, _read_json(source, 'the tokenizer config')))
  ids = {}
  for kind in ('bos', 'eos', 'pad'):
    for source, values in sources:
      if f'{kind}_token' in values:  # An explicit null means none.
        ids[kind] = _token_id(tokenizer, values[f'{kind}_token'], source)
        break
    else:
      value = hf_config.get(f'{kind}_token_id')
      if isinstance(value, list):
        value = value[0] if value else None
      ids[kind] = value
  if ids['eos'] is None:
    raise UsageError(f'--checkpoint {folder} names no eos token (in '
                     'tokenizer_config.json, special_tokens_map.json or '
                     'config.json).')
  pad = ids['eos'] if ids['pad'] is None else ids['pad']
  return Tokenizer(tokenizer, bos_id=ids['bos'], eos_id=ids['eos'],
                   pad_id=pad)


def _headers(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
  """A safetensors file's tensors: name -> (dtype, shape), data unread."""
  try:
    with open(path, 'rb') as f:
      size, = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(size))
  except (OSError, ValueError, struct.error) as error:
    raise UsageError(f'{path} is not a safetensors file: {error}') from None
  return {name: (meta['dtype'], tuple(meta['shape']))
          for name, meta in header.items() if name != '__metadata__'}


def _loader_parts(family: str, config):
  """(model class, key mapping, preprocessing) for tunix's loader."""
  # pylint: disable=protected-access
  if family == 'qwen3':
    return (models.Qwen3, qwen3_params._get_key_and_transform_mapping,
            qwen3_params._stack_experts)
  if family == 'llama3':
    return (models.Llama3, llama3_params._get_key_and_transform_mapping,
            None)
  return (gemma3_lib.Gemma3, gemma3_params._get_key_and_transform_mapping,
          gemma3_params._make_preprocess_fn(config))


def _tied(config) -> bool:
  """Whether the output layer is the embedding (Gemma 3's always is)."""
  if isinstance(config, qwen3_lib.ModelConfig):
    return config.use_tied_embedding
  return getattr(config, 'weight_tying', True)


def check_weights(folder: str, family: str, config, files) -> bool:
  """Checks the files' tensors against the model, from the headers only.

  Args:
    folder: the model folder (for the messages).
    family: one of `models.FAMILIES`.
    config: the tunix `ModelConfig`.
    files: the `*.safetensors` paths.

  Returns:
    Whether some file mixes dtypes (tunix's fast loader cannot read those).

  Raises:
    UsageError: a tensor the model has no place for, a parameter no file
      gives, or a shape that differs, each named.
  """
  model_class, key_mapping, preprocess = _loader_parts(family, config)
  mapping = key_mapping(config)
  mapped, mixed = {}, False
  for path in files:
    headers = _headers(path)
    mixed |= len({dtype for dtype, _ in headers.values()}) > 1
    for name, (dtype, shape) in headers.items():
      try:
        key, transform = torch_utils.torch_key_to_jax_key(mapping, name)
      except ValueError:
        if _IGNORED.search(name):
          continue
        raise UsageError(
            f'{path} holds {name}, which the {family} model has no place '
            'for.') from None
      if dtype not in _DTYPES:
        raise UsageError(f'{path}: {name} is {dtype}, not a float tensor.')
      if transform is not None:
        permute, reshape = transform
        if permute:
          shape = tuple(shape[i] for i in permute)
        if reshape:
          if np.prod(shape) != np.prod(reshape):
            raise UsageError(
                f'{path}: {name} is {list(shape)}, which config.json\'s '
                f'sizes make {list(reshape)}.')
          shape = tuple(reshape)
      mapped[key] = jax.ShapeDtypeStruct(shape, _DTYPES[dtype])
  if preprocess is not None:
    try:
      mapped = jax.eval_shape(preprocess, mapped)
    except ValueError as error:
      raise UsageError(f'--checkpoint {folder}: {error}') from None
  abstract = nnx.eval_shape(lambda: model_class(config,
                                                rngs=nnx.Rngs(params=0)))
  expected = {safetensors_loader.path_to_key(p): v.shape for p, v in
              jax.tree_util.tree_flatten_with_path(
                  nnx.state(abstract).to_pure_dict())[0]}
  for key, shape in expected.items():
    if key not in mapped:
      raise UsageError(f'--checkpoint {folder}: no safetensors file gives '
                       f'the model\'s {key} {list(shape)}.')
    if tuple(mapped[key].shape) != tuple(shape):
      raise UsageError(
          f'--checkpoint {folder}: the files\' {key} is '
          f'{list(mapped[key].shape)}, the model\'s (from config.json) '
          f'{list(shape)}.')
  tied = _tied(config)
  extra = sorted(k for k in mapped if k not in expected
                 and not k.startswith('unused.')
                 and not (tied and k == 'lm_head.w'))
  if extra:
    raise UsageError(f'--checkpoint {folder}: the files hold {extra[0]} '
                     f'(and {len(extra) - 1} more) the model lacks.')
  return mixed


def load(folder: str, *, dtype=jnp.float32, mesh=None) -> Loaded:
  """Loads a Hugging Face folder of Qwen 3, Llama 3 or Gemma 3, offline.

  Args:
    folder: the model folder (`config.json`, `*.safetensors`, tokenizer).
    dtype: the parameters' dtype (the files' are cast).
    mesh: a `jax.sharding.Mesh` with axes `fsdp` and `tp` (tunix's sharding
      names) to shard the parameters over, or None for one device.

  Returns:
    The `Loaded` model, config, tokenizer and summary line (also printed).

  Raises:
    UsageError: the folder cannot be loaded; the message says why, on one
      line.
  """
  folder = os.path.abspath(os.path.expanduser(folder))
  family, hf, multimodal = read_config(folder)
  config_path = os.path.join(folder, 'config.json')
  config = model_config(family, hf, config_path, dtype)
  raw = _read_json(config_path, 'the model config')
  tokenizer = load_tokenizer(folder, raw)
  vocab = getattr(config, 'vocab_size', None) or config.num_embed
  _refuse_if(tokenizer.vocab_size > vocab, config_path,
             f'vocab_size {vocab} is smaller than tokenizer.json\'s '
             f'{tokenizer.vocab_size} tokens.')
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise UsageError(f'--checkpoint {folder} has no *.safetensors files '
                     '(PyTorch .bin weights are not read).')
  if mesh is not None and not {'fsdp', 'tp'} <= set(mesh.axis_names):
    raise UsageError(f'the mesh\'s axes {mesh.axis_names} lack tunix\'s '
                     'sharding names \'fsdp\' and \'tp\'.')
  mixed = check_weights(folder, family, config, files)
  model_class, key_mapping, preprocess = _loader_parts(family, config)
  try:
    model = safetensors_loader.load_and_create_model(
        folder, model_class, config, key_mapping, mesh=mesh,
        preprocess_fn=preprocess, dtype=dtype,
        mode='original' if mixed else 'auto')
  except (ValueError, RuntimeError, AssertionError) as error:
    message = str(error).replace('\n', ' ')
    raise UsageError(f'--checkpoint {folder}: tunix cannot load it: '
                     f'{message}') from None
  params = models.count_params(model)
  tied = 'tied' if _tied(config) else 'untied'
  what = ' (text tower of a multimodal Gemma 3)' if multimodal else ''
  summary = (
      f'Loaded {family}{what} from {folder}: {config.num_layers} layers, '
      f'width {config.embed_dim}, {config.num_heads} heads '
      f'({config.num_kv_heads} key/value), vocab {vocab} ({tied} '
      f'embeddings), {params / 1e6:.1f}M params, '
      f'{jnp.dtype(dtype).name}.')
  print(summary)
  return Loaded(model=model, family=family, config=config,
                tokenizer=tokenizer, summary=summary)
