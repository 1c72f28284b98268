"""The training loop: config -> mesh -> data -> sharded state -> steps -> metrics/checkpoints.

Each arrow of the data flow in docs/architecture.md is one call below.
"""

import logging
import math
import os
import signal
import sys
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
from training import perf, throughput
from training.monitor import MetricWriter, Progress, setup_logging
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
  setup_logging()
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.get('dry_run', False):
    return dry_run(config, build_program(config, mesh))
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
  eval_on = eval_enabled(config)
  eval_batches = [program.global_batch(b) for b in data_lib.make_eval_batches(
      config, num_batches=config.eval_batches, process_index=pid,
      process_count=nproc)] if eval_on else []

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
  timing = throughput.Throughput(tokens_per_step, flops_per_token, matmul_peak(config, mesh))
  # Real tokens are counted on this process's rows; every process loads as many.
  real_scale = 1 if hybrid else nproc
  writer = MetricWriter(workdir)
  progress = Progress(config.steps, start, enabled=config.progress)
  log_lines = not (progress.active and sys.stderr.isatty())  # a log file gets the rows
  stop_requested = _install_signal_handlers()

  # (step, metrics on device, real tokens, data wait s): fetched one step late, keeps
  # dispatch async.
  pending = None
  last_row: dict[str, Any] = {}
  profiling = False

  saved_step = start

  def save(step, force=False):
    nonlocal saved_step
    universal.save_state(ckpt, step, state, ckpt_meta, {pid: train_iter.get_state()},
                         force=force)
    saved_step = step

  compile_logged = []  # perf/compile_s goes into the first row only

  def finish_step(step, metrics, real_tokens, data_wait_s):
    nonlocal last_row
    loss = float(metrics['loss'])
    if not math.isfinite(loss):
      raise NonFiniteLoss(f'loss is {loss} at step {step}; stopping (lower optimizer.lr, '
                          'check the data, or enable optimizer.clip_norm)')
    if step > start + 1:  # the first step was compiled and timed alone
      timing.step_done(real_tokens, data_wait_s)
    if step % config.log_every == 0 or step == config.steps:
      perf_row = timing.row()
      tps = perf_row.get('perf/tokens_per_sec')
      row = {'train/loss': loss, 'train/perplexity': math.exp(min(loss, 50.0)),
             'train/lr': float(metrics['lr']), 'train/grad_norm': float(metrics['grad_norm']),
             'train/param_norm': float(metrics['param_norm']), **perf_row}
      if timing.compile_s is not None and not compile_logged:
        row['perf/compile_s'] = timing.compile_s
        compile_logged.append(True)
      row.update({k: float(v) for k, v in metrics.items()
                  if k not in ('loss', 'lr', 'grad_norm', 'param_norm', 'tokens')})
      mem = perf.device_memory_bytes()
      if mem:
        row['perf/device_memory_bytes'] = mem
      writer.write(step, row)
      last_row = row
      progress.update(step, loss, tps)
      if log_lines:
        log.info('%s', throughput.log_line(step, loss, perf_row))
    else:
      progress.update(step)

  try:
    for step in range(start + 1, config.steps + 1):
      if config.profile_steps and step == config.profile_start and pid == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'tb'))
        profiling = True
      t0 = time.perf_counter()
      host_batch = next(train_iter)
      batch = prepare(host_batch)
      data_wait_s = time.perf_counter() - t0
      real = throughput.real_tokens(host_batch) * real_scale
      if step == start + 1:
        state, metrics = timing.first_step(train_step, state, batch)
      else:
        state, metrics = train_step(state, batch)
      if pending is not None:
        finish_step(*pending)
      pending = (step, metrics, real, data_wait_s)
      if profiling and step >= config.profile_start + config.profile_steps - 1:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        profiling = False
      if (eval_on and config.eval_every > 0 and step % config.eval_every == 0
          and step != config.steps):
        finish_step(*pending)
        pending = None
        timing.pause()
        eval_loss = evaluate(eval_step, state.params, eval_batches)
        writer.write(step, {'eval/loss': eval_loss})
        log.info('eval at step %d: loss %.4f', step, eval_loss)
        timing.resume()
      if config.checkpoint.every and step % config.checkpoint.every == 0:
        timing.pause(pending[1] if pending else None)
        save(step)
        timing.resume()
      if stop_requested():
        log.warning('signal received: saving step %d and exiting', step)
        break
    if pending is not None:
      finish_step(*pending)
    final_step = int(state.step)
    last_row = {**last_row, 'step': final_step, 'params': n_params}
    if eval_on:
      eval_loss = evaluate(eval_step, state.params, eval_batches)
      writer.write(final_step, {'eval/loss': eval_loss})
      log.info('final eval at step %d: loss %.4f', final_step, eval_loss)
      last_row['eval/loss'] = eval_loss
    if final_step > start and saved_step != final_step:  # not saved by checkpoint.every already
      save(final_step, force=True)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    ckpt.close()
    writer.close()
  return last_row


def eval_enabled(config) -> bool:
  """eval_every=-1 or eval_batches=0 turn held-out eval off (periodic and final)."""
  return config.eval_every >= 0 and config.eval_batches > 0


def matmul_peak(config, mesh) -> float:
  """perf.peak_flops, or the best of perf.peak_trials matmul timings (logged once)."""
  if config.perf.peak_flops:  # per device, as accelerator data sheets state it
    log.info('MFU against perf.peak_flops=%.3g FLOP/s per device x %d (given, not measured)',
             config.perf.peak_flops, mesh.devices.size)
    return config.perf.peak_flops * mesh.devices.size
  trials = perf.measure_peak_trials(mesh, trials=config.perf.get('peak_trials', 10))
  log.info('matmul peak over %d device(s): best of %d trials %.3g FLOP/s (median %.3g, '
           'worst %.3g); MFU divides by the best', mesh.devices.size, len(trials), max(trials),
           float(sorted(trials)[len(trials) // 2]), min(trials))
  return max(trials)


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
