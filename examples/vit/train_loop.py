"""The training loop: steps, the logged history and metrics log, checkpoints."""

import contextlib
import json
import os
import signal
import sys
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from examples.vit import checkpointing
from examples.vit import configs
from examples.vit import devices
from examples.vit import models
from examples.vit import train_step as train_step_lib


class Stopped(Exception):
  """Raised by --stop-after once that step's checkpoint is written."""


class Preempted(Exception):
  """Raised after a preemption notice, once the step's checkpoint is written.

  `args`: the step, and the checkpoint's folder (None without `--workdir`).
  """


class PreemptionNotice:
  """SIGTERM, the notice a preemptible VM, SLURM or Kubernetes sends before
  it stops a job, asked about between steps.

  The signal handler only records the notice. One process stops after the
  step it is in. Several processes must stop after the same step: they
  share what they received on logged steps (every `--log-every` steps,
  where the host waits for the devices anyway; no host sync is added to
  the other steps) and stop together at the first logged step after the
  notice. A notice JAX's preemption service gives every process itself
  (`CheckpointManager.reached_preemption`, e.g. a TPU maintenance event)
  stops them at the step that service agrees on.
  """

  def __init__(self):
    self.received = False

  @contextlib.contextmanager
  def listening(self):
    """Records SIGTERM instead of dying of it, within the block."""
    self.received = False
    previous = signal.signal(signal.SIGTERM, self._record)
    try:
      yield self
    finally:  # None: a handler not set from Python (JAX's own).
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)

  def _record(self, signum, frame) -> None:
    del signum, frame
    self.received = True

  def reached(self, step: int, logged: bool) -> bool:
    """Whether every process stops after `step` (`logged`: a logged step)."""
    if jax.process_count() == 1:
      return self.received
    if ocp.multihost.reached_preemption(step):
      return True
    if not logged:
      return False
    return bool(np.any(multihost_utils.process_allgather(
        np.int32(self.received))))


# The process's SIGTERM (one per process, as signals are); `train.main`
# listens for it.
preemption = PreemptionNotice()


_STACKED = '/'.join(models.STACKED_BLOCKS) + '/'


def layer_values(tree) -> dict[str, Any]:
  """`{"embedding/kernel": value, ...}`; masked leaves are left out.

  A scanned model's stacked leaf (`Transformer/encoderblock/...`, one value
  per block) is logged per block under the unrolled model's name
  (`Transformer/encoderblock_{i}/...`), so both logs read alike.
  """
  values = {}
  for path, value in jax.tree_util.tree_leaves_with_path(tree):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    value = np.asarray(value)
    if name.startswith(_STACKED) and value.ndim == 1:
      rest = name[len(_STACKED):]
      for i, v in enumerate(value.tolist()):
        values[f'{_STACKED[:-1]}_{i}/{rest}'] = v
    else:
      values[name] = value.tolist()
  return values


class MetricsLog:
  """Appends `{"step", "loss", "accuracy", "lr", "deviation": {layer: ..},
  "selection_rate": {layer: ..}, ...}` lines to `path` (process 0 only), and
  writes scalars to TensorBoard when `tensorboardX` is importable."""

  def __init__(self, path: str | None, start_step: int):
    self.path = path if path and devices.is_writer() else None
    self.tensorboard = None
    if self.path is None:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    kept = []
    if start_step and os.path.exists(self.path):  # Resumed: drop later lines.
      with open(self.path) as f:
        kept = [line for line in f if json.loads(line)['step'] <= start_step]
    with open(self.path, 'w') as f:
      f.writelines(kept)
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self.tensorboard = tensorboardX.SummaryWriter(
          os.path.splitext(self.path)[0] + '_tensorboard')
    except ImportError:
      pass

  def write(self, record: dict[str, Any]) -> None:
    if self.path is None:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self.tensorboard is not None:
      for name in ('loss', 'accuracy', 'lr'):
        self.tensorboard.add_scalar(name, record[name], record['step'])
      for name in ('deviation', 'selection_rate'):
        for layer, value in record.get(name, {}).items():
          self.tensorboard.add_scalar(f'{name}/{layer}', value, record['step'])
      self.tensorboard.flush()


