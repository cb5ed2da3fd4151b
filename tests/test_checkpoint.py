"""orbax checkpoints: the whole state round-trips, training resumes exactly.

The state holds the anchor, `optax.MaskedNode()` for a masked head and None
for `anchor="zero"`; all of it must come back, and a run resumed from a
checkpoint must be bit-for-bit the uninterrupted one. A checkpoint written
by another optimizer set-up must not restore quietly into the wrong slots:
`spd_optax.restore_state` says what differs.
"""

import functools
import shutil
import tempfile

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import spd_optax as spd

# When its restore raises (a mismatched checkpoint, on purpose here), orbax
# leaves reads un-awaited; Python reports them later, whatever test runs.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

MASK = {'backbone': True, 'head': False}

CONFIGS = {
    'spd': lambda: spd.adam_spd(3e-2, weight_decay=1.0),
    'spd_masked_head': lambda: spd.adam_spd(3e-2, weight_decay=1.0, mask=MASK),
    'spd_zero_anchor': lambda: spd.adam_spd(3e-2, weight_decay=1.0,
                                            anchor='zero'),
    'ftp': lambda: spd.adam_ftp(3e-2),
    'ftp_masked_head': lambda: spd.adam_ftp(3e-2, mask=MASK),
    'ftp_zero_anchor': lambda: spd.adam_ftp(3e-2, anchor='zero'),
}
# Trained and resumed: a masked head (an anchor with MaskedNodes) and the
# zero anchor (None), for each method.
TRAINED_CASES = tuple((name, name) for name in CONFIGS
                      if name.endswith(('masked_head', 'zero_anchor')))


