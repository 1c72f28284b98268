"""Device profiles the planner models a step on.

Data-sheet figures (dense matmul peak in bf16, memory, HBM bandwidth, link bandwidth per
direction) with their sources. Two factors are modelling assumptions, not data-sheet
figures, and say so: `matmul_efficiency` (the share of peak a train step's matmuls reach;
well-tuned dense LLM training on H100s reports 40-55% MFU) and `overlap` (the share of data-
and fsdp-parallel collectives the compiler's scheduler hides under compute; 0 on CPU, whose
collectives are synchronous). `calibrate` (scripts/plan.py --calibrate) measures a machine's
own profile instead.
"""

import dataclasses  # noqa: F401 - plan.py reads dataclasses.asdict through here
import json
import os

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  kind: str                    # gpu | tpu | cpu: which attention kernels exist
  peak_flops: float            # dense matmul FLOP/s of one device, training dtype
  memory_bytes: float          # memory of one device
  hbm_bytes_per_s: float
  intra_bytes_per_s: float     # one link direction, to a peer in the same node / ICI slice
  inter_bytes_per_s: float     # one direction, to a peer in another node (per device)
  devices_per_node: int        # devices reachable over the intra-node links
  latency_s: float             # fixed cost of one collective
  matmul_efficiency: float     # share of peak reached by a step's matmuls (assumption)
  attention_efficiency: tuple  # ((impl, share of peak), ...) per attention kernel
  overlap: float               # share of gradient / parameter collectives hidden (assumption)
  source: str
  # Share of peak a recurrence scan reaches (elementwise and sequential: far below a
  # matmul's). The data-centre figures are an assumption; calibrate measures it.
  scan_efficiency: float = 0.05
  # Measured attention shares by the per-device head layout a candidate runs, ((impl, query
  # heads, kv heads, share), ...): a kernel's speed depends on its GQA grouping (on CPU a
  # 2-query-per-kv-head block costs 1.5x two 1:1 blocks). Written by calibrate_workload.
  attention_layouts: tuple = ()
  # Measured cost of each remat policy on the attention kernel, ((impl, policy, forward +
  # backward time over the same without remat), ...): a policy can cost more than its
  # recomputation (on CPU `dots` saves every per-block score of a block kernel: 1.7x).
  attention_remat: tuple = ()
  # Whether a collective can run while compute does (GPU/TPU: yes, so a ring hides each
  # step's transfer under that step's compute; XLA:CPU runs collectives synchronously).
  async_collectives: bool = True
  # Measured context-parallel layouts (training/calibration.calibrate_layouts), each a factor
  # on the modelled time: ((kernel, strategy, context, tensor, factor), ...) for one attention
  # layer
  # (seconds per FLOP over the unsplit sequence's: transfers, merges and smaller blocks
  # included) and ((context, tensor, factor), ...) for the recurrence scan.
  context_attention: tuple = ()
  scan_layouts: tuple = ()

  def context_attention_factor(self, kernel: str, impl: str, context: int,
                               tensor: int) -> float | None:
    for k, name, c, t, factor in self.context_attention:
      if (k, name, c, t) == (kernel, impl, context, tensor):
        return factor
    return None

  def scan_layout_factor(self, context: int, tensor: int) -> float | None:
    if (context, tensor) == (1, 1):
      return 1.0 if self.scan_layouts else None
    for c, t, factor in self.scan_layouts:
      if (c, t) == (context, tensor):
        return factor
    return None

  def attention_remat_ratio(self, impl: str, policy: str) -> float | None:
    for name, p, ratio in self.attention_remat:
      if (name, p) == (impl, policy):
        return ratio
    return None

  def attention_share(self, impl: str, heads: int = 0, kv_heads: int = 0) -> float:
    for name, h, k, share in self.attention_layouts:
      if (name, h, k) == (impl, heads, kv_heads):
        return share
    return dict(self.attention_efficiency).get(impl, self.matmul_efficiency / 2)

  def link_bytes_per_s(self, span: int) -> float:
    """Bandwidth of a collective whose group spans `span` consecutive devices."""
    return self.intra_bytes_per_s if span <= self.devices_per_node else self.inter_bytes_per_s


