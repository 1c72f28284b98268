"""SambaY vs the dense baseline on this machine: training throughput and MFU at equal parameter
count, selective-scan throughput against a sequential `lax.scan`, and decoding cache bytes.

Ren et al., "Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long
Generation" (2025). Counted as docs/measuring.md says: model FLOPs = 3 x forward FLOPs
from each family's `forward_flops_per_token` (the scan at 9 x d_inner x d_state per token per
Mamba layer); peak measured in this run by a 2048^2 float32 matmul; times are the median of
5 steps after compilation and a warm-up step (min and max printed too).

    python scripts/bench_sambay.py            # a few minutes on 2 CPU cores
    python scripts/bench_sambay.py --quick    # 512/1024 tokens, a smoke run
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--quick', action='store_true', help='short sequences (512, 1024)')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds-long check: d=32, 64 tokens, two scan variants')
  parser.add_argument('--max_mib', type=float, default=4096,
                      help='largest compiled training step to run; above it, time the forward')
  return parser.parse_args(argv)


if __name__ == '__main__':
  parse_args()  # --help and bad arguments answer here, before JAX's ~2 s import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from configs import base, sambay_d16, sambay_tiny  # noqa: E402
from modeling import registry, sambay, sambay_decode, ssm  # noqa: E402
from training import loss as loss_lib  # noqa: E402
from training.metrics import perf  # noqa: E402

REPEATS = 5


def timed(fn, *args) -> tuple[float, float, float]:
  jax.block_until_ready(fn(*args))   # warm-up
  times = []
  for _ in range(REPEATS):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), min(times), max(times)


def sambay_model_config():
  """SambaY at a CPU-sized width: 8 layers (every role), d 128, 2 heads x 64, window 128."""
  m = sambay_tiny.get_config().model
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 2, 1, 64, 512
  m.sambay.window = 128
  m.remat = 'full'   # one layer's [L, S] attention scores live at a time, so 8K fits
  return m


def dense_model_config(num_params: int, like):
  """The dense GQA/RoPE baseline of equal depth, width and heads; its MLP width is chosen so the
  parameter count matches SambaY's."""
  m = base.get_config().model
  for k in ('num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim', 'vocab_size',
            'remat'):
    m[k] = like[k]
  m.mlp_dim = like.mlp_dim
  slope = 3 * m.d_model * m.num_layers
  m.mlp_dim = int(round((like.mlp_dim + (num_params - count_params(m)) / slope) / 8) * 8)
  return m


def abstract_state(model_config):
  return nnx.split(nnx.eval_shape(lambda: registry.build_model(model_config, rngs=nnx.Rngs(0))))


def count_params(model_config) -> int:
  return sum(x.size for x in jax.tree.leaves(abstract_state(model_config)[1]))


def train_throughput(model_config, seq_len: int, peak: float, max_mib: float) -> dict:
  """A training step (forward + backward); when its compiled memory exceeds `max_mib`, a forward
  (prefill) step instead, counted at 1 x forward FLOPs."""
  graphdef, _ = abstract_state(model_config)
  params = jax.jit(lambda: nnx.split(
      registry.build_model(model_config, rngs=nnx.Rngs(0)))[1])()

  def loss(params, tokens, seg, pos):
    model = nnx.merge(graphdef, params)
    h = model(tokens[:, :-1], segment_ids=seg, positions=pos)
    return loss_lib.lm_loss_sum(model, h, tokens[:, 1:])[0]

  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, seq_len + 1), 0, model_config.vocab_size)
  seg = jnp.ones((1, seq_len), jnp.int32)
  pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
  args = (params, tokens, seg, pos)
  mode, mult = 'train', 3
  step = jax.jit(jax.value_and_grad(loss)).lower(*args).compile()
  mem_mib = perf.compiled_memory_bytes(step) / 2 ** 20
  if mem_mib > max_mib:   # the machine is shared: do not risk the OOM killer
    mode, mult = f'fwd ({mem_mib:,.0f} MiB train)', 1
    step = jax.jit(loss).lower(*args).compile()
    mem_mib = perf.compiled_memory_bytes(step) / 2 ** 20
  med, lo, hi = timed(step, *args)
  tps = seq_len / med
  fam = registry.get_family(model_config.name)
  row = {'tok/s': tps, 'step_s': (med, lo, hi), 'mem_mib': mem_mib, 'mode': mode}
  for conv, causal in (('causal', True), ('noncausal', False)):
    row[f'mfu_{conv}'] = tps * mult * fam.forward_flops_per_token(model_config, seq_len,
                                                                    causal=causal) / peak
  row['gflop_tok'] = mult * fam.forward_flops_per_token(model_config, seq_len) / 1e9
  return row


