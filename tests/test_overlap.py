"""The rings' compiled programs let every transfer overlap compute (structural, no GPU needed).

For ring and TokenRing (context 4, zigzag, causal, GQA), the optimized HLO of forward +
backward (the forward pass is the part not under `transpose(jvp(...))`) must show: no collective
inside a conditional; ring: every K/V send independent of any attention compute (double buffering), only dK/dV sent after their step's compute;
TokenRing: every send has attention compute of the same pass it can run under, except the
last step's returns, which have nothing left to hide behind.
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
  p = programs['ring']
  fwd = [(c, i) for c, i in p.sends() if not _backward(i)]
  assert len(fwd) == 4  # K, V, segment ids, positions: once, in the loop body
  for comp, ins in fwd:
    assert comp in p.while_bodies()
    assert not p.depends_on_compute(comp, ins), ins.line[:120]
    assert p.concurrent_compute(comp, ins), 'nothing to overlap with'

  bwd = [(c, i) for c, i in p.sends() if _backward(i)]
  loop = [(c, i) for c, i in bwd if c in p.while_bodies()]
  independent = [i for c, i in loop if not p.depends_on_compute(c, i)]
  after = [i for c, i in loop if p.depends_on_compute(c, i)]
  assert len(independent) == 4 and len(after) == 2  # K/V ahead; dK/dV after the compute
  for c, i in loop:
    if i in independent:
      assert p.concurrent_compute(c, i)
  peeled = [i for c, i in bwd if c not in p.while_bodies()]
  assert len(peeled) == 2  # the last step sends only dK/dV home


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
  # Steps 1..N-1, each: the query halves out (forward: q, segment ids, positions x 2 halves;
  # backward: dO, lse, delta x 2, the rest is shared with the forward pass) and the results
  # back (o, lse x back/front halves; dQ x 2). Only the final delivery waits.
  assert len(sends) >= (N - 1) * (8 if backward else 10)
  assert len(blocked) <= (2 if backward else 4), blocked
