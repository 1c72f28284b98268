"""Telemetry: the trip-count-aware collective counter, per-device attention FLOPs, and the keys a
context-parallel run (with in-training task evals) writes to metrics.jsonl; CART's loop states."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallelism import mesh as mesh_lib
from tests.helpers import random_batch, tiny_config
from training import loop
from training.metrics import perf, telemetry
from training.program import build_program


def test_counter_multiplies_loop_bodies_by_trip_count():
  mesh = Mesh(np.array(jax.devices()[:4]), ('d',))
  x = jax.device_put(jnp.ones((4, 1024), jnp.float32), NamedSharding(mesh, P('d')))

  def f(x, trips):
    def body(_, c):
      return c + jax.lax.psum(c, 'd') * 0.5
    return jax.lax.fori_loop(0, trips, body, x)

  sent = {}
  for trips in (1, 5):
    g = jax.jit(jax.shard_map(lambda x, t=trips: f(x, t), mesh=mesh, in_specs=P('d'),
                              out_specs=P('d')))
    by_kind = perf.collective_bytes_by_kind(g.lower(x).compile().as_text(), 4)
    sent[trips] = by_kind['all-reduce']
  per_trip = 2 * 3 / 4 * 1024 * 4            # ring all-reduce of a 4 KiB buffer over 4 devices
  np.testing.assert_allclose(sent[5], 5 * per_trip)
  np.testing.assert_allclose(sent[1], per_trip)


def test_zigzag_balances_attention_flops():
  L, n = 64, 4
  seg, pos = np.ones((2, L), np.int32), np.tile(np.arange(L), (2, 1))
  contiguous = telemetry.attention_flops_per_device(seg, pos, 2, n, heads=1, head_dim=1)
  from parallelism.context.layout import to_zigzag
  zz = telemetry.attention_flops_per_device(seg, to_zigzag(pos, n), 2, n, heads=1, head_dim=1)
  assert contiguous.sum() == zz.sum() == 2 * 4 * L * (L + 1) / 2
  assert contiguous.max() / contiguous.mean() > 1.5
  assert zz.max() / zz.mean() == 1.0


def test_context_parallel_run_writes_telemetry_and_task_evals(tmp_path):
  c = tiny_config(**{'mesh.data': 4, 'mesh.context': 2, 'parallelism.context_impl': 'ring',
                     'steps': 2, 'log_every': 1, 'eval_every': 1, 'eval_batches': 1,
                     'eval.tasks': 'loss,position_loss,mqar', 'eval.mqar_pairs': '4',
                     'eval.mqar_samples': 2, 'eval.tokens': 64, 'data.source': 'synthetic'})
  c.checkpoint.async_save = False
  loop.run(c, str(tmp_path))
  rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'metrics.jsonl'))]
  keys = set().union(*rows)
  for k in ('comm/gradients_bytes', 'comm/ring_kv_bytes', 'comm/total_bytes',
            'mem/compiled_total_bytes', 'data/real_token_fraction', 'data/padding_fraction',
            'balance/attn_flops_max', 'balance/attn_flops_mean', 'balance/attn_imbalance',
            'eval/mqar/len_32/pairs_4', 'eval/position_loss/len_32/pos_000016_000032'):
    assert k in keys, k
  first = next(r for r in rows if 'comm/total_bytes' in r)   # written once, at start-up
  assert first['comm/ring_kv_bytes'] > 0 and first['comm/gradients_bytes'] > 0
  assert first['mem/compiled_total_bytes'] > 0
  logged = [r for r in rows if 'data/real_token_fraction' in r]
  assert all(r['data/real_token_fraction'] == 1.0 for r in logged)   # synthetic: no padding
  assert all(r['balance/attn_imbalance'] == 1.0 for r in logged)     # zigzag, full rows


def test_cart_state_rms_per_loop():
  c = tiny_config(**{'model.name': 'cart', 'model.cart.prelude_layers': 1,
                     'model.cart.loops': 3, 'mesh.data': 2})
  program = build_program(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:2]))
  tele = program.telemetry()
  host = random_batch(c)
  tele.observe(host)
  rng = np.random.default_rng(0)   # random parameters: no init program to compile
  params = jax.tree.map(lambda a: jax.device_put(
      (0.1 * rng.standard_normal(a.shape) + 1).astype(a.dtype), a.sharding),
      program.setup.abstract.params)
  row = tele.row(params, program.global_batch(host))
  norms = [row[f'cart/state_rms_loop_{r}'] for r in range(3)]
  assert all(np.isfinite(norms)) and all(v > 0 for v in norms)
  assert 0 < row['data/real_token_fraction'] < 1             # random_batch pads 2 positions
