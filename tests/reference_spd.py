"""Float64 NumPy transcription of ../shared/ALGORITHMS.md: SPD and L2-SP.

Written from the spec line by line, independent of optax and JAX, so the
tests compare the library against the rules and not against itself. Also
holds the two base optimizers the rules wrap (Adam, SGD with momentum, as
optax defines them) and a small two-layer network with a hand-written
backward pass, so a whole fine-tuning trajectory is NumPy only.

A params tree here is a flat `dict` name -> `np.ndarray` (float64).
"""

from collections.abc import Callable
from typing import NamedTuple, Optional, Union

import numpy as np

Params = dict[str, np.ndarray]
ScalarOrSchedule = Union[float, Callable[[int], float]]


def _f64(tree: Params) -> Params:
  return {name: np.asarray(x, np.float64) for name, x in tree.items()}


def value_at(value: ScalarOrSchedule, count: int) -> float:
  """A float-or-schedule hyper-parameter at step `count` (0 at the 1st step)."""
  return float(value(count)) if callable(value) else float(value)


# Base optimizers (optax sign: the update already carries -learning_rate).


class Adam:
  """`optax.adam(lr, b1, b2, eps)`: bias-corrected moments, eps outside sqrt."""

  def __init__(self, learning_rate, b1=0.9, b2=0.999, eps=1e-8):
    self.learning_rate, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps
    self.t = 0
    self.m: Params = {}
    self.v: Params = {}

  def direction(self, grads: Params) -> Params:
    """Adam's scaled gradient, before the learning rate (`scale_by_adam`)."""
    self.t += 1
    out = {}
    for name, g in grads.items():
      m = self.m.get(name, np.zeros_like(g))
      v = self.v.get(name, np.zeros_like(g))
      m = self.b1 * m + (1 - self.b1) * g
      v = self.b2 * v + (1 - self.b2) * g * g
      self.m[name], self.v[name] = m, v
      m_hat = m / (1 - self.b1 ** self.t)
      v_hat = v / (1 - self.b2 ** self.t)
      out[name] = m_hat / (np.sqrt(v_hat) + self.eps)
    return out

  def update(self, grads: Params) -> Params:
    count = self.t
    lr = value_at(self.learning_rate, count)
    return {name: -lr * d for name, d in self.direction(grads).items()}


class SgdMomentum:
  """`optax.sgd(lr, momentum)`: heavy ball, the buffer starts at the first g."""

  def __init__(self, learning_rate, momentum=0.9):
    self.learning_rate, self.momentum = learning_rate, momentum
    self.t = 0
    self.trace: Params = {}

  def update(self, grads: Params) -> Params:
    lr = value_at(self.learning_rate, self.t)
    self.t += 1
    out = {}
    for name, g in grads.items():
      trace = self.momentum * self.trace.get(name, np.zeros_like(g)) + g
      self.trace[name] = trace
      out[name] = -lr * trace
    return out


# Selective Projection Decay, one leaf (ALGORITHMS.md, "SPD").


class SpdLeafStep(NamedTuple):
  update: np.ndarray
  selected: bool
  ratio: float


def spd_leaf(g: np.ndarray, p: np.ndarray, a: np.ndarray, u: np.ndarray,
             weight_decay: float) -> SpdLeafStep:
  """The SPD rule for one leaf, exactly as ALGORITHMS.md writes it."""
  p_tilde = p + u
  c = -np.sum(g * (p - a))
  if c < 0:
    cur = np.linalg.norm((p_tilde - a).ravel())
    prev = np.linalg.norm((p - a).ravel())
    r = 0.0 if cur == 0 else float(np.clip((cur - prev) / cur, 0.0, 1.0))
    p_new = p_tilde - weight_decay * r * (p_tilde - a)
    return SpdLeafStep(p_new - p, True, r)
  return SpdLeafStep(p_tilde - p, False, 0.0)


class SpdStep(NamedTuple):
  updates: Params
  selected: dict[str, bool]
  ratio: dict[str, float]


class Spd:
  """SPD around a base optimizer, the leaves in `mask` (default all) decayed."""

  def __init__(self, base, weight_decay: ScalarOrSchedule,
               anchor: Union[str, Params] = 'init',
               mask: Optional[dict[str, bool]] = None):
    self.base, self.weight_decay = base, weight_decay
    self.anchor_mode, self.mask = anchor, mask
    self.anchor: Optional[Params] = None
    self.count = 0

  def init(self, params: Params) -> None:
    params = _f64(params)
    if isinstance(self.anchor_mode, str):
      self.anchor = (dict(params) if self.anchor_mode == 'init' else
                     {name: np.zeros_like(p) for name, p in params.items()})
    else:
      self.anchor = _f64(self.anchor_mode)

  def update(self, grads: Params, params: Params) -> SpdStep:
    grads, params = _f64(grads), _f64(params)
    base_updates = self.base.update(grads)
    weight_decay = value_at(self.weight_decay, self.count)
    self.count += 1
    updates, selected, ratio = {}, {}, {}
    for name, p in params.items():
      if self.mask is not None and not self.mask[name]:
        updates[name] = base_updates[name]
        continue
      step = spd_leaf(grads[name], p, self.anchor[name], base_updates[name],
                      weight_decay)
      updates[name], selected[name], ratio[name] = step
    return SpdStep(updates, selected, ratio)


