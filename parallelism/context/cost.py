"""`parallelism.context_impl='auto'`: pick ring or TokenRing per layer by modelled step time.

A cost model in the spirit of TokenRing (Wang et al., 2024, arXiv 2412.20501) section 3. Both
do the same attention FLOPs; with double buffering (ring) and the bidirectional pipeline
(TokenRing) a step's transfers run under its compute, so a step takes

    max(compute, each link direction's transfer)           full-duplex link
    max(compute, both directions' transfers added)         half-duplex link

Transfer time = bytes per local token x local tokens x hops / link bandwidth. Ring sends to a
neighbour (1 hop). TokenRing's queries go to a neighbour, but its results go straight home
(j -> j + s): one hop on a switch (NVLink/NVSwitch), min(s, N - s) hops on average over the
steps on a ring or torus (`switched=False`). Compute per step: the zigzag layout makes every
step half a block pair (4 x T^2/2 x H x D FLOPs forward for T local tokens; the backward
pass recomputes and costs 2.5x that).

Bytes per local token and step (isz = bytes per activation element; partials and gradients
that travel are float32; segment id + position = 8 bytes):

  ring        forward   one way: K, V                       2 K D isz + 8
              backward  one way: K, V, dK, dV               2 K D isz + 8 K D + 8
  token_ring  forward   out:  Q                             H D isz + 8
                        back: o, lse                        4 H D + 4 H
              backward  out:  Q, dO, lse, delta             2 H D isz + 8 H + 8
                        back: dQ                            4 H D

Which wins (training, N = 8, H = 32 query heads of dim 128, bf16, T local tokens per device;
microseconds per step from `step_time` with `DEFAULT_HARDWARE`; compute = fwd + bwd FLOPs):

  | hw  | H/K     | T    | compute | ring | TR duplex | TR half | winner duplex / half    |
  |-----|---------|------|---------|------|-----------|---------|-------------------------|
  | gpu | 1 (MHA) | 512  | 11      | 75   | 38        | 66      | token_ring / token_ring |
  | gpu | 1 (MHA) | 2048 | 172     | 298  | 198       | 263     | token_ring / token_ring |
  | gpu | 1 (MHA) | 8192 | 2749    | 2749 | 2749      | 2749    | tie -> fewer bytes: TR  |
  | gpu | 4       | 512  | 11      | 19   | 38        | 66      | ring / ring             |
  | gpu | 4       | 2048 | 172     | 172  | 198       | 263     | ring / ring             |
  | gpu | 4       | 8192 | 2749    | 2749 | 2749      | 2749    | tie -> fewer bytes: ring|
  | tpu | 1 (MHA) | 2048 | 301     | 1492 | 1711      | 2276    | ring / ring (torus hops)|
  | tpu | 4       | 8192 | 4810    | 4810 | 6871      | 9106    | ring / ring             |

Compute per step grows as T^2 and transfers as T, so beyond a few thousand local tokens both
hide their communication completely and the choice only matters for memory and link load
(ties go to the one moving fewer bytes over its busiest direction, then to ring). Below that,
TokenRing wins only for multi-head attention (H = K) on a switched fabric, where K/V are
twice the size of Q and ring uses one direction; on a torus its direct returns take
min(s, N - s) hops and ring wins; with any GQA grouping (H/K >= 2) ring wins,
because queries and float32 partial outputs outweigh the shared K/V heads (the pitfall the
paper's MHA-only evaluation hides). `scripts/bench_context.py` measures the real bytes from
the HLO; `tests/test_context.py` checks these winners.
"""

import dataclasses

IDS_BYTES = 8  # int32 segment id + int32 position per token


@dataclasses.dataclass(frozen=True)
class Hardware:
  flops_per_s: float       # attention matmul throughput of one device
  link_bytes_per_s: float  # per direction, to one peer
  switched: bool           # any-to-any in one hop (NVSwitch) vs a ring / torus


