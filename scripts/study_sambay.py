"""Study: SambaY vs a YOCO-style model without GMU vs a dense transformer, matched parameters.

    python scripts/study_sambay.py                  # the recorded run (docs/results/sambay.md)
    python scripts/study_sambay.py --smoke          # seconds, untrained, to a temp folder

"Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long Generation" (Ren et al.,
2025) reports lower loss for SambaY than for YOCO (the same decoder-decoder with the GMU layers
replaced by cross-attention) at matched compute, and a KV cache that does not grow with depth.
All three models here are trained on the same tokens (same data seed and steps) from
configs/sambay_tiny.py's widths; the YOCO model is SambaY with every GMU layer swapped for a
cross-attention layer (fewer parameters: a GMU is 2 x d x 2d, a cross-attention 2 x d x H x Dh);
the dense depth is the one whose parameter count is closest to SambaY's.

The claim holds here when SambaY's held-out loss is at most YOCO's + TOLERANCE nats (the GMU
does not hurt and should help) and SambaY's cache for a 64K-token sequence is smaller than the
dense model's. The script exits 1 otherwise.
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--steps', type=int, default=150)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--seq_len', type=int, default=128)
  p.add_argument('--eval_batches', type=int, default=8)
  p.add_argument('--smoke', action='store_true',
                 help='seconds: tiny shapes, no training steps (init, eval, report)')
  p.add_argument('--out', default=None,
                 help='report folder (default docs/results; smoke: a temp folder)')
  return p.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import sambay_tiny  # noqa: E402
from modeling import registry, sambay as sb, sambay_decode, ssm  # noqa: E402
from parallelism import mesh as mesh_lib  # noqa: E402
from scripts import study_report  # noqa: E402
from training.state import count_params  # noqa: E402

TOLERANCE = 0.02       # nats: SambaY may trail YOCO by at most this much for the claim to hold
LONG_CONTEXT = 65536


class YocoNoGmu(sb.SambaY):
  """SambaY's layout with every GMU layer replaced by a cross-attention layer over the shared
  KV cache: the YOCO cross-decoder the paper compares against."""

  def __init__(self, cfg, *, rngs, runtime=sb._SINGLE_DEVICE, scan_fn=None):
    super().__init__(cfg, rngs=rngs, runtime=runtime, scan_fn=scan_fn)
    scan_fn = scan_fn or ssm.make_scan(cfg.sambay.scan_impl, cfg.sambay.scan_chunk)
    self.roles = tuple(sb.CROSS if r == sb.GMU_ROLE else r for r in self.roles)
    self.layers = nnx.List([
        sb.Layer(sb.CROSS, cfg, rngs=rngs, runtime=runtime, scan_fn=scan_fn)
        if layer.role == sb.GMU_ROLE else layer for layer in self.layers])


registry.FAMILIES.setdefault('sambay_yoco', registry.Family(YocoNoGmu,
                                                            sb.forward_flops_per_token))


def study_config(args, name: str):
  c = sambay_tiny.get_config()
  c.steps, c.batch_size, c.seq_len = args.steps, args.batch_size, args.seq_len
  c.optimizer.warmup_steps = max(1, args.steps // 10)
  c.mesh.data = 1
  c.progress = False
  m = c.model
  if args.smoke:
    m.update(num_layers=4, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    m.sambay.window = 16
  if name == 'transformer':
    m.name, m.rope_theta = 'transformer', 10_000.0
    target = _params(study_config(args, 'sambay'))
    best = None
    for layers in range(1, 17):
      m.num_layers = layers
      n = _params(c)
      if best is None or abs(n - target) < abs(best[1] - target):
        best = (layers, n)
    m.num_layers = best[0]
  else:
    m.name = name
  return c


def _params(c) -> int:
  model = nnx.eval_shape(lambda: registry.build_model(c.model, rngs=nnx.Rngs(0)))
  return count_params(nnx.state(model, nnx.Param))


def cache_bytes(c, context: int) -> int:
  """One sequence's decoding cache at `context` positions (shapes only)."""
  model = nnx.eval_shape(lambda: registry.build_model(c.model, rngs=nnx.Rngs(0)))
  if c.model.name == 'transformer':
    m = c.model
    return sambay_decode.dense_cache_bytes(m.num_layers, m.num_kv_heads, m.head_dim, context, 4)
  cache = jax.eval_shape(lambda: sambay_decode.init_cache(model, 1, context))
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim))


