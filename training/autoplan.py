"""The automatic parallel plan on the real program: the modelled ranking of
`parallelism/planner`, then each leading candidate's train step compiled for its mesh (its
compiled per-device memory decides feasibility), and `mesh.auto` for train.py. Measuring
this machine's profile is `training/calibration.py`.

A row is "compiled" when this process had the candidate's device count of the target's
backend (fake CPU devices count: XLA_FLAGS=--xla_force_host_platform_device_count=N), else
"modelled" only.
"""

import dataclasses
import logging

import jax
import ml_collections
import numpy as np

from parallelism import mesh as mesh_lib
from parallelism.planner import hardware as hw_lib
from parallelism.planner import documents, search, workload as workload_lib
from parallelism.planner.estimate import Candidate, Estimate
from training.metrics import perf

log = logging.getLogger('loomax')


@dataclasses.dataclass
class Row:
  candidate: Candidate
  estimate: Estimate
  compiled_bytes: float | None = None   # per device; None = not compiled
  refused: str = ''                     # the start-up guard's message, if it refused
  feasible: bool = True                 # fits the budget (compiled figure where there is one)

  @property
  def checked(self) -> str:
    return 'refused' if self.refused else ('compiled' if self.compiled_bytes is not None
                                           else 'modelled')


def apply(config: ml_collections.ConfigDict, c: Candidate, *, seq_len: int | None = None,
          global_tokens: int | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with the candidate's keys (and the planned length and batch)."""
  out = ml_collections.ConfigDict(config.to_dict())
  for key, value in c.overrides().items():
    node = out
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  if seq_len:
    out.seq_len = seq_len
  if global_tokens and not c.hybrid:   # hybrid DP: batch_size counts documents (set above)
    out.batch_size = global_tokens // out.seq_len
  if not c.hybrid and 'hybrid_dp' in out.parallelism:
    out.parallelism.hybrid_dp.enabled = False
  return out


def _flag_value(v) -> str:
  return '(' + ','.join(map(str, v)) + ')' if isinstance(v, tuple) else str(v)


def flags(c: Candidate) -> str:
  """The candidate as train.py overrides to paste."""
  return ' '.join(f'--config.{k}={_flag_value(v)}' for k, v in c.overrides().items())


def _hybrid_compiled_bytes(program, config) -> float:
  """Hybrid DP: per-device bytes of the gradient program of the largest group (every device
  holds `capacity` tokens in each), compiled, plus the Adam moments it does not hold."""
  from parallelism.hybrid import planner as hybrid_lib
  ex = program.train_step.executor
  state = jax.eval_shape(program.init_state)
  rep, per = ex.replicated, ex.per_device
  sds = jax.ShapeDtypeStruct
  params = jax.tree.map(lambda p: sds(p.shape, p.dtype, sharding=rep), state.params)
  acc = jax.tree.map(lambda p: sds((ex.pool, *p.shape), p.dtype, sharding=per), state.params)
  scalar = sds((ex.pool,), np.float32, sharding=per)
  batch = {k: sds((ex.pool, ex.capacity), np.int32, sharding=per) for k in hybrid_lib.FIELDS}
  rng = sds(state.rng.shape, state.rng.dtype, sharding=rep)
  g = max(config.parallelism.hybrid_dp.layouts)
  compiled = ex.program(g).lower(params, acc, scalar, scalar, batch, rng).compile()
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  return float(perf.compiled_memory_bytes(compiled)) + 8 * n_params / config.mesh.fsdp


def compile_memory(config: ml_collections.ConfigDict, devices) -> float:
  """Per-device bytes of the configured train step compiled on `devices` (raises ValueError
  when a start-up guard refuses the combination)."""
  from training.program import build_program   # the composition root
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  program = build_program(config, mesh)
  if config.parallelism.hybrid_dp.enabled:   # (build_program ran its start-up checks)
    return _hybrid_compiled_bytes(program, config)
  return float(perf.compiled_memory_bytes(program.compiled_train_step()))


def corpus_lengths(config: ml_collections.ConfigDict, samples: int = 4096) -> np.ndarray:
  """Token lengths of the configured corpus's train documents (at most `samples`)."""
  from training.data import sources
  src = sources.make_document_source(config, 'train')
  return np.array([len(src[i]) for i in range(min(len(src), samples))], np.int64)


def documents_for(config: ml_collections.ConfigDict, doc_lengths, global_tokens: int,
                  seed: int = 0) -> documents.Documents:
  """One step's documents drawn from `doc_lengths`, with the family's costs per token and per
  causal pair (registry `planner_cost`) and whether hybrid-DP groups must be whole."""
  from modeling import registry
  family = registry.get_family(config.model.name)
  if family.planner_cost is None:
    raise ValueError(f'model.name={config.model.name!r} has no planner_cost in its registry '
                     'entry: planning for a length distribution needs its FLOPs per token and '
                     'per causal pair')
  token, pair = family.planner_cost(config.model)
  return documents.Documents(documents.step_documents(np.asarray(doc_lengths), global_tokens,
                                                      seed), pair, token,
                             bool(family.order_dependent_layers))


def plan(config: ml_collections.ConfigDict, *, devices: int, memory_bytes: float,
         seq_len: int, global_tokens: int, hw: hw_lib.Hardware, compile: str = 'auto',
         top: int = 5, max_compiles: int = 12, doc_lengths=None, **search_kwargs) -> list[Row]:
  """The ranked plan: the modelled order, with the leading candidates compiled (when this
  process has `devices` devices) until `top` compiled ones fit or `max_compiles` ran.

  The analytic memory model is a pruning aid, not the verdict: every compile also corrects
  it, as the median compiled / modelled ratio seen so far scales the modelled memory of the
  candidates not yet compiled (a candidate is compiled only if its corrected figure fits).
  Returns the feasible rows first (compiled before modelled, then by modelled step time)."""
  w = workload_lib.from_config(config, seq_len, global_tokens)
  docs = None if doc_lengths is None else documents_for(config, doc_lengths, global_tokens)
  from training.data import sources
  # Hybrid DP reads whole documents: only a document source can feed it.
  hybrid = config.data.source in sources.DOCUMENT_SOURCES
  if docs is not None and not hybrid:
    log.info('planner: data.source=%r is not a document source %s: no hybrid-DP candidates',
             config.data.source, sources.DOCUMENT_SOURCES)
  ranked = search.plan(w, hw, devices, memory_bytes, docs=docs, hybrid=hybrid,
                       **search_kwargs)
  rows = [Row(p.candidate, p.estimate, feasible=p.fits) for p in ranked]
  local = jax.devices()
  # A CPU compile of a GPU target would measure another program (XLA:CPU has no cuDNN or
  # Pallas GPU kernels, and other fusions): compile only on the target's own backend.
  can_compile = (compile != 'never' and len(local) >= devices
                 and hw.kind == jax.default_backend())
  if compile == 'always' and not can_compile:
    raise ValueError(f'--compile=always needs {devices} {hw.kind} devices here; this process '
                     f'has {len(local)} ({jax.default_backend()})')
  ratios, scale, done, fitting = [], 1.0, 0, 0
  for row in rows:
    modelled = row.estimate.memory['total']
    if not can_compile or done >= max_compiles or fitting >= top:
      row.feasible = row.feasible and modelled * scale <= memory_bytes
      continue
    if not row.feasible or modelled * scale > memory_bytes:
      row.feasible = False
      continue
    cfg = apply(config, row.candidate, seq_len=seq_len, global_tokens=global_tokens)
    done += 1
    try:
      row.compiled_bytes = compile_memory(cfg, local[:devices])
    except ValueError as e:
      row.refused, row.feasible = str(e).splitlines()[0], False
      continue
    ratios.append(row.compiled_bytes / modelled)
    scale = max(float(np.median(ratios)), 1.0)
    row.feasible = row.compiled_bytes <= memory_bytes
    fitting += row.feasible
  if can_compile:
    log.info('planner: %d compiled, memory model corrected by x%.2f', done, scale)
  order = lambda r: (not r.feasible, r.checked != 'compiled', r.estimate.time['step'])
  return sorted(rows, key=order)


def device_memory() -> float | None:
  """Bytes of memory on this backend's first device, where the backend reports it."""
  stats = jax.devices()[0].memory_stats() or {}
  return float(stats['bytes_limit']) if 'bytes_limit' in stats else None


def profile_for_backend() -> hw_lib.Hardware:
  """The profile of the devices this process sees (by device kind), or cpu."""
  kind = jax.devices()[0].device_kind.lower()
  for name in ('h200', 'h100'):
    if name in kind:
      return hw_lib.PROFILES[name]
  if 'v5p' in kind:
    return hw_lib.PROFILES['tpu-v5p']
  return hw_lib.PROFILES['cpu']


def auto_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`mesh.auto=True`: the planner's first choice for the devices this run sees (logged with
  the runner-up); the config with its keys set."""
  a = config.mesh
  hw = hw_lib.parse(a.auto_hardware) if a.auto_hardware else profile_for_backend()
  memory = a.auto_memory_gib * hw_lib.GIB or device_memory() or hw.memory_bytes
  n = jax.device_count()
  rows = plan(config, devices=n, memory_bytes=memory, seq_len=config.seq_len,
              global_tokens=config.batch_size * config.seq_len, hw=hw, top=2)
  good = [r for r in rows if r.feasible]
  if not good:
    raise ValueError(f'mesh.auto: no plan fits {memory / hw_lib.GIB:.2f} GiB per device on {n} '
                     'devices: lower batch_size or seq_len, or set mesh.auto_memory_gib')
  for tag, r in zip(('chosen', 'runner-up'), good):
    log.info('mesh.auto %s: %s (modelled step %.3g s, memory %.1f MiB %s)', tag,
             r.candidate.describe(), r.estimate.time['step'],
             (r.compiled_bytes or r.estimate.memory['total']) / 2**20, r.checked)
  out = apply(config, good[0].candidate)
  out.mesh.auto = False
  return out
