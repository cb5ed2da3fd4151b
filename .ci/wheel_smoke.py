"""Smoke test of the built wheel, run from outside the checkout.

Catches a file missing from the package: imports `spd_optax` from the venv's
site-packages (never the checkout), checks the version and the typing marker,
and takes a few jitted steps with every optimizer the package exports.
"""

import importlib.metadata
import os
import sys

import jax
import jax.numpy as jnp
import optax

import spd_optax as spd

here = os.path.dirname(os.path.abspath(spd.__file__))
if 'site-packages' not in here:
  sys.exit(f'spd_optax imported from {here}, not from the installed wheel.')
if spd.__version__ != importlib.metadata.version('spd-optax'):
  sys.exit(f'spd_optax.__version__ {spd.__version__} != the wheel\'s '
           f'{importlib.metadata.version("spd-optax")}.')
if not os.path.isfile(os.path.join(here, 'py.typed')):
  sys.exit('the wheel lacks spd_optax/py.typed.')

params = {'w': jnp.ones((4, 3)) / 4, 'b': jnp.zeros((3,))}
x = jnp.arange(8.0).reshape(2, 4) / 8


def loss(p):
  return jnp.sum((x @ p['w'] + p['b'] - 1.0) ** 2)


optimizers = {
    'adam_spd': spd.adam_spd(1e-2, weight_decay=0.5),
    'adam_ftp': spd.adam_ftp(1e-2),
    'sgd_ftp': spd.sgd_ftp(1e-2, momentum=0.9),
    'adamw_l2sp': spd.adamw_l2sp(1e-2, weight_decay=0.1),
    'selective_projection_decay': spd.selective_projection_decay(
        optax.sgd(1e-2), weight_decay=0.5),
}
for name, opt in optimizers.items():
  state = opt.init(params)

  @jax.jit
  def step(p, s, opt=opt):
    updates, s = opt.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  p = params
  for _ in range(5):
    p, state = step(p, state)
  if not float(loss(p)) < float(loss(params)):
    sys.exit(f'{name}: the loss did not decrease in 5 steps.')
  print(f'{name}: ok, loss {float(loss(params)):.4f} -> {float(loss(p)):.4f}')
print(f'spd_optax {spd.__version__} from {here}: wheel smoke test passed.')
