"""The training loop: config -> mesh -> program -> data -> sharded state -> steps, with hooks.

`run` composes a run (each arrow of the data flow in docs/architecture.md is one call);
`train_steps` is the step loop. What the strategy does (data, prepare, step, throughput,
telemetry) is the program's (`training/program.py`); the rest are hooks, each in its module:
metrics rows (`metrics_log.py`), checkpoints (`save_hook.py`), eval (`eval_hook.py`),
profiling (`profile_hook.py`), stop signals (`stop.py`: agreed across processes, exit status
128 + signal via `stop.Stopped`), telemetry (`telemetry.py`). One writer per workdir
(`workdir_lock.py`); the config is checked before anything starts (`config_checks.py`) and
written atomically once the restore succeeded (`run_files.py`).
"""

import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections

from checkpoint import metadata as ckpt_metadata
from checkpoint.manager import config_json
from modeling import registry
from parallelism import distributed, mesh as mesh_lib
from training import autoplan, checkpointing
from training.evaluation import eval_hook
from training.metrics import perf
from training.safety import config_checks, run_files, stop
from training.safety import workdir_lock
from training.checkpointing import NonFiniteLoss  # noqa: F401 - raised by run()
from training.evaluation.eval_hook import eval_enabled, evaluate  # noqa: F401 - re-exported
from training.metrics.metrics_log import Dispatched, MetricsLog
from training.metrics.monitor import MetricWriter, Progress, setup_logging
from training.metrics.profile_hook import ProfileHook
from training.curriculum import build_program   # staged when data.length_schedule is set
from training.save_hook import SaveHook
from training.state import count_params
from training.metrics.throughput import matmul_peak

