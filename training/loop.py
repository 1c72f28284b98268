"""The training loop: config -> mesh -> program -> data -> sharded state -> steps, with hooks.

`run` composes a run (each arrow of the data flow in docs/architecture.md is one call);
`train_steps` is the step loop. What the strategy does (data, prepare, step, throughput,
telemetry) is the program's (`training/program.py`); the rest are hooks, each in its module:
metrics rows (`metrics_log.py`), checkpoints (`save_hook.py`), eval (`eval_hook.py`),
profiling (`profile_hook.py`), stop signals (`signals.py`), telemetry (`telemetry.py`).
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
from training import autoplan, checkpointing, eval_hook, perf, signals
from training.checkpointing import NonFiniteLoss  # noqa: F401 - raised by run()
from training.eval_hook import eval_enabled, evaluate  # noqa: F401 - re-exported
from training.metrics_log import Dispatched, MetricsLog
from training.monitor import MetricWriter, Progress, setup_logging
from training.profile_hook import ProfileHook
from training.curriculum import build_program   # staged when data.length_schedule is set
from training.save_hook import SaveHook
from training.state import count_params
from training.throughput import matmul_peak

log = logging.getLogger('loomax')


def write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_json(config))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns the last logged metrics row."""
  distributed.initialize(config.distributed)
  setup_logging()
  if config.mesh.auto:   # the planner's choice for these devices (training/autoplan.py)
    config = autoplan.auto_config(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.dry_run:
    return dry_run(config, build_program(config, mesh))
  ckpt = checkpointing.open_checkpointer(config, workdir)
  start_plan = checkpointing.plan_start(config, ckpt)
  config = checkpointing.resolve_config(config, start_plan)
  write_config(config, workdir)
  pid, nproc = jax.process_index(), jax.process_count()
  log.info('mesh %s over %d devices, %d process(es)', mesh_lib.describe(mesh),
           mesh.devices.size, nproc)

  program = build_program(config, mesh)
  train_iter = program.train_iterator(pid, nproc)
  eval_batches = eval_hook.held_out_batches(config, program, pid, nproc)
  state, train_iter, start_info = checkpointing.restore_or_init(config, program, start_plan,
                                                                workdir, train_iter)
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
  stop = signals.StopSignals().install()
  try:
    state, stopped = train_steps(program, state, train_iter, start=start, steps=config.steps,
                                 timing=timing, telemetry=telemetry, rows=rows,
                                 periodic=(save, evaluator), save=save, profiler=profiler,
                                 stop=stop)
    final_step = int(state.step)
    last_row = {**rows.last_row, 'step': final_step, 'params': n_params}
    if not stopped:
      save(final_step, state, force=True)  # before the final eval, which a preemption may cut
      last_row.update(evaluator.final(final_step, state))
  finally:
    stop.restore()  # a notebook or test process gets its Ctrl-C and SIGTERM back
    profiler.close()
    progress.close()
    ckpt.close()
    writer.close()
  return last_row


def train_steps(program, state, train_iter, *, start: int, steps: int, timing, telemetry,
                rows: MetricsLog, periodic, save: SaveHook, profiler: ProfileHook,
                stop: signals.StopSignals):
  """Steps start+1..steps; returns (state, whether a stop signal ended them early). Metrics
  are fetched one step late (dispatch stays asynchronous); the first step is compiled and
  timed alone; `periodic` hooks (save, eval) run outside the throughput window on a step
  known to be finite."""
  batch = None
  for step in range(start + 1, steps + 1):
    profiler.before_step(step)
    t0 = time.perf_counter()
    host_batch = next(train_iter)
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
    stopping = stop.stop_requested()
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
