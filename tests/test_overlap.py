"""The rings' compiled programs let every transfer overlap compute (structural, no GPU needed).

For ring and TokenRing (context 4, zigzag, causal, GQA), the optimized HLO of forward +
backward (the forward pass is the part not under `transpose(jvp(...))`) must show: no collective
inside a conditional; one collective-permute per step and direction (K, V, segment ids,
positions, and in the ring's backward the lagged dK/dV, packed into one buffer); ring: every
send independent of the attention compute it sits beside (double buffering, dK/dV one step
late), except the final hop home; TokenRing: every send has attention compute of the same
pass it can run under, except the last step's returns, which have nothing left to hide
behind.
"""

import jax
import numpy as np
import pytest

from configs import base
from modeling.attention import self_attention_kwargs
from parallelism import mesh as mesh_lib
from parallelism.context import make_context_attend
from parallelism.context.overlap import Program

N, L, H, K, D = 4, 64, 4, 2, 8


def _program(impl: str) -> Program:
  c = base.get_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.context, c.mesh.tensor = 1, 1, N, 1
  c.parallelism.context_impl = impl
  c.attention.block_q = c.attention.block_kv = 8
  attend = make_context_attend(c, mesh_lib.make_mesh(c.mesh, jax.devices()[:N]))
  f = lambda q, k, v, s, p: attend(q, k, v, causal=True, **self_attention_kwargs(s, p)).sum()
  f = jax.grad(f, (0, 1, 2))
  x = lambda h: jax.ShapeDtypeStruct((1, L, h, D), np.float32)
  ids = jax.ShapeDtypeStruct((1, L), np.int32)
  return Program(jax.jit(f).lower(x(H), x(K), x(K), ids, ids).compile().as_text())


@pytest.fixture(scope='module')
def programs():
  return {impl: _program(impl) for impl in ('ring', 'token_ring')}


def _backward(ins) -> bool:
  return 'transpose(jvp' in ins.line


@pytest.mark.parametrize('impl', ['ring', 'token_ring'])
def test_no_collective_inside_a_conditional(programs, impl):
  p = programs[impl]
  assert p.sends(), 'no collective-permute found: the parser or the program changed'
  assert p.collectives_in_conditionals() == []


def test_ring_sends_kv_ahead_of_compute(programs):
  """Forward: one packed K/V permute per step, independent of the compute beside it."""
  p = programs['ring']
  fwd = [(c, i) for c, i in p.sends() if not _backward(i)]
  assert len(fwd) == 1  # K, V, segment ids, positions: one buffer, once, in the loop body
  for comp, ins in fwd:
    assert comp in p.while_bodies()
    assert not p.depends_on_compute(comp, ins), ins.line[:120]
    assert p.concurrent_compute(comp, ins), 'nothing to overlap with'


def test_ring_backward_lags_dkv_one_step(programs):
  """Backward: dK/dV of step s travel during step s+1, in the same buffer as the next K/V, so
  no send waits on its own step's compute; only the final hop home (after the last step)
  does."""
  p = programs['ring']
  bwd = [(c, i) for c, i in p.sends() if _backward(i)]
  loop = [(c, i) for c, i in bwd if c in p.while_bodies()]
  assert len(loop) == 1, [i.line[:100] for _, i in loop]  # (K, V, ids, dK, dV): one permute
  c, i = loop[0]
  assert not p.depends_on_compute(c, i) and p.concurrent_compute(c, i)
  peeled = [(c, i) for c, i in bwd if c not in p.while_bodies()]
  # Peeled: step 0's K/V and step N-1's lagged dK/dV, each beside its step's compute, and the
  # final hop home, which has nothing left to run under. (Outside the loop "depends on
  # compute" cannot tell the loop from the step beside it, so concurrency is what is checked.)
  waiting = [i.name for c, i in peeled if not p.concurrent_compute(c, i)]
  assert len(peeled) == 3 and len(waiting) == 1, ([i.line[:100] for _, i in peeled], waiting)


@pytest.mark.parametrize('backward', [False, True], ids=['forward', 'backward'])
def test_token_ring_sends_overlap_compute(programs, backward):
  p = programs['token_ring']
  in_pass = lambda i: _backward(i) == backward
  sends = [(c, i) for c, i in p.sends() if in_pass(i)]
  blocked = []
  for comp, ins in sends:
    concurrent = [n for n in p.concurrent_compute(comp, ins) if in_pass(p.comps[comp][n])]
    if not concurrent:
      blocked.append(ins.name)
  # Steps 1..N-1, each one packed buffer per direction: the queries out (both halves, with
  # their ids; backward also dO, lse, delta) and the results back (o and lse, or dQ, of both
  # halves). Only the final delivery waits.
  assert len(sends) == 2 * (N - 1), [i.line[:100] for _, i in sends]
  assert len(blocked) <= 1, blocked


def test_xla_flags_helper_adds_overlap_flags_and_env_wins():
  from parallelism import xla_flags
  c = base.get_config()
  assert c.parallelism.xla_flags == 'auto'
  env = {'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=false --foo=1'}
  value = xla_flags.merged('auto', env['XLA_FLAGS'])
  assert '--xla_gpu_enable_latency_hiding_scheduler=false' in value  # the user's setting wins
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' not in value
  assert '--xla_gpu_experimental_parallel_collective_overlap_limit=2' in value
  assert xla_flags.merged('none', '--foo=1') == '--foo=1'
  assert xla_flags.merged('--a=1 --b=2', '') == '--a=1 --b=2'
  assert xla_flags.merged('auto', '--foo=1', gpu=False) == '--foo=1'  # no CUDA plugin
  # This process's backend already runs: apply leaves XLA_FLAGS as it is (and warns).
  c.parallelism.xla_flags = '--xla_gpu_enable_latency_hiding_scheduler=true'
  env = {'XLA_FLAGS': ''}
  jax.devices()
  assert xla_flags.apply(c, env) == '' and env['XLA_FLAGS'] == ''
