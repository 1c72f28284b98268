"""Study: does training with stochastic KV routing make a model degrade less when caches are shared?

    python scripts/study_kv_routing.py              # the recorded run (docs/results/kv_routing.md)
    python scripts/study_kv_routing.py --smoke      # seconds, untrained, to a temp folder

Trains the tiny dense model twice on the same tokens, with routing (p = 0.6, the paper's
fine-tuning value) and without (p = 1), then evaluates both under grouped cache plans (every
g-th layer keeps a cache: 100/50/25% retention on 4 layers), after "Stochastic KV Routing:
Enabling Adaptive Depth-Wise Cache Sharing" (Filippova et al., 2026). The model is narrowed to
d_model 128 (seq 128) to fit a few CPU minutes; at d_model 256 and 150 steps the deeper layers
barely used attention yet, and sharing caches cost the baseline only ~0.015 nats.

The claim holds here when the routed model's loss increase at 50% retention (vs its own full
cache) is smaller than the baseline's by at least MARGIN nats. The script exits 1 otherwise.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--d_model', type=int, default=128, help='head_dim and mlp_dim follow')
  parser.add_argument('--eval_batches', type=int, default=16)
  parser.add_argument('--p', type=float, default=0.6, help='keep-own probability of the routed run')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: tiny shapes, no training steps (init, eval, report)')
  parser.add_argument('--out', default=None,
                      help='report folder (default docs/results; smoke: a temp folder)')
  return parser.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny  # noqa: E402
from modeling import decode  # noqa: E402
from modeling.kv_routing import CachePlan  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from scripts import study_report  # noqa: E402

GROUPS = (1, 2, 4)   # 100%, 50%, 25% retention on 4 layers
MARGIN = 0.005       # nats: the routed model's 50%-retention penalty must be this much smaller


def study_config(args, p: float):
  c = tiny.get_config()
  c.steps, c.batch_size, c.seq_len = args.steps, args.batch_size, args.seq_len
  c.optimizer.warmup_steps = max(1, args.steps // 10)
  c.mesh.data = 1
  c.progress = False
  m = c.model
  m.d_model = args.d_model
  m.head_dim = args.d_model // m.num_heads
  m.mlp_dim = 3 * args.d_model
  m.kv_routing.p = p
  return c


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.steps, args.batch_size, args.seq_len, args.d_model, args.eval_batches = 0, 2, 32, 32, 1
  out = args.out or (tempfile.mkdtemp() if args.smoke else study_report.RESULTS)
  mesh = mesh_lib.make_mesh(study_config(args, 1.0).mesh, jax.devices()[:1])
  batches = study_report.held_out(study_config(args, 1.0), args.eval_batches)

  results = {}
  for p in (args.p, 1.0):
    c = study_config(args, p)
    params, graphdef, seconds = study_report.train(c, mesh)
    model = nnx.merge(graphdef, params)
    plans = []
    for g in GROUPS:
      plan = CachePlan.every(c.model.num_layers, g)
      plans.append({'g': g, 'retention': plan.retention,
                    'loss': study_report.mean_loss(graphdef, params, batches, kv_plan=plan),
                    'cache_bytes': decode.cache_bytes(model, plan, 1, c.seq_len)})
    results[p] = (plans, seconds)
    print(f'  p={p}: ' + ', '.join(f'g={r["g"]} {r["loss"]:.4f}' for r in plans), flush=True)

  table = ['| run | s/step (wall) | ' + ' | '.join(f'loss @{100 // g}% (+)' for g in GROUPS)
           + ' | cache @25% (bytes) |', '|---' * (3 + len(GROUPS)) + '|']
  for p, (plans, seconds) in results.items():
    base = plans[0]['loss']
    name = f'routed p={p:g}' if p < 1 else 'baseline p=1'
    table.append(f'| {name} | {seconds:.3f} | ' + ' | '.join(
        f'{r["loss"]:.4f} ({r["loss"] - base:+.4f})' for r in plans)
        + f' | {plans[-1]["cache_bytes"]:,} |')
  delta = lambda plans, i: plans[i]['loss'] - plans[0]['loss']
  routed, baseline = results[args.p][0], results[1.0][0]
  holds = delta(routed, 1) <= delta(baseline, 1) - MARGIN
  verdict = (f'loss increase at 50% retention: routed {delta(routed, 1):+.4f} vs baseline '
             f'{delta(baseline, 1):+.4f} nats (threshold: routed <= baseline - {MARGIN}); at '
             f'25%: routed {delta(routed, 2):+.4f} vs baseline {delta(baseline, 2):+.4f}; '
             f'full-cache loss routed {routed[0]["loss"]:.4f} vs baseline '
             f'{baseline[0]["loss"]:.4f}.')
  c = study_config(args, 1.0)
  body = (f'Dense model, {c.model.num_layers} layers, d_model {c.model.d_model}, '
          f'{args.steps} steps x {args.batch_size} x {args.seq_len} tokens per run (the same '
          f'batches), byte-level local_text; loss = mean next-byte NLL over {args.eval_batches} '
          'held-out batches under each cache plan (every g-th layer keeps a cache).\n\n'
          + '\n'.join(table))

  def figure(path):
    def draw(ax):
      for p, (plans, _) in results.items():
        ax.plot([100 * r['retention'] for r in plans],
                [r['loss'] - plans[0]['loss'] for r in plans], 'o-',
                label=f'routed p={p:g}' if p < 1 else 'baseline p=1')
      ax.invert_xaxis()
      ax.set(xlabel='KV cache retention (%)', ylabel='loss increase vs full cache (nats)',
             title='Cache sharing penalty')
      ax.legend()
    study_report.plot(path, draw)

  return study_report.finish('kv_routing', 'Stochastic KV routing: cache-sharing penalty',
                             body, verdict, holds, figure, out, table, args.smoke)


if __name__ == '__main__':
  from training.errors import run_cli
  run_cli(main)