_GPU_ATTENTION = (('jax_nn', 0.55), ('pallas', 0.45), ('blockwise', 0.25), ('xla', 0.2))

PROFILES: dict[str, Hardware] = {
    'h100': Hardware(
        'h100', 'gpu', 989e12, 80 * 1e9, 3.35e12, 450e9, 50e9, 8, 10e-6, 0.55, _GPU_ATTENTION,
        0.5, 'NVIDIA H100 SXM data sheet: 989 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s, '
        'NVLink 4 900 GB/s (450 GB/s per direction); 400 Gb/s NDR InfiniBand per GPU'),
    'h200': Hardware(
        'h200', 'gpu', 989e12, 141 * 1e9, 4.8e12, 450e9, 50e9, 8, 10e-6, 0.55, _GPU_ATTENTION,
        0.5, 'NVIDIA H200 SXM data sheet: 989 TFLOP/s dense BF16, 141 GB HBM3e at 4.8 TB/s, '
        'NVLink 4 900 GB/s; 400 Gb/s NDR InfiniBand per GPU'),
    'tpu-v5p': Hardware(
        'tpu-v5p', 'tpu', 459e12, 95 * 1e9, 2.765e12, 100e9, 100e9, 4096, 20e-6, 0.55,
        (('splash', 0.45), ('blockwise', 0.25), ('xla', 0.2)), 0.5,
        'Google Cloud TPU v5p: 459 TFLOP/s BF16, 95 GB HBM2e at 2,765 GB/s, ICI 4,800 Gbps '
        'per chip over 6 links (modelled as 100 GB/s per link direction, 3D torus)'),
    # Fake CPU devices share the host's cores: figures per device are the host's divided by
    # the device count. Measure them with --calibrate; these are a 2-core laptop-class guess.
    'cpu': Hardware(
        'cpu', 'cpu', 5e9, 2 * GIB, 10e9, 5e9, 5e9, 1024, 100e-6, 1.0,
        (('xla', 0.6), ('blockwise', 0.35)), 0.0,
        'uncalibrated guess for 8 fake devices on 2 cores; run scripts/plan.py --calibrate',
        async_collectives=False),
}


def parse(spec: str) -> Hardware:
  """A profile name, a JSON file written by `calibrate`, or
  custom:PEAK_TFLOPS,HBM_GBPS,LINK_GBPS (data-centre GPU defaults for the rest)."""
  if spec in PROFILES:
    return PROFILES[spec]
  if spec.startswith('custom:'):
    try:
      peak, hbm, link = (float(x) for x in spec[len('custom:'):].split(','))
    except ValueError:
      raise ValueError(f'--hardware {spec!r}: expected custom:PEAK_TFLOPS,HBM_GBPS,LINK_GBPS')
    return dataclasses.replace(PROFILES['h100'], name=spec, peak_flops=peak * 1e12,
                               hbm_bytes_per_s=hbm * 1e9, intra_bytes_per_s=link * 1e9,
                               source='custom: peak, HBM and link given; the rest as h100')
  if os.path.isfile(spec):
    with open(spec) as f:
      d = json.load(f)
    d['attention_efficiency'] = tuple(tuple(x) for x in d['attention_efficiency'])
    d['attention_layouts'] = tuple(tuple(x) for x in d.get('attention_layouts', ()))
    for key in ('attention_remat', 'context_attention', 'scan_layouts'):
      d[key] = tuple(tuple(x) for x in d.get(key, ()))
    return Hardware(**d)
  raise ValueError(f'--hardware {spec!r}: use one of {sorted(PROFILES)}, a profile JSON '
                   'written by --calibrate, or custom:PEAK_TFLOPS,HBM_GBPS,LINK_GBPS')


def save(hw: Hardware, path: str) -> None:
  with open(path, 'w') as f:
    json.dump(dataclasses.asdict(hw), f, indent=1)
