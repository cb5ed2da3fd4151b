"""The study's figures, drawn from what `results.json` holds."""

import os
import re
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

COLORS = {'adamw_lora': '#d62728', 'spd_lora': '#1f77b4',
          'adamw_full': '#ff7f0e', 'spd_full': '#2ca02c'}
_ORDER = ('embedder', 'q_proj', 'q_einsum', 'qkv_einsum', 'k_proj',
          'kv_einsum', 'v_proj', 'o_proj', 'attn_vec_einsum', 'q_norm',
          'k_norm', 'gate_proj', 'up_proj', 'down_proj', 'norm', 'final_norm')


def short_name(leaf: str) -> str:
  """`layers/0/attn/q_proj/w_lora_a` as `L0 q_proj a`."""
  name = re.sub(r'^layers/(\d+)/(attn|mlp)/', r'L\1 ', leaf)
  name = re.sub(r'^layers/(\d+)/', r'L\1 ', name)
  name = re.sub(r'/(w|kernel)_lora_([ab])$', r' \2', name)
  return name.replace('/', '.')


def model_order(leaf: str):
  """A sort key putting leaves in the order the decoder applies them."""
  match = re.match(r'^layers/(\d+)/', leaf)
  layer = int(match.group(1)) if match else (-1 if 'embed' in leaf else 10**6)
  within = [i for i, part in enumerate(_ORDER) if part in leaf]
  return (layer, within[0] if within else 99, leaf)


def plot_tradeoff(results: dict[str, Any], path: str) -> None:
  """ID held-out loss vs retention (stdlib) held-out loss: one curve per
  method over its strengths, each point the mean over the seeds (± std
  bars), every seed faint; the pre-trained model a star. Lower-left is
  better on both."""
  fig, ax = plt.subplots(figsize=(8, 5.8))
  by_method: dict[str, list] = {}
  for run in results['runs'].values():
    by_method.setdefault(run['method'], []).append(run)
  for method, runs in by_method.items():
    runs = sorted(runs, key=lambda r: r['weight_decay'])
    xs = [r['id_loss'] for r in runs]
    ys = [r['retention_loss'] for r in runs]
    color = COLORS.get(method)
    for r in runs:
      seeds = r['seeds']
      if len(seeds) > 1:
        ax.scatter([s['id_loss'] for s in seeds],
                   [s['retention_loss'] for s in seeds], s=12, color=color,
                   alpha=0.3, zorder=2)
    ax.errorbar(xs, ys, xerr=[r.get('id_loss_std', 0) for r in runs],
                yerr=[r.get('retention_loss_std', 0) for r in runs],
                color=color, marker='o', capsize=2, label=runs[0]['name'],
                zorder=3)
    symbol = 'λ' if method.startswith('spd') else 'wd'
    for r, x, y in zip(runs, xs, ys):
      ax.annotate(f'{symbol}={r["weight_decay"]:g}', (x, y),
                  textcoords='offset points', xytext=(5, 4), fontsize=8,
                  color=color)
  pre = results['pretrained']
  if pre.get('id_loss') is not None:
    ax.scatter(pre['id_loss'], pre['retention_loss'], marker='*', s=180,
               color='gray', label='pre-trained', zorder=3)
  n = max([len(r['seeds']) for r in results['runs'].values()] + [1])
  ax.set_xlabel(f'ID held-out loss, {results["finetune_domain"]} '
                '(nats/token)')
  ax.set_ylabel('retention: pre-training domain held-out loss (nats/token)')
  ax.set_title(f'What fine-tuning learns vs what it keeps (mean ± std, {n} '
               f'seed{"s" if n > 1 else ""})')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _heatmap(ax, layers: dict[str, list[float]], steps, title: str,
             label: str, vmin=None, vmax=None, cmap='viridis'):
  names = sorted(layers, key=model_order)
  values = np.asarray([layers[n] for n in names], np.float64)
  image = ax.imshow(values, aspect='auto', interpolation='nearest', cmap=cmap,
                    vmin=vmin, vmax=vmax,
                    extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5,
                            -0.5))
  ax.set_yticks(range(len(names)), [short_name(n) for n in names],
                fontsize=max(4, min(8, 500 / max(len(names), 1))))
  ax.set_xlabel('fine-tuning step')
  ax.set_title(title, fontsize=10)
  plt.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)


def plot_spd(run: dict[str, Any], path: str) -> None:
  """SPD's diagnostics per leaf over training (first seed): the fraction of
  steps each adapter (or weight) was selected for decay, and its mean
  deviation ratio r, per logged window."""
  history = run['history']
  steps = history['step']
  window = steps[1] - steps[0] if len(steps) > 1 else 1
  height = 2.0 + 0.16 * len(history['selection_rate'])
  fig, (left, right) = plt.subplots(1, 2, figsize=(14, height))
  rate = np.mean([np.mean(v) for v in history['selection_rate'].values()])
  _heatmap(left, history['selection_rate'], steps,
           f'selected for decay (mean rate {rate:.2f})',
           f'fraction of steps (windows of {window})', 0, 1, 'magma')
  _heatmap(right, history['ratio'], steps, 'deviation ratio r (mean)',
           'r', 0, None, 'viridis')
  fig.suptitle(f'{run["name"]}, λ = {run["weight_decay"]:g}: SPD per leaf')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_loss(results: dict[str, Any], path: str) -> None:
  """Training loss of each method and strength (first seed)."""
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for run in results['runs'].values():
    history = run['history']
    if not history['step']:
      continue
    ax.plot(history['step'], history['loss'], color=COLORS.get(run['method']),
            alpha=0.4 + 0.6 * (run['weight_decay'] == max(
                r['weight_decay'] for r in results['runs'].values()
                if r['method'] == run['method'])),
            label=f'{run["name"]} {run["weight_decay"]:g}')
  ax.set_xlabel('fine-tuning step')
  ax.set_ylabel('training loss (nats/token)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_all(results: dict[str, Any], directory: str) -> list[str]:
  """Writes every figure that `results` has data for; returns their paths."""
  paths = []

  def save(plot, name, *args):
    paths.append(os.path.join(directory, name))
    plot(*args, paths[-1])

  if results['pretrained'].get('id_loss') is not None:
    save(plot_tradeoff, 'id_vs_retention.png', results)
  if any(r['history']['step'] for r in results['runs'].values()):
    save(plot_loss, 'loss.png', results)  # (--trainer peft logs no history)
  for method in ('spd_lora', 'spd_full'):
    runs = sorted((r for r in results['runs'].values()
                   if r['method'] == method and r['history'].get('ratio')),
                  key=lambda r: r['weight_decay'])
    if runs:  # The middle strength of the grid.
      save(plot_spd, f'{method}_selection.png', runs[len(runs) // 2])
  return paths
