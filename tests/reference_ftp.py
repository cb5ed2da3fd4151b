"""Float64 NumPy transcription of ../shared/ALGORITHMS.md: FTP, AdamW, SGD.

Written from the spec line by line, in PyTorch's layout (a Dense weight is
`(out, in)`, a Conv weight `(out, in, kh, kw)`: a row norm sums over every
axis but the FIRST), independent of optax and JAX. The tests transpose the
library's Flax-layout leaves to compare. The base optimizers follow
`torch.optim.AdamW` and `torch.optim.SGD` (coupled L2, momentum buffer that
starts at the first gradient, no dampening), and the two-layer network has a
hand-written backward pass, so a whole fine-tuning trajectory is NumPy only.

A params tree here is a flat `dict` name -> `np.ndarray` (float64).
"""

from collections.abc import Callable
from typing import Optional, Union

import numpy as np

Params = dict[str, np.ndarray]
ScalarOrSchedule = Union[float, Callable[[int], float]]


def _f64(tree: Params) -> Params:
  return {name: np.array(x, np.float64) for name, x in tree.items()}


def value_at(value: ScalarOrSchedule, count: int) -> float:
  """A float-or-schedule hyper-parameter at step `count` (0 at the 1st step)."""
  return float(value(count)) if callable(value) else float(value)


# Base optimizers, as PyTorch steps them: they return the proposed params.


class AdamW:
  """`torch.optim.AdamW`: decoupled decay, then the bias-corrected step."""

  def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0):
    self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
    self.weight_decay = weight_decay
    self.t = 0
    self.exp_avg: Params = {}
    self.exp_avg_sq: Params = {}

  def step(self, params: Params, grads: Params) -> Params:
    self.t += 1
    proposed = {}
    for name, p in params.items():
      g = grads[name]
      p = p * (1 - self.lr * self.weight_decay)
      m = self.b1 * self.exp_avg.get(name, np.zeros_like(g)) + (1 - self.b1) * g
      v = (self.b2 * self.exp_avg_sq.get(name, np.zeros_like(g))
           + (1 - self.b2) * g * g)
      self.exp_avg[name], self.exp_avg_sq[name] = m, v
      bias_correction1 = 1 - self.b1 ** self.t
      bias_correction2 = 1 - self.b2 ** self.t
      denom = np.sqrt(v) / np.sqrt(bias_correction2) + self.eps
      proposed[name] = p - (self.lr / bias_correction1) * m / denom
    return proposed


class SGD:
  """`torch.optim.SGD`: coupled L2, momentum buffer = g at the first step."""

  def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    self.lr, self.momentum, self.nesterov = lr, momentum, nesterov
    self.weight_decay = weight_decay
    self.buffer: Params = {}

  def step(self, params: Params, grads: Params) -> Params:
    proposed = {}
    for name, p in params.items():
      d_p = grads[name] + self.weight_decay * p
      if self.momentum != 0:
        if name not in self.buffer:
          buf = d_p.copy()
        else:
          buf = self.momentum * self.buffer[name] + d_p
        self.buffer[name] = buf
        d_p = d_p + self.momentum * buf if self.nesterov else buf
      proposed[name] = p - self.lr * d_p
    return proposed


# Fast Trainable Projection (ALGORITHMS.md, "FTP").


