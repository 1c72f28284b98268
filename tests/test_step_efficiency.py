"""Issue 19: the step's efficiency work changes no numerics, and the profiling CLIs run.

The loss and gradients of the dense model are compared, in float32 on a fixed packed batch,
with a straightforward reference written here from the model's definition (einsums over the
parameter tree, full-head attention with an explicit mask, plain log-softmax).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modeling import registry
from tests.helpers import random_batch, tiny_config
from training import loss as loss_lib, step as step_lib
from training.metrics import profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rms(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
  d = x.shape[-1]
  inv = theta ** (-np.arange(0, d, 2, dtype=np.float32) / d)
  ang = pos[..., None].astype(jnp.float32) * inv
  sin, cos = jnp.sin(ang)[:, :, None], jnp.cos(ang)[:, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_loss(p, cfg, batch):
  """Mean next-token cross-entropy of the dense transformer, written out plainly."""
  tok, seg, pos = batch['inputs'], batch['segment_ids'], batch['positions']
  x = p['embed']['table'][tok]
  G = cfg.num_heads // cfg.num_kv_heads
  mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, :, None] >= pos[:, None, :])
  for blk in [p['blocks'][i] for i in sorted(p['blocks'])]:
    h = _rms(x, blk['attn_norm']['scale'], cfg.norm_eps)
    q = _rope(jnp.einsum('bld,dhk->blhk', h, blk['attn']['wq']), pos, cfg.rope_theta)
    k = _rope(jnp.einsum('bld,dhk->blhk', h, blk['attn']['wk']), pos, cfg.rope_theta)
    v = jnp.einsum('bld,dhk->blhk', h, blk['attn']['wv'])
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum('blhk,bshk->bhls', q, k) / np.sqrt(cfg.head_dim)
    s = jnp.where(mask[:, None], s, -1e30)
    o = jnp.einsum('bhls,bshk->blhk', jax.nn.softmax(s, -1), v)
    x = x + jnp.einsum('blhk,hkd->bld', o, blk['attn']['wo'])
    h = _rms(x, blk['mlp_norm']['scale'], cfg.norm_eps)
    m = jax.nn.silu(h @ blk['mlp']['w_gate']) * (h @ blk['mlp']['w_up'])
    x = x + m @ blk['mlp']['w_down']
  x = _rms(x, p['final_norm']['scale'], cfg.norm_eps)
  logp = jax.nn.log_softmax(x @ p['embed']['table'].T, -1)
  t = batch['targets']
  nll = -jnp.take_along_axis(logp, jnp.maximum(t, 0)[..., None], -1)[..., 0]
  valid = t >= 0
  return jnp.sum(jnp.where(valid, nll, 0.0)) / valid.sum()


@pytest.fixture(scope='module')
def setup():
  c = tiny_config()
  c.batch_size = 4
  model = registry.build_model(c.model, rngs=nnx.Rngs(3))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = {k: jnp.asarray(v) for k, v in random_batch(c, seed=5).items()}
  return c, graphdef, params, batch


def _plain(params):
  return jax.tree.map(lambda v: v[...], nnx.to_pure_dict(params))


@pytest.mark.parametrize('loss_chunk', [0, 8])
def test_loss_and_grads_match_reference(setup, loss_chunk):
  c, graphdef, params, batch = setup

  def ours(p):
    total, count = step_lib.loss_sum(p, graphdef, batch, None, loss_chunk)
    return total / count

  loss, grads = jax.jit(jax.value_and_grad(ours))(params)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      lambda p: reference_loss(p, c.model, batch)))(_plain(params))
  assert abs(float(loss) - float(ref_loss)) < 1e-5, (float(loss), float(ref_loss))
  flat = jax.tree.leaves(_plain(grads))
  ref_flat = jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref_flat) > 10
  for g, r in zip(flat, ref_flat):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6, rtol=1e-4)


def test_cross_entropy_matches_log_softmax():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 8, 33)) * 4, jnp.float32)
  targets = jnp.asarray(rng.integers(-1, 33, (2, 8)), jnp.int32)
  total, count = loss_lib.cross_entropy_sum(logits, targets)
  logp = jax.nn.log_softmax(logits, -1)
  valid = np.asarray(targets) >= 0
  expect = -sum(float(logp[b, l, targets[b, l]]) for b, l in zip(*np.nonzero(valid)))
  assert abs(float(total) - expect) < 1e-4 and float(count) == valid.sum()


def test_breakdown_categories_from_hlo():
  """The categorizer puts a dot, a transpose copy and a scoped softmax where they belong."""
  def f(x, w):
    y = x @ w
    with jax.named_scope(profile.LOSS_SCOPE):
      z = jax.nn.logsumexp(y.T * 2.0, axis=-1)
    return z.sum()
  hlo = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((32, 48))).compile().as_text()
  ins = profile.parse_hlo(hlo)
  cats = {name: profile.categorize(name, ins) for name in ins}
  assert 'matmul' in cats.values() and 'loss' in cats.values()
  times = {name: 1.0 for name in ins}
  out = profile.breakdown(times, hlo)
  assert set(out) == set(profile.CATEGORIES) and out['matmul'] >= 1 and out['loss'] >= 1


def test_profile_step_smoke(tmp_path):
  """scripts/profile_step.py --smoke (tests/test_scripts.py runs --help and the bench_* smokes)."""
  out = tmp_path / 'out.json'
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  r = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'profile_step.py'),
                      '--smoke', '--json', str(out)], capture_output=True, text=True, env=env,
                     timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'op-time breakdown' in r.stdout and 'matmul' in r.stdout
  data = json.loads(out.read_text())
  assert data['op_seconds'] > 0 and data['seconds']['matmul'] > 0
  assert set(data['seconds']) == set(profile.CATEGORIES) and data['top_ops']


def test_dense_flat_equals_einsum_and_context_turns_it_off():
  from modeling import layers
  from parallelism import mesh as mesh_lib
  from training import composition
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 5, 6)), jnp.float32)
  flat = layers.dense(x, w, n_in=2, flatten_tokens=True)
  ein = layers.dense(x, w, n_in=2, flatten_tokens=False)
  assert flat.shape == (2, 3, 6)
  np.testing.assert_allclose(np.asarray(flat), np.asarray(jnp.einsum('blhk,hkd->bld', x, w)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(flat), np.asarray(ein), rtol=1e-5, atol=1e-5)
  c = tiny_config(**{'mesh.context': 2})
  assert composition._length_sharded(c, mesh_lib.make_mesh(c.mesh))
  c = tiny_config()
  assert not composition._length_sharded(c, mesh_lib.make_mesh(c.mesh))
