"""The ViT example in several real processes: numbers, preemption, a lost one.

Two processes of 2 CPU devices each, started by `examples.vit.launch` on
localhost (a free port each time, gloo collectives), against one process
of 4 devices; then SIGTERM to one of them, and SIGKILL to one of them.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from examples.vit import devices
from examples.vit import launch as launch_lib
from examples.vit import train
from tests.test_vit_example import FAST
from tests.test_vit_example import REPO
from tests.test_vit_example import run_error
from tests.test_vit_example import write_domains
from tests.test_vit_example import write_tiny_checkpoint

STEPS = 12
HEARTBEAT = 10  # seconds, the lost-process test's --heartbeat-timeout
GRACE = 30  # seconds the launcher gives JAX's heartbeat before it kills

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='finds the processes in /proc')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this file's processes: the first
  launch compiles, the others read (a quarter less CPU each)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('JAX_COMPILATION_CACHE_DIR',
                 str(tmp_path_factory.mktemp('compilation_cache')))
    patch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    yield


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  write_tiny_checkpoint(root / 'ckpt.npz', image_size=16)
  return write_domains(root / 'domains'), str(root / 'ckpt.npz')


def flags(data, root) -> list[str]:
  """Adam-SPD on the tiny ViT, its large leaves split over every device
  (so each process holds other shards), a checkpoint every 4 steps."""
  domains, checkpoint = data
  return FAST + ['--data', domains, '--checkpoint', checkpoint,
                 '--optimizer', 'spd', '--steps', str(STEPS), '--shots', '0',
                 '--batch-size', '4', '--image-size', '8',
                 '--checkpoint-every', '4', '--fsdp', '--fsdp-min-size', '256',
                 '--results-dir', str(root / 'out'),
                 '--workdir', str(root / 'work')]


def child_of(pid: int, process_id: int) -> int:
  """The pid of the launcher's process `process_id`."""
  with open(f'/proc/{pid}/task/{pid}/children') as f:
    children = [int(c) for c in f.read().split()]
  for child in children:
    with open(f'/proc/{child}/cmdline') as f:
      argv = f.read().split('\0')
    if argv[argv.index('--process-id') + 1] == str(process_id):
      return child
  raise AssertionError(f'no process {process_id} among {children}')


def launch(argv, send=None, after_step=None, workdir=None):
  """Runs 2 processes of 2 CPU devices; with `send`, sends that signal to
  process 1 once step `after_step`'s checkpoint is in `workdir`.

  Returns the launcher's status, stdout, stderr, and the seconds from the
  signal to the end.
  """
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'examples.vit.launch', '--num-processes', '2',
       '--devices-per-process', '2', '--heartbeat-timeout', str(HEARTBEAT),
       '--grace', str(GRACE), '--'] + argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  sent = None
  if send is not None:
    step = os.path.join(workdir, 'spd', str(after_step))
    deadline = time.monotonic() + 240
    while not os.path.isdir(step):
      assert launcher.poll() is None, launcher.communicate()
      assert time.monotonic() < deadline, 'no checkpoint at step 4'
      time.sleep(0.05)
    os.kill(child_of(launcher.pid, 1), send)
    sent = time.monotonic()
  out, err = launcher.communicate(timeout=300)
  return (launcher.returncode, out, err,
          None if sent is None else time.monotonic() - sent)


