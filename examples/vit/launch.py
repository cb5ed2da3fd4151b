r"""Runs the example as N processes on this machine, as N hosts would run it.

  python -m examples.vit.launch --num-processes 2 --devices-per-process 2 \
      -- --optimizer spd --workdir runs/spd

starts `python -m examples.vit.train --coordinator-address localhost:PORT
--num-processes 2 --process-id I <the flags after -->` for I = 0, 1, with
PORT a free one (asked of the system, so two launches do not clash). Each
process gets `--devices-per-process` CPU devices of its own, or with
`--platform gpu` that many GPUs (`--local-device-ids`: process I gets GPUs
I*K to I*K+K-1). The processes' output is forwarded line by line, each line
prefixed with `[I]`. A SIGTERM or Ctrl-C to the launcher is sent on to every
process as SIGTERM: they stop at one step, save it and exit (status 4, see
`train.py`); the processes end with the launcher.

Exit status: 0 when every process ends well; the processes' own status when
they agree (2: usage error, 3: `--stop-after`, 4: preempted); else 5, a lost
process, with one line on stderr naming it, how it ended, and the last
complete checkpoint in `--workdir` (the same command resumes from it). The
others stop within `--heartbeat-timeout` seconds of the loss (a failed
collective or the JAX runtime's heartbeat ends them; the launcher ends what
is left `--grace` seconds later).
"""

import argparse
from collections.abc import Sequence
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# Exit statuses (train.py's, and the launcher's own).
USAGE, STOPPED, PREEMPTED, LOST = 2, 3, 4, 5
# How a process that outlived a lost one ends: it says so (LOST), or JAX's
# runtime aborts it (SIGABRT: -6 from Popen, 134 from a shell).
_SURVIVOR_STATUSES = (LOST, -signal.SIGABRT, 128 + signal.SIGABRT)
DEFAULT_HEARTBEAT_TIMEOUT = 100  # seconds, JAX's default


