"""Compiled memory of CART's jitted train step at R=1 and R=6, with and without remat per
core application (model.cart.remat_loop), from `compiled.memory_analysis()`.

    python scripts/bench_cart_memory.py                       # configs/cart_d256.py, 1 device
    python scripts/bench_cart_memory.py --d_model=512 --seq_len=512

Deterministic (nothing runs: the step is lowered on abstract inputs and compiled). Per-device
bytes = temp + arguments + outputs - aliased (training/perf.compiled_memory_bytes); the state
is donated, so its arguments alias its outputs.

A second, backend-independent figure: the bytes of the residuals JAX's autodiff keeps from the
forward pass for the backward (the leaves of `jax.vjp`'s closure, shapes only). That is where
remat shows: XLA:CPU expands JAX's optimization barriers and then CSEs the recomputation back
into the forward pass, so on CPU `compiled.memory_analysis()` does not move with remat at all
(the same holds for a plain 8-layer MLP and for model.remat on the dense model).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--seq_len', type=int, default=1024)
  parser.add_argument('--micro_batch', type=int, default=8)
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long check: d_model 64, 32 tokens, one sequence')
  return parser.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import cart_paper  # noqa: E402
from modeling import cart  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from training.metrics import perf  # noqa: E402
from training import step as step_lib  # noqa: E402
from training.composition import make_runtime  # noqa: E402
from training.program import batch_sharding  # noqa: E402
from training.state import setup_model  # noqa: E402

MiB = 2 ** 20


def compile_step(config):
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  b_sharding = batch_sharding(config, mesh)
  step = jax.jit(step_lib.make_train_step(setup, config.optimizer.grad_accum_steps),
                 in_shardings=(setup.shardings, b_sharding), donate_argnums=0)
  shape = (config.batch_size, config.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=b_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions')}
  return step.lower(setup.abstract, batch).compile(), setup, batch


def residual_bytes(setup, batch) -> int:
  """Bytes autodiff saves for the backward of one micro-batch's loss (abstract, no memory)."""
  def residuals(params, batch):
    loss = lambda p: step_lib.loss_sum(p, setup.graphdef, batch, jax.random.PRNGKey(0))[0]
    return jax.tree.leaves(jax.vjp(loss, params)[1])
  leaves = jax.eval_shape(residuals, setup.abstract.params, batch)
  return sum(x.size * x.dtype.itemsize for x in leaves)


def main():
  args = parse_args()
  if args.smoke:
    args.d_model, args.seq_len, args.micro_batch = 64, 32, 1
  R = 2 if args.smoke else 6
  variants = ((1, 'none'), (R, 'none'), (R, 'full'), (R, 'dots'))
  if args.smoke:
    variants = variants[:3]

  rows = []
  for loops, remat in variants:
    c = cart_paper.paper_config(args.d_model, loops)
    if args.smoke:
      c.model.vocab_size, c.model.cart.prelude_layers = 256, 1
    c.seq_len, c.batch_size = args.seq_len, args.micro_batch
    c.optimizer.grad_accum_steps = 1   # memory is per micro-batch; accumulation adds one grad copy
    c.mesh.data = 1
    c.model.cart.remat_loop = remat
    compiled, setup, batch = compile_step(c)
    m, total = compiled.memory_analysis(), perf.compiled_memory_bytes(compiled)
    stored, effective = cart.parameter_counts(c.model)
    rows.append((loops, remat, stored, effective, m.temp_size_in_bytes, m.argument_size_in_bytes,
                 total, residual_bytes(setup, batch)))
    print(f'  compiled R={loops} remat_loop={remat}: {total / MiB:,.1f} MiB', flush=True)

  dev = jax.devices()[0]
  print()
  print(f'# CART train-step compiled memory | backend {jax.default_backend()} | '
        f'{dev.device_kind} x1 | jax {jax.__version__} | configs/cart_d{args.d_model}.py '
        f'(P=6, vocab 32,000, {c.model.dtype} activations, float32 params + AdamW state) | '
        f'micro-batch {args.micro_batch} x {args.seq_len} | per device: temp + args + out - alias')
  head = ['R', 'remat_loop', 'stored params', 'effective params', 'temp MiB', 'args MiB',
          'total MiB', 'total vs R=1', 'autodiff residuals MiB']
  print('| ' + ' | '.join(head) + ' |')
  print('|' + '---|' * len(head))
  base_total = rows[0][6]
  for loops, remat, stored, effective, temp, arg, total, resid in rows:
    print(f'| {loops} | {remat} | {stored:,} | {effective:,} | {temp / MiB:,.1f} | '
          f'{arg / MiB:,.1f} | {total / MiB:,.1f} | {total / base_total:.2f}x | '
          f'{resid / MiB:,.1f} |')
  r1, r6, r6_full = rows[0], rows[1], rows[2]
  print(f'compiled: R={R} {r6[6] / MiB:,.0f} MiB vs R=1 {r1[6] / MiB:,.0f} MiB '
        f'({r6[6] / r1[6]:.2f}x) | residuals: R={R} {r6[7] / r1[7]:.2f}x of R=1, '
        f'remat_loop=full {r6_full[7] / r6[7]:.2f}x of no remat')


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
