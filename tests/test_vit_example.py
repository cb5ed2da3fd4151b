"""Tests of the ViT robust fine-tuning example (`examples/vit`)."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
from PIL import Image
import pytest

from examples.vit import models
from examples.vit import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = models.VIT_CONFIGS['tiny']
FAST = ['--model', 'tiny', '--quiet', '--log-every', '2', '--seeds', '1']


def write_tiny_checkpoint(path, image_size=16, num_classes=10, seed=0):
  model = models.VisionTransformer(num_classes, TINY)
  params = models.init_params(model, image_size, seed)
  models.save_npz(path, params)
  return params


def write_domains(root, domains=('real', 'sketch', 'paint'),
                  classes=('cat', 'dog'), per_class=5, empty=()):
  """A DomainNet-style folder of small PNGs: root/<domain>/<class>/<i>.png."""
  rng = np.random.default_rng(0)
  for d, domain in enumerate(domains):
    for c, name in enumerate(classes):
      os.makedirs(os.path.join(root, domain, name))
      if domain in empty:
        continue
      for i in range(per_class):
        pixels = rng.integers(0, 60, (20, 24, 3)) + 90 * c + 30 * d
        Image.fromarray(np.uint8(pixels)).save(
            os.path.join(root, domain, name, f'{i}.png'))
  return str(root)


def run_error(argv, capsys):
  """Runs main(argv), expecting a usage error; returns its stderr line.

  The checkpoint loader's one-line summary may come before it.
  """
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  assert exit_info.value.code != 0
  lines = [line for line in capsys.readouterr().err.strip().splitlines()
           if '-class head' not in line]
  assert len(lines) == 1, lines
  assert lines[0].startswith('error: ')
  return lines[0]


def test_npz_keys_follow_the_vit_jax_layout(tmp_path):
  write_tiny_checkpoint(tmp_path / 'ckpt.npz')
  with np.load(tmp_path / 'ckpt.npz', allow_pickle=False) as npz:
    shapes = {key: npz[key].shape for key in npz.files}
  block = 'Transformer/encoderblock_1/'
  attention = block + 'MultiHeadDotProductAttention_1/'
  assert shapes['embedding/kernel'] == (4, 4, 3, 16)
  assert shapes['cls'] == (1, 1, 16)
  assert shapes['Transformer/posembed_input/pos_embedding'] == (1, 17, 16)
  assert shapes[attention + 'query/kernel'] == (16, 2, 8)
  assert shapes[attention + 'value/bias'] == (2, 8)
  assert shapes[attention + 'out/kernel'] == (2, 8, 16)
  assert shapes[block + 'LayerNorm_0/scale'] == (16,)
  assert shapes[block + 'LayerNorm_2/bias'] == (16,)
  assert shapes[block + 'MlpBlock_3/Dense_0/kernel'] == (16, 32)
  assert shapes[block + 'MlpBlock_3/Dense_1/kernel'] == (32, 16)
  assert shapes['Transformer/encoder_norm/scale'] == (16,)
  assert shapes['head/kernel'] == (16, 10)
  assert len(shapes) == 4 + 2 * 16 + 2 + 2


def test_npz_round_trip_resizes_posemb_and_makes_a_new_head(tmp_path):
  saved = write_tiny_checkpoint(tmp_path / 'ckpt.npz', image_size=16)
  model = models.VisionTransformer(3, TINY)
  init = models.init_params(model, 32, seed=1)
  loaded = models.load_npz(str(tmp_path / 'ckpt.npz'), init)

  chex.assert_trees_all_equal_shapes(loaded, init)
  np.testing.assert_array_equal(loaded['head']['kernel'], np.zeros((16, 3)))
  np.testing.assert_array_equal(loaded['head']['bias'], np.zeros(3))
  posemb = loaded['Transformer']['posembed_input']['pos_embedding']
  old = np.asarray(saved['Transformer']['posembed_input']['pos_embedding'])
  chex.assert_shape(posemb, (1, 65, 16))
  np.testing.assert_array_equal(posemb[:, 0], old[:, 0])
  # Bilinear upsampling keeps the grid's mean and stays within its range.
  np.testing.assert_allclose(posemb[0, 1:].mean(0), old[0, 1:].mean(0),
                             atol=0.01)
  assert posemb[0, 1:].max() <= old[0, 1:].max() + 1e-6
  rest = lambda p: {k: v for k, v in models.flatten(p).items()
                    if not k.startswith('head/') and 'pos_embedding' not in k}
  chex.assert_trees_all_equal(rest(loaded), rest(jax.device_get(saved)))
  logits = model.apply({'params': loaded}, np.zeros((2, 32, 32, 3), np.float32))
  chex.assert_shape(logits, (2, 3))


def test_helpers_mask_the_head_and_name_attention_output_axes():
  params = models.init_params(models.VisionTransformer(10, TINY), 16)
  mask = models.backbone_mask(params)
  assert not any(jax.tree.leaves(mask['head']))
  assert all(jax.tree.leaves({k: v for k, v in mask.items() if k != 'head'}))
  attention = ('Transformer', 'encoderblock_0',
               'MultiHeadDotProductAttention_1')
  axes = models.vit_output_axes
  assert axes(attention + ('query', 'kernel'), (16, 2, 8)) == (1, 2)
  assert axes(attention + ('out', 'kernel'), (2, 8, 16)) == (2,)
  assert axes(attention + ('key', 'bias'), (2, 8)) == ()
  assert axes(('embedding', 'kernel'), (4, 4, 3, 16)) == (3,)


def test_default_study_writes_every_method_seed_domain_and_plot(tmp_path,
                                                                capsys):
  out = tmp_path / 'out'
  argv = FAST + ['--pretrain-steps', '4', '--steps', '4', '--shots', '2',
                 '--seeds', '2', '--sweep', 'spd=0.5,1;wise=0.25,0.5',
                 '--results-dir', str(out)]
  train.main(argv)
  captured = capsys.readouterr()
  assert 'Adam-SPD' in captured.out and str(out) in captured.out
  assert 'LP-FT' in captured.out and 'WiSE-FT α=0.5' in captured.out
  assert ' ± ' in captured.out and 'over 2 fine-tuning seeds' in captured.out

  with open(out / 'results.json') as f:
    results = json.load(f)
  wise = {'wise0.25', 'wise0.5', 'wise0.75'}
  assert set(results['methods']) == {'adamw', 'l2sp', 'spd', 'ftp',
                                     'lpft'} | wise
  assert results['finetune_seeds'] == [0, 1000]
  ood = {'noise', 'blur', 'invert', 'rotate', 'color'}
  assert set(results['domains']) == ood | {'clean'}
  for method, run in results['methods'].items():
    assert set(run['ood_accuracy']) == set(run['ood_std']) == ood
    assert len(run['seeds']) == 2
    for key in ('id_accuracy', 'ood_mean', 'deviation'):
      values = [r[key] for r in run['seeds']]
      np.testing.assert_allclose(run[key], np.mean(values))
      np.testing.assert_allclose(
          run[key.split('_')[0] + '_std'] if key != 'ood_mean'
          else run['ood_mean_std'], np.std(values, ddof=1))
    if method not in wise:
      assert [r['seed'] for r in run['seeds']] == [0, 1000]
      assert all(r['history']['step'][-1] == 4 for r in run['seeds'])
      assert 0 <= run['id_accuracy'] <= 1 and run['deviation'] >= 0
  # Different seeds draw different few-shot sets and data orders.
  losses = [r['history']['loss'] for r in results['methods']['adamw']['seeds']]
  assert losses[0] != losses[1]
  # WiSE-FT moves the backbone alpha of AdamW's way, per seed.
  for alpha in (0.25, 0.5, 0.75):
    for mixed, adamw in zip(results['methods'][f'wise{alpha:g}']['seeds'],
                            results['methods']['adamw']['seeds']):
      np.testing.assert_allclose(mixed['deviation'],
                                 alpha * adamw["deviation"], rtol=1e-3)
  # LP-FT: a 2-step probe (head only), then 2 steps of everything.
  lpft = results['methods']['lpft']['history']
  assert lpft['probe']['step'] == [2] and lpft['step'] == [4]
  assert 'selected' in results['methods']['spd']['history']
  assert 'gamma' in results['methods']['ftp']['history']
  sweep = results['sweep']
  assert set(sweep) == {'spd', 'wise'}
  assert [p['value'] for p in sweep['spd']] == [0.5, 1.0]
  assert [p['value'] for p in sweep['wise']] == [0.25, 0.5]
  assert all(len(p['seeds']) == 2 for points in sweep.values()
             for p in points)
  # The grid point at the study's own lambda is the study's run.
  assert sweep['spd'][1]['id_accuracy'] == results['methods']['spd'][
      'id_accuracy']
  assert (out / 'metrics_spd_sweep0.5.jsonl').exists()
  assert (out / 'metrics_spd_seed1_sweep0.5.jsonl').exists()
  for name in ('accuracy', 'deviation', 'spd_selection', 'ftp_gamma',
               'tradeoff'):
    assert (out / f'{name}.png').stat().st_size > 1000
  assert any(p.startswith('pretrain_') for p in os.listdir(tmp_path / 'cache'))


def test_data_dir_with_a_checkpoint(tmp_path):
  data = write_domains(tmp_path / 'data')
  write_tiny_checkpoint(tmp_path / 'ckpt.npz', image_size=16)
  out = tmp_path / 'out'
  results = train.main(FAST + [
      '--data', data, '--checkpoint', str(tmp_path / 'ckpt.npz'),
      '--train-domain', 'sketch', '--optimizer', 'spd', '--steps', '3',
      '--shots', '0', '--batch-size', '4', '--image-size', '8',
      '--results-dir', str(out)])
  assert results['class_names'] == ['cat', 'dog']
  assert results['train_domain'] == 'sketch'
  assert set(results['methods']['spd']['ood_accuracy']) == {'paint', 'real'}
  assert results['pretrained_accuracy'] is None
  assert (out / 'spd_selection.png').exists()


def test_missing_checkpoint_is_one_line_error(capsys):
  line = run_error(FAST + ['--checkpoint', '/no/such/ViT-B_16.npz'], capsys)
  assert '/no/such/ViT-B_16.npz' in line


def test_wrong_shape_checkpoint_is_one_line_error(tmp_path, capsys):
  write_tiny_checkpoint(tmp_path / 'ckpt.npz')
  line = run_error(['--model', 'small', '--quiet',
                    '--checkpoint', str(tmp_path / 'ckpt.npz')], capsys)
  assert 'shape' in line and '--model' in line


def test_empty_domain_is_one_line_error(tmp_path, capsys):
  data = write_domains(tmp_path / 'data', empty=('paint',))
  line = run_error(FAST + ['--data', data], capsys)
  assert "'paint'" in line


def test_missing_data_dir_is_one_line_error(tmp_path, capsys):
  line = run_error(FAST + ['--data', str(tmp_path / 'nothing')], capsys)
  assert 'nothing' in line


def test_help_explains_every_flag(capsys):
  with pytest.raises(SystemExit):
    train.main(['--help'])
  text = capsys.readouterr().out
  for flag in ('--checkpoint', '--model', '--data', '--train-domain',
               '--optimizer', '--lr', '--weight-decay', '--steps',
               '--batch-size', '--image-size', '--results-dir', '--quiet',
               '--scan', '--remat', '--seeds', '--sweep', '--wise-alphas'):
    assert flag in text
  assert 'Cost: one fine-tuning run' in ' '.join(text.split())


def test_module_runs_from_the_repo_root_and_fails_without_traceback():
  result = subprocess.run(
      [sys.executable, '-m', 'examples.vit.train', '--checkpoint', 'no.npz'],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      'error: checkpoint no.npz does not exist.']


def write_big_vision_checkpoint(path, stack):
  """A tiny big_vision ViT (MAP head, learned position embeddings over the
  patches) under `params/`, written key by key as big_vision saves it."""
  from tests import test_vit_checkpoints as owners  # pylint: disable=g-import-not-at-top
  arrays = owners.random_arrays(owners.big_vision_shapes(grid=4, pool='map'))
  if stack:
    arrays = owners.stacked(arrays)
  return owners.write(path, {'params/' + k: v for k, v in arrays.items()})


@pytest.mark.parametrize('flags,methods', [
    (['--scan'], ('spd',)), (['--scan', '--remat'], ('ftp',))])
def test_big_vision_checkpoint_fine_tunes_end_to_end(tmp_path, capsys, flags,
                                                     methods):
  data = write_domains(tmp_path / 'data')
  path = write_big_vision_checkpoint(tmp_path / 'bv.npz', stack=True)
  out = tmp_path / 'out'
  results = train.main(FAST[2:] + flags + [
      '--data', data, '--checkpoint', path,
      '--optimizer', methods[0],
      '--steps', '3', '--log-every', '1', '--shots', '0', '--batch-size', '4',
      '--results-dir', str(out)])
  err = capsys.readouterr().err
  summary = [line for line in err.splitlines()
             if line.startswith('big_vision ViT')]
  assert len(summary) == 1, err
  assert 'map pooling' in summary[0] and 'stacked' in summary[0]
  assert 'new 2-class head' in summary[0]
  assert results['checkpoint_summary'] == summary[0]
  # --model left out: the checkpoint's shape; --image-size: its 4 x 4 grid.
  assert results['config']['model'] is None
  assert results['config']['image_size'] == 16
  assert results['config']['scan'] and results['config']['remat'] == (
      '--remat' in flags)
  with open(out / 'results.json') as f:
    saved = json.load(f)
  assert set(saved['methods']) == set(methods)
  for run in saved['methods'].values():
    assert 0 <= run['id_accuracy'] <= 1 and run['deviation'] > 0
    deviation = run['history']['deviation']
    # Stacked leaves are logged per block, under the unrolled names.
    assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in deviation
    assert not any(k.startswith('Transformer/encoderblock/')
                   for k in deviation)
    assert 'MAPHead_0/probe' in deviation and 'pos_embedding' in deviation
    np.testing.assert_allclose(
        run['deviation'],
        np.sqrt(sum(v[-1] ** 2 for k, v in deviation.items()
                    if not k.startswith('head/'))), rtol=1e-6)
  if 'spd' in methods:
    spd_selected = saved['methods']['spd']['history']['selected']
    assert 'Transformer/encoderblock_0/LayerNorm_0/scale' in spd_selected
    assert (out / 'spd_selection.png').stat().st_size > 1000
  if 'ftp' in methods:
    ftp_gamma = saved['methods']['ftp']['history']['gamma']
    assert 'Transformer/encoderblock_1/LayerNorm_2/bias' in ftp_gamma
    assert (out / 'ftp_gamma.png').stat().st_size > 1000
  for name in ('accuracy', 'deviation'):
    assert (out / f'{name}.png').stat().st_size > 1000


def test_model_given_with_a_checkpoint_checks_its_shape(tmp_path, capsys):
  path = write_big_vision_checkpoint(tmp_path / 'bv.npz', stack=False)
  line = run_error(['--quiet', '--model', 'small', '--checkpoint', path],
                   capsys)
  assert 'another shape' in line and '--model' in line


def test_lora_with_scan_is_one_line_error(capsys):
  line = run_error(FAST + ['--scan', '--lora-rank', '2'], capsys)
  assert '--scan' in line and '--lora-rank' in line


def test_plot_names_cover_big_vision_and_map_head_leaves():
  from examples.vit import plots  # pylint: disable=g-import-not-at-top
  assert plots.short_name('pos_embedding') == 'pos_embedding'
  assert plots.layer_group('pos_embedding') == 'embeddings'
  assert plots.short_name('MAPHead_0/probe') == 'map.probe'
  assert plots.short_name(
      'MAPHead_0/MlpBlock_0/Dense_1/kernel') == 'map.mlp.fc2.kernel'
  assert plots.short_name(
      'MAPHead_0/LayerNorm_0/scale') == 'map.norm.scale'
  assert plots.layer_group('MAPHead_0/MultiHeadDotProductAttention_0/out/'
                           'kernel') == 'MAP head'
  assert plots.short_name('Transformer/encoderblock/MlpBlock_3/Dense_0/'
                          'kernel') == 'blocks mlp.fc1.kernel'
  order = sorted(['head/kernel', 'MAPHead_0/probe',
                  'Transformer/encoder_norm/scale',
                  'Transformer/encoderblock_1/LayerNorm_0/scale',
                  'pos_embedding'], key=plots.model_order)
  assert order == ['pos_embedding',
                   'Transformer/encoderblock_1/LayerNorm_0/scale',
                   'Transformer/encoder_norm/scale', 'MAPHead_0/probe',
                   'head/kernel']
