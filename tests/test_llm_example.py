"""Tests of the LLM fine-tuning example's training side (`examples/llm`):
qwix LoRA, the jitted step and its optimizers, tunix's PeftTrainer, the
study and the checkpoint path."""

import json
import os

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples.llm import configs
from examples.llm import data
from examples.llm import lora
from examples.llm import models
from examples.llm import study
from examples.llm import train
from examples.llm import train_step

TOKENIZER = data.ByteTokenizer()
TINY = dict(num_layers=1, embed_dim=32, hidden_dim=64, num_heads=2,
            num_kv_heads=1, head_dim=16)
FAST = ['--quiet', '--num-layers', '1', '--embed-dim', '32', '--hidden-dim',
        '64', '--num-heads', '2', '--num-kv-heads', '1', '--head-dim', '16',
        '--seq-len', '32', '--batch-size', '4', '--eval-batch-size', '4',
        '--pretrain-batch-size', '4', '--eval-tokens', '256',
        '--pretrain-bytes', '200000', '--log-every', '2',
        '--lora-targets', 'q,v']
# Adapters on q and v only keep the tests' compiles small (every target of
# every family is checked by the step-0 test).
TARGETS = ('q', 'v')


# One trainer for the tests that train: its compiled step per method is
# reused by every run of the method (as the study reuses it).
TRAINER = study.Trainer(configs.Config(log_every=2, quiet=True), None)


def tiny_model(family='qwen3', seed=0, **sizes):
  config = models.tiny_config(family, vocab_size=TOKENIZER.vocab_size,
                              **(sizes or TINY))
  return models.create(family, config, seed=seed)


def batches(seed=0, batch_size=4, seq_len=16):
  text = 'def f(x):\n    return x + 1  # a small corpus of python\n' * 40
  tokens = data.token_array(text, TOKENIZER)
  return (train_step.with_loss_mask(b) for b in data.lm_batches(
      tokens, batch_size=batch_size, seq_len=seq_len, seed=seed))