log = logging.getLogger('loomax')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns the last logged metrics row. Raises UserError for
  bad input (before anything is written), `stop.Stopped` when a signal ended the run (after its
  save), `NonFiniteLoss` on non-finite values."""
  config_checks.validate(config)   # ranges, one line, before anything starts
  distributed.initialize(config.distributed)
  setup_logging()
  config_checks.validate_on_devices(config, jax.device_count(), jax.process_count())
  if config.mesh.auto:   # the planner's choice for these devices (training/autoplan.py)
    config = autoplan.auto_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.dry_run:
    return dry_run(config, build_program(config, mesh))
  with workdir_lock.acquire(workdir):   # one writer per workdir, before anything is written
    return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  ckpt = checkpointing.open_checkpointer(config, workdir)
  start_plan = checkpointing.plan_start(config, ckpt)
  config = checkpointing.resolve_config(config, start_plan)
  pid, nproc = jax.process_index(), jax.process_count()
  log.info('mesh %s over %d devices, %d process(es)', mesh_lib.describe(mesh),
           mesh.devices.size, nproc)

  program = build_program(config, mesh)
  train_iter = program.train_iterator(pid, nproc)
  eval_batches = eval_hook.held_out_batches(config, program, pid, nproc)
  state, train_iter, start_info = checkpointing.restore_or_init(config, program, start_plan,
                                                                workdir, train_iter)
  run_files.write_config(config, workdir)   # atomic, only after validation and the restore
  saver = checkpointing.Saver(ckpt, ckpt_metadata.describe(
      config, ckpt_metadata.state_arrays(program.setup), mesh, nproc))
  start = int(state.step)
  n_params = count_params(state.params)
  checkpointing.mark_run_start(workdir, start, start_info)
  if start >= config.steps:
    log.info('step %d of steps=%d is already saved in %s: nothing to train', start,
             config.steps, ckpt.directory)
    ckpt.close()
    return {'step': start, 'params': n_params}
  log.info('%s: %s parameters, starting at step %d', config.model.name, f'{n_params:,}', start)
  describe = registry.get_family(config.model.name).describe
  if describe is not None:  # optional one-line family summary, e.g. CART's effective params
    log.info('%s', describe(config.model))

  timing = program.throughput(matmul_peak(config, mesh))
  writer = MetricWriter(workdir)
  telemetry = program.telemetry()   # telemetry.py: padding, balance, comm, memory
  writer.write(start, telemetry.startup())
  evaluator = eval_hook.EvalHook(config, program, eval_batches, writer)
  progress = Progress(config.steps, start, enabled=config.progress)
  rows = MetricsLog(config, start=start, writer=writer, progress=progress, timing=timing,
                    telemetry=telemetry, describe_last_good=saver.describe_last_good)
  save = SaveHook(config, saver, train_iter, rows.is_finite)
  profiler = ProfileHook(config, workdir)
  stopper = stop.StopControl(nproc)   # signals, agreed stop, interruptible data waits
  try:
    state, stopped = train_steps(program, state, train_iter, start=start, steps=config.steps,
                                 timing=timing, telemetry=telemetry, rows=rows,
                                 periodic=(save, evaluator), save=save, profiler=profiler,
                                 stopper=stopper)
    final_step = int(state.step)
    last_row = {**rows.last_row, 'step': final_step, 'params': n_params}
    if not stopped:
      save(final_step, state, force=True)  # before the final eval, which a preemption may cut
      last_row.update(evaluator.final(final_step, state))
  finally:
    stopper.restore()  # a notebook or test process gets its Ctrl-C and SIGTERM back
    profiler.close()
    progress.close()
    ckpt.close()
    writer.close()
  if stopped:   # after the finally, so the save is complete; train.py exits 128 + signal
    raise stop.Stopped(stopper.signum, final_step, saved=saver.last_good == final_step)
  return last_row


def train_steps(program, state, train_iter, *, start: int, steps: int, timing, telemetry,
                rows: MetricsLog, periodic, save: SaveHook, profiler: ProfileHook,
                stopper: stop.StopControl):
  """Steps start+1..steps; returns (state, whether a stop signal ended them early). Metrics
  are fetched one step late (dispatch stays asynchronous); the first step is compiled and
  timed alone; `periodic` hooks (save, eval) run outside the throughput window on a step
  known to be finite."""
  batch = None
  for step in range(start + 1, steps + 1):
    profiler.before_step(step)
    t0 = time.perf_counter()
    host_batch = stopper.next_batch(train_iter, step)   # a signal ends a blocked wait
    # The run's first step, and the first of each new program (a length stage), compile: timed
    # alone, after the previous step is finished in its own window.
    compiles = program.new_program(host_batch) or step == start + 1
    if compiles:
      rows.flush(state, batch)
    telemetry.observe(host_batch)
    batch = program.prepare(host_batch)
    data_wait_s = time.perf_counter() - t0
    real = program.real_tokens(host_batch)
    if compiles:
      state, metrics = timing.first_step(program.train_step, state, batch)
    else:
      state, metrics = program.train_step(state, batch)
    rows.dispatched(Dispatched(step, metrics, real, data_wait_s, timed=not compiles), state,
                    batch)
    profiler.after_step(step, metrics)
    stopping = stopper.agreed()   # the same step on every process (a collective)
    due = [hook for hook in periodic if hook.due(step)]
    if stopping or due:
      rows.flush(state, batch)  # a step is saved only once it is known finite
      timing.pause()            # saves and evals stay out of the throughput window
    if stopping:
      save(step, state, force=True)
      log.warning('signal received: saved step %d; exiting without the final eval', step)
      return state, True
    for hook in due:
      hook(step, state)
    timing.resume()
  rows.flush(state, batch)
  return state, False


def dry_run(config, program) -> dict[str, Any]:
  """Prints the resolved config, the mesh, the parameter count and the per-device compiled
  memory of the train step; trains nothing."""
  compiled = program.compiled_train_step()
  memory = perf.compiled_memory_bytes(compiled)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(program.setup.abstract.params))
  if jax.process_index() == 0:
    print(config_json(config))
    print(f'mesh: {mesh_lib.describe(program.mesh)} over {program.mesh.devices.size} devices')
    print(f'parameters: {n_params:,}')
    print(f'train step compiled memory per device: {memory / 2**20:,.1f} MiB '
          '(temp + arguments + outputs - aliased)')
  return {'step': 0, 'params': n_params, 'perf/compiled_memory_bytes': memory}
