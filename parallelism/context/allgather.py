"""All-gather context parallelism: gather K/V over the context axis, keep queries local.

The simple baseline (as in Megatron-LM's context parallelism for short rings, or Llama 3's
all-gather CP, "The Llama 3 Herd of Models", 2024): one all-gather of K/V per layer (its
transpose, a reduce-scatter of dK/dV, in the backward pass), then the per-block kernel
(`modeling/kernels/`) on (local queries) x (all keys). Memory holds the whole sequence's K/V
on every device.

Tiles are fitted to the zigzag chunk (a device's queries are two chunks, the gathered keys 2N
chunks), so no block straddles two chunks and the kernel skips the blocks the causal mask
kills: about half of them, as on one device, instead of computing every pair.
"""

from modeling import kernels
from parallelism.context.sharded import ContextAxis


def make_local(kernel: kernels.BlockKernel, zigzag: bool = True):

  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    gather = lambda x: axis.all_gather(x, axis=1)
    k, v, kseg, kpos = (gather(x) for x in (k, v, kseg, kpos))
    chunks = 2 if zigzag and causal else 1
    fitted = kernel.fitted(q.shape[1] // chunks, k.shape[1] // (chunks * axis.size))
    return kernels.attend(fitted)(q, k, v, q_segment_ids=qseg, kv_segment_ids=kseg,
                                  q_positions=qpos, kv_positions=kpos, causal=causal,
                                  window=window)
  return local
