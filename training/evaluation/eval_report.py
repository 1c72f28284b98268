"""Where evaluation results go: OUT/results.json, one PNG per task, TensorBoard under OUT/tb
(and for RULER, OUT/ruler.md: the task x length table)."""

import json
import os

import numpy as np

from training.evaluation import evals


def write(results: dict, out_dir: str, step: int) -> list[str]:
  """Writes everything; returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  files = [os.path.join(out_dir, 'results.json')]
  with open(files[0], 'w') as f:
    json.dump(results, f, indent=1)
  files += plot(results, out_dir)
  if 'ruler' in results:
    from training.evaluation import ruler
    files.append(os.path.join(out_dir, 'ruler.md'))
    with open(files[-1], 'w') as f:
      f.write(ruler.table(results['ruler']) + '\n')
  from tensorboardX import SummaryWriter
  tb = SummaryWriter(os.path.join(out_dir, 'tb'))
  for tag, value in evals.scalars(results).items():
    tb.add_scalar(tag, value, step)
  tb.close()
  return files


def plot(results: dict, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  title = f"{results.get('family', '')} step {results.get('step', '')}".strip()
  files = []

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    files.append(path)

  if 'loss' in results:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    Ls = [int(L) for L in results['loss']]
    ax.plot(Ls, list(results['loss'].values()), 'o-')
    ax.set_xscale('log', base=2)
    ax.set(xlabel='context length (tokens)', ylabel='held-out loss (nats/token)',
           title=f'loss | {title}')
    save(fig, 'loss.png')
  if 'position_loss' in results:
    fig, ax = plt.subplots(figsize=(6, 4))
    for L, r in results['position_loss'].items():
      xs = [max(lo, 0.5) for (lo, _), v in zip(r['buckets'], r['loss']) if v is not None]
      ys = [v for v in r['loss'] if v is not None]
      ax.plot(xs, ys, 'o-', label=f'L={L}')
    ax.set_xscale('log', base=2)
    ax.set(xlabel='position in document (bucket start)', ylabel='loss (nats/token)',
           title=f'loss by position | {title}')
    ax.legend()
    save(fig, 'position_loss.png')
  pk = results.get('passkey')
  if pk and pk['lengths']:
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(pk['lengths']) + 2))
    grid = np.array([[np.nan if a is None else a for a in row] for row in pk['accuracy']])
    im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto')
    ax.set_xticks(range(len(pk['depths'])), [f'{d:.0%}' for d in pk['depths']])
    ax.set_yticks(range(len(pk['lengths'])), [str(L) for L in pk['lengths']])
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        ax.text(j, i, '-' if np.isnan(grid[i, j]) else f'{grid[i, j]:.2f}', ha='center',
                va='center', fontsize=8)
    ax.set(xlabel='needle depth', ylabel='context length', title=f'passkey accuracy | {title}')
    fig.colorbar(im, ax=ax)
    save(fig, 'passkey.png')
  mq = results.get('mqar')
  if mq:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for j, n in enumerate(mq['pairs']):
      pts = [(L, row[j]) for L, row in zip(mq['lengths'], mq['accuracy']) if row[j] is not None]
      if pts:
        ax.plot(*zip(*pts), 'o-', label=f'{n} pairs')
    ax.set_xscale('log', base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel='context length (tokens)', ylabel='recall accuracy', title=f'MQAR | {title}')
    ax.legend()
    save(fig, 'mqar.png')
  ru = results.get('ruler')
  if ru:
    fig, ax = plt.subplots(figsize=(1.2 * len(ru['lengths']) + 3, 0.45 * len(ru['tasks']) + 2))
    _heatmap(fig, ax, [*ru['score'], ru['average']], [str(L) for L in ru['lengths']],
             [*ru['tasks'], 'average'])
    ax.set(xlabel='context length', title=f'RULER-style score | {title}')
    save(fig, 'ruler.png')
  nd = (ru or {}).get('niah_depth')
  if nd and nd['lengths']:
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(nd['depths']) + 2))
    grid = np.array(nd['score'], dtype=float).T          # depth x length
    _heatmap(fig, ax, grid.tolist(), [str(L) for L in nd['lengths']],
             [f'{d:.0%}' for d in nd['depths']])
    ax.set(xlabel='context length', ylabel='needle depth',
           title=f'NIAH (single) accuracy | {title}')
    save(fig, 'ruler_niah_depth.png')
  return files


def _heatmap(fig, ax, rows, xlabels, ylabels):
  grid = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
  im = ax.imshow(grid, vmin=0, vmax=1, cmap='RdYlGn', aspect='auto')
  ax.set_xticks(range(len(xlabels)), xlabels)
  ax.set_yticks(range(len(ylabels)), ylabels)
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      ax.text(j, i, '-' if np.isnan(grid[i, j]) else f'{grid[i, j]:.2f}', ha='center',
              va='center', fontsize=8)
  fig.colorbar(im, ax=ax)
