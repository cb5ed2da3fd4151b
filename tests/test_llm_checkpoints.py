"""Hugging Face folders written by `transformers` load with its logits.

Each family's tiny random model is built with `transformers`' own classes
(torch, CPU, float32, eval mode), its weights perturbed so that no norm is
one or zero, saved with `save_pretrained(safe_serialization=True)` beside a
tokenizer saved by `PreTrainedTokenizerFast.save_pretrained`, loaded through
`checkpoints.load`, and run on a right-padded batch: the logits at the real
positions agree to `ATOL`.
"""

import functools
import json
import os
import shutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import chex  # pylint: disable=g-import-not-at-top
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import tokenizers
import torch
import transformers

from examples.llm import checkpoints
from examples.llm import configs
from examples.llm import models

# float32 on both sides; the models are tiny, so the sums are short.
ATOL = 1e-4
LENGTHS = (12, 7)  # Real tokens per row; the second row is padded.
CORPUS = ('def add(x, y):\n    return x + y\n', 'The quick brown fox jumps '
          'over the lazy dog.', 'import os\nprint(os.path.join("a", "b"))\n',
          'Question: is the sky blue? Answer: true\n', 'ünïcödé — ok')
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)


@functools.lru_cache(maxsize=None)
def _bpe() -> str:
  """A small byte-level BPE (about 300 tokens), as tokenizer.json text."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<unk>', '<s>', '</s>', '<pad>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(CORPUS * 4, trainer)
  return tokenizer.to_str()


def save_tokenizer(folder, **special) -> transformers.PreTrainedTokenizerFast:
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer.from_str(_bpe()),
      unk_token='<unk>', **special)
  tokenizer.save_pretrained(folder)
  return tokenizer


VOCAB = tokenizers.Tokenizer.from_str(_bpe()).get_vocab_size() + 4


def hf_config(family, **kw):
  """A tiny `transformers` config of the family."""
  if family == 'qwen3':
    # Base 10^4 (transformers' default), not tunix's fixed 10^6.
    return transformers.Qwen3Config(**{
        'vocab_size': VOCAB, 'num_hidden_layers': 2, 'rope_theta': 10_000.0,
        'tie_word_embeddings': False, **SIZES, **kw})
  if family == 'llama3':
    return transformers.LlamaConfig(
        vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=128,
        **SIZES, **kw)
  # Six layers: five sliding-window ones (window 4 < 12 tokens), one global.
  return transformers.Gemma3TextConfig(**{
      'vocab_size': VOCAB, 'num_hidden_layers': 6, 'sliding_window': 4,
      'query_pre_attn_scalar': 16, **SIZES, **kw})


CAUSAL_LM = {'qwen3': transformers.Qwen3ForCausalLM,
             'llama3': transformers.LlamaForCausalLM,
             'gemma3': transformers.Gemma3ForCausalLM}


def save_model(folder, family, config, seed=0, **save):
  """A random `transformers` model, every weight perturbed, saved."""
  torch.manual_seed(seed)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  model = CAUSAL_LM[family](config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.2 * torch.randn_like(param))
  model.save_pretrained(folder, safe_serialization=True, **save)
  save_tokenizer(folder, bos_token='<s>', eos_token='</s>', pad_token='<pad>')
  return model


def batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, VOCAB, (len(LENGTHS), max(LENGTHS)))
  mask = np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]
  return np.where(mask, tokens, 3).astype(np.int32), mask


def hf_logits(model, tokens, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens).long(),
                attention_mask=torch.from_numpy(mask).long())
  return out.logits.float().numpy()


def max_abs_diff(loaded, model):
  tokens, mask = batch()
  ours = np.asarray(nnx.jit(models.logits)(loaded.model, jnp.asarray(tokens),
                                           jnp.asarray(mask)))
  theirs = hf_logits(model, tokens, mask)
  assert ours.shape == theirs.shape
  return float(np.abs(ours - theirs)[mask].max())


LLAMA31_ROPE = dict(rope_type='llama3', rope_theta=500_000.0, factor=4.0,
                    low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
CASES = {
    # GQA, untied, RoPE base 10^4.
    'qwen3': ('qwen3', {}),
    # Qwen3-0.6B's: tied embeddings, base 10^6.
    'qwen3_tied': ('qwen3', dict(tie_word_embeddings=True,
                                 rope_theta=1_000_000.0)),
    # Llama 3.2's shape: tied embeddings, base 5 * 10^5.
    'llama3_tied': ('llama3', dict(tie_word_embeddings=True,
                                   rope_theta=500_000.0)),
    # Llama 3.1's: untied, its RoPE scaling (every branch of it at width 16),
    # the weights in shards.
    'llama31_untied': ('llama3', dict(tie_word_embeddings=False,
                                      rope_parameters=LLAMA31_ROPE)),
    # Gemma 3 4B's RoPE: linear scaling 8 on the global layer.
    'gemma3': ('gemma3', dict(rope_parameters={
        'sliding_attention': dict(rope_type='default', rope_theta=10_000.0),
        'full_attention': dict(rope_type='linear', factor=8.0,
                               rope_theta=1_000_000.0)})),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_loaded_checkpoint_gives_transformers_logits(case, tmp_path, capsys):
  family, kw = CASES[case]
  shards = {'max_shard_size': '40KB'} if case == 'llama31_untied' else {}
  model = save_model(tmp_path, family, hf_config(family, **kw), **shards)
  assert (len(list(tmp_path.glob('*.safetensors'))) > 1) == bool(shards)

  loaded = checkpoints.load(str(tmp_path))

  assert loaded.family == family
  summary = capsys.readouterr().out.strip()
  assert summary == loaded.summary and '\n' not in summary
  assert f'Loaded {family}' in summary and str(tmp_path) in summary
  # A tied output layer is the embedding's parameter, counted once.
  assert models.count_params(loaded.model) == sum(
      p.numel() for p in model.parameters())
  diff = max_abs_diff(loaded, model)
  print(f'{case}: max |logits - transformers logits| = {diff:.2e}')
  assert diff < ATOL


def test_multimodal_gemma3_loads_its_text_tower(tmp_path, capsys):
  text = hf_config('gemma3')
  vision = transformers.SiglipVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(
      text_config=text.to_dict(), vision_config=vision.to_dict(),
      mm_tokens_per_image=4, image_token_index=VOCAB - 1,
      boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(1)
  model = transformers.Gemma3ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.2 * torch.randn_like(param))
  model.save_pretrained(tmp_path, safe_serialization=True)
  save_tokenizer(tmp_path, bos_token='<s>', eos_token='</s>')

  loaded = checkpoints.load(str(tmp_path))

  assert 'text tower of a multimodal Gemma 3' in capsys.readouterr().out
  diff = max_abs_diff(loaded, model)
  print(f'gemma3 multimodal: max |logits - transformers logits| = {diff:.2e}')
  assert diff < ATOL


def test_tunix_rope_alone_misses_llama3_logits(tmp_path):
  """The RoPE mend matters: tunix's own class (base 10^6) is off."""
  model = save_model(tmp_path, 'llama3', hf_config(
      'llama3', tie_word_embeddings=True, rope_theta=500_000.0))
  loaded = checkpoints.load(str(tmp_path))
  loaded.model.__class__ = models.llama3_lib.Llama3  # tunix's, unmended.
  assert max_abs_diff(loaded, model) > 100 * ATOL