def scan_throughput(impl: str, seq_len: int, max_mib: float, E: int = 256, N: int = 16) -> dict:
  r = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(r.standard_normal(s).astype(np.float32))
  x, B, C = f32(1, seq_len, E), f32(1, seq_len, N), f32(1, seq_len, N)
  dt = jax.nn.softplus(f32(1, seq_len, E))
  A = -jnp.exp(f32(E, N))
  reset = jnp.zeros((1, seq_len), bool)
  name, chunk = (impl.split(':') + ['64'])[:2]
  scan = ssm.make_scan(name, int(chunk))
  args = (x, dt, B, C)
  fwd = jax.jit(lambda x, dt, B, C: scan(x, dt, A, B, C, reset_BL=reset)[0]).lower(*args).compile()
  bwd = jax.jit(jax.grad(lambda x, dt, B, C: jnp.sum(
      scan(x, dt, A, B, C, reset_BL=reset)[0] ** 2), argnums=(0, 1, 2, 3))).lower(*args).compile()
  mem_mib = perf.compiled_memory_bytes(bwd) / 2 ** 20
  f_med = timed(fwd, *args)[0]
  b_med = timed(bwd, *args)[0] if mem_mib <= max_mib else float('nan')
  flops = ssm.scan_flops_per_token(E, N) * seq_len
  return {'fwd_tok/s': seq_len / f_med, 'train_tok/s': seq_len / b_med, 'train_mib': mem_mib,
          'fwd_gflops': flops / f_med / 1e9, 'train_gflops': 3 * flops / b_med / 1e9}


def cache_rows(contexts):
  rows = []
  for name, cfg in (('sambay_tiny', sambay_tiny.get_config().model),
                    ('sambay_d16', sambay_d16.get_config().model)):
    model = nnx.eval_shape(lambda cfg=cfg: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    itemsize = jnp.dtype(sambay.dtype_of(cfg.dtype)).itemsize
    for n in contexts:
      s_bytes = sambay_decode.cache_bytes(jax.eval_shape(
          lambda n=n, model=model: sambay_decode.init_cache(model, 1, n)))
      d_bytes = sambay_decode.dense_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                n, itemsize)
      rows.append((name, n, s_bytes / n, d_bytes / n, d_bytes / s_bytes))
  return rows


