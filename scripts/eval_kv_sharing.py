"""Eval loss and KV-cache bytes of one trained checkpoint at several cache-retention levels.

Serves the checkpoint under the grouped cache plans of "Stochastic KV Routing: Enabling Adaptive
Depth-Wise Cache Sharing" (Filippova et al., 2026): every g-th layer keeps a cache and the others
read their group leader's, g = 1..4 (100/50/33/25% retention).

    python scripts/eval_kv_sharing.py --checkpoint runs/tiny [--step N] [--groups 1,2,3,4]
    python scripts/eval_kv_sharing.py --smoke   # trains a 2-step tiny run first, then evaluates

--checkpoint is the run's workdir or its checkpoints/ folder (the step's own config is used).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', help='run workdir or its checkpoints/')
  parser.add_argument('--step', type=int, default=None, help='default: the latest')
  parser.add_argument('--groups', default='1,2,3,4', help='cache every g-th layer, for each g')
  parser.add_argument('--eval_batches', type=int, default=None, help='default: the run config')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long check: evaluate a 2-step tiny run trained in a temp dir')
  args = parser.parse_args(argv)
  if not args.smoke and not args.checkpoint:
    parser.error('--checkpoint is required (or --smoke)')
  return args


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from checkpoint import universal  # noqa: E402
from checkpoint.manager import Checkpointer  # noqa: E402
from modeling import decode  # noqa: E402
from modeling.kv_routing import CachePlan  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from training import data as data_lib  # noqa: E402
from training import loss as loss_lib  # noqa: E402
from training.program import build_program  # noqa: E402


def load_run(checkpoint: str, step: int | None = None):
  """(config, program, params, step) of a run written by training/loop.py, with the config the
  step was saved with (training/evaluation/serving.py)."""
  from training.evaluation import serving
  workdir = serving.run_dir(checkpoint)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    step = serving.pick_step(ckpt, step, checkpoint)
    config = serving.step_config(ckpt, step, workdir)
    program = build_program(config, mesh_lib.make_mesh(config.mesh))
    state, _, _ = universal.restore_state(ckpt, step, config, program.setup, program.mesh)
  finally:
    ckpt.close()
  return config, program, state.params, step


def evaluate_plans(config, program, params, groups, num_batches: int) -> list[dict]:
  """Per g: mean held-out next-token loss under CachePlan.every(L, g), and the cache bytes of
  one `seq_len`-token sequence (K and V of the cached layers, in model.dtype)."""
  batches = [program.global_batch(b) for b in data_lib.make_eval_batches(
      config, num_batches=num_batches)]
  model = nnx.merge(program.setup.graphdef, params)

  @nnx.jit(static_argnames='plan')
  def loss_sum(model, batch, plan):
    h = model(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'],
              kv_plan=plan)
    return loss_lib.lm_loss_sum(model, h, batch['targets'])

  rows = []
  for g in groups:
    plan = CachePlan.every(config.model.num_layers, g)
    total = count = 0.0
    for batch in batches:
      t, c = loss_sum(model, batch, plan=plan)
      total, count = total + float(t), count + float(c)
    rows.append({'g': g, 'cached': plan.cached, 'retention': plan.retention,
                 'loss': total / max(count, 1.0),
                 'cache_bytes': decode.cache_bytes(model, plan, 1, config.seq_len)})
  return rows


def header(config, what: str) -> str:
  m = config.model
  dev = jax.devices()[0]
  return (f'# {what} | backend {jax.default_backend()}, {dev.device_kind} x {jax.device_count()}, '
          f'jax {jax.__version__} | model L={m.num_layers} d={m.d_model} H={m.num_heads} '
          f'K={m.num_kv_heads} Dh={m.head_dim} {m.dtype}, seq_len {config.seq_len} | '
          f'loss: mean next-token nats on held-out batches; '
          f'cache: K+V bytes of one seq_len-token sequence')


def smoke_run() -> str:
  """A 2-step run of a 2-layer d=32 model in a temporary workdir; returns the workdir."""
  import tempfile

  from configs import tiny
  from training import loop
  c = tiny.get_config()
  c.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
  c.steps, c.batch_size, c.seq_len, c.log_every, c.eval_every = 2, 8, 32, 1, -1
  c.progress, c.checkpoint.async_save = False, False
  c.perf.peak_flops = 1e12  # the loop's MFU is not what this script reports
  workdir = tempfile.mkdtemp(prefix='eval_kv_sharing_smoke_')
  loop.run(c, workdir)
  return workdir


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.checkpoint, args.groups, args.eval_batches = smoke_run(), '1,2', 1
  config, program, params, step = load_run(args.checkpoint, args.step)
  groups = [int(g) for g in args.groups.split(',')]
  rows = evaluate_plans(config, program, params, groups,
                        args.eval_batches or config.eval_batches)
  print(header(config, f'KV cache sharing: {args.checkpoint} step {step}, trained with '
                       f'kv_routing.p={config.model.kv_routing.p}'))
  print(f'{"g":>3} {"cached layers":<16} {"retention":>9} {"eval loss":>10} {"vs g=1":>8} '
        f'{"cache bytes":>12}')
  base = rows[0]['loss']
  for r in rows:
    print(f'{r["g"]:>3} {",".join(map(str, r["cached"])):<16} {r["retention"]:>9.0%} '
          f'{r["loss"]:>10.4f} {r["loss"] - base:>+8.4f} {r["cache_bytes"]:>12,}')
  print(' | '.join(f'{r["retention"]:.0%}: loss {r["loss"]:.4f}, {r["cache_bytes"]:,} B'
                   for r in rows))


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
