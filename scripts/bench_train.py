"""Training throughput of one config: tokens/s, step time, MFU against a matmul peak measured in
the same run, the op-time breakdown of the step, compiled memory, and the data pipeline alone.

    python scripts/bench_train.py --config configs/tiny.py [--shape d384] [--steps 8]
        [--json PATH] [--smoke] [--config.KEY=VAL ...]

Times are reported twice: wall time (the docs/measuring.md convention) and process CPU time (all
threads). On a machine shared with other work, wall time swings with the load while CPU time
per step does not, so "MFU (CPU time)" = (model FLOPs / step CPU s) / (peak FLOPs / peak CPU s)
is the steadier ratio; on a quiet machine the two agree when the step keeps every core busy.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from parallelism import mesh as mesh_lib  # noqa: E402
from training import data as data_lib  # noqa: E402
from training.metrics import perf, profile
from training.program import build_program  # noqa: E402
from training.state import count_params  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
flags.DEFINE_integer('steps', 8, 'Timed steps (median reported).')
flags.DEFINE_string('shape', '', f'Named shape overriding the config: {sorted(profile.SHAPES)}.')
flags.DEFINE_integer('profile_steps', 2, 'Steps traced for the op-time breakdown (0 = none).')
flags.DEFINE_string('json', '', 'Also write every figure to this JSON file.')
flags.DEFINE_bool('smoke', False, 'Seconds-long run: the smoke shape, 2 steps, small peak matmul.')


def cpu_time_peak(mesh, n: int, repeats: int) -> float:
  """FLOPs per process CPU second of the same all-devices n x n float32 matmul that
  perf.measure_peak_trials times in wall seconds (best of the repeats)."""
  devices = mesh.devices.reshape(-1)
  sharding = NamedSharding(Mesh(devices, ('d',)), P('d'))
  x = jax.device_put(jnp.ones((len(devices), n, n), jnp.float32) / n, sharding)
  f = jax.jit(lambda a: jnp.einsum('dij,djk->dik', a, a), out_shardings=sharding)
  f(x).block_until_ready()
  cpu = []
  for _ in range(repeats):
    c0 = time.process_time()
    f(x).block_until_ready()
    cpu.append(time.process_time() - c0)
  return 2.0 * n ** 3 * len(devices) / min(cpu)


def main(_):
  absl_logging.set_verbosity(absl_logging.WARNING)
  F = flags.FLAGS
  c = profile.apply_shape(F.config, 'smoke' if F.smoke else F.shape)
  steps = 2 if F.smoke else F.steps
  mesh = mesh_lib.make_mesh(c.mesh)
  program = build_program(c, mesh)
  state = program.init_state()
  batch = program.global_batch(next(data_lib.make_train_iterator(c)))
  compiled = program.train_step.lower(state, batch).compile()
  holder = {'state': state}

  def one_step():
    holder['state'], m = compiled(holder['state'], batch)
    jax.block_until_ready(m)

  t = perf.wall_and_cpu(one_step, repeats=steps)
  n = 256 if F.smoke else 2048
  trials = perf.measure_peak_trials(mesh, n=n, trials=3 if F.smoke else 10)
  peak = {'wall': c.perf.peak_flops * mesh.devices.size if c.perf.peak_flops else max(trials),
          'cpu': cpu_time_peak(mesh, n, repeats=2 if F.smoke else 5)}
  tokens = c.batch_size * c.seq_len
  causal = perf.train_flops_per_token(c.model, c.seq_len, causal=True)
  full = perf.train_flops_per_token(c.model, c.seq_len, causal=False)
  tps = tokens / t['median']
  mfu = tps * causal / peak['wall']
  mfu_cpu = tokens * causal / t['cpu_median'] / peak['cpu']
  data_tps = data_lib.measure_tokens_per_sec(c, seconds=0.5 if F.smoke else 3.0)
  mem = perf.compiled_memory_bytes(compiled)
  prof = None
  if F.profile_steps:
    prof = profile.profile_steps(one_step, compiled.as_text(), 1 if F.smoke else F.profile_steps)
  dev = jax.devices()[0]
  m = c.model
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'# bench_train | {dev.platform} {dev.device_kind} x{len(jax.devices())} | '
        f'jax {jax.__version__} | model {m.name} L={m.num_layers} d={m.d_model} '
        f'H={m.num_heads}x{m.head_dim} K={m.num_kv_heads} F={m.mlp_dim} V={m.vocab_size} '
        f'params {count_params(state.params):,} | batch {c.batch_size} x seq {c.seq_len} | '
        f'mesh {mesh_lib.describe(mesh)} | {m.dtype} | scan_layers={m.scan_layers} '
        f'remat={m.remat} | load average {load:.1f} on {os.cpu_count()} CPUs')
  print('# MFU = 3 x forward model FLOPs (docs/measuring.md) / peak; causal counts half the '
        'attention pairs, full counts all; peak = float32 matmul measured in this run')
  rows = [
      ('step time median (min-max) s', f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})"),
      ('step CPU time median s', f"{t['cpu_median']:.3f}"),
      ('tokens/s', f'{tps:,.0f}'),
      ('model TFLOPs/token (causal | full)', f'{causal / 1e12:.6f} | {full / 1e12:.6f}'),
      ('matmul peak GFLOP/s (wall' + (', perf.peak_flops' if c.perf.peak_flops else
                                        f', best of {len(trials)}; worst '
                                        f'{min(trials) / 1e9:,.0f}') + ' | per CPU s)',
       f"{peak['wall'] / 1e9:,.0f} | {peak['cpu'] / 1e9:,.0f}"),
      ('MFU causal | full (wall)', f'{mfu:.1%} | {tps * full / peak["wall"]:.1%}'),
      ('MFU causal (CPU time)', f'{mfu_cpu:.1%}'),
      ('compiled step memory / device MiB', f'{mem / 2**20:,.1f}'),
      ('data pipeline tokens/s (alone)', f'{data_tps:,.0f}'),
  ]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f'{k:<{width}}  {v}')
  if prof:
    for line in profile.format_breakdown(prof):
      print(line)
  if F.json:
    with open(F.json, 'w') as f:
      json.dump({'step_seconds': t, 'tokens_per_sec': tps, 'train_flops_per_token_causal': causal,
                 'train_flops_per_token_full': full, 'peak_flops': peak, 'mfu_causal': mfu,
                 'mfu_full': tps * full / peak['wall'], 'mfu_causal_cpu_time': mfu_cpu,
                 'compiled_memory_bytes': mem, 'data_tokens_per_sec': data_tps,
                 'breakdown': prof, 'peak_trials': trials, 'load_average': load,
                 'config': c.to_dict()}, f, indent=1, default=str)
  print(f'tokens/s {tps:,.0f} | MFU {mfu:.0%} (causal, wall) {mfu_cpu:.0%} (CPU time) | '
        f'peak {peak["wall"] / 1e9:,.0f} GFLOP/s | data {data_tps / 1e6:.1f}M tokens/s')


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(lambda: app.run(main))
