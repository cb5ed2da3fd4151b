"""The study's figures, drawn from what `results.json` holds."""

import os
import re
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

COLORS = {'adamw': '#d62728', 'l2sp': '#9467bd', 'spd': '#1f77b4',
          'ftp': '#2ca02c', 'lpft': '#ff7f0e', 'wise': '#8c564b'}


def color(method: str) -> str | None:
  """A method's colour; WiSE-FT's alphas (`wise0.5`) share one."""
  return COLORS.get('wise' if method.startswith('wise') else method)

# Stacked (`--scan`) leaves are logged per block under the unrolled names
# (`train_loop.layer_values`); `Transformer/encoderblock/` is for a log
# that kept one.
_SHORT_NAMES = (
    (r'^Transformer/encoderblock_(\d+)/', r'block\1 '),
    (r'^Transformer/encoderblock/', 'blocks '),
    (r'^MAPHead_0/MultiHeadDotProductAttention_0/', 'map.attn.'),
    (r'^MAPHead_0/MlpBlock_0/Dense_0/', 'map.mlp.fc1.'),
    (r'^MAPHead_0/MlpBlock_0/Dense_1/', 'map.mlp.fc2.'),
    (r'^MAPHead_0/LayerNorm_0/', 'map.norm.'),
    (r'^MAPHead_0/probe$', 'map.probe'),
    (r'MultiHeadDotProductAttention_1/', 'attn.'),
    (r'MlpBlock_3/Dense_0/', 'mlp.fc1.'),
    (r'MlpBlock_3/Dense_1/', 'mlp.fc2.'),
    (r'LayerNorm_0/', 'norm1.'),
    (r'LayerNorm_2/', 'norm2.'),
    (r'^Transformer/posembed_input/pos_embedding$', 'pos_embedding'),
    (r'^Transformer/encoder_norm/', 'encoder_norm.'),
    (r'^embedding/', 'patch_embedding.'),
    (r'/', '.'),
)


def short_name(layer: str) -> str:
  """A leaf's name for the figures, e.g. `block3 mlp.fc1.kernel`.

  `Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel` becomes
  `block3 mlp.fc1.kernel`.
  """
  for pattern, replacement in _SHORT_NAMES:
    layer = re.sub(pattern, replacement, layer)
  return layer


def layer_group(layer: str) -> str:
  """The part of the ViT a leaf belongs to: embeddings, a block, the norm."""
  match = re.match(r'^Transformer/encoderblock_(\d+)/', layer)
  if match:
    return f'block {match.group(1)}'
  if layer.startswith('Transformer/encoderblock/'):
    return 'blocks (stacked)'
  if layer.startswith('Transformer/encoder_norm'):
    return 'encoder norm'
  if layer.startswith('MAPHead_0/'):
    return 'MAP head'
  if layer.startswith('head'):
    return 'head'
  return 'embeddings'


def _block_order(group: str):
  if group == 'embeddings':
    return -1
  if group == 'blocks (stacked)':
    return 0
  if group.startswith('block'):
    return int(group.split()[1])
  return {'encoder norm': 10**6, 'MAP head': 10**6 + 1}.get(group, 10**6 + 2)


_WITHIN_GROUP = ('embedding/', 'cls', 'pos_embedding', 'probe', 'LayerNorm_0',
                 '/query/', '/key/', '/value/', '/out/', 'LayerNorm_2',
                 'Dense_0', 'Dense_1', 'kernel', 'scale')


def model_order(layer: str):
  """A sort key putting leaves in the order the ViT applies them."""
  within = [i for i, part in enumerate(_WITHIN_GROUP) if part in layer]
  return (_block_order(layer_group(layer)), within[0] if within else 99,
          0 if layer.endswith(('kernel', 'scale')) else 1, layer)


