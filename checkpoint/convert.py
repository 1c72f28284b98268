"""Offline conversion of a universal checkpoint: another mesh, layer layout or dtype, parameters
only, or an export of one consolidated array per parameter (.npz) for use outside JAX.

The arrays on disk do not depend on a mesh, so "converting to a mesh" means: check that the
target mesh divides every sharded dimension (an error names the parameter), record the mesh in
the checkpoint's config, and move the data through that mesh while converting. Resuming from
the result still takes the mesh of the config it is resumed with. The source directory is only
ever opened read-only; the destination must not exist yet and appears only once complete.

See checkpoint/universal.py for the restore path this shares, and Lian et al., "Universal
Checkpointing" (2024) for the idea.
"""

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm

from checkpoint import layout, metadata, universal
from checkpoint.manager import Checkpointer, CheckpointError
from parallelism import mesh as mesh_lib

LAYOUTS = ('scan', 'unrolled')
DTYPES = ('float32', 'bfloat16', 'float16')
EXPORTS = ('npz',)
_GROUP_BYTES = 512 << 20  # arrays read and converted per progress step


@dataclasses.dataclass(frozen=True)
class Request:
  src: str
  dst: str
  step: int | None = None
  mesh: dict[str, int] | None = None   # target mesh sizes (axes not named are 1)
  devices: int | None = None           # or: the source mesh config resolved over N devices
  params_only: bool = False
  dtype: str | None = None             # target model.param_dtype
  layout: str | None = None            # scan | unrolled
  export: str | None = None            # npz: dst is a file of consolidated parameters
  dry_run: bool = False


