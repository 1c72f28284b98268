"""Sample text from a trained checkpoint, with a KV cache, for any model family.

    python scripts/generate.py --checkpoint runs/tiny --prompt "def " --max_new_tokens 64
    python scripts/generate.py --checkpoint runs/cart_tiny --prompt "import " --loops 8 --stats
    python scripts/generate.py --checkpoint runs/tiny --prompt "x" --cache_layers 0,2 --stats

Byte-level: the prompt's UTF-8 bytes are the tokens. --num_samples rows are sampled in one
batch (each with its own random stream). --temperature 0 is greedy. --stats adds prefill and
decode tokens/s (compilation excluded) and the cache bytes of the batch.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--checkpoint', required=True, help='run workdir or its checkpoints/ folder')
  p.add_argument('--step', type=int, default=None, help='default: the latest checkpoint')
  p.add_argument('--prompt', required=True)
  p.add_argument('--max_new_tokens', type=int, default=128)
  p.add_argument('--temperature', type=float, default=0.8, help='0 = greedy')
  p.add_argument('--top_k', type=int, default=0, help='0 = off')
  p.add_argument('--top_p', type=float, default=1.0, help='1 = off')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--num_samples', type=int, default=1, help='rows sampled in one batch')
  p.add_argument('--loops', type=int, default=None,
                 help='CART: core applications R at inference (default: the eval R)')
  p.add_argument('--cache_layers', default='',
                 help="dense: layers that keep a KV cache, e.g. '0,2' (default: the config's "
                      'model.kv_routing plan)')
  p.add_argument('--stats', action='store_true', help='print tokens/s and cache bytes')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import jax
  import numpy as np

  from modeling import sampling
  from modeling.kv_routing import CachePlan
  from training.evaluation import serving
  from training.data import tokenizer

  run = serving.load(args.checkpoint, args.step, devices=jax.devices()[:1])
  model = run.model()
  tokenizer.check_byte_vocab(run.config.model.vocab_size, 'generate --prompt')
  prompt = tokenizer.encode(args.prompt)
  if not len(prompt):
    raise SystemExit('--prompt is empty; give at least one character')
  plan = (CachePlan.of_layers(run.config.model.num_layers,
                              [int(s) for s in args.cache_layers.split(',')])
          if args.cache_layers else None)
  sampler = sampling.Sampler(args.temperature, args.top_k, args.top_p)
  out = sampling.generate(model, np.tile(prompt, (args.num_samples, 1)), args.max_new_tokens,
                          sampler, seed=args.seed, loops=args.loops, plan=plan)
  for i, row in enumerate(out.tokens):
    if args.num_samples > 1:
      print(f'--- sample {i}')
    print(args.prompt + tokenizer.decode(row))
  if args.stats:
    print(f'# {run.config.model.name} step {run.step} | backend {jax.default_backend()} | '
          f'prefill {out.prompt_tokens} tokens: {out.prefill_tokens_per_s:,.0f} tokens/s | '
          f'decode {out.decoded_tokens} tokens: {out.decode_tokens_per_s:,.1f} tokens/s | '
          f'cache {out.cache_bytes:,} bytes for {args.num_samples} x '
          f'{len(prompt) + args.max_new_tokens} positions')


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
