"""The training loop: config -> mesh -> data -> sharded state -> steps -> metrics/checkpoints.

Each arrow of ../shared/ARCHITECTURE.md's data flow is one call below.
"""

import logging
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections

from checkpoint import metadata as ckpt_metadata
from checkpoint import universal
from checkpoint.manager import Checkpointer, config_json
from modeling import registry
from parallelism import distributed, mesh as mesh_lib
from training import data as data_lib, hybrid_data
from training import evals, perf, telemetry
from training.monitor import MetricWriter, Progress
from training.program import build_program
from training.state import count_params

log = logging.getLogger('loomax')


class NonFiniteLoss(RuntimeError):
  pass


def evaluate(eval_step, params, batches) -> float:
  total = count = 0.0
  for b in batches:
    t, c = eval_step(params, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_json(config))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns the last logged metrics row."""
  distributed.initialize(config.distributed)
  mesh = mesh_lib.make_mesh(config.mesh)
  write_config(config, workdir)
  pid, nproc = jax.process_index(), jax.process_count()
  log.info('mesh %s over %d devices, %d process(es)', mesh_lib.describe(mesh),
           mesh.devices.size, nproc)

  program = build_program(config, mesh)
  train_iter = data_lib.make_train_iterator(config, process_index=pid, process_count=nproc)
  hybrid = config.parallelism.hybrid_dp.enabled  # whole documents, planned per batch
  if hybrid:
    hybrid_data.check_config(config, mesh)
    train_iter = hybrid_data.make_train_iterator(config)
  eval_batches = [program.global_batch(b) for b in data_lib.make_eval_batches(
      config, num_batches=config.eval_batches, process_index=pid, process_count=nproc)]

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                      keep_every=config.checkpoint.keep_every,
                      async_save=config.checkpoint.async_save)
  state, train_iter = _restore_or_init(config, program, ckpt, train_iter)
  ckpt_meta = ckpt_metadata.describe(config, ckpt_metadata.state_arrays(program.setup), mesh,
                                     nproc)
  start = int(state.step)
  n_params = count_params(state.params)
  log.info('%s: %s parameters, starting at step %d', config.model.name, f'{n_params:,}', start)
  describe = getattr(registry.get_family(config.model.name).build, 'describe', None)
  if describe is not None:  # optional one-line family summary, e.g. CART's effective params
    log.info('%s', describe(config.model))

  train_step, eval_step = program.train_step, program.eval_step
  prepare = program.global_batch
  if hybrid:
    train_step = hybrid_data.TrainStep(config, mesh, program.setup)
    prepare = lambda documents: documents

  tokens_per_step = config.batch_size * config.seq_len
  flops_per_token = perf.train_flops_per_token(config.model, config.seq_len)
  peak = config.perf.peak_flops or perf.measure_peak_flops(mesh)
  writer = MetricWriter(workdir)
  tele = telemetry.Telemetry(config, program)   # telemetry.py: padding, balance, comm, memory
  writer.write(start, tele.startup())
  task_evals = evals.in_training(config, program)   # eval.tasks beyond 'loss': {} when none
  progress = Progress(config.steps, start, enabled=config.progress)
  stop_requested = _install_signal_handlers()

  pending = None       # (step, metrics on device): fetched one step late, keeps dispatch async
  last_row: dict[str, Any] = {}
  window_start, window_steps = time.perf_counter(), 0
  profiling = False

  saved_step = start

  def save(step, force=False):
    nonlocal saved_step
    universal.save_state(ckpt, step, state, ckpt_meta, {pid: train_iter.get_state()},
                         force=force)
    saved_step = step

  def finish_step(step, metrics):
    nonlocal window_start, window_steps, last_row
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLoss(f'loss is {loss} at step {step}; stopping (lower optimizer.lr, '
                          'check the data, or enable optimizer.clip_norm)')
    window_steps += 1
    if step % config.log_every == 0 or step == config.steps:
      elapsed = time.perf_counter() - window_start
      tps = window_steps * tokens_per_step / elapsed
      row = {'train/loss': loss, 'train/perplexity': math.exp(min(loss, 50.0)),
             'train/lr': float(metrics['lr']), 'train/grad_norm': float(metrics['grad_norm']),
             'train/param_norm': float(metrics['param_norm']),
             'perf/tokens_per_sec': tps, 'perf/step_time_s': elapsed / window_steps,
             'perf/mfu': tps * flops_per_token / peak}
      row.update({k: float(v) for k, v in metrics.items()
                  if k not in ('loss', 'lr', 'grad_norm', 'param_norm', 'tokens')})
      row.update(tele.row(state.params, None if hybrid else batch))
      mem = perf.device_memory_bytes()
      if mem:
        row['perf/device_memory_bytes'] = mem
      writer.write(step, row)
      last_row = row
      progress.update(step, loss, tps)
      window_start, window_steps = time.perf_counter(), 0
    else:
      progress.update(step)

  try:
    for step in range(start + 1, config.steps + 1):
      if config.profile_steps and step == config.profile_start and pid == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'tb'))
        profiling = True
      host_batch = next(train_iter)
      tele.observe(host_batch)
      batch = prepare(host_batch)
      state, metrics = train_step(state, batch)
      if pending is not None:
        finish_step(*pending)
      pending = (step, metrics)
      if profiling and step >= config.profile_start + config.profile_steps - 1:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        profiling = False
      if config.eval_every and step % config.eval_every == 0 and step != config.steps:
        finish_step(*pending)
        pending = None
        writer.write(step, {'eval/loss': evaluate(eval_step, state.params, eval_batches),
                            **task_evals(state.params)})
      if config.checkpoint.every and step % config.checkpoint.every == 0:
        save(step)
      if stop_requested():
        log.warning('signal received: saving step %d and exiting', step)
        break
    if pending is not None:
      finish_step(*pending)
    final_step = int(state.step)
    eval_loss = evaluate(eval_step, state.params, eval_batches)
    writer.write(final_step, {'eval/loss': eval_loss, **task_evals(state.params)})
    last_row = {**last_row, 'eval/loss': eval_loss, 'step': final_step,
                'params': n_params}
    if final_step > start and saved_step != final_step:  # not saved by checkpoint.every already
      save(final_step, force=True)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    ckpt.close()
    writer.close()
  return last_row


def _restore_or_init(config, program, ckpt: Checkpointer, train_iter):
  """(state, train iterator): restored onto this config's mesh and layout, or fresh."""
  resume = config.resume
  if resume:
    source = ckpt if resume == 'auto' else Checkpointer(resume, read_only=True)
    step = source.latest_step()
    if step is not None:
      state, meta, data_states = universal.restore_state(source, step, config, program.setup,
                                                         program.mesh)
      if data_states and config.parallelism.hybrid_dp.enabled:
        train_iter.set_state(data_states[jax.process_index()])  # every process reads it all
        how = 'exact (hybrid data parallel document stream)'
      elif data_states:
        train_iter, how = data_lib.resume_train_iterator(
            config, data_states, process_index=jax.process_index(),
            process_count=jax.process_count())
      else:
        how = 'not saved: starting the data stream afresh'
      log.info('resumed from %s at step %d (written on mesh %s by %d process(es); data %s)',
               source.directory, step, meta['written_by']['mesh'],
               meta['written_by']['process_count'], how)
      return state, train_iter
    if resume != 'auto':
      raise FileNotFoundError(f'resume={resume!r} holds no checkpoint')
  return program.init_state(), train_iter


def _install_signal_handlers():
  """SIGTERM/SIGINT ask the loop to stop after the current step and save."""
  flag = {'stop': False}

  def handler(signum, frame):
    del frame
    if flag['stop']:
      raise KeyboardInterrupt
    flag['stop'] = True
    log.warning('received signal %d', signum)

  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      signal.signal(sig, handler)
    except ValueError:  # not the main thread (e.g. under some test runners)
      pass
  return lambda: flag['stop']
