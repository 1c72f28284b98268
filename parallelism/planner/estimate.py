"""A candidate's modelled per-device memory and step time (docs/planning.md, "The model").

Memory per device = model state + saved activations + the loss head's logits:
  state        P x (param + gradient + 8 Adam bytes) / (fsdp x tensor), plus two layers'
               parameters gathered at once under fsdp
  activations  tokens on the device per micro-batch x effective layers x bytes per token and
               layer, by remat policy (`ACTIVATION_SHARE`); attention keeps a log-sum-exp per
               head, except the dense XLA kernel, which keeps [heads, keys] float32 scores and
               probabilities per query (O(L^2))
  logits       tokens x vocab / tensor x 8 bytes (float32 logits and their gradient), at most
               2 GiB (attention.loss_chunk=-1 chunks the head past 1 GiB)
Step time = compute + recompute + exposed communication:
  compute      3 x forward FLOPs per device at the hardware's matmul / attention / scan
               efficiency; attention at the share measured for the candidate's per-device
               head layout (`head_layout`) where calibrate_workload measured it, times the
               factor calibrate_layouts measured for its (strategy, context, tensor) split;
               the scan times its split's measured factor (else, context parallel, the
               state correction's FLOPs)
  recompute    the forward work the remat policy redoes (full: all; save_attention_out: all
               but the attention core; dots: none); for attention, where calibrate_workload
               measured it, the kernel's time under the policy over its time without
  communication per device and step, ring all-reduce / all-gather / reduce-scatter byte counts
               ((n-1)/n of the payload per phase) over the link that the axis spans (tensor is
               the innermost mesh axis, then context, fsdp, data); gradient and parameter
               collectives are hidden by the hardware's `overlap` share; tensor all-reduces are
               exposed; ring attention hides each step's transfer under that step's compute
               (`parallelism/context/cost.py`) where the hardware runs collectives
               asynchronously (not XLA:CPU), and is already in a measured split's factor;
               a fixed latency per collective.
"""

import dataclasses

from parallelism.context import cost as ring_cost
from parallelism.planner.hardware import GIB, Hardware
from parallelism.planner.workload import Workload