def final_arrays(workdir):
  """The last checkpoint's params, optimizer state and data position, as
  NumPy arrays (whatever devices wrote them)."""
  path = os.path.join(workdir, 'spd')
  with ocp.CheckpointManager(path) as manager:
    assert manager.latest_step() == STEPS
  checkpointer = ocp.PyTreeCheckpointer()
  item = os.path.join(path, str(STEPS), 'default')
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
      checkpointer.metadata(item).item_metadata)
  return checkpointer.restore(
      item, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_same_run(results, expected, workdir, expected_workdir):
  """The same results.json (but the wall time), and the same final
  checkpoint bit for bit."""
  for name in ('wall_s', 'seeds'):
    results['methods']['spd'].pop(name)
    expected['methods']['spd'].pop(name)
  assert results['methods'] == expected['methods']
  saved, reference = final_arrays(workdir), final_arrays(expected_workdir)
  assert jax.tree.structure(saved) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


def read(root):
  with open(root / 'out' / 'results.json') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def two_processes(data, tmp_path_factory):
  """The uninterrupted run, in 2 processes."""
  root = tmp_path_factory.mktemp('two')
  status, out, err, _ = launch(flags(data, root))
  assert status == 0, err
  return root, out, err


@pytest.fixture(scope='module')
def one_process(data, tmp_path_factory):
  """The uninterrupted run in this process, on 4 of its 8 devices."""
  root = tmp_path_factory.mktemp('one')
  train.main(flags(data, root))
  assert jax.process_count() == 1
  return root


def test_two_processes_give_the_one_process_numbers_and_one_writer(
    two_processes, one_process):
  root, out, _ = two_processes
  two, one = read(root), read(one_process)
  assert two['config']['num_processes'] == 2
  spd_2, spd_1 = two['methods']['spd'], one['methods']['spd']
  assert spd_2['id_accuracy'] == spd_1['id_accuracy']
  assert spd_2['ood_accuracy'] == spd_1['ood_accuracy']
  assert spd_2['history']['step'] == spd_1['history']['step']
  # Gloo sums across the processes in another order than one process sums
  # its devices: equal to float round-off, not bit for bit.
  for name in ('loss', 'accuracy'):
    np.testing.assert_allclose(spd_2['history'][name],
                               spd_1['history'][name], rtol=1e-6)
  np.testing.assert_allclose(spd_2['deviation'], spd_1['deviation'],
                             rtol=1e-5)

  # Process 0 alone writes the metrics (a second writer would repeat each
  # line), the table, results.json and the figures (one code path).
  with open(root / 'out' / 'metrics_spd.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == list(range(2, 13, 2))
  table = [line for line in out.splitlines() if '| Adam-SPD' in line]
  assert len(table) == 1 and table[0].startswith('[0] '), out
  assert (root / 'out' / 'spd_selection.png').stat().st_size > 1000
  # Every process writes its shards of every checkpoint (the last 2 kept).
  kept = [p for p in os.listdir(root / 'work' / 'spd') if p.isdigit()]
  assert sorted(kept, key=int) == ['8', '12']
  for step in kept:
    item = root / 'work' / 'spd' / step / 'default'
    for process in (0, 1):
      assert os.listdir(item / f'ocdbt.process_{process}' / 'd')
      assert (item / 'array_metadatas' / f'process_{process}').exists()


def test_sigterm_to_one_process_stops_both_after_one_step_and_resumes_exactly(
    data, two_processes, tmp_path):
  argv = flags(data, tmp_path)
  status, _, err, _ = launch(argv, signal.SIGTERM, 4, str(tmp_path / 'work'))
  assert status == train.PREEMPTED, err
  lines = re.findall(r'^\[(\d)\] preempted at step (\d+); run the same '
                     r'command to resume\.$', err, re.MULTILINE)
  assert sorted(p for p, _ in lines) == ['0', '1'], err
  steps = {int(s) for _, s in lines}
  assert len(steps) == 1, err
  step = steps.pop()
  assert 4 < step < STEPS
  # Both stop on the same (logged) step, whose checkpoint is complete.
  assert launch_lib.last_complete_checkpoint(str(tmp_path / 'work')) == (
      str(tmp_path / 'work' / 'spd'), step)

  status, _, err, _ = launch(argv)
  assert status == 0, err
  assert f'[1] resumed from step {step} in' in err
  assert_same_run(read(tmp_path), read(two_processes[0]),
                  tmp_path / 'work', two_processes[0] / 'work')


def test_lost_process_ends_the_job_within_the_heartbeat_and_resumes(
    data, two_processes, tmp_path):
  argv = flags(data, tmp_path)
  status, _, err, elapsed = launch(argv, signal.SIGKILL, 4,
                                   str(tmp_path / 'work'))
  assert status == 5, err
  # The survivor's failed collective ends it at once, or JAX's heartbeat
  # (10 s, not its default 100) does, with its own message; the launcher
  # would kill it only 30 s after that, silently.
  assert elapsed < HEARTBEAT + GRACE, elapsed
  assert ('[0] process 0: a collective with the other processes failed' in err
          or 'the JAX distributed service detected fatal errors' in err), err
  last = err.strip().splitlines()[-1]
  found = re.fullmatch(
      r'lost process 1 \(killed by SIGKILL\); the others stopped; last '
      r'complete checkpoint: step (\d+) in (.*); run the same command to '
      r'resume\.', last)
  assert found, last
  step = int(found.group(1))
  assert found.group(2) == str(tmp_path / 'work' / 'spd') and step >= 4

  status, _, err, _ = launch(argv)
  assert status == 0, err
  assert f'[0] resumed from step {step} in' in err
  assert_same_run(read(tmp_path), read(two_processes[0]),
                  tmp_path / 'work', two_processes[0] / 'work')


def test_sigterm_mid_run_then_the_same_command_is_the_uninterrupted_run(
    data, one_process, tmp_path, capsys, monkeypatch):
  argv = flags(data, tmp_path)
  handler = signal.getsignal(signal.SIGTERM)
  batches = []
  place = devices.global_batch

  def global_batch(batch, sharding):  # The notice comes during step 7.
    batches.append(batch)
    if len(batches) == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return place(batch, sharding)
  monkeypatch.setattr(devices, 'global_batch', global_batch)
  with pytest.raises(SystemExit) as stop:
    train.main(argv)
  assert stop.value.code == train.PREEMPTED
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'preempted at step 7; run the same command to resume.')
  # Our handler is gone again.
  assert signal.getsignal(signal.SIGTERM) == handler
  monkeypatch.undo()

  train.main(argv)
  assert 'resumed from step 7 in' in capsys.readouterr().err
  assert_same_run(read(tmp_path), read(one_process), tmp_path / 'work',
                  one_process / 'work')


def test_process_flags_reach_jax_distributed_initialize(monkeypatch, capsys):
  calls = []

  def initialize(**kwargs):
    calls.append(kwargs)
    raise RuntimeError('stop here')
  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  with pytest.raises(RuntimeError, match='stop here'):
    train.main(FAST + ['--coordinator-address', 'localhost:1234',
                       '--num-processes', '2', '--process-id', '1',
                       '--local-device-ids', '0,1',
                       '--heartbeat-timeout', '7'])
  # --distributed alone: JAX detects the cluster.
  with pytest.raises(RuntimeError, match='stop here'):
    train.main(FAST + ['--distributed'])
  assert calls == [{'coordinator_address': 'localhost:1234',
                    'num_processes': 2, 'process_id': 1,
                    'local_device_ids': [0, 1],
                    'heartbeat_timeout_seconds': 7}, {}]
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'
  line = run_error(FAST + ['--process-id', '2', '--num-processes', '2'],
                   capsys)
  assert '--process-id 2' in line


def test_launcher_passes_on_a_usage_error_status(data, tmp_path):
  status, _, err, _ = launch(flags(data, tmp_path) + ['--steps', '0'])
  assert status == 2
  assert sorted(re.findall(r'^\[(\d)\] error: --steps must be positive\.$',
                           err, re.MULTILINE)) == ['0', '1'], err