def rownorm(x: np.ndarray) -> np.ndarray:
  """L1 norm of each output unit (axis 0), keepdims; 0-d/1-d: one row."""
  if x.ndim <= 1:
    return np.sum(np.abs(x)) + 1e-8
  return np.sum(np.abs(x), axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-8


class FTP:
  """The projection step, for the leaves that have an anchor."""

  def __init__(self, k=1.0, mu: ScalarOrSchedule = 1e-2, b1=0.9, b2=0.999):
    self.k, self.mu, self.b1, self.b2 = k, mu, b1, b2
    self.t = 1
    self.gamma: dict[str, float] = {}
    self.m_g: dict[str, float] = {}
    self.v_g: dict[str, float] = {}
    self.c_prev: Params = {}
    self.s_prev: Params = {}
    # Per step, for the tests: h (after k) and gamma of each leaf.
    self.h_history: list[dict[str, float]] = []
    self.gamma_history: list[dict[str, float]] = []

  def step(self, params: Params, proposed: Params, grads: Params,
           anchors: Params) -> Params:
    """New params; leaves without an anchor keep the base optimizer's step."""
    t = self.t
    mu = value_at(self.mu, t - 1)
    new_params, hs = {}, {}
    for name, p in params.items():
      if name not in anchors:
        new_params[name] = proposed[name]
        continue
      a, g = anchors[name], grads[name]
      d = p - proposed[name]
      c = (p - d) - a
      n = rownorm(c)
      if t == 1:
        gamma, m_g, v_g = 1e-8, 0.0, 0.0
      else:
        h = np.sum(g * self.c_prev[name] * self.s_prev[name])
        if h > 0:
          h = h * self.k
        hs[name] = float(h)
        m_g = self.b1 * self.m_g[name] + (1 - self.b1) * h
        v_g = self.b2 * self.v_g[name] + (1 - self.b2) * h ** 2
        gamma = self.gamma[name] - mu * (m_g / (1 - self.b1 ** t)) / (
            np.sqrt(v_g / (1 - self.b2 ** t)) + 1e-8)
        gamma = float(np.clip(gamma, 1e-8, np.max(n)))
      new_params[name] = a + np.clip(gamma / n, 0, 1) * c
      self.gamma[name], self.m_g[name], self.v_g[name] = gamma, m_g, v_g
      self.c_prev[name], self.s_prev[name] = c, 1 / n
    self.h_history.append(hs)
    self.gamma_history.append(dict(self.gamma))
    self.t += 1
    return new_params


class Optimizer:
  """A base optimizer with FTP on the leaves not in `excluded`."""

  def __init__(self, base, ftp: FTP, anchor: Union[str, Params] = 'init',
               excluded: tuple[str, ...] = ()):
    self.base, self.ftp = base, ftp
    self.anchor_mode, self.excluded = anchor, excluded
    self.anchors: Optional[Params] = None

  def init(self, params: Params) -> None:
    params = _f64(params)
    if isinstance(self.anchor_mode, str):
      anchors = (params if self.anchor_mode == 'init' else
                 {name: np.zeros_like(p) for name, p in params.items()})
    else:
      anchors = _f64(self.anchor_mode)
    self.anchors = {name: a for name, a in anchors.items()
                    if name not in self.excluded}

  def step(self, params: Params, grads: Params) -> Params:
    params, grads = _f64(params), _f64(grads)
    proposed = self.base.step(params, grads)
    return self.ftp.step(params, proposed, grads, self.anchors)


def run(optimizer: Optimizer, params: Params,
        loss_and_grads: Callable[[Params], tuple[float, Params]],
        steps: int) -> list[Params]:
  """`steps` steps of `optimizer`: the params before and after each step."""
  params = _f64(params)
  optimizer.init(params)
  history = [params]
  for _ in range(steps):
    _, grads = loss_and_grads(params)
    params = optimizer.step(params, grads)
    history.append(params)
  return history


# A small network to fine-tune: two tanh layers and a new softmax head.


def mlp_loss_and_grads(params: Params, x: np.ndarray,
                       labels: np.ndarray) -> tuple[float, Params]:
  """Mean softmax cross-entropy of a two-layer tanh MLP, and its gradient."""
  n = x.shape[0]
  hidden0 = np.tanh(x @ params['w0'].T + params['b0'])
  hidden1 = np.tanh(hidden0 @ params['w1'].T + params['b1'])
  logits = hidden1 @ params['head_w'].T + params['head_b']
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  loss = -np.mean(log_probs[np.arange(n), labels])
  d_logits = np.exp(log_probs)
  d_logits[np.arange(n), labels] -= 1
  d_logits /= n
  d_pre1 = (d_logits @ params['head_w']) * (1 - hidden1 ** 2)
  d_pre0 = (d_pre1 @ params['w1']) * (1 - hidden0 ** 2)
  grads = {
      'w0': d_pre0.T @ x, 'b0': d_pre0.sum(0),
      'w1': d_pre1.T @ hidden0, 'b1': d_pre1.sum(0),
      'head_w': d_logits.T @ hidden1, 'head_b': d_logits.sum(0),
  }
  return float(loss), grads


def mlp_problem(seed: int = 0, n: int = 64, d_in: int = 6, hidden: int = 8,
                classes: int = 3):
  """Pre-trained weights (PyTorch layout), inputs and labels.

  The labels come from a perturbation of the pre-trained network, so
  fine-tuning has somewhere to go but not far.
  """
  rng = np.random.default_rng(seed)
  pretrained = {
      'w0': rng.normal(size=(hidden, d_in)) / np.sqrt(d_in),
      'b0': 0.1 * rng.normal(size=(hidden,)),
      'w1': rng.normal(size=(hidden, hidden)) / np.sqrt(hidden),
      'b1': 0.1 * rng.normal(size=(hidden,)),
      'head_w': 0.1 * rng.normal(size=(classes, hidden)),
      'head_b': np.zeros(classes),
  }
  teacher = {name: p + 0.5 * rng.normal(size=p.shape)
             for name, p in pretrained.items()}
  teacher['head_w'] = rng.normal(size=(classes, hidden))
  x = rng.normal(size=(n, d_in))
  teacher_logits = mlp_logits(teacher, x)
  labels = np.argmax(teacher_logits, axis=1)
  return pretrained, x, labels


def mlp_logits(params: Params, x: np.ndarray) -> np.ndarray:
  """The two-layer network's logits."""
  hidden0 = np.tanh(x @ params['w0'].T + params['b0'])
  hidden1 = np.tanh(hidden0 @ params['w1'].T + params['b1'])
  return hidden1 @ params['head_w'].T + params['head_b']