# Saved activation bytes per token and effective layer, as a share of what remat 'none' keeps.
ACTIVATION_SHARE = {'none': 1.0, 'dots': 0.8, 'dots_no_batch': 0.8}
# Forward work redone in the backward pass: (share of matmul work, share of attention work).
RECOMPUTE = {'none': (0.0, 0.0), 'dots': (0.0, 0.0), 'dots_no_batch': (0.0, 0.0),
             'save_attention_out': (1.0, 0.0), 'full': (1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class Candidate:
  data: int
  fsdp: int
  context: int
  tensor: int
  context_impl: str     # none | ring | token_ring | allgather
  attention: str        # attention.impl
  remat: str            # model.remat
  grad_accum: int
  # Hybrid data parallelism (parallelism.hybrid_dp, `documents.py`): the data x fsdp devices
  # are one pool; `capacity` tokens per device per micro-batch (0 = a static mesh), group
  # sizes `layouts`, `documents` per step (batch_size counts documents there).
  capacity: int = 0
  layouts: tuple = ()
  documents: int = 0

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.context * self.tensor

  @property
  def hybrid(self) -> bool:
    return self.capacity > 0

  def overrides(self) -> dict:
    """The config keys this candidate sets."""
    out = {'mesh.data': self.data, 'mesh.fsdp': self.fsdp, 'mesh.context': self.context,
           'mesh.tensor': self.tensor, 'parallelism.context_impl': self.context_impl,
           'attention.impl': self.attention, 'model.remat': self.remat,
           'optimizer.grad_accum_steps': self.grad_accum}
    if self.hybrid:
      out.update({'parallelism.hybrid_dp.enabled': True,
                  'parallelism.hybrid_dp.capacity': self.capacity,
                  'parallelism.hybrid_dp.layouts': self.layouts, 'batch_size': self.documents})
    return out

  def describe(self) -> str:
    mesh = ' x '.join(f'{a}={n}' for a, n in (('data', self.data), ('fsdp', self.fsdp),
                                               ('context', self.context),
                                               ('tensor', self.tensor)) if n > 1) or '1 device'
    ctx = f' {self.context_impl}' if self.context > 1 else ''
    if self.hybrid:
      ctx = f' hybrid_dp C={self.capacity}'
    acc = f' accum={self.grad_accum}' if self.grad_accum > 1 else ''
    return f'{mesh}{ctx} {self.attention} remat={self.remat}{acc}'


@dataclasses.dataclass(frozen=True)
class Estimate:
  memory: dict      # bytes per device: state, activations, logits, total
  time: dict        # seconds per step: compute, recompute, communication, step
  mfu: float        # model FLOPs / (step time x peak), per device


def micro_tokens(c: Candidate, w: Workload) -> float:
  """Tokens one device holds per micro-batch."""
  return w.global_tokens / (c.data * c.fsdp * c.grad_accum * c.context)


def memory(c: Candidate, w: Workload) -> dict:
  t = c.tensor
  state_per_param = w.param_bytes * 2 + 8
  state = w.params * state_per_param / (c.fsdp * t)
  if c.fsdp > 1:
    state += 2 * w.params / max(w.stored_layers, 1) * w.param_bytes / t
  H, K, Dh, D, F = w.heads, w.kv_heads, w.head_dim, w.d_model, w.mlp_dim
  kv_shards = t if K % t == 0 else 1
  full_layer = w.act_bytes * (4 * D + 2 * H * Dh / t + 2 * K * Dh / kv_shards + 3 * F / t)
  full_layer += 4 * H / t   # log-sum-exp per head
  if c.attention == 'xla' and c.context_impl in ('none', 'allgather'):
    full_layer += 8 * H / t * w.seq_len   # float32 scores and probabilities, per query token
  elif c.attention == 'xla' and c.remat in ('dots', 'dots_no_batch'):
    full_layer += 4 * H / t * w.seq_len   # a ring's per-block scores are dots: all are saved
  if c.remat == 'full':
    per_layer, transient = w.act_bytes * D, full_layer
  elif c.remat == 'save_attention_out':
    per_layer, transient = w.act_bytes * (2 * D + H * Dh / t), full_layer
  else:
    per_layer, transient = full_layer * ACTIVATION_SHARE[c.remat], 0.0
  tokens = micro_tokens(c, w)
  if c.context_impl in ('ring', 'token_ring'):
    transient += 3 * w.act_bytes * 2 * K * Dh / kv_shards   # K/V blocks in flight
  acts = tokens * (w.effective_layers * per_layer + transient)
  logits = min(tokens * w.vocab / t * 8, 2 * GIB)
  return {'state': state, 'activations': acts, 'logits': logits,
          'total': state + acts + logits}


def _span(c: Candidate, axis: str) -> int:
  """Consecutive devices a group along `axis` covers (mesh order data, fsdp, context, tensor)."""
  inner = {'tensor': 1, 'context': c.tensor, 'fsdp': c.tensor * c.context,
           'data': c.tensor * c.context * c.fsdp}[axis]
  return inner * getattr(c, axis)


def communication(c: Candidate, w: Workload, hw: Hardware, compute_attn_s: float, *,
                  context_measured: bool = False) -> dict:
  """Exposed seconds per step by kind. With `context_measured` the context strategy's
  transfers are in its measured attention time already (calibrate_layouts): none here."""
  P, t = w.params, c.tensor
  out = {}
  n_coll = 0
  if c.data > 1:  # gradient all-reduce over data (reduce-scatter + all-gather)
    b = 2 * (c.data - 1) / c.data * P * 4 / (c.fsdp * t)
    out['gradients'] = b / hw.link_bytes_per_s(_span(c, 'data')) * (1 - hw.overlap)
    n_coll += 1
  if c.fsdp > 1:  # parameters gathered forward and backward, gradients reduce-scattered
    b = (c.fsdp - 1) / c.fsdp * P * (2 * w.param_bytes + 4) / t
    out['fsdp'] = b / hw.link_bytes_per_s(_span(c, 'fsdp')) * (1 - hw.overlap)
    n_coll += 3 * w.stored_layers * c.grad_accum
  tokens = micro_tokens(c, w) * c.context   # the tensor group's tokens per micro-batch
  if t > 1:  # two all-reduces forward, two backward, per layer
    b = 4 * w.effective_layers * 2 * (t - 1) / t * (tokens / c.context) * w.d_model * w.act_bytes
    out['tensor'] = b * c.grad_accum / hw.link_bytes_per_s(_span(c, 'tensor'))
    n_coll += 4 * round(w.effective_layers) * c.grad_accum
  if c.context > 1 and not context_measured:
    n, local = c.context, micro_tokens(c, w)
    link = hw.link_bytes_per_s(_span(c, 'context'))
    kv_shards = t if w.kv_heads % t == 0 else 1
    if c.context_impl == 'allgather':
      b = 2 * (n - 1) / n * 2 * w.kv_heads / kv_shards * w.head_dim * w.act_bytes * local * n
      exposed = b / link
    else:
      per_token = ring_cost.cost(c.context_impl, w.heads // t, max(w.kv_heads // kv_shards, 1),
                                 w.head_dim, w.act_bytes, full_duplex=True)
      transfer = per_token * local / link
      step_compute = compute_attn_s / (w.effective_layers * c.grad_accum * n)
      hidden = min(transfer, step_compute) if hw.async_collectives else 0.0
      exposed = (transfer - hidden) * (n - 1)
    out['context'] = exposed * w.effective_layers * c.grad_accum
    n_coll += 2 * (n - 1) * round(w.effective_layers) * c.grad_accum
  out['latency'] = n_coll * hw.latency_s
  return out


def head_layout(heads: int, kv_heads: int, tensor: int) -> tuple[int, int]:
  """(query heads, kv heads they read) on one device: query heads split over tensor; each
  device's queries read heads / (heads per kv head) kv heads, at least one (when kv heads do
  not divide over tensor every device keeps them all, parallelism/rules.py, but its queries
  still read only their group's)."""
  h = heads // tensor
  return h, max(1, h // (heads // kv_heads))


def estimate(c: Candidate, w: Workload, hw: Hardware) -> Estimate:
  mem = memory(c, w)
  per_device_tokens = w.global_tokens / c.devices
  mm = 3 * w.matmul_flops * per_device_tokens
  scan = 3 * w.scan_flops * per_device_tokens
  attn = 3 * w.attention_flops * per_device_tokens
  mm_s = mm / (hw.peak_flops * hw.matmul_efficiency)
  scan_s = scan / (hw.peak_flops * hw.scan_efficiency)
  scan_factor = hw.scan_layout_factor(c.context, c.tensor)
  if scan_factor is not None:
    scan_s *= scan_factor
  elif c.context > 1:
    # The context-parallel scan (parallelism/context/scan.py) then corrects every local
    # output with the entering state: C . (exp(A cumsum dt) h_in), ~4 FLOPs per (e, n) next
    # to the scan's 9.
    scan_s *= 1 + 4 / 9
  share = hw.attention_share(c.attention, *head_layout(w.heads, w.kv_heads, c.tensor))
  attn_s = attn / (hw.peak_flops * share)
  context_factor = (hw.context_attention_factor(c.attention, c.context_impl, c.context,
                                                c.tensor) if c.context > 1 else None)
  if context_factor is not None:
    attn_s *= context_factor
  share_mm, share_attn = RECOMPUTE[c.remat]
  measured = hw.attention_remat_ratio(c.attention, c.remat)
  attn_extra = attn_s * (measured - 1) if measured is not None else share_attn * attn_s / 3
  recompute = share_mm * (mm_s + scan_s) / 3 + max(attn_extra, 0.0)
  comm = communication(c, w, hw, attn_s, context_measured=context_factor is not None)
  comm_s = sum(comm.values())
  step = mm_s + scan_s + attn_s + recompute + comm_s
  time = {'compute': mm_s + scan_s + attn_s, 'scan': scan_s, 'recompute': recompute,
          'communication': comm_s, **{f'comm_{k}': v for k, v in comm.items()}, 'step': step}
  return Estimate(mem, time, (mm + scan + attn) / (step * hw.peak_flops))