def main():
  args = parse_args()
  jax.config.update('jax_default_matmul_precision', 'highest')
  seq_lens = (512, 1024) if args.quick else (2048, 8192)
  scans = ('sequential', 'associative', 'chunked:64', 'chunked:256')
  if args.smoke:
    global REPEATS
    seq_lens, scans, REPEATS = (64,), ('sequential', 'chunked:64'), 1
  dev = jax.devices()[0]
  mesh = Mesh(np.array(jax.devices()[:1]), ('d',))
  peak_n = 256 if args.smoke else 2048
  peak = perf.measure_peak_flops(mesh, jnp.float32, n=peak_n)
  s_cfg = sambay_model_config()
  if args.smoke:
    s_cfg.d_model, s_cfg.mlp_dim, s_cfg.sambay.window = 32, 64, 16
    s_cfg.head_dim, s_cfg.vocab_size, s_cfg.remat = 16, 256, 'none'
  n_params = count_params(s_cfg)
  d_cfg = dense_model_config(n_params, s_cfg)
  print(f'# bench_sambay | backend {jax.default_backend()} | device {dev.device_kind} x1 | '
        f'jax {jax.__version__} | float32, batch 1, remat {s_cfg.remat} | '
        f'peak {peak / 1e9:.0f} GFLOP/s '
        f'(best of 10 {peak_n}^2 matmuls, this run)')
  print(f'# sambay: L={s_cfg.num_layers} d={s_cfg.d_model} H={s_cfg.num_heads}x{s_cfg.head_dim} '
        f'K={s_cfg.num_kv_heads} mlp={s_cfg.mlp_dim} window={s_cfg.sambay.window} '
        f'scan={s_cfg.sambay.scan_impl}:{s_cfg.sambay.scan_chunk} NoPE, {n_params:,} params | '
        f'dense: same L/d/heads, RoPE, mlp={d_cfg.mlp_dim}, {count_params(d_cfg):,} params')
  print('# model FLOPs = 3 x forward; scan 9 x d_inner x d_state per token per Mamba layer; '
        'MFU under the causal (MaxText) and non-causal (NeMo) attention conventions')
  print(f'{"model":8} {"seq":>6} {"tok/s":>8} {"step s (min-max)":>22} {"GFLOP/tok":>10} '
        f'{"MFU causal":>11} {"MFU non-c":>10} {"compiled MiB":>13}  step')
  results = {}
  for seq in seq_lens:
    for name, cfg in (('dense', d_cfg), ('sambay', s_cfg)):
      r = train_throughput(cfg, seq, peak, args.max_mib)
      results[(name, seq)] = r
      med, lo, hi = r['step_s']
      print(f'{name:8} {seq:6d} {r["tok/s"]:8.0f} {med:7.2f} ({lo:5.2f}-{hi:5.2f}) '
            f'{r["gflop_tok"]:10.3f} {r["mfu_causal"]:10.1%} {r["mfu_noncausal"]:10.1%} '
            f'{r["mem_mib"]:13.0f}  {r["mode"]}', flush=True)

  print('\n# selective scan alone: B=1, d_inner 256, d_state 16, float32; GFLOP/s by the 9 E N '
        'estimate (train = fwd + bwd counted as 3x)')
  print(f'{"scan":16} {"seq":>6} {"fwd tok/s":>10} {"train tok/s":>12} {"fwd GFLOP/s":>12} '
        f'{"train GFLOP/s":>14} {"train MiB":>10}')
  scan_res = {}
  for seq in seq_lens:
    for impl in scans:
      r = scan_throughput(impl, seq, args.max_mib)
      scan_res[(impl, seq)] = r
      print(f'{impl:16} {seq:6d} {r["fwd_tok/s"]:10.0f} {r["train_tok/s"]:12.0f} '
            f'{r["fwd_gflops"]:12.2f} {r["train_gflops"]:14.2f} {r["train_mib"]:10.0f}', flush=True)

  print('\n# decoding cache bytes per token of context (batch 1, model dtype; SSM state float32); '
        'dense = same depth/width/KV heads, K and V in every layer')
  print(f'{"config":12} {"context":>8} {"sambay B/tok":>13} {"dense B/tok":>12} {"dense/sambay":>13}')
  crow = cache_rows((4096,) if args.smoke else (4096, 32768, 131072))
  for name, n, s, d, ratio in crow:
    print(f'{name:12} {n:8d} {s:13.0f} {d:12.0f} {ratio:12.1f}x')

  long = seq_lens[-1]
  ds, ss = results[('dense', long)], results[('sambay', long)]
  seq_s = scan_res[('sequential', long)]['train_tok/s']
  best = max(scans[1:], key=lambda i: scan_res[(i, long)]['train_tok/s'])
  print(f'summary @{long} ({ss["mode"].split()[0]}): sambay {ss["tok/s"]:,.0f} tok/s '
        f'(MFU {ss["mfu_causal"]:.1%}) vs dense {ds["tok/s"]:,.0f} tok/s '
        f'(MFU {ds["mfu_causal"]:.1%}) | best scan {best} '
        f'{scan_res[(best, long)]["train_tok/s"] / seq_s:.1f}x sequential (train) | '
        f'd16 cache {crow[-1][4]:.1f}x smaller than dense at {crow[-1][1]:,} tokens | '
        f'peak {peak / 1e9:.0f} GFLOP/s')


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(main)