def free_port() -> int:
  """A TCP port no one listens on now (the system's pick for port 0)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def child_env(platform: str, devices_per_process: int,
              environ: dict[str, str] | None = None) -> dict[str, str]:
  """A process's environment: on CPU, `devices_per_process` devices of its
  own (set before JAX is imported, as XLA reads the flag once; an inherited
  device count is replaced)."""
  env = dict(os.environ if environ is None else environ)
  env['PYTHONUNBUFFERED'] = '1'
  if platform == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
    flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                   env.get('XLA_FLAGS', ''))
    env['XLA_FLAGS'] = (flags + ' --xla_force_host_platform_device_count='
                        f'{devices_per_process}').strip()
  return env


def child_argv(process_id: int, args: argparse.Namespace,
               port: int) -> list[str]:
  argv = [sys.executable, '-m', 'examples.vit.train',
          '--coordinator-address', f'localhost:{port}',
          '--num-processes', str(args.num_processes),
          '--process-id', str(process_id)]
  if args.heartbeat_timeout is not None:
    argv += ['--heartbeat-timeout', str(args.heartbeat_timeout)]
  if args.platform == 'gpu':
    k = args.devices_per_process
    argv += ['--local-device-ids',
             ','.join(str(process_id * k + j) for j in range(k))]
  return argv + list(args.train_flags)


def _own_group_dying_with_us() -> None:
  """In the child before it runs: its own process group, so that a Ctrl-C
  reaches the launcher only (which sends SIGTERM on), and on Linux a
  SIGTERM when the launcher dies (so none is left running)."""
  os.setpgid(0, 0)
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line)
    out.flush()
  stream.close()


def _flag_value(flags: Sequence[str], name: str) -> str | None:
  """The value of `--name V` or `--name=V` in `flags` (the last one)."""
  value = None
  for i, flag in enumerate(flags):
    if flag == name and i + 1 < len(flags):
      value = flags[i + 1]
    elif flag.startswith(name + '='):
      value = flag.split('=', 1)[1]
  return value


def how_it_ended(status: int) -> str:
  if status < 0:
    return f'killed by {signal.Signals(-status).name}'
  return f'exit status {status}'


def last_complete_checkpoint(workdir: str) -> tuple[str, int] | None:
  """`(DIR/<run>, step)` of the newest complete checkpoint under `workdir`.

  A step is complete once orbax has committed it (its folder renamed from
  the temporary name and `commit_success.txt` written, once every process
  has written its part); of the runs' folders (`checkpointing.py`: one per
  method and seed) the one written last counts. None when there is none.
  Read from the folders without JAX or orbax, so that the launcher stays
  light and answers at once.
  """
  root = os.path.abspath(workdir)
  newest = None
  if not os.path.isdir(root):
    return None
  for run in os.listdir(root):
    run_dir = os.path.join(root, run)
    if not os.path.isdir(run_dir):
      continue
    for step in os.listdir(run_dir):
      committed = os.path.join(run_dir, step, 'commit_success.txt')
      if step.isdigit() and os.path.exists(committed):
        key = (os.path.getmtime(committed), int(step))
        if newest is None or key > newest[0]:
          newest = (key, run_dir, int(step))
  return None if newest is None else (newest[1], newest[2])


def lost_line(process_id: int, status: int, flags: Sequence[str]) -> str:
  """The one line a lost process gets: who, how, and where to resume."""
  workdir = _flag_value(flags, '--workdir')
  if workdir is None:
    where = 'no --workdir: nothing to resume from'
  else:
    latest = last_complete_checkpoint(workdir)
    where = ('no complete checkpoint yet in ' + os.path.abspath(workdir)
             if latest is None else
             f'last complete checkpoint: step {latest[1]} in {latest[0]}')
  return (f'lost process {process_id} ({how_it_ended(status)}); the others '
          f'stopped; {where}; run the same command to resume.')


def launch(args: argparse.Namespace) -> int:
  """Starts the processes, forwards their output; returns the exit status."""
  port = args.port or free_port()
  children = []
  threads = []
  for i in range(args.num_processes):  # (No thread yet: see preexec_fn.)
    children.append(subprocess.Popen(
        child_argv(i, args, port),
        env=child_env(args.platform, args.devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        errors='replace', preexec_fn=_own_group_dying_with_us))
  for i, child in enumerate(children):
    for stream, out in ((child.stdout, sys.stdout), (child.stderr,
                                                     sys.stderr)):
      thread = threading.Thread(target=_forward, args=(stream, f'[{i}] ', out),
                                daemon=True)
      thread.start()
      threads.append(thread)
  received = []

  def send_on(signum, frame):
    """SIGTERM (a preemption notice) or Ctrl-C: every process gets SIGTERM,
    stops at one step, saves it and exits."""
    del frame
    received.append(signum)
    for child in children:
      if child.poll() is None:
        child.send_signal(signal.SIGTERM)
  previous = {s: signal.signal(s, send_on)
              for s in (signal.SIGTERM, signal.SIGINT)}
  timeout = args.heartbeat_timeout or DEFAULT_HEARTBEAT_TIMEOUT
  failed_at = {}  # process id -> when its failure was first seen
  try:
    while any(child.poll() is None for child in children):
      for i, child in enumerate(children):
        if child.poll() not in (None, 0):
          failed_at.setdefault(i, time.monotonic())
      if (failed_at and
          time.monotonic() - min(failed_at.values()) > timeout + args.grace):
        for child in children:  # The runtime did not end them: we do.
          if child.poll() is None:
            child.kill()
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for thread in threads:
    thread.join(timeout=5)
  statuses = [child.returncode for child in children]
  if all(s == 0 for s in statuses):
    return 0
  if len(set(statuses)) == 1 and statuses[0] in (USAGE, STOPPED, PREEMPTED):
    return statuses[0]
  if received:  # Stopped by the user (Ctrl-C), not lost: their status.
    status = next(s for s in statuses if s)
    return status if status > 0 else 128 - status
  for i, s in enumerate(statuses):
    if s:
      failed_at.setdefault(i, float('inf'))
  # The lost process is the first seen to fail, but a survivor that reported
  # the loss (LOST) or was aborted by JAX's runtime (SIGABRT) is never it:
  # within one poll the survivor may be seen first.
  lost = min(failed_at, key=lambda i: (statuses[i] in _SURVIVOR_STATUSES,
                                       failed_at[i], i))
  print(lost_line(lost, statuses[lost], args.train_flags), file=sys.stderr)
  return LOST


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
  """The docstring as written; a flag's default unless it is None."""

  def _get_help_string(self, action):
    if action.default is None:
      return action.help
    return super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m examples.vit.launch',
      usage='%(prog)s [-h] --num-processes N [options] -- [train.py flags]',
      description=__doc__, formatter_class=_HelpFormatter)
  a = parser.add_argument
  a('--num-processes', type=int, required=True, metavar='N',
    help='processes to start.')
  a('--devices-per-process', type=int, default=1, metavar='K',
    help='devices each process gets: K CPU devices of its own, or with '
    '--platform gpu K GPUs.')
  a('--platform', default='cpu', choices=('cpu', 'gpu'),
    help='the devices the processes use.')
  a('--port', type=int, default=None,
    help='the coordinator\'s port on localhost (default: a free one).')
  a('--heartbeat-timeout', type=int, default=None, metavar='SECONDS',
    help='passed on to train.py: how long the others wait for a lost '
    f'process (JAX\'s default: {DEFAULT_HEARTBEAT_TIMEOUT}).')
  a('--grace', type=float, default=10.0, metavar='SECONDS',
    help='after a process is lost, how much longer than the heartbeat '
    'timeout the launcher waits before it kills the others itself.')
  a('train_flags', nargs=argparse.REMAINDER,
    help='the flags of python -m examples.vit.train, after --.')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = make_parser().parse_args(argv)
  if args.train_flags[:1] == ['--']:
    args.train_flags = args.train_flags[1:]
  if args.num_processes <= 0 or args.devices_per_process <= 0:
    print('error: --num-processes and --devices-per-process must be '
          'positive.', file=sys.stderr)
    return USAGE
  return launch(args)


if __name__ == '__main__':
  sys.exit(main())
