"""Several hosts for real: SPD and FTP in 2 JAX processes on localhost.

Two processes of `tests/multiprocess_worker.py` (2 CPU devices each, gloo
collectives, a coordinator on a free port) step SPD and FTP under `jax.jit`
with the params, the state and the batch split over the 4 devices of both:
FSDP (`spd.state_sharding`), data parallel (each process gives only its own
rows of the batch) and `shard_map` with `axis_name`. The FSDP states are also
saved with orbax by both processes at once and restored with
`spd.restore_state`. Meanwhile this process runs the same function on 4 of
its own devices: the same float32 program, split over one process, not two.
"""

import json
import os
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

import multiprocess_launch
import multiprocess_worker as worker

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
# For the whole run: about 30 s on 2 busy cores.
TIMEOUT = 240
# The round-off allowed between one process and two, in float32 epsilons of
# the leaf's largest magnitude. The two runs are one program but for who sums
# an all-reduce's parts: XLA's in-process collectives add the devices' parts
# in device order, gloo in its own, so one `psum` of 4 float32 vectors
# already differs in its last bit, and 8 Adam steps carry that along.
# Measured: at most 7 (SPD's ratio), 2.4 for the params; SPD's
# selections are equal, and a leaf that is 0 in one run is 0 in the other.
MAX_EPS_OF_SCALE = 16

CASES = tuple((f'{layout}_{opt_name}', layout, opt_name)
              for layout, opt_name in worker.CASES)
FSDP_OPTIMIZERS = tuple(opt_name for layout, opt_name in worker.CASES
                        if layout == 'fsdp')


def _two_process_run(root):
  """(each process's results, what each saw, the one-process reference)."""
  out = os.path.join(root, 'out')
  os.makedirs(out)
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'multiprocess_worker.py')
  command = lambda process_id, address: [
      sys.executable, script, '--coordinator-address', address,
      '--num-processes', str(NUM_PROCESSES), '--process-id', str(process_id),
      '--out', out, '--checkpoint-dir', os.path.join(root, 'checkpoint')]
  start = time.monotonic()
  with multiprocess_launch.LocalProcesses(
      command, NUM_PROCESSES, DEVICES_PER_PROCESS, log_dir=root) as processes:
    reference = worker.run_layouts(
        jax.devices()[:NUM_PROCESSES * DEVICES_PER_PROCESS])
    processes.wait(TIMEOUT - (time.monotonic() - start))
  results, seen = [], []
  for process_id in range(NUM_PROCESSES):
    name = os.path.join(out, f'process_{process_id}')
    with np.load(name + '.npz') as saved:
      results.append(dict(saved))
    with open(name + '.json') as f:
      seen.append(json.load(f))
  return results, seen, reference


def _of(results, prefix):
  """The entries under `prefix`, named without it."""
  return {key[len(prefix):]: value for key, value in results.items()
          if key.startswith(prefix)}


def _assert_within_round_off(actual, expected, key):
  """Equal, or within `MAX_EPS_OF_SCALE` float32 epsilons of the leaf's scale."""
  scale = np.max(np.abs(expected)) if expected.dtype != bool else 0
  if not scale:
    np.testing.assert_array_equal(actual, expected, err_msg=key)
    return
  error = np.max(np.abs(actual - expected)) / (np.finfo(np.float32).eps * scale)
  assert error <= MAX_EPS_OF_SCALE, (
      f'{key}: off by {error:.1f} epsilons of its scale {scale:.3g}')


def _start_value(key):
  value = worker.pretrained()
  for name in key.split('/'):
    value = value[name]
  return value


class TwoProcessesTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = tempfile.TemporaryDirectory(prefix='spd_multiprocess_')
    cls.results, cls.seen, cls.reference = _two_process_run(cls.root.name)

  @classmethod
  def tearDownClass(cls):
    cls.root.cleanup()
    super().tearDownClass()

  def test_two_processes_each_see_two_of_four_global_devices(self):
    for process_id, seen in enumerate(self.seen):
      self.assertEqual(seen['process_index'], process_id)
      self.assertEqual(seen['process_count'], NUM_PROCESSES)
      self.assertEqual(seen['device_count'],
                       NUM_PROCESSES * DEVICES_PER_PROCESS)
      self.assertEqual(seen['local_device_count'], DEVICES_PER_PROCESS)
      self.assertEqual(sorted(seen['device_processes']), [0, 0, 1, 1])

  def test_both_processes_hold_the_same_params_and_decisions(self):
    # Gathered split leaves, and each process's own copy of replicated ones
    # (data parallel's params, every decision): no host drifted.
    first, second = self.results
    self.assertEqual(sorted(first), sorted(second))
    for key in first:
      np.testing.assert_array_equal(first[key], second[key], err_msg=key)

  @parameterized.named_parameters(*CASES)
  def test_two_processes_give_the_one_process_trajectory(
      self, layout, opt_name):
    prefix = f'{layout}/{opt_name}/'
    mine = {key: value for key, value in _of(self.results[0], prefix).items()
            if not key.startswith('resumed_params/')}
    reference = _of(self.reference, prefix)
    self.assertEqual(sorted(mine), sorted(reference))
    for key, expected in reference.items():
      _assert_within_round_off(mine[key], expected, key)
    # The params moved, and the decisions changed along the way.
    for key, value in _of(mine, 'params/').items():
      self.assertGreater(np.max(np.abs(value - _start_value(key))), 1e-3, key)
    decisions = _of(mine, 'decisions/')
    if 'spd' in opt_name:
      selected = np.stack(list(_of(decisions, 'selected/').values()))
      self.assertTrue(selected.any() and not selected.all(), selected)
      ratios = np.stack(list(_of(decisions, 'ratio/').values()))
      self.assertGreater(ratios.max(), 0.0)
    else:
      gammas = np.stack(list(_of(decisions, 'gamma/').values()))
      # From 1e-8 at the first step to a learned radius for every leaf.
      self.assertLess(gammas[:, 0].max(), 1e-7)
      self.assertGreater(gammas[:, -1].min(), 1e-6)

  @parameterized.named_parameters(
      (opt_name, opt_name) for opt_name in FSDP_OPTIMIZERS)
  def test_state_saved_by_two_processes_resumes_the_trajectory_exactly(
      self, opt_name):
    run = _of(self.results[0], f'fsdp/{opt_name}/')
    resumed = _of(run, 'resumed_params/')
    self.assertNotEmpty(resumed)
    for key, value in resumed.items():
      np.testing.assert_array_equal(value, run['params/' + key], err_msg=key)

  def test_every_process_wrote_its_part_of_the_checkpoint(self):
    item = os.path.join(self.root.name, 'checkpoint', str(worker.SAVE_AT),
                        'default')
    parts = sorted(name for name in os.listdir(item)
                   if name.startswith('ocdbt.process_'))
    self.assertEqual(
        parts, [f'ocdbt.process_{i}' for i in range(NUM_PROCESSES)])


class LocalProcessesTest(absltest.TestCase):

  def test_a_failed_process_kills_the_others_and_reports_its_stderr(self):
    command = lambda process_id, address: [sys.executable, '-c', (
        'import sys, time\n'
        'if sys.argv[1] == "1": sys.exit("process one gives up")\n'
        'time.sleep(60)'), str(process_id)]
    with tempfile.TemporaryDirectory() as log_dir:
      start = time.monotonic()
      with multiprocess_launch.LocalProcesses(
          command, 2, 1, log_dir) as processes:
        with self.assertRaisesRegex(multiprocess_launch.ProcessesFailed,
                                    '(?s)process 1 of 2 failed.*gives up'):
          processes.wait(timeout=30)
      self.assertLess(time.monotonic() - start, 20)
    self.assertEqual(processes.processes[0].returncode, -9)

  def test_a_run_past_its_timeout_is_killed(self):
    command = lambda process_id, address: [
        sys.executable, '-c', 'import time; time.sleep(60)']
    with tempfile.TemporaryDirectory() as log_dir:
      with multiprocess_launch.LocalProcesses(
          command, 2, 1, log_dir) as processes:
        with self.assertRaisesRegex(multiprocess_launch.ProcessesFailed,
                                    'not done after'):
          processes.wait(timeout=0.5)
    self.assertEqual([p.returncode for p in processes.processes], [-9, -9])

  def test_children_get_their_own_device_count_whatever_the_parent_has(self):
    env = multiprocess_launch.child_environment(2)
    self.assertIn('--xla_force_host_platform_device_count=8',
                  os.environ['XLA_FLAGS'])
    self.assertEqual(
        env['XLA_FLAGS'].count('--xla_force_host_platform_device_count'), 1)
    self.assertIn('--xla_force_host_platform_device_count=2',
                  env['XLA_FLAGS'])


if __name__ == '__main__':
  absltest.main()