def test_file_mixing_dtypes_loads_exactly(tmp_path):
  """tunix's fast path reads a file in its first tensor's dtype; not here."""
  model = save_model(tmp_path, 'llama3', hf_config(
      'llama3', tie_word_embeddings=False, rope_theta=500_000.0))
  tensors = safetensors.torch.load_file(tmp_path / 'model.safetensors')
  with torch.no_grad():  # The norms in bfloat16, the rest in float32.
    for name, param in model.named_parameters():
      if 'norm' in name:
        param.copy_(param.to(torch.bfloat16).float())
        tensors[name] = param.detach().to(torch.bfloat16)
  first = sorted(tensors)[0]
  assert tensors[first].dtype == torch.float32
  safetensors.torch.save_file(tensors, tmp_path / 'model.safetensors',
                              metadata={'format': 'pt'})

  assert max_abs_diff(checkpoints.load(str(tmp_path)), model) < ATOL


def test_tokenizer_encodes_as_transformers_and_names_its_special_tokens(
    tmp_path):
  theirs = save_tokenizer(tmp_path, bos_token='<s>', eos_token='</s>',
                          pad_token='<pad>')
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  ours = checkpoints.load_tokenizer(str(tmp_path), {})
  texts = CORPUS + ('unseen words: zebra quokka 123', '  two  spaces\n\n')
  for text in texts:
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
  assert ours.vocab_size == len(theirs)


def test_tokenizer_without_bos_or_pad_takes_eos_for_pad(tmp_path):
  # As Qwen 3 (bos null) and Llama 3 (no pad); config.json's bos id unused.
  save_tokenizer(tmp_path, eos_token='</s>')
  path = tmp_path / 'tokenizer_config.json'
  config = json.loads(path.read_text())
  config['bos_token'] = None
  path.write_text(json.dumps(config))
  ours = checkpoints.load_tokenizer(str(tmp_path), {'bos_token_id': 1,
                                                    'pad_token_id': None})
  eos = ours._tokenizer.token_to_id('</s>')  # pylint: disable=protected-access
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, eos, eos)


# Refusals: one line naming the problem.

def refusal(folder, match):
  with pytest.raises(configs.UsageError) as error:
    checkpoints.load(str(folder))
  message = str(error.value)
  assert '\n' not in message, message
  assert match in message, message
  return message


def write_config(folder, family, **kw):
  hf_config(family, **kw).save_pretrained(folder)
  save_tokenizer(folder, bos_token='<s>', eos_token='</s>')


def test_folder_without_config_json(tmp_path):
  save_tokenizer(tmp_path, eos_token='</s>')
  refusal(tmp_path, 'has no config.json')
  refusal(tmp_path / 'absent', 'is not a folder')


