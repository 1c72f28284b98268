"""Evaluate a checkpoint on long-context tasks: loss, loss by position, passkey, MQAR, RULER;
and on downstream tasks from local files: lambada, multiple_choice, perplexity
(training/evaluation/downstream.py).

    python scripts/evaluate.py --checkpoint runs/tiny --tasks loss,position_loss,passkey,mqar \
        --lengths 256,1024 --out /tmp/ev
    python scripts/evaluate.py --checkpoint runs/tiny --lengths 16384,65536 --context 8 --out ev
    python scripts/evaluate.py --checkpoint runs/tiny --tasks ruler --lengths 256,1024 --out ev

Loads the checkpoint's parameters onto the local devices (any count: universal restore), data
parallel over them, or with --context N ring attention over N of them (zigzag); lengths above
--blockwise_above use the blockwise kernel. Writes OUT/results.json (every number), one PNG per
task and the same scalars into TensorBoard under OUT/tb. See training/evaluation/evals.py for the tasks
and how they are scored (the model's own arg-max over the answer, given the true prefix);
ruler (training/evaluation/ruler.py) generates greedily through the decode cache instead and also writes
OUT/ruler.md (task x length table) and OUT/ruler_niah_depth.png.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--checkpoint', required=True, help='run workdir or its checkpoints/ folder')
  p.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  p.add_argument('--tasks', default='loss,position_loss,passkey,mqar')
  p.add_argument('--lengths', default='', help="comma-separated; '' = the run's seq_len")
  p.add_argument('--out', required=True, help='output folder')
  p.add_argument('--context', type=int, default=1, help='context-parallel devices (ring)')
  p.add_argument('--eval_tokens', type=int, default=16384,
                 help='held-out tokens per length for loss and position_loss')
  p.add_argument('--passkey_samples', type=int, default=4, help='examples per length x depth')
  p.add_argument('--mqar_pairs', default='4,16,64')
  p.add_argument('--mqar_samples', type=int, default=8, help='examples per length x pairs')
  p.add_argument('--ruler_tasks', default='all', help='ruler: comma-separated subset or all')
  p.add_argument('--ruler_samples', type=int, default=4,
                 help='ruler: examples per task x length (NIAH single: per depth)')
  p.add_argument('--rows_per_batch', type=int, default=8)
  p.add_argument('--blockwise_above', type=int, default=2048)
  p.add_argument('--seed', type=int, default=1234)
  p.add_argument('--lambada_file', default='', help='lambada: jsonl of {"text": ...}')
  p.add_argument('--choice_file', default='',
                 help='multiple_choice: jsonl, HellaSwag / PIQA / ARC / context-choices-label')
  p.add_argument('--text_file', default='', help='perplexity: a UTF-8 text file')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import jax
  import tqdm

  from training.evaluation import downstream, eval_report, evals, ruler, serving

  settings = evals.EvalSettings(
      tasks=evals.parse_list(args.tasks, str), lengths=evals.parse_list(args.lengths, int),
      eval_tokens=args.eval_tokens, passkey_samples=args.passkey_samples,
      mqar_pairs=evals.parse_list(args.mqar_pairs, int), mqar_samples=args.mqar_samples,
      ruler_tasks=ruler.parse_tasks(args.ruler_tasks), ruler_samples=args.ruler_samples,
      rows_per_batch=args.rows_per_batch, blockwise_above=args.blockwise_above, seed=args.seed,
      files=downstream.Files(args.lambada_file, args.choice_file, args.text_file))
  run = serving.load(args.checkpoint, args.step, context=args.context)
  ev = evals.Evaluator(run.config, run.mesh, run.setup.shardings.params, settings)
  bar = tqdm.tqdm(total=_num_units(settings, run.config), unit='eval', dynamic_ncols=True,
                  disable=jax.process_index() != 0)

  def tick(what):
    bar.set_description(what)
    bar.update(1)

  results = evals.run_tasks(ev, run.params, tick)
  bar.close()
  results.update({'checkpoint': os.path.abspath(args.checkpoint), 'step': run.step,
                  'family': run.config.model.name,
                  'mesh': {k: int(v) for k, v in run.mesh.shape.items()},
                  'backend': jax.default_backend(), 'devices': jax.device_count()})
  if jax.process_index() == 0:
    files = eval_report.write(results, args.out, run.step)
    print(json.dumps({k: results[k] for k in ('loss', 'skipped') if k in results}))
    if 'ruler' in results:
      print(ruler.table(results['ruler']))
    print('wrote ' + ', '.join(files))


def _num_units(settings, config) -> int:
  """Progress-bar length: one unit per (task, length[, pairs]) evaluated."""
  from training.evaluation import downstream, evals
  lengths = settings.lengths or (config.seq_len,)
  n = 0
  if {'loss', 'position_loss'} & set(settings.tasks):
    n += len(lengths)
  if 'passkey' in settings.tasks:
    n += sum(evals.passkey_fits(L) is None for L in lengths)
  if 'mqar' in settings.tasks:
    n += sum(evals.mqar_fits(L, p, config.model.vocab_size) is None
             for L in lengths for p in settings.mqar_pairs)
  if 'ruler' in settings.tasks:
    n += len(lengths) * len(settings.ruler_tasks)
  return n + sum(t in downstream.TASKS for t in settings.tasks)


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