def _normal(seed, shape, scale=1.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _pretrained():
  return {'backbone': {'kernel': _normal(0, (8, 16), 1 / 3),
                       'bias': _normal(1, (16,), 1 / 10)},
          'head': {'kernel': _normal(2, (16, 2), 1 / 3)}}


def _batch():
  x = _normal(3, (32, 8))
  return x, np.stack([np.sin(x.sum(-1)), np.cos(x[:, 0])], axis=-1)


def _loss(params, x, y):
  hidden = jnp.tanh(x @ params['backbone']['kernel']
                    + params['backbone']['bias'])
  return jnp.mean((hidden @ params['head']['kernel'] - y) ** 2)


@functools.lru_cache(maxsize=None)
def _config(name):
  """The optimizer and its jitted training step, built once per config."""
  opt = CONFIGS[name]()

  @jax.jit
  def step(params, state):
    grads = jax.grad(_loss)(params, *_batch())
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return opt, step


def _train(name, params, state, steps):
  _, step = _config(name)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _trained_state(name, steps=4):
  opt, _ = _config(name)
  return _train(name, _pretrained(), opt.init(_pretrained()), steps)


class CheckpointTest(parameterized.TestCase):

  def _save(self, tree, step=0):
    directory = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    with ocp.CheckpointManager(directory) as manager:
      manager.save(step, args=ocp.args.StandardSave(tree))
      manager.wait_until_finished()
      return manager.directory

  @parameterized.named_parameters(*TRAINED_CASES)
  def test_full_state_round_trips_with_anchor_masked_nodes_and_none(
      self, name):
    _, state = _trained_state(name)
    target = CONFIGS[name]().init(_pretrained())
    directory = self._save(state)
    with ocp.CheckpointManager(directory) as manager:
      restored = spd.restore_state(manager, 0, target)
    self.assertEqual(jax.tree.structure(restored), jax.tree.structure(state))
    chex.assert_trees_all_equal(restored, state)
    if name.endswith('zero_anchor'):
      self.assertIsNone(restored.anchor)
    else:
      chex.assert_trees_all_equal(
          restored.anchor['backbone'], _pretrained()['backbone'])
    if name.endswith('masked_head'):
      self.assertIsInstance(restored.anchor['head']['kernel'], optax.MaskedNode)

  @parameterized.named_parameters(*TRAINED_CASES)
  def test_resumed_training_is_bit_for_bit_the_uninterrupted_run(self, name):
    opt, _ = _config(name)
    uninterrupted = _train(name, _pretrained(), opt.init(_pretrained()), 10)

    halfway = _trained_state(name, steps=5)
    directory = self._save({'params': halfway[0], 'opt_state': halfway[1]})
    # A fresh process would build the target from the optimizer again.
    fresh = CONFIGS[name]()
    target = {'params': _pretrained(), 'opt_state': fresh.init(_pretrained())}
    with ocp.CheckpointManager(directory) as manager:
      restored = spd.restore_state(manager, 0, target)
    resumed = _train(name, restored['params'], restored['opt_state'], 5)
    chex.assert_trees_all_equal(resumed, uninterrupted)

  def test_restore_places_state_with_the_target_shardings(self):
    mesh = Mesh(np.array(jax.devices()), ('x',))
    params = _pretrained()
    params_sharding = {
        'backbone': {'kernel': NamedSharding(mesh, P(None, 'x')),
                     'bias': NamedSharding(mesh, P('x'))},
        'head': {'kernel': NamedSharding(mesh, P())}}
    _, state = _trained_state('spd_masked_head')
    directory = self._save(state)

    opt = CONFIGS['spd_masked_head']()
    abstract = jax.eval_shape(opt.init, params)
    shardings = spd.state_sharding(abstract, params, params_sharding)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings)
    with ocp.CheckpointManager(directory) as manager:
      restored = spd.restore_state(manager, 0, target)
    chex.assert_trees_all_equal(restored, state)
    self.assertEqual(restored.anchor['backbone']['kernel'].sharding,
                     params_sharding['backbone']['kernel'])
    self.assertEqual(
        restored.base_optimizer_state[0].mu['backbone']['bias'].sharding,
        params_sharding['backbone']['bias'])

  @parameterized.named_parameters(
      ('masked_head_into_unmasked', 'spd_masked_head', 'spd',
       r"anchor/head/kernel: in the target, not in the checkpoint"),
      ('unmasked_into_masked_head', 'spd', 'spd_masked_head',
       r"anchor/head/kernel: in the checkpoint, not in the target"),
      ('zero_anchor_into_init_anchor', 'spd_zero_anchor', 'spd',
       r"anchor/backbone/kernel: in the target, not in the checkpoint"),
      ('spd_into_ftp', 'spd', 'ftp', r"gamma/backbone/bias: in the target"),
  )
  def test_restoring_another_setup_fails_naming_what_differs(
      self, saved, target_name, message):
    directory = self._save(CONFIGS[saved]().init(_pretrained()))
    target = CONFIGS[target_name]().init(_pretrained())
    # Whether orbax itself lets the restore pass or raises, and whether or
    # not the manager was told the handler.
    for handlers in (ocp.StandardCheckpointHandler(), None):
      with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        with self.assertRaisesRegex(
            ValueError, 'another mask, anchor mode') as raised:
          spd.restore_state(manager, 0, target)
      self.assertRegex(str(raised.exception), message)

  def test_restoring_other_shapes_fails_naming_the_leaf(self):
    directory = self._save(CONFIGS['spd']().init(_pretrained()))
    wider = jax.tree.map(lambda a: np.concatenate([a, a], -1), _pretrained())
    target = CONFIGS['spd']().init(wider)
    with ocp.CheckpointManager(directory) as manager:
      with self.assertRaisesRegex(
          ValueError, r'anchor/backbone/kernel: shape \(8, 16\) in the '
          r'checkpoint, \(8, 32\) in the target'):
        spd.restore_state(manager, 0, target)

  def test_plain_orbax_restore_of_a_masked_checkpoint_leaves_none_slots(self):
    # Why `restore_state` checks: orbax itself takes an empty MaskedNode slot
    # for any leaf and returns None where the target has an array.
    directory = self._save(CONFIGS['spd_masked_head']().init(_pretrained()))
    target = CONFIGS['spd']().init(_pretrained())
    with ocp.CheckpointManager(directory) as manager:
      restored = manager.restore(0, args=ocp.args.StandardRestore(target))
    self.assertIsNone(restored.anchor['head']['kernel'])

  def test_plain_orbax_restore_after_a_mask_change_is_refused_at_update(self):
    # The newly constrained head comes back as None slots: SPD would pull it
    # toward zero, FTP would fail deep inside. `update` names the leaf.
    for saved, target_name in (('spd_masked_head', 'spd'),
                               ('ftp_masked_head', 'ftp')):
      directory = self._save(CONFIGS[saved]().init(_pretrained()))
      opt, step = _config(target_name)
      target = opt.init(_pretrained())
      with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(0, args=ocp.args.StandardRestore(target))
      with self.assertRaisesRegex(
          ValueError, r"`anchor` .*\['head'\]\['kernel'\] is None.*"
          r"spd_optax.restore_state"):
        step(_pretrained(), restored)

  def _one_line_error(self, manager, step):
    with self.assertRaises(ValueError) as raised:
      spd.restore_state(manager, step, CONFIGS['spd']().init(_pretrained()))
    message = str(raised.exception)
    self.assertNotIn('\n', message)
    self.assertIn(f'step {step}', message)
    self.assertIn(str(manager.directory), message)
    return message

  def test_restoring_a_missing_step_says_which_steps_there_are(self):
    directory = self._save(CONFIGS['spd']().init(_pretrained()), step=2)
    with ocp.CheckpointManager(directory) as manager:
      message = self._one_line_error(manager, 5)
    self.assertIn('[2]', message)

  def test_restoring_a_step_without_its_item_folder_says_so(self):
    directory = self._save(CONFIGS['spd']().init(_pretrained()), step=3)
    shutil.rmtree(directory / '3' / 'default')
    with ocp.CheckpointManager(directory) as manager:
      message = self._one_line_error(manager, 3)
    self.assertIn("item folder 'default'", message)

  def test_restoring_a_step_without_its_metadata_says_so(self):
    directory = self._save(CONFIGS['spd']().init(_pretrained()), step=3)
    (directory / '3' / 'default' / '_METADATA').unlink()
    with ocp.CheckpointManager(directory) as manager:
      message = self._one_line_error(manager, 3)
    self.assertIn('_METADATA', message)
