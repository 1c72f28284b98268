"""Op-time breakdown of one config's train step, from a jax.profiler trace.

    python scripts/profile_step.py --config configs/tiny.py [--shape d384] [--steps 3]
        [--json PATH] [--smoke]

Traces a few steps (after a warm-up step), attributes every XLA op to a category (matmul,
attention, layout copies, elementwise/norms, loss, optimizer, collectives) by its optimized
HLO instruction (training/metrics/profile.py) and prints ms per step and shares. Host/data wait is the
time spent fetching the next batch from the real input pipeline between steps.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from parallelism import mesh as mesh_lib  # noqa: E402
from training import data as data_lib  # noqa: E402
from training.metrics import profile
from training.program import build_program  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
flags.DEFINE_string('shape', '', f'Named shape overriding the config: {sorted(profile.SHAPES)}.')
flags.DEFINE_integer('steps', 3, 'Traced steps.')
flags.DEFINE_string('json', '', 'Also write the breakdown to this JSON file.')
flags.DEFINE_bool('smoke', False, 'Seconds-long run: the smoke shape, one traced step.')


def main(_):
  absl_logging.set_verbosity(absl_logging.WARNING)
  F = flags.FLAGS
  c = profile.apply_shape(F.config, 'smoke' if F.smoke else F.shape)
  steps = 1 if F.smoke else F.steps
  mesh = mesh_lib.make_mesh(c.mesh)
  program = build_program(c, mesh)
  holder = {'state': program.init_state()}
  it = data_lib.make_train_iterator(c)
  holder['batch'] = program.global_batch(next(it))
  compiled = program.train_step.lower(holder['state'], holder['batch']).compile()

  def run_step():
    holder['state'], m = compiled(holder['state'], holder['batch'])
    jax.block_until_ready(m)

  def next_batch():
    holder['batch'] = program.global_batch(next(it))

  result = profile.profile_steps(run_step, compiled.as_text(), steps, next_batch)
  dev = jax.devices()[0]
  m = c.model
  print(f'# profile_step | {dev.platform} {dev.device_kind} x{len(jax.devices())} | '
        f'jax {jax.__version__} | model {m.name} L={m.num_layers} d={m.d_model} '
        f'H={m.num_heads}x{m.head_dim} K={m.num_kv_heads} F={m.mlp_dim} V={m.vocab_size} | '
        f'batch {c.batch_size} x seq {c.seq_len} | {m.dtype} | scan_layers={m.scan_layers} '
        f'remat={m.remat} attention.impl={c.attention.impl} | {steps} traced steps')
  for line in profile.format_breakdown(result):
    print(line)
  shares = {k: v / result['op_seconds'] for k, v in result['seconds'].items()}
  print('shares | ' + ' | '.join(f'{k} {v:.0%}' for k, v in shares.items() if v >= 0.005))
  if F.json:
    with open(F.json, 'w') as f:
      json.dump({**result, 'shares': shares, 'config': c.to_dict(), 'steps': steps}, f, indent=1,
                default=str)


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(lambda: app.run(main))
