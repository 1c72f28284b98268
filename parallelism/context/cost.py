"""`parallelism.context_impl='auto'`: pick ring or TokenRing per layer by bytes on the links.

A communication-cost model in the spirit of TokenRing (Wang et al., 2024, arXiv 2412.20501)
section 3: both do the same attention FLOPs, so what differs is the traffic per ring step.
Per local token and step, in bytes (isz = bytes per activation element, partials and
gradients that travel are float32, segment id + position = 8 bytes):

  ring        forward   one way: K, V                       2 K D isz + 8
              backward  one way: K, V, dK, dV               2 K D isz + 8 K D + 8
  token_ring  forward   out:  Q                             H D isz + 8
                        back: o, lse                        4 H D + 4 H
              backward  out:  Q, dO, lse, delta             2 H D isz + 8 H + 8
                        back: dQ                            4 H D

A step takes as long as its busiest link direction: with a full-duplex link
(`parallelism.context_full_duplex=True`, NVLink/ICI) TokenRing costs max(out, back), with a
half-duplex one out + back; ring always uses one direction. (The zigzag TokenRing sends the
front query half to only some devices, 3/4 of a shard on average, but every step has a
device that sends a whole shard, so the model counts whole shards.) Training counts
forward + backward; ties go to ring.

When each wins (training, bytes per token per step; H query heads of dim D, K kv heads;
TR = token_ring with a full-duplex / half-duplex link):

  | dtype | D   | H  | H/K     | ring  | TR duplex | TR half | winner duplex / half |
  |-------|-----|----|---------|-------|-----------|---------|----------------------|
  | f32   | 64  | 8  | 1 (MHA) | 12304 | 6248      | 10352   | token_ring / token_ring |
  | f32   | 64  | 8  | 2       | 6160  | 6248      | 10352   | ring / ring          |
  | f32   | 64  | 8  | 8       | 1552  | 6248      | 10352   | ring / ring          |
  | bf16  | 128 | 32 | 1 (MHA) | 65552 | 33160     | 57744   | token_ring / token_ring |
  | bf16  | 128 | 32 | 4       | 16400 | 33160     | 57744   | ring / ring          |

In short: TokenRing wins only for multi-head attention (H = K), where K/V are twice the size
of Q and ring uses one link direction; with any GQA grouping (H/K >= 2) ring wins, because
queries and float32 partial outputs outweigh the shared K/V heads (the pitfall the paper's
MHA-only evaluation hides). `scripts/bench_context.py` measures the real bytes from the HLO.
"""

import dataclasses

IDS_BYTES = 8  # int32 segment id + int32 position per token


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
  traffic = {'ring': ring_traffic, 'token_ring': token_ring_traffic}[impl]
  fwd, bwd = traffic(heads, kv_heads, head_dim, itemsize)
  return fwd.time(full_duplex) + (bwd.time(full_duplex) if train else 0.0)


def choose(heads: int, kv_heads: int, head_dim: int, itemsize: int, *, full_duplex: bool,
           train: bool = True) -> str:
  """'ring' or 'token_ring', whichever moves fewer bytes over the busiest link direction."""
  args = (heads, kv_heads, head_dim, itemsize)
  ring = cost('ring', *args, full_duplex=full_duplex, train=train)
  token_ring = cost('token_ring', *args, full_duplex=full_duplex, train=train)
  return 'token_ring' if token_ring < ring else 'ring'
