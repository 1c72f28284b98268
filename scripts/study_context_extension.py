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
  p.add_argument('--workdir', default='', help='runs go here (base/, extend_<type>/)')
  p.add_argument('--out', default='', help='results path without extension')
  p.add_argument('--from_json', default='',
                 help='only write OUT.md from a results JSON of an earlier run')
  p.add_argument('--smoke', action='store_true',
                 help='seconds-long check: a 1-layer model, 2 steps each, none and yarn')
  p.add_argument('--types', default='none,linear,ntk,yarn,llama3')
  p.add_argument('--base_steps', type=int, default=200)
  p.add_argument('--steps', type=int, default=30, help='extension steps per scaling type')
  p.add_argument('--eval_tokens', type=int, default=16384)
  p.add_argument('--passkey_samples', type=int, default=2)
  p.add_argument('--ruler_samples', type=int, default=2)
  args = p.parse_args(argv)
  if args.smoke:
    import tempfile
    tmp = tempfile.mkdtemp(prefix='ctx_smoke_')
    args.workdir, args.out = args.workdir or tmp, args.out or os.path.join(tmp, 'out')
    args.types, args.base_steps, args.steps = 'none,yarn', 2, 2
    args.eval_tokens, args.passkey_samples, args.ruler_samples = 2048, 1, 1
    MODEL.update(num_layers=1, d_model=32, head_dim=16, mlp_dim=64)
  elif not args.out or not (args.workdir or args.from_json):
    p.error('--workdir and --out are required (or --smoke)')
  return args


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
  from training.evaluation import evals, serving
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
  """({seq_len: mean tokens/s}, {seq_len: mean MFU}, train rows) of a staged run."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  tps: dict[str, list] = {}
  mfu: dict[str, list] = {}
  for r in rows:
    if 'perf/tokens_per_sec' in r and 'data/seq_len' in r:
      L = str(int(r['data/seq_len']))
      tps.setdefault(L, []).append(r['perf/tokens_per_sec'])
      mfu.setdefault(L, []).append(r['perf/mfu'])
  mean = lambda d: {L: sum(v) / len(v) for L, v in d.items()}   # noqa: E731
  return mean(tps), mean(mfu), [r for r in rows if 'train/loss' in r]


def markdown(results: dict, command: str) -> str:
  """The tables of OUT.md."""
  f = lambda v: '-' if v is None else f'{v:.3f}'   # noqa: E731
  pct = lambda v: '-' if v is None else f'{100 * v:.0f}%'   # noqa: E731
  m = results['model']
  lines = [
      '# Context extension: 256 -> 2,048 tokens with each RoPE scaling type', '',
      f'Recorded {results["date"]} on this machine (CPU, shared cores) by', '',
      f'    {command}', '',
      f'Model: dense transformer, {m["num_layers"]} layers, d_model {m["d_model"]}, head_dim '
      f'{m["head_dim"]}, byte-level, trained {results["base_steps"]} steps of 16 x 256 tokens '
      '(configs/tiny.py) on the Python standard library. Each extension: '
      f'{results["steps"]} steps of 4,096 tokens (configs/extend.py: 1,024 -> 2,048 length '
      'schedule, factor 8, L0 = 256, peak LR 1e-3), the same data for every type. Evaluated at '
      '2,048 tokens on held-out files: loss by position (nats/token, token-weighted over the '
      'log2 buckets), passkey (all 5 digits, 5 depths), RULER-style NIAH single (5 depths) and '
      'variable tracking.', '',
      '| scaling | zero-shot loss, positions < 256 | zero-shot loss, 256-2,047 | extended '
      'loss, < 256 | extended loss, 256-2,047 | extended loss, 1,024-2,047 | passkey @2K | '
      'NIAH single @2K | VT @2K | train tokens/s (1K / 2K stage) | MFU (1K / 2K) |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for kind, r in results['types'].items():
    z, e = r['zero_shot'], r['extended']
    tps = r['tokens_per_sec_by_stage']
    mfu = r.get('mfu_by_stage', {})
    ru = e.get('ruler_2048', {})
    lines.append(f'| {kind} | {f(z["loss_below_256"])} | {f(z["loss_beyond_256"])} | '
                 f'{f(e["loss_below_256"])} | {f(e["loss_beyond_256"])} | '
                 f'{f(e["loss_1024_2048"])} | {pct(e["passkey_2048"])} | '
                 f'{pct(ru.get("niah_single"))} | {pct(ru.get("vt"))} | '
                 f'{tps.get("1024", 0):,.0f} / {tps.get("2048", 0):,.0f} | '
                 f'{100 * mfu.get("1024", 0):.1f}% / {100 * mfu.get("2048", 0):.1f}% |')
  lines += ['', 'Loss by position bucket after extension (nats/token):', '',
            '| scaling | ' + ' | '.join(
                f'[{lo},{hi})' for lo, hi in
                next(iter(results['types'].values()))['extended']['position_loss']['buckets']
                if lo >= 64) + ' |']
  nb = sum(1 for lo, _ in next(iter(results['types'].values()))['extended']['position_loss'][
      'buckets'] if lo >= 64)
  lines.append('|---|' + '---:|' * nb)
  for kind, r in results['types'].items():
    pl = r['extended']['position_loss']
    lines.append(f'| {kind} | ' + ' | '.join(
        f(v) for (lo, _), v in zip(pl['buckets'], pl['loss']) if lo >= 64) + ' |')
  lines += ['', f'Whole study: {results["wall_s"] / 60:.1f} min wall, '
            f'{results["cpu_s"] / 60:.1f} min process CPU (the original model not included).',
            '']
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  command = 'python scripts/study_context_extension.py ' + ' '.join(argv or sys.argv[1:])
  if args.from_json:
    results = json.load(open(args.from_json))
    written = datetime.datetime.fromtimestamp(os.path.getmtime(args.from_json),
                                              datetime.timezone.utc)
    results.setdefault('date', written.strftime('%Y-%m-%d %H:%M UTC'))
    with open(args.out + '.md', 'w') as f:
      f.write(markdown(results, results.get('command', command)))
    return
  from configs import extend, tiny
  from training import loop
  t_start = time.time()
  cpu0 = time.process_time()
  base = os.path.join(args.workdir, 'base')
  if not os.path.exists(os.path.join(base, 'checkpoints')):
    c = _shrink(tiny.get_config())
    c.steps, c.eval_every = args.base_steps, -1
    c.batch_size = 4 if args.smoke else c.batch_size
    loop.run(c, base)
  results = {'model': MODEL, 'base_steps': args.base_steps, 'steps': args.steps, 'types': {}}
  for kind in args.types.split(','):
    c = _shrink(extend.get_config(kind))
    if args.smoke:
      c.batch_size = 1
    c.steps = c.optimizer.decay_steps = args.steps
    c.data.length_schedule = f'0:1024,{max(1, args.steps // 3)}:{extend.TARGET}'
    scaling = c.model.rope_scaling.to_dict()
    print(f'--- {kind}: zero-shot', flush=True)
    zero = evaluate(base, scaling, args, ruler_tasks=())
    work = os.path.join(args.workdir, f'extend_{kind}')
    if not os.path.exists(os.path.join(work, 'checkpoints')):
      c.init_from = os.path.join(base, 'checkpoints')
      print(f'--- {kind}: extension training', flush=True)
      loop.run(c, work)
    print(f'--- {kind}: evaluation after extension', flush=True)
    tuned = evaluate(work, None, args,
                     ruler_tasks=('niah_single',) if args.smoke else ('niah_single', 'vt'))
    perf, mfu, train_rows = _stage_perf(work)
    results['types'][kind] = {'scaling': scaling, 'zero_shot': zero, 'extended': tuned,
                              'tokens_per_sec_by_stage': perf, 'mfu_by_stage': mfu,
                              'final_train_loss': train_rows[-1]['train/loss']}
  results['wall_s'] = time.time() - t_start
  results['cpu_s'] = time.process_time() - cpu0
  results['date'] = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  results['command'] = command
  with open(args.out + '.json', 'w') as f:
    json.dump(results, f, indent=1)
  with open(args.out + '.md', 'w') as f:
    f.write(markdown(results, command))
  print(json.dumps({k: {'zero': v['zero_shot']['loss_beyond_256'],
                        'tuned': v['extended']['loss_beyond_256'],
                        'passkey': v['extended']['passkey_2048']}
                    for k, v in results['types'].items()}))


if __name__ == '__main__':
  main()