def parse_mesh(text: str) -> dict[str, int]:
  """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4} (axes not named are 1)."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, _, size = part.partition('=')
    name, size = name.strip(), size.strip()
    if (name not in mesh_lib.AXES or name in out or not size.lstrip('-').isdigit()
        or not (int(size) >= 1 or int(size) == -1)):
      raise ValueError(f'--mesh {text!r}: write axis=size pairs (size >= 1, or -1 for the '
                       f'remaining devices), each axis once, axes from {mesh_lib.AXES}')
    out[name] = int(size)
  if not out:
    raise ValueError(f'--mesh {text!r}: no axis=size pair')
  return out


def target_devices(mesh: dict[str, int] | None, devices: int | None) -> int | None:
  """How many devices the target needs (None: whatever the source config resolves to)."""
  if devices:
    return devices
  if mesh and all(s > 0 for s in mesh.values()):
    return math.prod(mesh.values())
  return None


def resolve_src(path: str) -> str:
  """A checkpoints directory, or a workdir holding one."""
  sub = os.path.join(path, 'checkpoints')
  if os.path.isdir(sub) and not any(d.isdigit() for d in os.listdir(path)):
    return sub
  return path


def is_inside(path: str, directory: str) -> bool:
  """Whether `path` is `directory` or lies under it (symlinks resolved)."""
  p, d = os.path.realpath(path), os.path.realpath(directory)
  return os.path.commonpath([p, d]) == d


def target_config(saved: dict[str, Any], req: Request) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(saved)
  if req.mesh is not None:
    for axis in mesh_lib.AXES:
      c.mesh[axis] = req.mesh.get(axis, 1)
  elif req.export is not None and req.devices is None:
    # An export gathers every array to the host anyway: read it on one device, whatever mesh
    # (and device count) wrote it.
    for axis in mesh_lib.AXES:
      c.mesh[axis] = 1
  if req.layout is not None:
    if req.layout not in LAYOUTS:
      raise ValueError(f'--layout {req.layout!r}; valid: {LAYOUTS}')
    c.model.scan_layers = req.layout == 'scan'
  if req.dtype is not None:
    if req.dtype not in DTYPES:
      raise ValueError(f'--dtype {req.dtype!r}; valid: {DTYPES}')
    c.model.param_dtype = req.dtype
  c.resume = ''
  return c


def _mesh_for(config, n: int | None):
  devices = jax.devices()
  if n is not None and n > len(devices):
    raise ValueError(f'the target mesh needs {n} devices but this process sees {len(devices)}; '
                     'on CPU run with XLA_FLAGS=--xla_force_host_platform_device_count='
                     f'{n} (scripts/convert_checkpoint.py sets it)')
  return mesh_lib.make_mesh(config.mesh, devices=devices[:n] if n else devices)


def _keep(path: str, params_only: bool) -> bool:
  return not (params_only and metadata.item_of(path) == 'opt_state')


def _groups(paths: list[str], infos: dict[str, metadata.ArrayInfo]) -> list[list[str]]:
  groups, cur, size = [], [], 0
  for p in paths:
    if cur and size + infos[p].nbytes > _GROUP_BYTES:
      groups.append(cur)
      cur, size = [], 0
    cur.append(p)
    size += infos[p].nbytes
  return groups + ([cur] if cur else [])


def convert(setup_for: Callable[[ml_collections.ConfigDict, Any], Any], req: Request,
            out: Callable[[str], None] = print, progress: bool = True) -> dict:
  """Runs one conversion; returns a summary (arrays, bytes, per-device bytes, dst).

  `setup_for(config, mesh)` gives the target's ModelSetup (shapes, logical axes, shardings);
  the caller passes it so this library does not depend on training/.
  """
  src_dir = resolve_src(req.src)
  if req.export is not None and req.export not in EXPORTS:
    raise ValueError(f'--export {req.export!r}; valid: {EXPORTS}')
  for d in {req.src, src_dir}:
    if is_inside(req.dst, d):
      raise ValueError(f'--dst {req.dst} lies inside --src {d}: the source is never modified; '
                       'pick a --dst outside it')
  if os.path.exists(req.dst) and not req.dry_run:
    raise FileExistsError(f'--dst {req.dst} exists; refusing to overwrite it')
  src = Checkpointer(src_dir, read_only=True)
  step = req.step if req.step is not None else src.latest_step()
  if step is None or step not in src.all_steps():
    which = 'latest' if req.step is None else req.step
    raise CheckpointError(f'{src_dir}: no checkpoint at step {which} '
                          f'(steps present: {src.all_steps()})')
  meta = src.read_meta(step)
  config = target_config(meta['config'], req)
  n = target_devices(req.mesh, req.devices)
  if req.export is not None and req.mesh is None and req.devices is None:
    n = 1
  mesh = _mesh_for(config, n)
  setup = setup_for(config, mesh)  # checks divisibility by name
  src_arrays = {p: i for p, i in metadata.arrays_of(meta).items() if _keep(p, req.params_only)}
  if 'opt_state' not in meta.get('items', ()) and not req.params_only:
    raise CheckpointError(f'{src.step_dir(step)} holds parameters only; pass --params-only')
  dst_arrays = {p: i for p, i in metadata.state_arrays(setup).items()
                if _keep(p, req.params_only)}
  if req.export is not None:
    dst_arrays = {p: i for p, i in dst_arrays.items() if metadata.item_of(p) == 'params'}
    src_arrays = {p: i for p, i in src_arrays.items() if metadata.item_of(p) == 'params'}
  plan = layout.plan(src_arrays, dst_arrays)
  shardings = {p: s for p, s in metadata.flatten(setup.shardings).items() if p in dst_arrays}
  per_device = sum(metadata.ArrayInfo(tuple(shardings[p].shard_shape(i.shape)), i.dtype,
                                      i.axes).nbytes for p, i in dst_arrays.items())
  summary = {'src': src_dir, 'step': step, 'dst': req.dst, 'arrays': len(dst_arrays),
             'bytes': sum(i.nbytes for i in dst_arrays.values()),
             'per_device_bytes': per_device, 'mesh': dict(mesh.shape),
             'layout': metadata.layout_of(config), 'from_layout': meta['layout']}
  out(_describe(summary, plan, dst_arrays, shardings, req))
  if req.dry_run:
    return summary

  arrays: dict[str, jax.Array] = {}
  bar = tqdm.tqdm(total=len(dst_arrays), unit='array', disable=not progress,
                  desc=f'convert step {step}')
  for group in _groups(sorted(dst_arrays), dst_arrays):
    sub_plan = {p: plan[p] for p in group}
    sub_src = {q: src_arrays[q] for s in sub_plan.values() for q in s.paths}
    arrays.update(universal.read_into(src, step, sub_src, {p: dst_arrays[p] for p in group},
                                      shardings, config.parallelism.rules, mesh))
    bar.update(len(group))
  bar.close()
  if req.export == 'npz':
    _export_npz(req.dst, arrays, dst_arrays, config, step)
  else:
    _write(req.dst, step, arrays, config, dst_arrays, mesh, src, meta, src_dir)
  out(f'wrote {req.dst}')
  return summary


def _write(dst: str, step: int, arrays, config, dst_arrays, mesh, src: Checkpointer, meta,
           src_dir: str) -> None:
  new_meta = metadata.describe(config, dst_arrays, mesh, meta['written_by']['process_count'])
  new_meta['converted_from'] = {'directory': src_dir, 'step': step,
                                'layout': meta['layout'], 'written_by': meta['written_by']}
  data_states = src.read_data(step)
  counts = {s['position']['process_count'] for s in (data_states or {}).values()}
  try:
    ckpt = Checkpointer(dst, keep=None, async_save=False)
    ckpt.save(step, arrays, new_meta, data_states or None,
              data_process_count=counts.pop() if len(counts) == 1 else None)
    ckpt.close()
  except BaseException:
    shutil.rmtree(dst, ignore_errors=True)  # it did not exist before: leave nothing half-made
    raise


def _export_npz(dst: str, arrays, dst_arrays, config, step: int) -> None:
  """One consolidated array per parameter, keyed by its path without 'params/'; bfloat16 is
  stored as its raw uint16 bits (npz has no bfloat16), with the real dtype in the sidecar."""
  host, info = {}, {}
  for path in sorted(arrays):
    name = path.split(metadata.SEP, 1)[1] if path.startswith('params/') else path
    x = np.asarray(jax.device_get(arrays[path]))
    if x.dtype.name == 'bfloat16':
      x = x.view(np.uint16)
    host[name] = x
    info[name] = {**dst_arrays[path].to_json(), 'stored_as': x.dtype.name}
  tmp = dst + '.partial.npz'
  np.savez(tmp, **host)
  with open(dst + '.json', 'w') as f:
    json.dump({'step': step, 'layout': metadata.layout_of(config), 'arrays': info,
               'config': json.loads(json.dumps(config.to_dict(), default=str))}, f, indent=1)
  os.replace(tmp, dst)


def _describe(summary, plan, dst_arrays, shardings, req: Request) -> str:
  head = (f'{"DRY RUN: " if req.dry_run else ""}{summary["src"]} step {summary["step"]} '
          f'({summary["from_layout"]}) -> {req.dst} ({summary["layout"]}'
          f'{", npz export" if req.export else ""}{", params only" if req.params_only else ""}) '
          f'on mesh {summary["mesh"]}')
  lines = [head, f'{"array":60s} {"shape":>18s} {"dtype":>9s} {"from":>6s} '
           f'{"spec":>24s} {"per-device":>12s}']
  for path in sorted(dst_arrays):
    info, s = dst_arrays[path], shardings[path]
    shard = metadata.ArrayInfo(tuple(s.shard_shape(info.shape)), info.dtype, info.axes)
    lines.append(f'{path:60s} {str(info.shape):>18s} {info.dtype:>9s} {plan[path].kind:>6s} '
                 f'{str(tuple(s.spec)):>24s} {shard.nbytes:>12,d}')
  lines.append(f'{summary["arrays"]} arrays, {summary["bytes"]:,d} bytes written, '
               f'{summary["per_device_bytes"]:,d} bytes per device')
  return '\n'.join(lines)
