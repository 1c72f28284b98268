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
import jax.numpy as jnp
import ml_collections
import numpy as np

from checkpoint.manager import Checkpointer, config_json
from parallelism import disaggregation, distributed, mesh as mesh_lib, rules as rules_lib
from parallelism.context import layout as context_layout
from training import data as data_lib
from training import perf, step as step_lib
from training.composition import make_runtime
from training.monitor import MetricWriter, Progress
from training.state import count_params, init_train_state, setup_model

log = logging.getLogger('loomax')


class NonFiniteLoss(RuntimeError):
  pass


def batch_sharding(config, mesh):
  return rules_lib.named_sharding((config.batch_size, config.seq_len), ('batch', 'length'),
                                  config.parallelism.rules, mesh, 'batch')


def to_global(local_batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host-local rows -> one global array per key (each process passes only its rows)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


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

  runtime = make_runtime(config, mesh)
  setup = setup_model(config, mesh, runtime)
  train_iter = data_lib.make_train_iterator(config, process_index=pid, process_count=nproc)
  b_sharding = batch_sharding(config, mesh)
  layout = context_layout.host_layout(config, mesh)  # zigzag for context parallelism, else id
  layout = disaggregation.with_plan(config, mesh, layout)  # + 'dca_*' plan when disaggregated
  eval_batches = [to_global(layout(b), b_sharding) for b in data_lib.make_eval_batches(
      config, num_batches=config.eval_batches, process_index=pid, process_count=nproc)]

  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                      keep_every=config.checkpoint.keep_every,
                      async_save=config.checkpoint.async_save)
  state = _restore_or_init(config, setup, runtime, ckpt, train_iter)
  start = int(state.step)
  n_params = count_params(state.params)
  log.info('%s: %s parameters, starting at step %d', config.model.name, f'{n_params:,}', start)

  constrain_micro = lambda x: jax.lax.with_sharding_constraint(x, b_sharding)
  train_step = jax.jit(step_lib.make_train_step(setup, config.optimizer.grad_accum_steps,
                                                constrain_micro, config.attention.loss_chunk),
                       in_shardings=(setup.shardings, b_sharding),
                       out_shardings=(setup.shardings, rules_lib.replicated(mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(setup, config.attention.loss_chunk),
                      in_shardings=(setup.shardings.params, b_sharding))

  tokens_per_step = config.batch_size * config.seq_len
  flops_per_token = perf.train_flops_per_token(config.model, config.seq_len)
  peak = config.perf.peak_flops or perf.measure_peak_flops(mesh)
  writer = MetricWriter(workdir)
  progress = Progress(config.steps, start, enabled=config.progress)
  stop_requested = _install_signal_handlers()

  pending = None       # (step, metrics on device): fetched one step late, keeps dispatch async
  last_row: dict[str, Any] = {}
  window_start, window_steps = time.perf_counter(), 0
  profiling = False

  def save(step, force=False):
    meta = {'config': config.to_dict(), 'step': step}
    ckpt.save(step, state, train_iter, meta=_jsonable(meta), force=force)

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
      batch = to_global(layout(next(train_iter)), b_sharding)
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
        writer.write(step, {'eval/loss': evaluate(eval_step, state.params, eval_batches)})
      if config.checkpoint.every and step % config.checkpoint.every == 0:
        save(step)
      if stop_requested():
        log.warning('signal received: saving step %d and exiting', step)
        break
    if pending is not None:
      finish_step(*pending)
    final_step = int(state.step)
    eval_loss = evaluate(eval_step, state.params, eval_batches)
    writer.write(final_step, {'eval/loss': eval_loss})
    last_row = {**last_row, 'eval/loss': eval_loss, 'step': final_step,
                'params': n_params}
    if final_step > start:
      save(final_step, force=True)
  finally:
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    ckpt.close()
    writer.close()
  return last_row


def _restore_or_init(config, setup, runtime, ckpt: Checkpointer, train_iter):
  resume = config.resume
  if resume:
    source = ckpt if resume == 'auto' else Checkpointer(resume, async_save=False)
    step = source.latest_step()
    if step is not None:
      state, _ = source.restore(step, setup.abstract, train_iter)
      log.info('resumed from %s at step %d', source.directory, step)
      return state
    if resume != 'auto':
      raise FileNotFoundError(f'resume={resume!r} holds no checkpoint')
  return init_train_state(config, setup, runtime)


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


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, jnp.ndarray)):
    return np.asarray(x).tolist()
  return x
