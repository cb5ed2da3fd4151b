"""The ViT example at scale: device mesh, resume, LoRA, metrics, multi-host."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from examples.vit import configs
from examples.vit import devices
from examples.vit import input_pipeline
from examples.vit import models
from examples.vit import study
from examples.vit import train
from examples.vit import train_loop
from examples.vit import train_step
from tests.test_vit_example import FAST
from tests.test_vit_example import run_error
from tests.test_vit_example import write_domains
from tests.test_vit_example import write_tiny_checkpoint


@pytest.fixture(scope='module')
def setup():
  """A tiny pre-trained-like model and 64 digits to fine-tune on."""
  model = models.VisionTransformer(10, models.VIT_CONFIGS['tiny'])
  params = models.init_params(model, 16, seed=0)
  # A non-zero head, so the loss moves from the first step.
  params = dict(params, head=dict(params['head'], kernel=jax.random.normal(
      jax.random.key(1), params['head']['kernel'].shape) * 0.3))
  domains = input_pipeline.digits_domains(domains=('clean',),
                                          fractions=(0.0, 0.7), seed=0)
  records = domains.splits['clean']['finetune'][:64]
  return model, params, records


def tiny_config(**kwargs):
  return configs.Config(**dict(dict(
      model='tiny', image_size=16, steps=4, batch_size=8, warmup_steps=1,
      log_every=1, quiet=True, fsdp_min_size=256, results_dir=''), **kwargs))


def run(setup, method, config, mesh):
  model, params, records = setup
  state = study.make_state(method, model, params, config)
  batches = input_pipeline.train_batches(records, 16, config.batch_size, 1)
  return train_loop.train(state, batches, config.steps, config, method, mesh)


def test_mesh_shapes():
  assert dict(devices.make_mesh(tiny_config()).shape) == {'data': 8, 'fsdp': 1}
  assert dict(devices.make_mesh(tiny_config(fsdp=True)).shape) == {
      'data': 1, 'fsdp': 8}
  # As many devices as divide the batch size.
  assert dict(devices.make_mesh(tiny_config(batch_size=4)).shape) == {
      'data': 4, 'fsdp': 1}
  with pytest.raises(configs.UsageError, match='--mesh-fsdp 3'):
    devices.make_mesh(tiny_config(mesh_fsdp=3))


@pytest.mark.parametrize('method', ['spd', 'ftp'])
def test_sharded_run_matches_single_device(setup, method):
  assert jax.device_count() == 8
  config = tiny_config(mesh_fsdp=4, steps=3)
  one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                          ('data', 'fsdp'))
  mesh = devices.make_mesh(config)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  state_1, history_1 = run(setup, method, config, one)
  state_8, history_8 = run(setup, method, config, mesh)
  np.testing.assert_allclose(history_8['loss'], history_1['loss'], rtol=1e-5)
  print(f'{method}: max |loss difference| sharded vs single device: '
        f'{np.max(np.abs(np.subtract(history_8["loss"], history_1["loss"]))):.2e}')
  # The attention key bias has a zero gradient in exact arithmetic (softmax
  # ignores a shift shared by all keys); Adam normalizes its round-off to
  # steps of ~lr whose sign depends on the reduction order, so it is left out.
  for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(jax.device_get(state_8.params)),
      jax.tree.leaves(jax.device_get(state_1.params))):
    if "['key']['bias']" not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  # Large leaves (>= 256 elements) and their optimizer state, anchor
  # included, are split over fsdp; small params are replicated (FTP's
  # per-row statistics of a large leaf follow its split).
  big = [p.shape for p in jax.tree.leaves(state_8.params) if p.size >= 256]
  assert big
  sharded = 0
  for leaf in jax.tree.leaves(state_8):
    if getattr(leaf, 'shape', None) in big:
      assert 'fsdp' in jax.tree.leaves(tuple(leaf.sharding.spec)), leaf.shape
      sharded += 1
  for leaf in jax.tree.leaves(state_8.params):
    if leaf.size < 256:
      assert leaf.sharding.is_fully_replicated
  # params, Adam's mu and nu, the optimizer's anchor (the only copy of the
  # pre-trained weights: TrainState's anchor holds only the head's).
  assert sharded >= 4 * len(big)


def test_lora_in_bfloat16_trains_only_adapters_and_head(setup):
  model, params, records = setup
  config = tiny_config(lora_rank=2, steps=3, dtype='bfloat16')
  bf16 = models.VisionTransformer(10, models.VIT_CONFIGS['tiny'],
                                  dtype=np.dtype('bfloat16'))
  state, history = run((bf16, params, records), 'spd', config,
                       devices.make_mesh(config))
  assert np.isfinite(history['loss']).all()
  # bfloat16 activations; float32 params and optimizer state.
  for leaf in jax.tree.leaves((state.params, state.opt_state, state.frozen)):
    if np.issubdtype(leaf.dtype, np.floating):
      assert leaf.dtype == np.float32
  frozen = jax.device_get(state.frozen)
  for name, sub in frozen.items():
    for a, b in zip(jax.tree.leaves(sub),
                    jax.tree.leaves(jax.device_get(params[name]))):
      np.testing.assert_array_equal(a, b)
  trained = jax.device_get(state.params)
  assert all(np.abs(ab['b']).max() > 0 for ab in trained['lora'].values())
  assert np.abs(trained['head']['kernel']).max() > 0
  assert len(trained['lora']) == 4 * 2  # q, k, v, out in both blocks
  # No copy of the backbone or the adapters for the drift: an adapter's
  # logged deviation is its change of the kernel, ||scale * a @ b||.
  assert devices.tree_bytes(state.anchor) == devices.tree_bytes(params['head'])
  assert set(history['deviation']) == (
      {f'lora/{name}' for name in trained['lora']}
      | {'head/kernel', 'head/bias'})
  for name, ab in trained['lora'].items():
    change = state.lora_scale * (np.float64(ab['a']) @ np.float64(ab['b']))
    np.testing.assert_allclose(history['deviation'][f'lora/{name}'][-1],
                               np.linalg.norm(change), rtol=1e-5)

  # Adam's two moments of the adapters and head, and SPD's few scalars.
  fresh = study.make_state('spd', model, params, config)
  opt_bytes = devices.tree_bytes(fresh.opt_state)
  trainable = devices.tree_bytes(fresh.params)
  assert 2 * trainable <= opt_bytes < 2 * trainable + 1024
  assert opt_bytes < devices.tree_bytes(params)


def one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'fsdp'))


def test_train_step_donates_the_state_but_not_the_pretrained_params(setup):
  model, params, records = setup
  config = tiny_config()
  mesh = one_device_mesh()
  state = study.make_state('spd', model, params, config, mesh)
  shardings = devices.state_shardings(state, mesh, config.fsdp_min_size)
  data_sharding = devices.batch_sharding(mesh)
  step_fn = train_step.make_train_step(shardings, data_sharding)
  batch = devices.global_batch(
      next(input_pipeline.train_batches(records, 16, 8, 1)), data_sharding)
  # Params-shaped leaves (SPD's per-leaf scalars are not read, so XLA gets
  # no buffer for them to reuse).
  before = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim]
  compiled = step_fn.lower(state, batch).compile()
  assert compiled.memory_analysis().alias_size_in_bytes >= devices.tree_bytes(
      (state.params, state.opt_state))
  compiled(state, batch)
  # XLA wrote the new state over the old one...
  assert all(leaf.is_deleted() for leaf in before)
  # ...which was a copy: the pre-trained weights, kept by the caller (the
  # study makes every method's state from them), are intact.
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize('method', ['adamw', 'l2sp', 'spd', 'ftp'])
def test_state_holds_the_pretrained_weights_once(setup, method):
  model, params, _ = setup
  state = study.make_state(method, model, params, tiny_config())
  names = list(train_loop.layer_values(params))
  kept = dict(zip(names, train_step.optimizer_anchor(state.opt_state,
                                                     state.params)))
  own = train_loop.layer_values(state.anchor)
  if method == 'adamw':  # No anchor in the optimizer: one copy of its own.
    assert set(own) == set(names)
    assert all(a is None for a in kept.values())
  else:  # The optimizer's anchor, and a copy of the unconstrained head only.
    assert set(own) == {'head/kernel', 'head/bias'}
    assert all((kept[n] is None) == n.startswith('head/') for n in names)
  flat = train_loop.layer_values(params)
  for name in names:
    np.testing.assert_array_equal(own.get(name, kept[name]), flat[name])
  # The logged drift is measured from that one copy.
  moved = state.replace(params=jax.tree.map(lambda p: p + 0.5, state.params))
  deviation = train_loop.layer_values(
      jax.device_get(train_step.logged_metrics(moved)['deviation']))
  for name in names:
    np.testing.assert_allclose(deviation[name],
                               0.5 * np.sqrt(np.size(flat[name])), rtol=1e-5)
  # Every leaf is its own buffer (the donated step needs it), none the
  # caller's.
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)
  assert not set(pointers) & {x.unsafe_buffer_pointer()
                              for x in jax.tree.leaves(params)}


def test_drift_logged_on_logged_steps_is_the_every_step_drift(setup):
  """The drift, now measured only on logged steps, is what the old step (not
  donated, `||p - anchor||` every step) gave at those steps."""
  model, params, records = setup
  method = 'spd'
  config = tiny_config(steps=5, log_every=2)
  _, history = run(setup, method, config, one_device_mesh())
  assert history['step'] == [2, 4, 5]

  state = study.make_state(method, model, params, config)
  undonated = jax.jit(train_step.train_step)
  batches = input_pipeline.train_batches(records, 16, config.batch_size, 1)
  pretrained = jax.device_get(params)
  expected = {}
  for step in range(1, config.steps + 1):
    state, _ = undonated(state, next(batches))
    drift = jax.tree.map(
        lambda p, a: np.linalg.norm(np.float64(p) - np.float64(a)),
        jax.device_get(state.params), pretrained)
    if step in history['step']:
      for layer, value in train_loop.layer_values(drift).items():
        expected.setdefault(layer, []).append(value)
  assert set(history['deviation']) == set(expected)
  for layer, values in expected.items():
    np.testing.assert_allclose(history['deviation'][layer], values,
                               rtol=1e-5, atol=1e-8, err_msg=layer)


def test_study_with_lora_writes_metrics_jsonl(tmp_path):
  data = write_domains(tmp_path / 'data')
  write_tiny_checkpoint(tmp_path / 'ckpt.npz', image_size=16)
  out = tmp_path / 'out'
  results = train.main(FAST + [
      '--data', data, '--checkpoint', str(tmp_path / 'ckpt.npz'),
      '--steps', '3', '--shots', '0', '--batch-size', '8', '--image-size', '8',
      '--log-every', '1', '--lora-rank', '2', '--results-dir', str(out)])
  assert set(results['methods']) == {'adamw', 'spd'}
  assert results['methods']['spd']['name'] == 'Adam-SPD+LoRA'
  memory = results['methods']['spd']['memory']
  assert memory['opt_state_bytes'] < memory['model_bytes']
  for method in ('adamw', 'spd'):
    with open(out / f'metrics_{method}_lora.jsonl') as f:
      records = [json.loads(line) for line in f]
    assert [r['step'] for r in records] == [1, 2, 3]
    for r in records:
      assert {'step', 'loss', 'accuracy', 'lr', 'deviation'} <= set(r)
      assert np.isfinite(r['loss']) and r['lr'] >= 0 and r['deviation']
  assert records[0]['selection_rate']  # SPD's, per adapter leaf


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path, capsys):
  data = write_domains(tmp_path / 'data')
  write_tiny_checkpoint(tmp_path / 'ckpt.npz', image_size=16)
  argv = FAST + ['--data', data, '--checkpoint', str(tmp_path / 'ckpt.npz'),
                 '--optimizer', 'spd', '--steps', '4', '--shots', '0',
                 '--batch-size', '4', '--image-size', '8',
                 '--checkpoint-every', '2', '--results-dir',
                 str(tmp_path / 'out')]
  whole = train.main(argv + ['--workdir', str(tmp_path / 'a')])
  # Killed after 3 steps (step 3 is lost), then the same command again
  # resumes from step 2 and finishes.
  killed = argv + ['--workdir', str(tmp_path / 'b'), '--stop-after', '3']
  with pytest.raises(SystemExit) as stop:
    train.main(killed)
  assert stop.value.code == 3
  resumed = train.main(killed)
  assert 'resumed from step 2' in capsys.readouterr().err
  assert (resumed['methods']['spd']['history']['loss']
          == whole['methods']['spd']['history']['loss'])

  def final(workdir):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.CheckpointManager(os.path.abspath(workdir / 'spd')) as manager:
      assert manager.latest_step() == 4
      return manager.restore(4, args=ocp.args.StandardRestore())
  a, b = final(tmp_path / 'a'), final(tmp_path / 'b')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)

  # Another run's flags, or another optimizer layout: a one-line error.
  line = run_error(argv + ['--workdir', str(tmp_path / 'a'), '--lr', '0.5'],
                   capsys)
  assert 'lr=' in line and str(tmp_path / 'a') in line
  shutil.copytree(tmp_path / 'a' / 'spd', tmp_path / 'c' / 'ftp')
  os.remove(tmp_path / 'c' / 'ftp' / 'run.json')
  line = run_error(argv + ['--workdir', str(tmp_path / 'c'),
                           '--optimizer', 'ftp'], capsys)
  assert 'cannot resume from step 4' in line and 'optimizer' in line
  # A corrupt checkpoint: one line, not a fresh start.
  for entry in os.listdir(tmp_path / 'b' / 'spd' / '4'):
    shutil.rmtree(tmp_path / 'b' / 'spd' / '4' / entry, ignore_errors=True)
  line = run_error(argv + ['--workdir', str(tmp_path / 'b')], capsys)
  assert 'cannot' in line and 'step 4' in line


def test_hosts_read_disjoint_slices_of_the_single_host_order(setup):
  assert input_pipeline.host_rows(8, 0, 1) == slice(0, 8)
  assert input_pipeline.host_rows(8, 3, 4) == slice(6, 8)
  with pytest.raises(input_pipeline.DataError):
    input_pipeline.host_rows(6, 0, 4)
  _, _, records = setup
  single = input_pipeline.train_batches(records, 16, 8, seed=1)
  hosts = [input_pipeline.train_batches(records, 16, 8, seed=1,
                                        process_index=i, process_count=4)
           for i in range(4)]
  for _ in range(3):
    batch = next(single)
    parts = [next(h) for h in hosts]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([p[key] for p in parts]), batch[key])


def test_only_process_zero_writes(tmp_path, monkeypatch):
  data = write_domains(tmp_path / 'data')
  write_tiny_checkpoint(tmp_path / 'ckpt.npz', image_size=16)
  monkeypatch.setattr(devices, 'is_writer', lambda: False)
  out = tmp_path / 'out'
  results = train.main(FAST + [
      '--data', data, '--checkpoint', str(tmp_path / 'ckpt.npz'),
      '--optimizer', 'adamw', '--steps', '2', '--shots', '0',
      '--batch-size', '4', '--image-size', '8', '--results-dir', str(out)])
  assert results['methods']['adamw']['history']['step'] == [2]
  assert not out.exists()