def main(argv=None):
  args = parse_args(argv)
  if args.smoke:
    args.steps, args.batch_size, args.seq_len, args.eval_batches = 0, 2, 32, 1
  out = args.out or (tempfile.mkdtemp() if args.smoke else study_report.RESULTS)
  mesh = mesh_lib.make_mesh(study_config(args, 'sambay').mesh, jax.devices()[:1])
  batches = study_report.held_out(study_config(args, 'sambay'), args.eval_batches)

  rows = {}
  for name in ('sambay', 'sambay_yoco', 'transformer'):
    c = study_config(args, name)
    params, graphdef, seconds = study_report.train(c, mesh)
    rows[name] = {'params': count_params(params), 'seconds': seconds,
                  'loss': study_report.mean_loss(graphdef, params, batches),
                  'cache': cache_bytes(c, LONG_CONTEXT), 'layers': c.model.num_layers}
    print(f'  {name}: {rows[name]}', flush=True)

  labels = {'sambay': 'SambaY (GMU)', 'sambay_yoco': 'YOCO-style (no GMU)',
            'transformer': 'dense transformer'}
  table = ['| model | layers | params | s/step (wall) | held-out loss | cache @64K (MiB) |',
           '|---|---|---|---|---|---|']
  for name, r in rows.items():
    table.append(f'| {labels[name]} | {r["layers"]} | {r["params"]:,} | {r["seconds"]:.3f} | '
                 f'{r["loss"]:.4f} | {r["cache"] / 2**20:.1f} |')
  s, y, d = rows['sambay'], rows['sambay_yoco'], rows['transformer']
  holds = s['loss'] <= y['loss'] + TOLERANCE and s['cache'] < d['cache']
  verdict = (f'SambaY {s["loss"]:.4f} vs YOCO-style {y["loss"]:.4f} nats '
             f'(delta {s["loss"] - y["loss"]:+.4f}; threshold: SambaY <= YOCO + {TOLERANCE}); '
             f'dense {d["loss"]:.4f}. Cache for one 64K-token sequence: SambaY '
             f'{s["cache"] / 2**20:.1f} MiB vs dense {d["cache"] / 2**20:.1f} MiB.')
  c = study_config(args, 'sambay')
  body = (f'{args.steps} steps x {args.batch_size} x {args.seq_len} tokens per model, the same '
          f'batches for all; d_model {c.model.d_model}, byte-level local_text data; held-out '
          f'loss = mean next-byte NLL over {args.eval_batches} eval batches.\n\n'
          + '\n'.join(table))

  def figure(path):
    def draw(ax):
      names = list(rows)
      ax.bar([labels[n] for n in names], [rows[n]['loss'] for n in names],
             color=['tab:green', 'tab:orange', 'tab:blue'])
      lo = min(r['loss'] for r in rows.values())
      ax.set_ylim(lo - 0.1, max(r['loss'] for r in rows.values()) + 0.05)
      ax.set_ylabel('held-out loss (nats/byte)')
      ax.set_title(f'SambaY study: {args.steps} steps, matched params')
    study_report.plot(path, draw)

  return study_report.finish('sambay', 'SambaY vs YOCO-style (no GMU) vs dense',
                             body, verdict, holds, figure, out, table, args.smoke)


if __name__ == '__main__':
  from training.errors import run_cli
  run_cli(main)
