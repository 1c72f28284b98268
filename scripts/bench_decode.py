"""Decode throughput and cache bytes per sequence vs context length, for the three families.

    python scripts/bench_decode.py                     # contexts 1K, 4K, 16K, 64K
    python scripts/bench_decode.py --smoke             # seconds: tiny contexts, few steps
    python scripts/bench_decode.py --json out.json

One sequence (batch 1) per family, float32, d_model 128, heads 2 x 64 (2 KV heads), SwiGLU 512,
byte vocabulary: a dense transformer, CART (P prelude layers, coda 1, R=4 core applications) and
SambaY (8 layers: Mamba/SWA self-decoder with window 128, one full-attention layer whose KV cache
the cross-decoder shares); the dense depth and CART's P are the ones whose stored parameter
counts are closest to SambaY's.

For each context C the cache is allocated for C + steps positions and set to position C (its
contents do not change the work: every step attends over the whole buffer, masked), then
`steps` decoding steps run as one compiled scan. Columns:
  cache bytes   every array of one sequence's cache (K/V, anchor K/V, SSM/conv state, window)
  tok/s         decoded tokens per wall second, median of --repeats runs after a warm-up
  cpu tok/s     decoded tokens per process-CPU second (the machine may be shared: compare
                families by this column)
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--contexts', default='1024,4096,16384,65536')
  p.add_argument('--steps', type=int, default=16, help='decoding steps per timed run')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--smoke', action='store_true', help='tiny models and contexts, seconds')
  p.add_argument('--json', default=None, help='also write the rows to this file')
  return p.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from modeling import registry, sampling  # noqa: E402


def family_configs(smoke: bool):
  def common():
    m = base.get_config().model
    m.update(d_model=128, num_heads=2, num_kv_heads=2, head_dim=64, mlp_dim=512)
    if smoke:
      m.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    return m

  sambay = common()
  sambay.name, sambay.num_layers = 'sambay', (4 if smoke else 8)
  sambay.rope_theta = 0.0
  sambay.sambay.window = 16 if smoke else 128
  target = _count(sambay)
  cart = common()
  cart.name = 'cart'
  cart.cart.update(coda_layers=1, loops=4)
  cart.cart.prelude_layers = _closest(cart, 'cart.prelude_layers', target)
  dense = common()
  dense.num_layers = _closest(dense, 'num_layers', target)
  return {'transformer': dense, 'cart': cart, 'sambay': sambay}


def _closest(m, key: str, target: int) -> int:
  """The value 1..16 of model key `key` whose stored parameter count is closest to target."""
  node, leaf = (m.cart, 'prelude_layers') if key.startswith('cart.') else (m, key)
  best = None
  for v in range(1, 17):
    node[leaf] = v
    n = _count(m)
    if best is None or abs(n - target) < abs(best[1] - target):
      best = (v, n)
  return best[0]


def _count(model_cfg) -> int:
  model = nnx.eval_shape(lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(0)))
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def bench_one(model, name: str, context: int, steps: int, repeats: int) -> dict:
  dec = sampling.decoder_for(model)
  graphdef, state = nnx.split(model)

  def run(state, cache, token):
    m = nnx.merge(graphdef, state)

    def body(carry, _):
      cache, tok = carry
      logits, cache = dec.step(m, cache, tok)
      return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None

    (cache, tok), _ = jax.lax.scan(body, (cache, token), None, length=steps)
    return tok

  cache = dec.cache_at(model, 1, context + steps, context)
  token = jnp.zeros((1,), jnp.int32)
  fn = jax.jit(run).lower(state, cache, token).compile()
  jax.block_until_ready(fn(state, cache, token))
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(state, cache, token))
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return {'family': name, 'context': context, 'cache_bytes': sampling.cache_bytes(cache),
          'tokens_per_s': steps / float(np.median(wall)),
          'cpu_tokens_per_s': steps / max(float(np.median(cpu)), 1e-9)}


def main(argv=None):
  args = parse_args(argv)
  contexts = [64] if args.smoke else [int(s) for s in args.contexts.split(',')]
  steps, repeats = (4, 1) if args.smoke else (args.steps, args.repeats)
  cfgs = family_configs(args.smoke)
  rows = []
  for name, cfg in cfgs.items():
    model = registry.build_model(cfg, rngs=nnx.Rngs(0))
    for C in contexts:
      r = bench_one(model, name, C, steps, repeats)
      r['params'] = _count(cfg)
      rows.append(r)
      print(f'  {name} C={C}: {r["tokens_per_s"]:.1f} tok/s, {r["cache_bytes"]:,} B',
            flush=True)
  dev = jax.devices()[0]
  print(f'\n# decode, batch 1, {steps} steps x {repeats} | backend {jax.default_backend()} '
        f'{dev.device_kind} | jax {jax.__version__} | float32 | '
        + ', '.join(f'{n}: {_describe(c)} ({_count(c):,} params)' for n, c in cfgs.items()))
  head = '| context | ' + ' | '.join(f'{n} cache MiB | {n} tok/s (cpu tok/s)' for n in cfgs)
  print(head + ' |')
  print('|---' * (1 + 2 * len(cfgs)) + '|')
  for C in contexts:
    cells = []
    for n in cfgs:
      r = next(r for r in rows if r['family'] == n and r['context'] == C)
      cells += [f'{r["cache_bytes"] / 2**20:.2f}',
                f'{r["tokens_per_s"]:.1f} ({r["cpu_tokens_per_s"]:.1f})']
    print(f'| {C} | ' + ' | '.join(cells) + ' |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'steps': steps, 'repeats': repeats,
                 'backend': jax.default_backend()}, f, indent=1)


def _describe(m) -> str:
  """The family's own one-line summary (registry `describe`), else its layer count."""
  describe = registry.get_family(m.name).describe
  return describe(m) if describe is not None else f'{m.num_layers} layers'


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