def plot_accuracy(results: dict[str, Any], path: str) -> None:
  """ID vs mean OOD accuracy per method, and the accuracy on every domain."""
  runs = results['methods']
  train_domain = results['train_domain']
  domains = [train_domain] + [d for d in results['domains']
                              if d != train_domain]
  fig, (left, right) = plt.subplots(
      1, 2, figsize=(13, 4.8), gridspec_kw={'width_ratios': [1, 1.8]})
  for method, run in runs.items():
    ood = run['ood_mean'] if run['ood_mean'] is not None else np.nan
    seeds = run.get('seeds', ())
    if len(seeds) > 1:  # Every seed, faint, and the mean ± std.
      left.scatter([100 * r['id_accuracy'] for r in seeds],
                   [100 * (r['ood_mean'] if r['ood_mean'] is not None
                           else np.nan) for r in seeds],
                   s=18, color=color(method), alpha=0.35, zorder=2)
      left.errorbar(100 * run['id_accuracy'], 100 * ood,
                    xerr=100 * run['id_std'],
                    yerr=100 * (run['ood_mean_std'] or 0), fmt='none',
                    ecolor=color(method), elinewidth=1.2, capsize=3,
                    zorder=3)
    left.scatter(100 * run['id_accuracy'], 100 * ood, s=90,
                 color=color(method), label=run['name'], zorder=3,
                 marker='D' if method.startswith('wise') else 'o')
    left.annotate(run['name'], (100 * run['id_accuracy'], 100 * ood),
                  textcoords='offset points', xytext=(7, 4), fontsize=9)
  pretrained = results.get('pretrained_accuracy')
  if pretrained:
    ood = [pretrained[d] for d in domains[1:]]
    if ood:
      left.scatter(100 * pretrained[train_domain], 100 * np.mean(ood),
                   marker='*', s=160, color='gray', zorder=3)
      left.annotate('pre-trained\n(its own head)',
                    (100 * pretrained[train_domain], 100 * np.mean(ood)),
                    textcoords='offset points', xytext=(7, -14), fontsize=8,
                    color='gray')
  left.set_xlabel(f'ID accuracy (%), {train_domain}')
  left.set_ylabel('mean OOD accuracy (%)')
  left.set_title('In distribution vs out of distribution')
  left.grid(alpha=0.3)
  left.margins(0.25)

  width = 0.8 / max(len(runs), 1)
  x = np.arange(len(domains) + 1)
  for i, (method, run) in enumerate(runs.items()):
    values = [run['id_accuracy']] + [run['ood_accuracy'][d]
                                     for d in domains[1:]]
    values.append(run['ood_mean'] if run['ood_mean'] is not None else np.nan)
    errors = None
    if len(run.get('seeds', ())) > 1:
      errors = 100 * np.asarray(
          [run['id_std']] + [run['ood_std'][d] for d in domains[1:]]
          + [run['ood_mean_std'] or 0])
    right.bar(x - 0.4 + width * (i + 0.5), 100 * np.asarray(values), width,
              yerr=errors, error_kw={'elinewidth': 0.8, 'capsize': 1.5},
              color=color(method), label=run['name'],
              alpha=0.6 if method.startswith('wise') else 1.0)
  if pretrained:
    values = [pretrained[d] for d in domains]
    values.append(np.mean(values[1:]) if len(values) > 1 else np.nan)
    right.scatter(x, 100 * np.asarray(values), marker='_', s=500,
                  color='black', zorder=3, label='pre-trained (its own head)')
  right.set_xticks(x, [f'{train_domain}\n(ID)'] + domains[1:] + ['OOD\nmean'])
  right.set_ylabel('accuracy (%)')
  right.set_ylim(0, 100)
  right.set_title('Accuracy per domain')
  right.grid(axis='y', alpha=0.3)
  right.legend(fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.17),
               ncol=min(len(runs) + 1, 5), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_deviation(results: dict[str, Any], path: str) -> None:
  """Distance to the pre-trained weights of each part of the ViT over training.

  A part's distance is the L2 norm of its leaves' deviations together; the
  new head has no pre-trained weights and is left out.
  """
  runs = {m: r for m, r in results['methods'].items()
          if r.get('history')}  # WiSE-FT is not trained: no history.
  groups = sorted({layer_group(layer)
                   for run in runs.values()
                   for layer in run['history']['deviation']
                   if not layer.startswith('head')}, key=_block_order)
  cmap = plt.get_cmap('viridis')
  colors = {g: cmap(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}
  fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs) + 1.5, 4),
                           sharey=True, squeeze=False)
  for ax, (method, run) in zip(axes[0], runs.items()):
    history = run['history']
    for group in groups:
      squares = [np.square(v) for layer, v in history['deviation'].items()
                 if layer_group(layer) == group]
      ax.plot(history['step'], np.sqrt(np.sum(squares, axis=0)),
              color=colors[group], label=group)
    ax.set_title(f'{run["name"]}  (total {run["deviation"]:.2f})')
    ax.set_xlabel('fine-tuning step')
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('‖θ − θ0‖ of the part')
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='center right', fontsize=8)
  fig.suptitle('Deviation from the pre-trained weights, per part of the ViT')
  fig.tight_layout(rect=(0, 0, 1 - 1.3 / (4 * len(runs) + 1.5), 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _heatmap(layers: dict[str, list[float]], steps, title: str, label: str,
             path: str, log: bool = False, vmin=None, vmax=None,
             cmap: str = 'viridis') -> None:
  """A layer x step heatmap, one row per leaf in model order."""
  names = sorted(layers, key=model_order)
  values = np.asarray([layers[n] for n in names], np.float64)
  if log:
    values = np.log10(np.maximum(values, 1e-12))
  height = 1.5 + 0.12 * len(names)
  fig, ax = plt.subplots(figsize=(10, height))
  image = ax.imshow(values, aspect='auto', interpolation='nearest', cmap=cmap,
                    vmin=vmin, vmax=vmax,
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5,
                            -0.5))
  ax.set_yticks(range(len(names)), [short_name(n) for n in names],
                fontsize=max(4, min(8, 600 / max(len(names), 1))))
  # Lines between the parts of the ViT make the blocks easy to find.
  groups = [layer_group(n) for n in names]
  for i in range(1, len(names)):
    if groups[i] != groups[i - 1]:
      ax.axhline(i - 0.5, color='white', linewidth=0.8)
  ax.set_xlabel('fine-tuning step')
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label=label, fraction=0.03, pad=0.02)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_spd_selection(run: dict[str, Any], path: str) -> None:
  """Which leaves SPD selected for decay, over training (rate per window)."""
  history = run['history']
  steps = history['step']
  window = steps[1] - steps[0] if len(steps) > 1 else 1
  rate = np.mean([np.mean(v) for v in history['selected'].values()])
  _heatmap(history['selected'], history['step'],
           f'{run["name"]} (λ = {run["weight_decay"]:g}): layers selected for '
           f'decay (mean rate {rate:.2f})',
           f'fraction of steps selected (windows of {window})', path,
           vmin=0, vmax=1, cmap='magma')