def test_unknown_model_type(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'mistral'}))
  refusal(tmp_path, "model_type 'mistral' is none of the families")


def test_folder_without_safetensors(tmp_path):
  write_config(tmp_path, 'qwen3')
  refusal(tmp_path, 'has no *.safetensors files')


def test_folder_without_tokenizer(tmp_path):
  hf_config('llama3').save_pretrained(tmp_path)
  refusal(tmp_path, 'has no tokenizer.json')


@pytest.mark.parametrize('family,kw,match', [
    ('qwen3', dict(rope_parameters=dict(rope_type='yarn', factor=4.0,
                                        rope_theta=1e6,
                                        original_max_position_embeddings=32)),
     "RoPE type 'yarn'"),
    ('qwen3', dict(use_sliding_window=True, sliding_window=8),
     'use_sliding_window'),
    ('llama3', dict(mlp_bias=True), 'mlp_bias'),
    ('gemma3', dict(final_logit_softcapping=30.0), 'final_logit_softcapping'),
    ('gemma3', dict(query_pre_attn_scalar=10), 'query_pre_attn_scalar 10'),
    ('gemma3', dict(layer_types=['full_attention'] * 6), 'layer_types'),
])
def test_config_tunix_cannot_compute(tmp_path, family, kw, match):
  write_config(tmp_path, family, **kw)
  refusal(tmp_path, match)


@pytest.fixture(scope='module')
def saved_qwen3(tmp_path_factory):
  folder = tmp_path_factory.mktemp('qwen3')
  return str(folder), save_model(folder, 'qwen3', hf_config('qwen3'))


def test_weights_of_another_shape_or_missing(saved_qwen3, tmp_path_factory):
  source, _ = saved_qwen3
  wider = tmp_path_factory.mktemp('wider')
  shutil.copytree(source, wider, dirs_exist_ok=True)
  config = json.loads((wider / 'config.json').read_text())
  config['intermediate_size'] = 96
  (wider / 'config.json').write_text(json.dumps(config))
  refusal(wider, 'layers.0.mlp.down_proj.kernel is [128, 64], the model\'s '
          '(from config.json) [96, 64]')

  missing = tmp_path_factory.mktemp('missing')
  shutil.copytree(source, missing, dirs_exist_ok=True)
  tensors = safetensors.torch.load_file(missing / 'model.safetensors')
  del tensors['model.layers.1.self_attn.k_norm.weight']
  tensors['model.layers.0.self_attn.q_proj.bias'] = torch.zeros(64)
  safetensors.torch.save_file(tensors, missing / 'model.safetensors')
  refusal(missing, 'holds model.layers.0.self_attn.q_proj.bias, which the '
          'qwen3 model has no place for')
  del tensors['model.layers.0.self_attn.q_proj.bias']
  safetensors.torch.save_file(tensors, missing / 'model.safetensors')
  refusal(missing, 'no safetensors file gives the model\'s '
          'layers.1.attn.k_norm.w')


def test_load_onto_a_mesh_shards_the_weights_and_keeps_the_logits(
    saved_qwen3):
  folder, _ = saved_qwen3
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ('fsdp', 'tp'))

  loaded = checkpoints.load(folder, mesh=mesh)

  embedding = loaded.model.embedder.input_embedding.value
  assert embedding.sharding.spec == jax.sharding.PartitionSpec('tp', 'fsdp')
  assert len(embedding.sharding.device_set) == 8
  # The same values as on one device, which give transformers' logits.
  chex.assert_trees_all_equal(
      jax.device_get(nnx.state(loaded.model).to_pure_dict()),
      jax.device_get(nnx.state(checkpoints.load(folder).model).to_pure_dict()))
  with pytest.raises(configs.UsageError, match="lack tunix's sharding names"):
    checkpoints.load(folder, mesh=jax.sharding.Mesh(devices, ('data', 'fsdp')))


@pytest.mark.parametrize('family', models.FAMILIES)
def test_created_model_has_random_mlp_kernels(family):
  """tunix inits MLP kernels to zero, where they get no gradient; not here."""
  model = models.create(family, models.tiny_config(family, vocab_size=VOCAB),
                        seed=0)
  linears = models._mlp_kernels(model)  # pylint: disable=protected-access
  kernels = [np.asarray(linear.kernel.value) for linear in linears]
  assert len(kernels) == 3 * 2  # gate, up, down in each of 2 layers.
  assert all(np.std(k) > 0.02 for k in kernels)


def test_created_model_trains_its_mlp_from_scratch():
  model = models.create('llama3', models.tiny_config('llama3',
                                                     vocab_size=VOCAB), seed=0)
  tokens, mask = batch()

  def loss(model):
    return jnp.mean(models.logits(model, tokens, mask) ** 2)
  grads = nnx.jit(nnx.grad(loss))(model)

  mlp_grads = [g for path, g in jax.tree_util.tree_flatten_with_path(
      nnx.state(grads).to_pure_dict())[0]
               if 'mlp' in jax.tree_util.keystr(path)]
  assert len(mlp_grads) == 3 * 2
  assert all(float(jnp.abs(g).max()) > 0 for g in mlp_grads)
