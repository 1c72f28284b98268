"""Shared by the study scripts: train a config for a few steps, held-out loss, and the recorded
markdown report (command line, machine, date, table, verdict, figure) in docs/results/."""

import datetime
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from training import data as data_lib
from training import loss as loss_lib
from training import step as step_lib
from training.composition import make_runtime
from training.state import init_train_state, setup_model

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                       'results')


def train(config, mesh):
  """Trains `config` for config.steps on one mesh; returns (params, graphdef, seconds/step).
  steps=0 (the studies' --smoke) returns the initial parameters and NaN seconds."""
  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  state = init_train_state(config, setup, runtime)
  if config.steps == 0:
    return state.params, setup.graphdef, float('nan')
  train_step = jax.jit(step_lib.make_train_step(setup), donate_argnums=0)
  it = data_lib.make_train_iterator(config)
  start = None
  for step in range(config.steps):
    state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in next(it).items()})
    if step == 0:   # time steps 2..N: the first one compiles
      jax.block_until_ready(state.params)
      start = time.perf_counter()
  jax.block_until_ready(state.params)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{config.model.name}: loss {float(metrics["loss"])}')
  return state.params, setup.graphdef, (time.perf_counter() - start) / max(config.steps - 1, 1)


def held_out(config, num_batches: int):
  return [{k: jnp.asarray(v) for k, v in b.items()}
          for b in data_lib.make_eval_batches(config, num_batches=num_batches)]


def mean_loss(graphdef, params, batches, **model_kwargs) -> float:
  """Mean next-token loss of the model over `batches`; model_kwargs go to its __call__."""
  @jax.jit
  def loss_sum(params, batch):
    model = nnx.merge(graphdef, params)
    h = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'],
              **model_kwargs)
    return loss_lib.lm_loss_sum(model, h, batch['targets'])

  total = count = 0.0
  for b in batches:
    t, c = loss_sum(params, b)
    total, count = total + float(t), count + float(c)
  return total / count


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  dev = jax.devices()[0]
  return (f'{platform.node() or "host"}: {cpu}, {os.cpu_count()} CPU threads visible | JAX '
          f'{jax.__version__}, backend {jax.default_backend()} ({dev.device_kind})')


def write(name: str, title: str, body: str, verdict: str, holds: bool, figure=None,
          out_dir: str = RESULTS) -> str:
  """docs/results/<name>.md (and <name>.png from `figure(path)`); returns the markdown path."""
  os.makedirs(out_dir, exist_ok=True)
  png = None
  if figure is not None:
    png = os.path.join(out_dir, f'{name}.png')
    figure(png)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  lines = [f'# {title}', '',
           f'- command: `python {" ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}`',
           f'- machine: {machine()}', f'- date: {stamp}', '',
           body.rstrip(), '', f'**Verdict: the claim {"holds" if holds else "does NOT hold"} '
           f'at this scale.** {verdict}', '']
  if png:
    lines += [f'![{name}]({os.path.basename(png)})', '']
  path = os.path.join(out_dir, f'{name}.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


def finish(name: str, title: str, body: str, verdict: str, holds: bool, figure, out_dir: str,
           table: list[str], smoke: bool) -> int:
  """Writes the report, prints the table and verdict; the process exit code."""
  path = write(name, title, body, verdict, holds, figure, out_dir)
  print('\n'.join(table))
  print(verdict)
  print(f'claim {"holds" if holds else "does NOT hold"}; wrote {path}')
  # --smoke checks the plumbing on untrained models: its verdict means nothing, exit 0.
  return 0 if holds or smoke else 1


def plot(path: str, draw) -> None:
  """Calls draw(ax) on a fresh figure and saves it to `path`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  draw(ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
