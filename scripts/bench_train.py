"""Training throughput of one config: tokens/s, step time, MFU against a matmul peak measured in
the same run, compiled memory, and the data pipeline's tokens/s alone.

    python scripts/bench_train.py --config configs/tiny.py [--config.KEY=VAL ...] [--steps 10]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from parallelism import mesh as mesh_lib  # noqa: E402
from training import data as data_lib, perf  # noqa: E402
from training.program import build_program  # noqa: E402
from training.state import count_params  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
flags.DEFINE_integer('steps', 8, 'Timed steps (median reported).')
flags.DEFINE_bool('smoke', False, 'Seconds-long check: a 1-layer d=32 model, 2 timed steps.')


def main(_):
  absl_logging.set_verbosity(absl_logging.WARNING)
  c = flags.FLAGS.config
  smoke = flags.FLAGS.smoke
  if smoke:
    c.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                   mlp_dim=64)
    c.batch_size, c.seq_len, flags.FLAGS.steps = 4, 32, 2
  mesh = mesh_lib.make_mesh(c.mesh)
  program = build_program(c, mesh)
  state = program.init_state()
  batch = program.global_batch(next(data_lib.make_train_iterator(c)))
  compiled = program.train_step.lower(state, batch).compile()
  holder = {'state': state}

  def one_step():
    holder['state'], m = compiled(holder['state'], batch)
    jax.block_until_ready(m)

  t = perf.time_call(one_step, repeats=flags.FLAGS.steps)
  trials = perf.measure_peak_trials(mesh, n=256 if smoke else 2048, trials=3 if smoke else 10)
  peak = c.perf.peak_flops * mesh.devices.size if c.perf.peak_flops else max(trials)
  tokens = c.batch_size * c.seq_len
  causal = perf.train_flops_per_token(c.model, c.seq_len, causal=True)
  full = perf.train_flops_per_token(c.model, c.seq_len, causal=False)
  tps = tokens / t['median']
  data_tps = data_lib.measure_tokens_per_sec(c, seconds=0.3 if smoke else 3.0)
  mem = perf.compiled_memory_bytes(compiled)
  dev = jax.devices()[0]
  print(f'# bench_train | {dev.platform} {dev.device_kind} x{len(jax.devices())} | '
        f'jax {jax.__version__} | model {c.model.name} L={c.model.num_layers} '
        f'd={c.model.d_model} H={c.model.num_heads} K={c.model.num_kv_heads} '
        f'params {count_params(state.params):,} | batch {c.batch_size} x seq {c.seq_len} | '
        f'mesh {mesh_lib.describe(mesh)} | {c.model.dtype}')
  print('# MFU = 3 x forward model FLOPs (docs/measuring.md) / peak; causal counts half the '
        'attention pairs, full counts all')
  rows = [
      ('step time median (min-max) s', f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"),
      ('tokens/s', f'{tps:,.0f}'),
      ('model TFLOPs/token (causal | full)', f'{causal / 1e12:.6f} | {full / 1e12:.6f}'),
      ('matmul peak GFLOP/s' + (' (perf.peak_flops)' if c.perf.peak_flops else
                                 f' (best of {len(trials)}; worst {min(trials) / 1e9:,.0f})'),
       f'{peak / 1e9:,.0f}'),
      ('MFU causal | full', f'{tps * causal / peak:.1%} | {tps * full / peak:.1%}'),
      ('compiled step memory / device MiB', f'{mem / 2**20:,.1f}'),
      ('data pipeline tokens/s (alone)', f'{data_tps:,.0f}'),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v}')
  print(f'tokens/s {tps:,.0f} | MFU {tps * causal / peak:.0%} (causal) | '
        f'peak {peak / 1e9:,.0f} GFLOP/s | data {data_tps / 1e6:.1f}M tokens/s')


if __name__ == '__main__':
  app.run(main)
