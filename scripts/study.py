"""Run a seeded study (training/evaluation/study.py): arms x seeds at a fixed token budget, resumably, and
write docs/results/<study>.md, .json and .png with 95% intervals and three-way verdicts.

    python scripts/study.py cart                     # the recorded study -> docs/results/
    python scripts/study.py sambay --seeds 0,1,2,3,4 --root runs/studies
    python scripts/study.py kv_routing --smoke       # 2 seeds, a few steps, to a temp folder

Studies: cart (scripts/study_cart.py), sambay (study_sambay.py), kv_routing
(study_kv_routing.py); each also runs as its own script. Finished (arm, seed) runs in --root are
skipped, interrupted ones resume from their checkpoint.
"""

import argparse
import importlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STUDIES = {'cart': 'scripts.study_cart', 'sambay': 'scripts.study_sambay',
           'kv_routing': 'scripts.study_kv_routing'}
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                       'results')


def parser(name: str | None = None) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  if name is None:
    p.add_argument('study', choices=sorted(STUDIES))
  p.add_argument('--smoke', action='store_true',
                 help='2 seeds, a few steps at tiny shapes, to a temp folder: checks the '
                      'plumbing and that the studied mechanism is active; no evidence')
  p.add_argument('--seeds', default=None, help='comma-separated (default 0,1,2; smoke 0,1)')
  p.add_argument('--steps', type=int, default=None, help="override the study's step budget")
  p.add_argument('--root', default=None,
                 help='run workdirs (default runs/studies; smoke: a temp folder)')
  p.add_argument('--out', default=None, help='report folder (default docs/results; smoke: temp)')
  p.add_argument('--note', default='', help='a line the report carries (e.g. how loaded the '
                 'machine was for runs that predate the per-run load record)')
  p.add_argument('--lambada_file', default='', help='score every trained model on this jsonl '
                 '(training/evaluation/downstream.py), likewise:')
  p.add_argument('--choice_file', default='', help='multiple-choice jsonl (HellaSwag/PIQA/ARC)')
  p.add_argument('--text_file', default='', help='perplexity over a text file')
  return p


def main(argv=None, name: str | None = None) -> int:
  args = parser(name).parse_args(argv)
  name = name or args.study
  seeds = tuple(int(s) for s in (args.seeds or ('0,1' if args.smoke else '0,1,2')).split(','))
  if len(seeds) < 2:
    parser(name).error(f'--seeds={args.seeds}: no verdict from one seed; give at least 2')
  tmp = tempfile.mkdtemp(prefix=f'study_{name}_') if args.smoke else None
  root = args.root or (os.path.join(tmp, 'runs') if tmp else os.path.join('runs', 'studies'))
  out = args.out or (tmp or RESULTS)

  from training.evaluation import downstream
  from training.evaluation import study as study_lib
  study = importlib.import_module(STUDIES[name]).make_study(smoke=args.smoke, steps=args.steps)
  study.seeds = seeds
  study.downstream = downstream.Files(args.lambada_file, args.choice_file, args.text_file)
  report = study_lib.run_study(study, root, out,
                               command=' '.join(['python'] + [os.path.relpath(sys.argv[0])]
                                                + sys.argv[1:]), note=args.note)
  for c in report['comparisons']:
    print(f'{c["claim"]}: {c["a"]} - {c["b"]} = {c["diff"]:+.4f} '
          f'[{c["low"]:+.4f}, {c["high"]:+.4f}] -> {c["verdict"]}')
  print('| arm | held-out loss |')
  for a in report['arms']:
    print(f'| {a["label"]} | {study_lib._ci(a["loss"])} |')
  print(f'wrote {os.path.join(out, name)}.md/.json/.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
