"""Context-extension study on CPU: a tiny model trained at 256 tokens, extended to 2,048 with
each RoPE scaling type for the same number of steps (configs/extend.py), and evaluated at
2,048 before (zero-shot, scaled frequencies only) and after: loss by position beyond the
original length, passkey accuracy and RULER-style NIAH / variable tracking.

    python scripts/study_context_extension.py --workdir /tmp/ctx \
        --out docs/results/context_extension

Writes OUT.json (every number) and OUT.md (the tables, the command, the date).
"""

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = {'num_layers': 2, 'd_model': 128, 'head_dim': 32, 'mlp_dim': 384}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', required=True, help='runs go here (base/, extend_<type>/)')
  p.add_argument('--out', required=True, help='results path without extension')
  p.add_argument('--types', default='none,linear,ntk,yarn,llama3')
  p.add_argument('--base_steps', type=int, default=200)
  p.add_argument('--steps', type=int, default=30, help='extension steps per scaling type')
  p.add_argument('--eval_tokens', type=int, default=16384)
  p.add_argument('--passkey_samples', type=int, default=2)
  p.add_argument('--ruler_samples', type=int, default=2)
  return p.parse_args(argv)


def _shrink(c):
  c.model.update(MODEL)
  c.perf.peak_flops = 1e11           # no peak measurement: MFU against a nominal 100 GFLOP/s
  c.progress = False
  return c


def _beyond(pos_loss: dict, lo_min: int) -> float:
  """Token-weighted loss over the position buckets starting at >= lo_min."""
  num = den = 0.0
  for (lo, _), v, n in zip(pos_loss['buckets'], pos_loss['loss'], pos_loss['tokens']):
    if lo >= lo_min and v is not None:
      num, den = num + v * n, den + n
  return num / den if den else float('nan')


def evaluate(workdir, scaling: dict | None, args, ruler_tasks=('niah_single', 'vt')):
  from training import evals, serving
  from configs.extend import TARGET
  run = serving.load(workdir)
  if scaling is not None:
    run.config.model.rope_scaling.update(scaling)
  tasks = ('position_loss', 'passkey') + (('ruler',) if ruler_tasks else ())
  settings = evals.EvalSettings(tasks=tasks, lengths=(TARGET,), eval_tokens=args.eval_tokens,
                                passkey_samples=args.passkey_samples,
                                ruler_tasks=tuple(ruler_tasks or ()),
                                ruler_samples=args.ruler_samples, seed=1234)
  ev = evals.Evaluator(run.config, run.mesh, run.setup.shardings.params, settings)
  res = evals.run_tasks(ev, run.params)
  pl = res['position_loss'][str(TARGET)]
  pk = [a for a in res['passkey']['accuracy'][0] if a is not None]
  out = {'loss_beyond_256': _beyond(pl, 256), 'loss_below_256': _below(pl, 256),
         'loss_1024_2048': _beyond(pl, 1024), 'passkey_2048': sum(pk) / len(pk),
         'position_loss': pl}
  if ruler_tasks:
    r = res['ruler']
    out['ruler_2048'] = {t: row[0] for t, row in zip(r['tasks'], r['score'])}
    out['ruler_avg_2048'] = r['average'][0]
  return out


def _below(pos_loss: dict, hi_max: int) -> float:
  num = den = 0.0
  for (_, hi), v, n in zip(pos_loss['buckets'], pos_loss['loss'], pos_loss['tokens']):
    if hi <= hi_max and v is not None:
      num, den = num + v * n, den + n
  return num / den if den else float('nan')


def _stage_perf(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  out: dict[str, list] = {}
  for r in rows:
    if 'perf/tokens_per_sec' in r and 'data/seq_len' in r:
      out.setdefault(str(r['data/seq_len']), []).append(r['perf/tokens_per_sec'])
  return {L: sum(v) / len(v) for L, v in out.items()}, [r for r in rows if 'train/loss' in r]


def main(argv=None):
  args = parse_args(argv)
  from configs import extend, tiny
  from training import loop
  t_start = time.time()
  cpu0 = time.process_time()
  base = os.path.join(args.workdir, 'base')
  if not os.path.exists(os.path.join(base, 'checkpoints')):
    c = _shrink(tiny.get_config())
    c.steps, c.eval_every = args.base_steps, -1
    loop.run(c, base)
  results = {'model': MODEL, 'base_steps': args.base_steps, 'steps': args.steps, 'types': {}}
  for kind in args.types.split(','):
    c = _shrink(extend.get_config(kind))
    c.steps = c.optimizer.decay_steps = args.steps
    c.data.length_schedule = f'0:1024,{args.steps // 3}:{extend.TARGET}'
    scaling = c.model.rope_scaling.to_dict()
    print(f'--- {kind}: zero-shot', flush=True)
    zero = evaluate(base, scaling, args, ruler_tasks=())
    work = os.path.join(args.workdir, f'extend_{kind}')
    if not os.path.exists(os.path.join(work, 'checkpoints')):
      c.init_from = os.path.join(base, 'checkpoints')
      print(f'--- {kind}: extension training', flush=True)
      loop.run(c, work)
    print(f'--- {kind}: evaluation after extension', flush=True)
    tuned = evaluate(work, None, args)
    perf, train_rows = _stage_perf(work)
    results['types'][kind] = {'scaling': scaling, 'zero_shot': zero, 'extended': tuned,
                              'tokens_per_sec_by_stage': perf,
                              'final_train_loss': train_rows[-1]['train/loss']}
  results['wall_s'] = time.time() - t_start
  results['cpu_s'] = time.process_time() - cpu0
  with open(args.out + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: {'zero': v['zero_shot']['loss_beyond_256'],
                        'tuned': v['extended']['loss_beyond_256'],
                        'passkey': v['extended']['passkey_2048']}
                    for k, v in results['types'].items()}))


if __name__ == '__main__':
  main()
