"""Starts N real JAX processes on localhost, as several hosts would run.

Each process gets its own CPU devices (`--xla_force_host_platform_device_count`
set in its environment before JAX is imported, whatever the parent's), the
coordinator's address on a free port (so two test runs never clash) and its
process id. A process that fails, or a run past its timeout, kills every
process of the run, and the error carries each process's exit status and the
end of its stderr.

    with LocalProcesses(command, num_processes=2, devices_per_process=2,
                        log_dir=tmp) as processes:
      ...                               # the parent works meanwhile
      processes.wait(timeout=120)
"""

import os
import re
import signal
import socket
import subprocess
import time
from typing import Callable, Sequence

import spd_optax

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(
    spd_optax.__file__)))
_DEVICE_COUNT_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')
# gloo's connection lines: noise in a failure's report.
_NOISE = re.compile(r'^\[Gloo\] ')


class ProcessesFailed(RuntimeError):
  """A process of a `LocalProcesses` run failed, or the run timed out."""


def free_port() -> int:
  """A port no one listens on now (the OS picks it: never a fixed one)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def child_environment(devices_per_process: int) -> dict[str, str]:
  """The parent's environment, with the children's own CPU device count."""
  env = dict(os.environ)
  flags = _DEVICE_COUNT_FLAG.sub('', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = (
      f'{flags} --xla_force_host_platform_device_count={devices_per_process}'
  ).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join(
      [REPOSITORY] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                      if p])
  return env


class LocalProcesses:
  """N processes of one command, process ids 0..N-1, one coordinator.

  Args:
    command: `(process_id, coordinator_address) -> argv`; Python scripts
      should start with `sys.executable`.
    num_processes: how many processes.
    devices_per_process: the CPU devices JAX gives each.
    log_dir: where each process's stdout and stderr are written.
  """

  def __init__(self, command: Callable[[int, str], Sequence[str]],
               num_processes: int, devices_per_process: int, log_dir: str):
    self.command = command
    self.num_processes = num_processes
    self.devices_per_process = devices_per_process
    self.log_dir = log_dir
    self.coordinator_address = f'127.0.0.1:{free_port()}'
    self.processes: list[subprocess.Popen] = []

  def _log(self, process_id, stream):
    return os.path.join(self.log_dir, f'process_{process_id}.{stream}')

  def __enter__(self):
    env = child_environment(self.devices_per_process)
    try:
      for process_id in range(self.num_processes):
        with open(self._log(process_id, 'stdout'), 'wb') as stdout, \
             open(self._log(process_id, 'stderr'), 'wb') as stderr:
          self.processes.append(subprocess.Popen(
              list(self.command(process_id, self.coordinator_address)),
              stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
              env=env, cwd=REPOSITORY,
              # Its own process group, so a kill reaches anything it started.
              start_new_session=True))
    except BaseException:
      self.kill()
      raise
    return self

  def __exit__(self, *exc_info):
    self.kill()

  def kill(self):
    """Kills every process of the run still alive, and reaps them all."""
    for process in self.processes:
      if process.poll() is None:
        try:
          os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for process in self.processes:
      process.wait()

  def stdout(self, process_id: int) -> str:
    with open(self._log(process_id, 'stdout'), errors='replace') as f:
      return f.read()

  def report(self, lines: int = 30) -> str:
    """Each process's exit status and the last lines of its stderr."""
    parts = []
    for process_id, process in enumerate(self.processes):
      with open(self._log(process_id, 'stderr'), errors='replace') as f:
        stderr = [line for line in f.read().splitlines()
                  if not _NOISE.match(line)]
      parts.append(
          f'--- process {process_id} (exit status {process.returncode}), '
          f'last {min(lines, len(stderr))} lines of stderr:\n'
          + '\n'.join(stderr[-lines:]))
    return '\n'.join(parts)

  def wait(self, timeout: float) -> None:
    """Waits for every process to succeed; kills them all at the first failure.

    Args:
      timeout: seconds from now for the whole run.

    Raises:
      ProcessesFailed: a process exited with a non-zero status (the others
        are killed at once, not left to JAX's heartbeat timeout), or the run
        passed `timeout`; with every process's stderr.
    """
    deadline = time.monotonic() + timeout
    while True:
      statuses = [process.poll() for process in self.processes]
      failed = [process_id for process_id, status in enumerate(statuses)
                if status not in (None, 0)]
      if failed:
        self.kill()
        raise ProcessesFailed(
            f'process {" and ".join(map(str, failed))} of '
            f'{self.num_processes} failed; killed the others.\n'
            f'{self.report()}')
      if all(status == 0 for status in statuses):
        return
      if time.monotonic() > deadline:
        self.kill()
        raise ProcessesFailed(
            f'{self.num_processes} processes not done after {timeout} s; '
            f'killed them all.\n{self.report()}')
      time.sleep(0.05)