def flat(tree):
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(tree)} if isinstance(
              tree, nnx.State) else {
                  jax.tree_util.keystr(k): np.asarray(v)
                  for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def arrays(state):
  """`{path: jax.Array}` of an nnx state."""
  return {'/'.join(map(str, k)): v.value for k, v in nnx.to_flat_state(state)}


def run_error(argv, capsys):
  """Runs main(argv), expecting a refusal; returns its one stderr line (the
  checkpoint loader's summary line goes to stdout)."""
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: ')
  return lines[0]


@pytest.mark.parametrize('family', models.FAMILIES)
def test_lora_model_at_step_zero_gives_the_base_logits_exactly(family):
  # Op by op (eagerly) the adapted projections compute the base einsum, then
  # add `x a b = 0`: bit-equal. Under jit XLA may fuse the two programs
  # differently (Llama 3's logits then differ by about 1e-8).
  model = tiny_model(family, num_layers=2, embed_dim=32, hidden_dim=64,
                     num_heads=2, num_kv_heads=1, head_dim=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 10)),
                       jnp.int32)
  mask = jnp.ones((2, 10), bool).at[1, 6:].set(False)
  logits = models.logits
  base = logits(model, tokens, mask)
  adapted = lora.apply(model, rank=4, alpha=8.0, seed=1)
  adapters = nnx.state(adapted, nnx.LoRAParam)
  names = {k[-2] for k, _ in nnx.to_flat_state(adapters)}
  expected = ({'q_einsum', 'kv_einsum', 'attn_vec_einsum'} if family == 'gemma3'
              else {'q_proj', 'k_proj', 'v_proj', 'o_proj'})
  assert names == expected | {'gate_proj', 'up_proj', 'down_proj'}
  np.testing.assert_array_equal(logits(adapted, tokens, mask), base)
  # Not vacuous: non-zero b changes the logits, and the merged weights give
  # the adapted model's function.
  nnx.update(adapted, jax.tree.map(lambda x: x + 0.05, adapters))
  moved = logits(adapted, tokens, mask)
  assert float(jnp.max(jnp.abs(moved - base))) > 1e-3
  merged = tiny_model(family, seed=9, num_layers=2, embed_dim=32,
                      hidden_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
  nnx.update(merged, lora.merged_params(adapted, 8.0 / 4))
  np.testing.assert_allclose(logits(merged, tokens, mask), moved, atol=2e-5)


def test_spd_lora_state_is_adams_moments_of_the_adapters_and_frozen_stay():
  base = tiny_model()
  pretrained = flat(nnx.state(base, nnx.Param))
  model = lora.apply(base, rank=2, alpha=4.0, seed=2, targets=TARGETS)
  adapters = flat(nnx.state(model, nnx.LoRAParam))
  trainer = TRAINER
  tx = trainer.optimizer('spd_lora')
  run = train_step.make_run('spd_lora', model, tx, weight_decay=4.0,
                            lora_scale=2.0)
  opt_state = flat(run.trainable[1]['opt_state'])
  assert not any('anchor' in k for k in opt_state)
  moments = {k: v for k, v in opt_state.items() if v.ndim}
  # mu and nu of every adapter, nothing else leaf-shaped.
  assert sorted(v.shape for v in moments.values()) == sorted(
      2 * [v.shape for v in adapters.values()])
  assert all('/mu/' in k or '/nu/' in k for k in moments)
  scalars = [k for k, v in opt_state.items() if not v.ndim]
  assert sum('/ratio/' in k for k in scalars) == len(adapters)
  assert sum('/selected/' in k for k in scalars) == len(adapters)
  adapter_bytes = sum(v.nbytes for v in adapters.values())
  state_bytes = sum(v.nbytes for v in opt_state.values())
  assert 2 * adapter_bytes < state_bytes < 2 * adapter_bytes + 16 * (
      2 * len(adapters) + 16)

  history = trainer.train(run, batches(), 6, lambda step: 1e-2, 'test')
  trained_model, _ = run.merge()
  frozen = flat(nnx.state(trained_model, nnx.All(nnx.Param,
                                                 nnx.Not(nnx.LoRAParam))))
  assert frozen.keys() == pretrained.keys()
  for name, value in frozen.items():
    np.testing.assert_array_equal(value, pretrained[name], err_msg=name)
  after = flat(nnx.state(trained_model, nnx.LoRAParam))
  assert all(np.any(after[k] != adapters[k]) for k in adapters)
  # SPD's diagnostics are logged per adapter.
  assert len(history['selection_rate']) == len(adapters)
  assert all('lora' in leaf for leaf in history['ratio'])

  # A second run at another lambda and seed reuses the compiled step.
  compiled = trainer.steps['spd_lora'][1]
  adapted = lora.apply(base, rank=2, alpha=4.0, seed=3, targets=TARGETS)
  other = train_step.make_run('spd_lora', adapted, tx, weight_decay=0.5,
                              lora_scale=2.0)
  assert trainer.step(other, next(batches())) is compiled
  assert list(trainer.compile_s).count('spd_lora') == 1
  assert 'spd_lora (again)' not in trainer.compile_s
  hyper = run.trainable[1]['opt_state']['hyperparams']
  assert float(hyper['weight_decay'].value) == 4.0
  assert float(other.trainable[1]['opt_state']['hyperparams'][
      'weight_decay'].value) == 0.5


def test_spd_full_anchors_at_the_pretrained_weights():
  model = tiny_model()
  pretrained = flat(nnx.state(model, nnx.Param))
  run = train_step.make_run('spd_full', model,
                            train_step.make_optimizer('spd_full'),
                            weight_decay=1.0)
  anchor = {k.split('/anchor/')[1]: v for k, v in
            flat(run.trainable[1]['opt_state']).items() if '/anchor/' in k}
  assert anchor.keys() == pretrained.keys()
  for name, value in anchor.items():
    np.testing.assert_array_equal(value, pretrained[name])


def test_peft_trainer_gives_the_same_adapters_as_the_nnx_step():
  base = tiny_model()
  config = configs.Config(steps=3, warmup_steps=1, log_every=3, quiet=True)
  schedule = study.make_schedule(config, 1e-2)
  ours = lora.apply(base, rank=2, alpha=4.0, seed=5, targets=TARGETS)
  theirs = lora.apply(base, rank=2, alpha=4.0, seed=5, targets=TARGETS)
  run = train_step.make_run('spd_lora', ours, TRAINER.optimizer('spd_lora'),
                            weight_decay=2.0, lora_scale=2.0)
  TRAINER.train(run, batches(seed=1), 3, schedule, 'ours')
  peft = study._peft_train('spd_lora', theirs, 2.0, schedule, batches(seed=1),
                           config)
  mine = flat(nnx.state(run.merge()[0], nnx.LoRAParam))
  tunix = flat(nnx.state(peft.merge()[0], nnx.LoRAParam))
  start = flat(nnx.state(lora.apply(base, rank=2, alpha=4.0, seed=5,
                                    targets=TARGETS), nnx.LoRAParam))
  assert mine.keys() == tunix.keys()
  for name in mine:
    assert np.any(mine[name] != start[name]), name
    np.testing.assert_allclose(mine[name], tunix[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


def test_short_study_writes_every_seed_method_strength_and_figure(tmp_path,
                                                                  capsys):
  out = tmp_path / 'out'
  results = train.main(FAST + [
      '--pretrain-steps', '4', '--steps', '4', '--seeds', '2',
      '--weight-decay', 'spd_lora=0.5,4;spd_full=1;adamw_lora=0;adamw_full=0',
      '--results-dir', str(out)])
  printed = capsys.readouterr().out
  assert 'Adam-SPD+LoRA' in printed and ' ± ' in printed
  assert 'over 2 fine-tuning seeds' in printed and str(out) in printed
  with open(out / 'results.json') as f:
    saved = json.load(f)
  assert set(saved['runs']) == {'adamw_lora@0', 'spd_lora@0.5', 'spd_lora@4',
                                'adamw_full@0', 'spd_full@1'}
  assert saved['finetune_seeds'] == [0, 1000]
  assert set(saved['compile_s']) == {'pretrain', *configs.METHODS}
  for key, run in saved['runs'].items():
    assert [r['seed'] for r in run['seeds']] == [0, 1000]
    for name in ('id_loss', 'retention_loss', 'distance'):
      values = [r[name] for r in run['seeds']]
      np.testing.assert_allclose(run[name], np.mean(values))
      np.testing.assert_allclose(run[name + '_std'], np.std(values, ddof=1))
      assert np.all(np.isfinite(values))
    assert run['distance'] > 0
    assert ('adapter_distance' in run) == key.startswith(('adamw_lora',
                                                          'spd_lora'))
    method, decay = key.split('@')
    for i in range(2):
      tag = f'_{decay}' + (f'_seed{i}' if i else '')
      lines = (out / f'metrics_{method}{tag}.jsonl').read_text().splitlines()
      assert [json.loads(line)['step'] for line in lines] == [2, 4]
      if method.startswith('spd'):
        assert 'selection_rate' in json.loads(lines[-1])
  # Seeds draw different data orders and adapters.
  spd_runs = saved['runs']['spd_lora@0.5']['seeds']
  assert spd_runs[0]['id_loss'] != spd_runs[1]['id_loss']
  assert results['pretrained']['retention_loss'] > 0
  for name in ('id_vs_retention', 'loss', 'spd_lora_selection',
               'spd_full_selection'):
    assert (out / f'{name}.png').stat().st_size > 1000
  assert any(p.startswith('pretrain_') for p in os.listdir(tmp_path / 'cache'))


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    answer = ['true', 'false'][int(rng.integers(2))]
    out.append({'instruction': f'Is {i} even?\n\nAnswer format: true/false',
                'input': '', 'output': f'the correct answer is {answer}',
                'answer': answer})
  return out


def test_checkpoint_data_and_eval_dir_end_to_end(tmp_path, capsys):
  import test_llm_checkpoints as hf  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'qwen3'
  hf.save_model(folder, 'qwen3', hf.hf_config('qwen3'))
  (tmp_path / 'train.json').write_text(json.dumps(_records(12)))
  for task in ('boolq',):
    (tmp_path / 'eval' / task).mkdir(parents=True)
    (tmp_path / 'eval' / task / 'test.json').write_text(
        json.dumps(_records(6, seed=1)))
  out = tmp_path / 'out'
  results = train.main([
      '--quiet', '--checkpoint', str(folder), '--data',
      str(tmp_path / 'train.json'), '--eval-dir', str(tmp_path / 'eval'),
      '--optimizer', 'spd_lora', '--weight-decay', '1', '--steps', '2',
      '--seeds', '1', '--batch-size', '4', '--eval-batch-size', '4',
      '--heldout-records', '4', '--seq-len', '32', '--eval-tokens', '128',
      '--max-len', '320', '--log-every', '1', '--lora-targets', 'q,v',
      '--results-dir', str(out)])
  printed = capsys.readouterr().out
  assert 'Loaded qwen3' in printed and 'boolq' in printed
  assert results['family'] == 'qwen3'
  assert results['sizes']['finetune_records'] == 8
  run = results['runs']['spd_lora@1']
  for scores in (results['pretrained'], run):
    assert set(scores['tasks']) == {'boolq', 'average'}
    assert 0 <= scores['tasks']['boolq'] <= 1
    assert scores['tasks']['average'] == scores['tasks']['boolq']
    assert np.isfinite(scores['id_loss'])
  assert run['distance'] > 0
  assert (out / 'spd_lora_selection.png').exists()


def test_fsdp_mesh_splits_weights_and_their_optimizer_state():
  config = configs.Config(fsdp=True, fsdp_min_size=512, batch_size=8,
                          eval_batch_size=8, pretrain_batch_size=8)
  mesh = study.make_mesh(config)
  assert mesh.shape == {'data': 1, 'fsdp': len(jax.devices())}
  trainer = study.Trainer(config, mesh)
  run = train_step.make_run('spd_full', tiny_model(),
                            trainer.optimizer('spd_full'), weight_decay=1.0,
                            shardings=trainer.shardings)
  state = arrays(run.trainable)
  split = {k: str(v.sharding.spec) for k, v in state.items()
           if not v.sharding.is_fully_replicated}
  # The embedding, its anchor and both Adam moments, split alike.
  embedding = {k: v for k, v in split.items() if 'input_embedding' in k}
  assert len(embedding) == 4 and len(set(embedding.values())) == 1
  assert all(v.size < 512 for k, v in state.items() if k not in split)
  specs = set(embedding.values())
  history = trainer.train(run, batches(batch_size=8), 2, lambda s: 1e-3, 'x')
  assert np.isfinite(history['loss'][-1])
  after = arrays(run.trainable)
  assert {str(after[k].sharding.spec) for k in embedding} == specs


@pytest.mark.parametrize('argv, match', [
    (['--checkpoint', '/no/such/folder'], '--checkpoint /no/such/folder'),
    (['--data', '/no/such.json'], '--data /no/such.json does not exist'),
    (['--weight-decay', 'spd_lora=x'], '--weight-decay'),
    (['--weight-decay', 'sgd=1'], "unknown method 'sgd'"),
    (['--lora-targets', 'q,zz'], '--lora-targets'),
    (['--eval-tasks', 'mmlu'], '--eval-tasks'),
    (['--seeds', '0'], '--seeds must be positive'),
    (['--trainer', 'peft', '--fsdp'], '--trainer peft'),
    (['--dtype', 'bfloat16'], '--dtype bfloat16 is for --checkpoint'),
])
def test_bad_flags_stop_with_one_line(argv, match, capsys):
  assert match in run_error(argv, capsys)


def test_bad_folder_and_bad_data_stop_with_one_line(tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  line = run_error(['--checkpoint', str(tmp_path / 'empty')], capsys)
  assert 'config.json' in line
  records = _records(4)
  del records[2]['answer']
  (tmp_path / 'bad.json').write_text(json.dumps(records))
  line = run_error(FAST + ['--data', str(tmp_path / 'bad.json'),
                           '--pretrain-steps', '1', '--cache-dir',
                           str(tmp_path / 'cache'), '--results-dir',
                           str(tmp_path / 'out')], capsys)
  assert 'record 2' in line and 'answer' in line