def train(state: train_step_lib.TrainState, batches, steps: int,
          config: configs.Config, desc: str, mesh: Mesh,
          schedule: optax.Schedule | None = None, workdir: str | None = None,
          fingerprint: dict[str, Any] | None = None,
          metrics_path: str | None = None):
  """Runs `steps` of `train_step`; returns the state and the logged history.

  The step donates the state: `state` is consumed (its buffers are reused by
  the steps), so it must share no buffer with arrays the caller keeps, as a
  state made by `train_step.create_state` does not.

  Every `config.log_every` steps the history gets the step, the mean loss
  and accuracy of the window, each leaf's deviation and FTP radius at that
  step, and SPD's per-leaf selection rate and mean ratio over the window;
  the same goes to `metrics_path` (JSONL) with the learning rate. With
  `workdir`, a checkpoint is saved every `config.checkpoint_every` steps and
  at the end, and training resumes from the latest one there.
  """
  shardings = devices.state_shardings(state, mesh, config.fsdp_min_size)
  data_sharding = devices.batch_sharding(mesh)
  step_fn = train_step_lib.make_train_step(shardings, data_sharding)
  state = jax.device_put(state, shardings)
  history: dict[str, Any] = {'step': [], 'loss': [], 'accuracy': []}
  manager = None
  if workdir is not None:
    manager, state, saved = checkpointing.open_workdir(
        workdir, fingerprint or {}, state, batches, shardings, mesh)
    history = saved or history
  pending = history.pop('window', None)  # Steps run before the resume.
  start = int(state.step)
  log = MetricsLog(metrics_path, start)
  window = []
  bar = tqdm.tqdm(total=steps, initial=start, desc=desc, disable=config.quiet,
                  leave=True, dynamic_ncols=True, file=sys.stderr)
  for step in range(start + 1, steps + 1):
    state, metrics = step_fn(
        state, devices.global_batch(next(batches), data_sharding))
    if pending:
      window = window_from_json(pending, metrics)
      pending = None
    window.append(metrics)
    logged = step % config.log_every == 0 or step == steps
    if logged:
      _log_window(history, jax.device_get(window),
                  jax.device_get(train_step_lib.logged_metrics(state)), step,
                  schedule, log)
      bar.set_postfix(loss=f'{history["loss"][-1]:.3f}',
                      acc=f'{history["accuracy"][-1]:.2f}')
      bar.update(step - bar.n)
      window = []
    preempted = preemption.reached(step, logged)
    if manager is not None and (step % config.checkpoint_every == 0
                                or step == steps or preempted):
      # Orbax copies the arrays to the host before `save` returns, so the
      # next step may donate them.
      manager.save(step, args=ocp.args.StandardSave(
          checkpointing.checkpoint_item(state, batches)), force=True)
      if devices.is_writer():
        # With the steps since the last logged one, so that a resumed run
        # logs the same means.
        record = dict(history, window=window_to_json(jax.device_get(window)))
        (epath.Path(os.path.abspath(workdir)) / f'history_{step}.json'
         ).write_text(json.dumps(record))
    if preempted:
      if manager is not None:
        manager.wait_until_finished()
        manager.close()
      bar.close()
      raise Preempted(step, None if workdir is None
                      else os.path.abspath(workdir))
    if config.stop_after is not None and step - start == config.stop_after:
      if manager is not None:  # As if killed: later steps are not saved.
        manager.wait_until_finished()
        manager.close()
      bar.close()
      raise Stopped(step)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  bar.close()
  return state, history


def window_to_json(window) -> list[list[dict[str, Any]]]:
  """The metrics of unlogged steps as JSON: each step's leaves, exactly."""
  return [[{'dtype': np.asarray(x).dtype.str, 'value': np.asarray(x).tolist()}
           for x in jax.tree.leaves(metrics)] for metrics in window]


def window_from_json(saved, like) -> list[Any]:
  """`window_to_json`'s steps back, in the structure of the metrics `like`."""
  treedef = jax.tree.structure(like)
  return [treedef.unflatten([np.asarray(x['value'], x['dtype']) for x in m])
          for m in saved]


def _log_window(history, window, logged, step, schedule,
                log: MetricsLog) -> None:
  """Adds a logged step to `history` and `log`: the window's mean loss and
  accuracy, SPD's mean selection and ratio, and `logged` (the step's
  deviation, FTP's gamma) as they are."""
  history['step'].append(step)
  for name in ('loss', 'accuracy'):
    history[name].append(float(np.mean([m[name] for m in window])))
  averaged = {'deviation': logged['deviation']}
  if 'gamma' in logged:
    averaged['gamma'] = logged['gamma']
  for name in ('selected', 'ratio'):
    if name in window[-1]:
      # The mean over the window (per block for a stacked leaf).
      averaged[name] = jax.tree.map(
          lambda *xs: np.mean(np.asarray(xs, np.float32), axis=0),
          *[m[name] for m in window])
  record = {'step': step, 'loss': history['loss'][-1],
            'accuracy': history['accuracy'][-1],
            'lr': float(schedule(step - 1)) if schedule is not None else None}
  for name, tree in averaged.items():
    values = layer_values(tree)
    record['selection_rate' if name == 'selected' else name] = values
    for layer, value in values.items():
      history.setdefault(name, {}).setdefault(layer, []).append(value)
  log.write(record)