def plot_ftp_gamma(run: dict[str, Any], path: str) -> None:
  """FTP's projection radius gamma of every leaf, over training (log scale)."""
  history = run['history']
  _heatmap(history['gamma'], history['step'],
           f'{run["name"]}: projection radius γ per layer\n'
           '(dark: γ at its floor 1e-8, the layer held at its pre-trained '
           'weights)',
           'log10 γ', path, log=True)


def plot_tradeoff(results: dict[str, Any], path: str) -> None:
  """ID vs mean OOD accuracy of each method over its grid (`--sweep`), one
  curve per method, each point the mean over the seeds (± std bars)."""
  fig, ax = plt.subplots(figsize=(7.5, 5.5))
  for method, points in results['sweep'].items():
    points = sorted(points, key=lambda p: p['value'])
    xs = [100 * p['id_accuracy'] for p in points]
    ys = [100 * p['ood_mean'] for p in points]
    label = {'ftp': 'Adam-FTP (k)', 'wise': 'WiSE-FT (α)', 'spd':
             'Adam-SPD (λ)', 'l2sp': 'L2-SP (λ)'}.get(method, method)
    ax.errorbar(xs, ys, xerr=[100 * p['id_std'] for p in points],
                yerr=[100 * (p['ood_mean_std'] or 0) for p in points],
                color=color(method), marker='o', capsize=2, label=label)
    for p, x, y in zip(points, xs, ys):
      ax.annotate(f'{p["value"]:g}', (x, y), textcoords='offset points',
                  xytext=(5, 4), fontsize=8, color=color(method))
  for method in ('adamw', 'lpft'):
    run = results['methods'].get(method)
    if run is not None:
      ax.errorbar(100 * run['id_accuracy'], 100 * run['ood_mean'],
                  xerr=100 * run.get('id_std', 0),
                  yerr=100 * (run.get('ood_mean_std') or 0),
                  color=color(method), marker='s', markersize=8, capsize=2,
                  label=run['name'], linestyle='none')
  train_domain = results['train_domain']
  pretrained = results.get('pretrained_accuracy')
  if pretrained:
    ood = [v for d, v in pretrained.items() if d != train_domain]
    ax.scatter(100 * pretrained[train_domain], 100 * np.mean(ood),
               marker='*', s=160, color='gray', label='pre-trained (its head)')
  n = max([len(r.get('seeds', ())) for r in results['methods'].values()]
          + [1])
  ax.set_xlabel(f'ID accuracy (%), {train_domain}')
  ax.set_ylabel('mean OOD accuracy (%)')
  ax.set_title(f'Trade-off over each method\'s strength (mean ± std, {n} '
               f'seed{"s" if n > 1 else ""})')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_all(results: dict[str, Any], directory: str) -> list[str]:
  """Writes every figure that `results` has data for; returns their paths."""
  paths = []

  def save(plot, name, *args):
    paths.append(os.path.join(directory, name))
    plot(*args, paths[-1])

  save(plot_accuracy, 'accuracy.png', results)
  save(plot_deviation, 'deviation.png', results)
  runs = results['methods']
  if 'spd' in runs:
    save(plot_spd_selection, 'spd_selection.png', runs['spd'])
  if 'ftp' in runs:
    save(plot_ftp_gamma, 'ftp_gamma.png', runs['ftp'])
  if results.get('sweep'):
    save(plot_tradeoff, 'tradeoff.png', results)
  return paths