DEFAULT_HARDWARE = {
    'gpu': Hardware(700e12, 450e9, switched=True),     # H100/H200 class, NVLink 4 + NVSwitch
    'tpu': Hardware(400e12, 90e9, switched=False),     # v5p class, one ICI link, torus
    'cpu': Hardware(4e11, 10e9, switched=True),        # fake devices: shared memory
}


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Bytes per local token per ring step, in the two link directions."""
  out: float
  back: float = 0.0

  def time(self, full_duplex: bool) -> float:
    return max(self.out, self.back) if full_duplex else self.out + self.back


def ring_traffic(heads: int, kv_heads: int, head_dim: int, itemsize: int):
  del heads
  kv = 2 * kv_heads * head_dim
  return Traffic(kv * itemsize + IDS_BYTES), Traffic(kv * itemsize + 4 * kv + IDS_BYTES)


def token_ring_traffic(heads: int, kv_heads: int, head_dim: int, itemsize: int):
  del kv_heads
  hd = heads * head_dim
  fwd = Traffic(hd * itemsize + IDS_BYTES, 4 * hd + 4 * heads)
  bwd = Traffic(2 * hd * itemsize + 8 * heads + IDS_BYTES, 4 * hd)
  return fwd, bwd


def cost(impl: str, heads: int, kv_heads: int, head_dim: int, itemsize: int, *,
         full_duplex: bool, train: bool = True) -> float:
  """Bytes per local token and step over the busiest link direction (forward + backward)."""
  traffic = {'ring': ring_traffic, 'token_ring': token_ring_traffic}[impl]
  fwd, bwd = traffic(heads, kv_heads, head_dim, itemsize)
  return fwd.time(full_duplex) + (bwd.time(full_duplex) if train else 0.0)


def return_hops(n: int, switched: bool) -> float:
  """Mean hops of TokenRing's direct returns j -> j + s over the steps s = 1..n-1."""
  if switched or n <= 2:
    return 1.0
  return sum(min(s, n - s) for s in range(1, n)) / (n - 1)


def step_time(impl: str, heads: int, kv_heads: int, head_dim: int, itemsize: int, *,
              tokens: int, n: int, full_duplex: bool, hw: Hardware, train: bool = True) -> float:
  """Seconds per ring step: max(compute, link directions), forward (+ backward)."""
  traffic = {'ring': ring_traffic, 'token_ring': token_ring_traffic}[impl]
  hops_back = return_hops(n, hw.switched) if impl == 'token_ring' else 1.0
  fwd_flops = 4 * tokens * tokens / 2 * heads * head_dim
  total = 0.0
  for t, flops in zip(traffic(heads, kv_heads, head_dim, itemsize)[:1 + train],
                      (fwd_flops, 2.5 * fwd_flops)):
    out = t.out * tokens / hw.link_bytes_per_s
    back = t.back * tokens * hops_back / hw.link_bytes_per_s
    comm = max(out, back) if full_duplex else out + back
    total += max(flops / hw.flops_per_s, comm)
  return total


def choose(heads: int, kv_heads: int, head_dim: int, itemsize: int, *, full_duplex: bool,
           train: bool = True, tokens: int | None = None, n: int = 2,
           hw: Hardware | None = None) -> str:
  """'ring' or 'token_ring': the shorter modelled step (`tokens` local tokens per device on
  `n` devices; without `tokens`, the communication-bound limit), ties broken by bytes over
  the busiest link direction, then in favour of ring."""
  args = (heads, kv_heads, head_dim, itemsize)
  if tokens is not None:
    import jax  # the backend's default hardware
    hw = hw or DEFAULT_HARDWARE.get(jax.default_backend(), DEFAULT_HARDWARE['gpu'])
    times = {i: step_time(i, *args, tokens=tokens, n=n, full_duplex=full_duplex, hw=hw,
                          train=train) for i in ('ring', 'token_ring')}
    if abs(times['ring'] - times['token_ring']) > 1e-3 * times['ring']:
      return min(times, key=times.get)
  ring = cost('ring', *args, full_duplex=full_duplex, train=train)
  token_ring = cost('token_ring', *args, full_duplex=full_duplex, train=train)
  return 'token_ring' if token_ring < ring else 'ring'
