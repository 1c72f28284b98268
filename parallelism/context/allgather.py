"""All-gather context parallelism: gather K/V over the context axis, keep queries local.

The simple baseline (as in Megatron-LM's context parallelism for short rings, or Llama 3's
all-gather CP, "The Llama 3 Herd of Models", 2024): one all-gather of K/V per layer (its
transpose, a reduce-scatter of dK/dV, in the backward pass), then any single-device kernel
on (local queries) x (all keys). Memory holds the whole sequence's K/V on every device.
"""

from modeling.attention import AttendFn
from parallelism.context.sharded import ContextAxis


def make_local(kernel: AttendFn):
  def local(q, k, v, qseg, kseg, qpos, kpos, *, axis: ContextAxis, causal, window):
    gather = lambda x: axis.all_gather(x, axis=1)
    return kernel(q, gather(k), gather(v), q_segment_ids=qseg, kv_segment_ids=gather(kseg),
                  q_positions=qpos, kv_positions=gather(kpos), causal=causal, window=window)
  return local
