"""Train a tokenizer offline on local files: SentencePiece BPE or a Hugging Face byte-level BPE.

    python scripts/train_tokenizer.py --source local_text --vocab_size 4096 --out tok/sp.model
    python scripts/train_tokenizer.py --paths 'data/*.jsonl.zst' --source jsonl --kind hf \\
        --vocab_size 32000 --out tok/tokenizer.json

Both are lossless (decode(encode(text)) == text: SentencePiece with identity normalisation and
byte fallback, HF with byte-level pre-tokenisation). Prints the data.tokenizer value to use.
"""

import argparse
import io
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.data import sources, tokenizer  # noqa: E402

KINDS = ('sentencepiece', 'hf')
_SP_MAX_LINE = 4192  # SentencePiece's max_sentence_length (bytes): longer lines are cut


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--paths', default='', help="comma-separated globs ('' with --source "
                 'local_text: the Python standard library)')
  p.add_argument('--source', default='text', choices=sources.STREAM_SOURCES)
  p.add_argument('--text_field', default='text', help='jsonl field / parquet column')
  p.add_argument('--vocab_size', type=int, required=True)
  p.add_argument('--out', required=True, help='.model file (sentencepiece) or tokenizer.json (hf)')
  p.add_argument('--kind', default='sentencepiece', choices=KINDS)
  p.add_argument('--max_docs', type=int, default=0, help='train on the first N documents (0: all)')
  p.add_argument('--errors', default='strict', choices=('strict', 'replace'),
                 help='text that is not UTF-8: stop with an error naming the file, or replace')
  return p.parse_args(argv)


def input_files(source: str, paths: str) -> list[str]:
  if source == 'local_text' and not paths.strip():
    return sources.stdlib_python_files()
  return sources.resolve_paths(paths)


def documents(args):
  files = input_files(args.source, args.paths)
  docs = (t for f in files for t in sources.iter_texts(f, args.source, args.text_field,
                                                       args.errors))
  return itertools.islice(docs, args.max_docs) if args.max_docs else docs


def train_sentencepiece(docs, vocab_size: int, out: str) -> None:
  import sentencepiece as spm
  # SentencePiece learns from lines; '\n' is its own piece so documents round-trip exactly.
  lines = (piece for d in docs for line in d.split('\n') if line
           for piece in _cut(line, _SP_MAX_LINE))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type='bpe',
      byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
      add_dummy_prefix=False, allow_whitespace_only_pieces=True, user_defined_symbols=['\n'],
      split_digits=True, character_coverage=0.9995, minloglevel=2,
      bos_id=-1, eos_id=1, unk_id=0, pad_id=-1)
  with open(out, 'wb') as f:
    f.write(model.getvalue())


def _cut(line: str, max_bytes: int):
  # Characters are at most 4 bytes: max_bytes // 4 characters always fit.
  step = max_bytes // 4
  return (line[i:i + step] for i in range(0, len(line), step))


def train_hf(docs, vocab_size: int, out: str) -> None:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer)
  tok.save(out)


def main(argv=None) -> int:
  args = parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  start = time.perf_counter()
  try:
    (train_sentencepiece if args.kind == 'sentencepiece' else train_hf)(
        documents(args), args.vocab_size, out)
  except (ValueError, FileNotFoundError) as e:  # input: one line, status 2
    print(f'error: {e}', file=sys.stderr)
    return 2
  except RuntimeError as e:  # SentencePiece reports a too-small vocabulary this way
    print(f'error: --vocab_size {args.vocab_size}: {e}', file=sys.stderr)
    return 2
  spec = f'{args.kind}:{out}'
  tok = tokenizer.load(spec)
  print(f'trained {args.kind} tokenizer, {tok.vocab_size} ids, in '
        f'{time.perf_counter() - start:.1f}s: --config.data.tokenizer={spec} '
        f'--config.model.vocab_size={tok.vocab_size}')
  return 0


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
