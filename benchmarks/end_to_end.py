r"""How much does each optimizer cost in a whole training step?

Train-step throughput (images/s) of the example's ViT (`examples/vit/models.py`)
with each optimizer of the registry: the same model, the same batch, one jitted
step (forward, backward, update, apply; params and optimizer state donated),
the methods interleaved in one process, medians after warm-up. The head is
masked for SPD, L2-SP and FTP, as the example fine-tunes it. On CPU the
default is ViT-Ti/16 at batch 8 (224px); on a GPU, ViT-B/16 at batch 64.

  python benchmarks/end_to_end.py
  python benchmarks/end_to_end.py --model S/16 --batch 16
  python benchmarks/end_to_end.py --quick     # a tiny ViT, batch 4, 64px

Writes `benchmarks/results/end_to_end.json`.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _harness  # pylint: disable=g-bad-import-order
import _vit_params


def make_model(name, image_size):
  """The example's ViT (or None when the example is not importable)."""
  module = _vit_params.example_module()
  if module is None:
    raise SystemExit('examples/vit/models.py is needed for this benchmark.')
  config = module.VIT_CONFIGS[name]
  model = module.VisionTransformer(num_classes=_vit_params.NUM_CLASSES,
                                   config=config)
  params = module.init_params(model, image_size)
  return model, params


def train_step_fn(model, opt):
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({'params': p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def parse_args(argv):
  on_gpu = jax.default_backend() != 'cpu'
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='B/16' if on_gpu else 'Ti/16')
  parser.add_argument('--batch', type=int, default=64 if on_gpu else 8)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--methods', help='comma-separated (default: all)')
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--out', default=None)
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.quick:
    args.model, args.batch, args.image_size = 'Ti/16', 4, 64
    args.repeats, args.warmup = 3, 1
  methods = _harness.pick_methods(args.methods)
  info = _harness.machine()
  print('# ' + _harness.describe_machine(info))
  model, params0 = make_model(args.model, args.image_size)
  num_params = sum(x.size for x in jax.tree.leaves(params0))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (args.batch, args.image_size,
                                           args.image_size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, _vit_params.NUM_CLASSES, args.batch))
  print(f'# ViT-{args.model} from examples/vit/models.py, '
        f'{num_params / 1e6:.1f}M params, batch {args.batch}, '
        f'{args.image_size}px')
  runners = {}
  for method in methods:
    opt = _harness.make_optimizer(method, masked=method.base is not None)
    step = train_step_fn(model, opt)
    params = jax.tree.map(lambda x: x + 0, params0)
    holder = {'p': params, 's': jax.jit(opt.init)(params)}

    def run(holder=holder, step=step):
      holder['p'], holder['s'], loss = step(holder['p'], holder['s'], images,
                                            labels)
      jax.block_until_ready(loss)

    runners[method.name] = run
  times = _harness.interleaved(runners, args.repeats, args.warmup)
  base = np.median(times[_harness.BASELINE])
  rows = []
  for name, t in times.items():
    median = float(np.median(t))
    rows.append(dict(method=name, **_harness.summary(t),
                     images_per_s=args.batch / median,
                     ratio=median / base,
                     throughput_vs_adamw=base / median))
  print(f'\n## Train step, ViT-{args.model}, batch {args.batch}, '
        f'{args.image_size}px ({info["backend"]})')
  print(_harness.markdown_table(
      ['method', 'median ms', 'p10-p90 ms', 'images/s', 'throughput vs adamw'],
      [[r['method'], r['median_ms'], f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f}",
        r['images_per_s'], f"{r['throughput_vs_adamw']:.3f}"] for r in rows]))
  out = args.out or os.path.join(
      _harness.RESULTS_DIR,
      'end_to_end_quick.json' if args.quick else 'end_to_end.json')
  _harness.write_json(os.path.basename(out), dict(
      machine=info, model=args.model, batch=args.batch,
      image_size=args.image_size, params=num_params, rows=rows,
      gpu='not measured' if info['backend'] == 'cpu' else 'measured'), out)


if __name__ == '__main__':
  main(sys.argv[1:])
