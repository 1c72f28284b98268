"""Study: does training with stochastic KV routing make a model degrade less when caches are shared?

Trains the tiny dense model twice for the same budget, with routing (p = 0.6, the paper's
fine-tuning value) and without (p = 1), then evaluates both under grouped cache plans
(100/50/25% retention), after "Stochastic KV Routing: Enabling Adaptive Depth-Wise Cache
Sharing" (Filippova et al., 2026). The tiny model is narrowed to d_model 128 (seq 128) so that
400 steps per run fit ~6 minutes in all on 2 shared CPU cores; at d_model 256 and 150 steps the
deeper layers barely used attention yet, and sharing caches cost the baseline only ~0.015 nats.

    python scripts/study_kv_routing.py [--steps 400] [--d_model 128] [--workdir /tmp/kvr]
"""

import argparse
import logging
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny
from scripts.eval_kv_sharing import evaluate_plans, header, load_run
from training import loop

GROUPS = (1, 2, 4)   # 100%, 50%, 25% retention on 4 layers


def study_config(args, p: float):
  c = tiny.get_config()
  c.steps = args.steps
  c.batch_size = args.batch_size
  c.seq_len = args.seq_len
  c.optimizer.warmup_steps = max(1, args.steps // 10)
  c.eval_every = 0
  c.eval_batches = args.eval_batches
  c.log_every = max(1, args.steps // 5)
  c.progress = False
  c.checkpoint.async_save = False
  c.model.d_model = args.d_model
  c.model.head_dim = args.d_model // c.model.num_heads
  c.model.mlp_dim = 3 * args.d_model
  c.model.kv_routing.p = p
  if args.smoke:
    c.perf.peak_flops = 1e12  # MFU is not what this study reports: skip the measurement
  return c


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--d_model', type=int, default=128, help='head_dim and mlp_dim follow')
  parser.add_argument('--eval_batches', type=int, default=16)
  parser.add_argument('--p', type=float, default=0.6, help='keep-own probability of the routed run')
  parser.add_argument('--workdir', default='/tmp/kv_routing_study')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long check: 2 steps of 8 x 32 tokens, d_model 32')
  args = parser.parse_args(argv)
  if args.smoke:
    args.steps, args.batch_size, args.seq_len, args.d_model, args.eval_batches = 2, 8, 32, 32, 1
  logging.basicConfig(level=logging.WARNING)

  results = {}
  for p in (args.p, 1.0):
    workdir = os.path.join(args.workdir, f'p{p:g}')
    shutil.rmtree(workdir, ignore_errors=True)
    config = study_config(args, p)
    start = time.perf_counter()
    row = loop.run(config, workdir)
    train_s = time.perf_counter() - start
    config, program, params, _ = load_run(workdir)
    plans = evaluate_plans(config, program, params, GROUPS, config.eval_batches)
    # The loop's own final eval (full cache) must agree with ours at g = 1.
    assert abs(plans[0]['loss'] - row['eval/loss']) < 1e-4, (plans[0]['loss'], row['eval/loss'])
    results[p] = (plans, row['train/loss'], train_s)

  print(header(config, f'KV routing study: {args.steps} steps x {args.batch_size} x '
                       f'{args.seq_len} tokens per run, configs/tiny.py'))
  cols = ''.join(f'{f"loss@{100 // g}%":>11}{"(+)":>8}' for g in GROUPS)
  print(f'{"run":<14}{"train loss":>11}{cols}{"cache@25%":>11}{"train s":>9}')
  for p, (plans, train_loss, train_s) in results.items():
    base = plans[0]['loss']
    cells = ''.join(f'{r["loss"]:>11.4f}{r["loss"] - base:>+8.4f}' for r in plans)
    name = f'routed p={p:g}' if p < 1 else 'baseline p=1'
    print(f'{name:<14}{train_loss:>11.4f}{cells}{plans[-1]["cache_bytes"]:>11,}{train_s:>9.0f}')
  routed, baseline = results[args.p][0], results[1.0][0]
  delta = lambda plans, i: plans[i]['loss'] - plans[0]['loss']
  print(f'loss increase at 50% retention: routed {delta(routed, 1):+.3f} vs baseline '
        f'{delta(baseline, 1):+.3f}; at 25%: routed {delta(routed, 2):+.3f} vs baseline '
        f'{delta(baseline, 2):+.3f}; full-cache loss routed {routed[0]["loss"]:.3f} vs '
        f'baseline {baseline[0]["loss"]:.3f}')


if __name__ == '__main__':
  main()