# L2-SP (ALGORITHMS.md, "L2-SP"): u <- u - lr * lambda * (p - a), after Adam.


class AdamwL2sp:
  """Adam whose decoupled decay pulls toward the anchor."""

  def __init__(self, learning_rate, weight_decay: ScalarOrSchedule,
               b1=0.9, b2=0.999, eps=1e-8, anchor: Union[str, Params] = 'init',
               mask: Optional[dict[str, bool]] = None):
    self.adam = Adam(learning_rate, b1, b2, eps)
    self.learning_rate, self.weight_decay = learning_rate, weight_decay
    self.anchor_mode, self.mask = anchor, mask
    self.anchor: Optional[Params] = None

  def init(self, params: Params) -> None:
    params = _f64(params)
    if isinstance(self.anchor_mode, str):
      self.anchor = (dict(params) if self.anchor_mode == 'init' else
                     {name: np.zeros_like(p) for name, p in params.items()})
    else:
      self.anchor = _f64(self.anchor_mode)

  def update(self, grads: Params, params: Params) -> Params:
    grads, params = _f64(grads), _f64(params)
    count = self.adam.t
    lr = value_at(self.learning_rate, count)
    weight_decay = value_at(self.weight_decay, count)
    direction = self.adam.direction(grads)
    updates = {}
    for name, p in params.items():
      u = -lr * direction[name]
      if self.mask is None or self.mask[name]:
        u = u - lr * weight_decay * (p - self.anchor[name])
      updates[name] = u
    return updates


# A two-layer network to fine-tune: tanh MLP, mean squared error.


def mlp_loss_and_grads(params: Params, x: np.ndarray,
                       y: np.ndarray) -> tuple[float, Params]:
  """`0.5 * mean_n ||tanh(x w1 + b1) w2 + b2 - y||^2` and its gradient."""
  params = _f64(params)
  n = x.shape[0]
  hidden = np.tanh(x @ params['w1'] + params['b1'])
  error = hidden @ params['w2'] + params['b2'] - y
  loss = 0.5 * np.sum(error * error) / n
  d_out = error / n
  d_pre = (d_out @ params['w2'].T) * (1 - hidden * hidden)
  grads = {
      'w1': x.T @ d_pre,
      'b1': d_pre.sum(0),
      'w2': hidden.T @ d_out,
      'b2': d_out.sum(0),
  }
  return float(loss), grads


def mlp_problem(seed: int = 0, n: int = 32, d_in: int = 4, hidden: int = 8,
                d_out: int = 2):
  """Pre-trained weights and a regression task their perturbation solves."""
  rng = np.random.default_rng(seed)
  pretrained = {
      'w1': rng.normal(size=(d_in, hidden)) / np.sqrt(d_in),
      'b1': 0.1 * rng.normal(size=(hidden,)),
      'w2': rng.normal(size=(hidden, d_out)) / np.sqrt(hidden),
      'b2': 0.1 * rng.normal(size=(d_out,)),
  }
  teacher = {name: p + 0.5 * rng.normal(size=p.shape)
             for name, p in pretrained.items()}
  x = rng.normal(size=(n, d_in))
  y = np.tanh(x @ teacher['w1'] + teacher['b1']) @ teacher['w2'] + teacher['b2']
  return pretrained, x, y


class Trajectory(NamedTuple):
  params: list[Params]           # params[t] before step t; len = steps + 1
  selected: list[dict[str, bool]]
  ratio: list[dict[str, float]]


def run_spd(optimizer: Spd, params: Params, x: np.ndarray, y: np.ndarray,
            steps: int) -> Trajectory:
  """Fine-tunes the MLP with SPD for `steps` steps, recording every step."""
  params = _f64(params)
  optimizer.init(params)
  history, selected, ratio = [params], [], []
  for _ in range(steps):
    _, grads = mlp_loss_and_grads(params, x, y)
    step = optimizer.update(grads, params)
    params = {name: p + step.updates[name] for name, p in params.items()}
    history.append(params)
    selected.append(step.selected)
    ratio.append(step.ratio)
  return Trajectory(history, selected, ratio)


def run_l2sp(optimizer: AdamwL2sp, params: Params, x: np.ndarray,
             y: np.ndarray, steps: int) -> list[Params]:
  """Fine-tunes the MLP with Adam + L2-SP, returning params after each step."""
  params = _f64(params)
  optimizer.init(params)
  history = [params]
  for _ in range(steps):
    _, grads = mlp_loss_and_grads(params, x, y)
    updates = optimizer.update(grads, params)
    params = {name: p + updates[name] for name, p in params.items()}
    history.append(params)
  return history
