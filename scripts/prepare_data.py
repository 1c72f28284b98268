"""Tokenise a corpus into ArrayRecord shards plus an index of document lengths.

    python scripts/prepare_data.py --source jsonl --paths 'data/*.jsonl.zst' \\
        --tokenizer sentencepiece:tok/sp.model --out data/prepared --workers 8
    python train.py --config configs/tiny.py --workdir runs/x \\
        --config.data.source=array_record --config.data.paths=data/prepared \\
        --config.data.tokenizer=sentencepiece:tok/sp.model --config.model.vocab_size=...

Sources: text (one document per file), local_text (the same; no --paths: the Python standard
library), jsonl (one per line; also .jsonl.gz and .jsonl.zst), parquet (one per row of
--text_field). Run it again with the same arguments to resume an interrupted run: shards with
a completion marker are kept. See training/data/prepare.py for the output layout.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data import sources  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--source', required=True, choices=sources.STREAM_SOURCES)
  p.add_argument('--paths', default='', help='comma-separated globs')
  p.add_argument('--tokenizer', default='bytes',
                 help='bytes | sentencepiece:PATH | hf:PATH (as data.tokenizer)')
  p.add_argument('--out', required=True, help='output directory (resumed if it exists)')
  p.add_argument('--text_field', default='text', help='jsonl field / parquet column')
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1,
                 help='tokenising processes')
  p.add_argument('--shards', type=int, default=16, help='output shards (at most one per file)')
  p.add_argument('--errors', default='strict', choices=('strict', 'replace'),
                 help='text that is not UTF-8: stop with an error naming the file, or replace')
  p.add_argument('--no-progress', action='store_true')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  import tqdm

  from training.data import prepare
  try:
    files = (sources.stdlib_python_files() if args.source == 'local_text' and
             not args.paths.strip() else sources.resolve_paths(args.paths))
    plan = prepare.make_plan(args.source, files, args.tokenizer, text_field=args.text_field,
                             errors=args.errors, num_shards=args.shards)
    bar = tqdm.tqdm(total=sum(plan.file_bytes), unit='B', unit_scale=True,
                    disable=args.no_progress, desc='tokenise')
    tokens = 0

    def on_shard(stats):
      nonlocal tokens
      tokens += stats['tokens']
      bar.update(stats['input_bytes'])
      bar.set_postfix(tokens=f'{tokens:,}')

    summary = prepare.prepare(plan, args.out, workers=args.workers, on_shard=on_shard)
    bar.close()
  except (ValueError, FileNotFoundError, TypeError) as e:  # input: one line, status 2
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{summary["documents"]:,} documents, {summary["tokens"]:,} tokens '
        f'({summary["bytes_per_token"]:.2f} bytes/token) in {len(summary["shards"])} shards; '
        f'this run: {summary["shards_prepared_now"]} shards, '
        f'{summary["tokens_per_sec_now"]:,.0f} tokens/s over {summary["seconds_now"]:.1f}s '
        f'-> {args.out}')
  return 0


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
