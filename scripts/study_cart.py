"""Study: tiny CART trained at R in {2, 4, 6} against a parameter-matched dense transformer,
all on the same tokens, then every CART evaluated at other R' (the variable-R curve).

    python scripts/study_cart.py                    # ~3 CPU-minutes; 17 min wall at load 25
    python scripts/study_cart.py --steps=40         # a smoke run

Each model sees the same batches (same data seed, same step count, so the same tokens); the
dense baseline has the CART models' d_model, heads and MLP width and the number of layers whose
stored parameter count is closest to theirs. Paper: "CART: Context-Anchored Recurrent
Transformer" (Capps, 2026), which reports that CART loses to a stored-matched dense model and
that inference at R' != R hurts.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import cart_tiny
from modeling import cart, registry
from parallelism import mesh as mesh_lib
from training import data as data_lib
from training import loss as loss_lib
from training import step as step_lib
from training.composition import make_runtime
from training.state import count_params, init_train_state, setup_model

TRAIN_LOOPS = (2, 4, 6)
EVAL_LOOPS = (1, 2, 4, 6, 8, 12, 16)
SMOKE = False  # --smoke: a narrow model as well


def study_config(args, loops: int):
  c = cart_tiny.get_config(str(loops))
  c.steps, c.batch_size, c.seq_len = args.steps, args.batch_size, args.seq_len
  c.eval_batches = args.eval_batches
  c.optimizer.warmup_steps = max(1, args.steps // 10)
  c.mesh.data = 1
  c.progress = False
  if SMOKE:
    c.model.update(d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    c.model.cart.prelude_layers = 1
  return c


def dense_config(args, stored: int):
  """The transformer with the CART models' widths and the layer count closest in stored
  parameters (the embedding is tied in both)."""
  best = None
  for layers in range(1, 4 if SMOKE else 13):  # smoke: the narrow model needs few layers
    c = study_config(args, TRAIN_LOOPS[0])
    c.model.name = 'transformer'
    c.model.num_layers = layers
    model = nnx.eval_shape(lambda c=c: registry.build_model(c.model, rngs=nnx.Rngs(0)))
    n = count_params(nnx.state(model, nnx.Param))
    if best is None or abs(n - stored) < abs(best[1] - stored):
      best = (c, n)
  return best[0]


def train(config, mesh):
  """Trains `config` for config.steps; returns (params, graphdef, seconds per step)."""
  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  state = init_train_state(config, setup, runtime)
  train_step = jax.jit(step_lib.make_train_step(setup), donate_argnums=0)
  it = data_lib.make_train_iterator(config)
  start = None
  for step in range(config.steps):
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    state, metrics = train_step(state, batch)
    if step == 0:   # time steps 2..N: the first one compiles
      jax.block_until_ready(state.params)
      start = time.perf_counter()
  jax.block_until_ready(state.params)
  seconds = (time.perf_counter() - start) / max(config.steps - 1, 1)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{config.model.name}: loss {float(metrics["loss"])}')
  return state.params, setup.graphdef, seconds


def make_evaluator(eval_batches):
  """evaluate(graphdef, params, loops=None) -> mean held-out loss; one compile per
  (graphdef, loops). loops=None uses the model's own eval R."""
  cache = {}

  def compiled(graphdef, loops):
    def loss_sum(params, batch):
      model = nnx.merge(graphdef, params)
      kw = {} if loops is None else {'loops': loops}
      h = model(batch['inputs'], segment_ids=batch['segment_ids'],
                positions=batch['positions'], **kw)
      return loss_lib.lm_loss_sum(model, h, batch['targets'])
    return jax.jit(loss_sum)

  def evaluate(graphdef, params, loops=None):
    if (graphdef, loops) not in cache:
      cache[graphdef, loops] = compiled(graphdef, loops)
    total = count = 0.0
    for b in eval_batches:
      t, c = cache[graphdef, loops](params, b)
      total, count = total + float(t), count + float(c)
    return total / count

  return evaluate


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--seq_len', type=int, default=128)
  parser.add_argument('--eval_batches', type=int, default=8)
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long check: R=2 only, 2 steps of 2 x 32 tokens, d=32')
  args = parser.parse_args()
  if args.smoke:
    global TRAIN_LOOPS, EVAL_LOOPS, SMOKE
    TRAIN_LOOPS, EVAL_LOOPS, SMOKE = (2,), (2,), True
    args.steps, args.batch_size, args.seq_len, args.eval_batches = 2, 2, 32, 1
  wall = time.perf_counter()

  mesh = mesh_lib.make_mesh(study_config(args, 2).mesh, jax.devices()[:1])
  base = study_config(args, TRAIN_LOOPS[0])
  eval_batches = [{k: jnp.asarray(v) for k, v in b.items()}
                  for b in data_lib.make_eval_batches(base, num_batches=args.eval_batches)]
  evaluate = make_evaluator(eval_batches)

  rows = []   # (name, stored, effective, seconds, eval loss, rho, {R': loss})
  shared_graphdef = None   # every CART here has the same parameters: one graphdef
  for loops in TRAIN_LOOPS:
    c = study_config(args, loops)
    stored, effective = cart.parameter_counts(c.model)
    params, graphdef, seconds = train(c, mesh)
    shared_graphdef = shared_graphdef or graphdef
    rho = float(nnx.merge(graphdef, params).diagnostics()['cart/spectral_radius'])
    curve = {r: evaluate(shared_graphdef, params, r) for r in EVAL_LOOPS}
    rows.append((f'CART R={loops}', stored, effective, seconds, curve[loops], rho, curve))
    print(f'  trained CART R={loops} ({seconds:.3f} s/step): eval loss {curve[loops]:.4f}',
          flush=True)
  dense = dense_config(args, rows[0][1])
  params, graphdef, seconds = train(dense, mesh)
  n = count_params(params)
  loss = evaluate(graphdef, params)
  rows.append((f'dense {dense.model.num_layers} layers', n, n, seconds, loss, float('nan'), {}))
  print(f'  trained dense ({seconds:.3f} s/step): eval loss {loss:.4f}', flush=True)

  dev = jax.devices()[0]
  tokens = args.steps * args.batch_size * args.seq_len
  print()
  print(f'# CART study | backend {jax.default_backend()} | {dev.device_kind} x1 | jax '
        f'{jax.__version__} | configs/cart_tiny.py (d={base.model.d_model}, '
        f'P={base.model.cart.prelude_layers}, heads {base.model.num_heads}x{base.model.head_dim}) '
        f'| {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,} tokens each '
        f'| data local_text (bytes) | eval: mean next-byte NLL (nats) over '
        f'{args.eval_batches} held-out batches')
  head = ['model', 'stored', 'effective', 's/step (wall)', 'eval loss', 'rho'] + \
      [f"R'={r}" for r in EVAL_LOOPS]
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  for name, stored, effective, seconds, loss, rho, curve in rows:
    cells = [name, f'{stored:,}', f'{effective:,}', f'{seconds:.3f}', f'{loss:.4f}',
             '-' if np.isnan(rho) else f'{rho:.3f}']
    cells += [f'{curve[r]:.4f}' if r in curve else '-' for r in EVAL_LOOPS]
    print('| ' + ' | '.join(cells) + ' |')
  best = min(rows[:-1], key=lambda r: r[4])
  print(f'best {best[0]} eval loss {best[4]:.4f} vs {rows[-1][0]} {rows[-1][4]:.4f} '
        f'(delta {best[4] - rows[-1][4]:+.4f} nats) | wall {time.perf_counter() - wall:.0f}s')


if __name__ == '__main__':
  main()
