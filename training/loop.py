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
from checkpoint.manager import config_json
from modeling import registry
from parallelism import distributed, mesh as mesh_lib
from training import data as data_lib, hybrid_data
from training import checkpointing, perf
from training.checkpointing import NonFiniteLoss  # noqa: F401 - raised by run()
from training.monitor import MetricWriter, Progress
from training.program import build_program
from training.state import count_params

log = logging.getLogger('loomax')


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
  ckpt = checkpointing.open_checkpointer(config, workdir)
  start_plan = checkpointing.plan_start(config, ckpt)
  config = checkpointing.resolve_config(config, start_plan)
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
  eval_per_byte = data_lib.tokens_per_byte(eval_batches)  # None without byte counts

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
  progress = Progress(config.steps, start, enabled=config.progress)
  stop_requested = _install_signal_handlers()

  pending = None       # (step, metrics on device): fetched one step late, keeps dispatch async
  last_row: dict[str, Any] = {}
  window_start, window_steps = time.perf_counter(), 0
  profiling = False

  finite = {'step': start, 'ok': True}  # whether the state after that step may be saved
  skipped = 0

  def save(step, force=False):
    saver.save(step, state, train_iter.get_state(),
               finite['ok'] and finite['step'] == step, force=force)

  def finish_step(step, metrics):
    nonlocal window_start, window_steps, last_row, skipped
    loss = float(metrics['loss'])
    checked = {k: float(metrics[k]) for k in ('loss', 'grad_norm', 'param_norm', 'skipped')
               if k in metrics}
    finite.update(step=step, ok=checkpointing.is_finite_step(checked))
    if checked.get('skipped'):
      skipped += 1
      log.warning('step %d: non-finite update skipped (loss %s, grad norm %s; %d skipped so '
                  'far)', step, loss, checked['grad_norm'], skipped)
    elif not finite['ok']:
      raise NonFiniteLoss(f'non-finite values at step {step} (loss {loss}, grad norm '
                          f'{checked["grad_norm"]}, param norm {checked["param_norm"]}); '
                          f'stopping without saving it; {saver.describe_last_good()} (lower '
                          'optimizer.lr, check the data, enable optimizer.clip_norm, or set '
                          'optimizer.skip_nonfinite=True)')
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
                  if k not in ('loss', 'lr', 'grad_norm', 'param_norm', 'tokens', 'skipped')})
      if config.optimizer.skip_nonfinite:
        row['train/skipped_steps'] = skipped
      mem = perf.device_memory_bytes()
      if mem:
        row['perf/device_memory_bytes'] = mem
      writer.write(step, row)
      last_row = row
      progress.update(step, loss, tps)
      window_start, window_steps = time.perf_counter(), 0
    else:
      progress.update(step)

  stopping = False
  try:
    for step in range(start + 1, config.steps + 1):
      if config.profile_steps and step == config.profile_start and pid == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'tb'))
        profiling = True
      batch = prepare(next(train_iter))
      state, metrics = train_step(state, batch)
      if pending is not None:
        finish_step(*pending)
      pending = (step, metrics)
      if profiling and step >= config.profile_start + config.profile_steps - 1:
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        profiling = False
      stopping = stop_requested()
      save_due = config.checkpoint.every and step % config.checkpoint.every == 0
      eval_due = config.eval_every and step % config.eval_every == 0 and step != config.steps
      if stopping or save_due or eval_due:
        finish_step(*pending)  # a step is saved only once it is known finite
        pending = None
      if stopping or save_due:
        save(step, force=stopping)
      if stopping:
        log.warning('signal received: saved step %d; exiting without the final eval', step)
        break
      if eval_due:
        writer.write(step, data_lib.eval_row(evaluate(eval_step, state.params, eval_batches),
                                             eval_per_byte))
    if pending is not None:
      finish_step(*pending)
    final_step = int(state.step)
    last_row = {**last_row, 'step': final_step, 'params': n_params}
    if not stopping:
      save(final_step, force=True)  # before the final eval, which a preemption may cut short
      eval_loss = evaluate(eval_step, state.params, eval_batches)
      writer.write(final_step, data_lib.eval_row(eval_loss, eval_per_byte))
      last_row.update(data_lib.eval_row(eval_loss, eval_per_byte))
  finally:
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    ckpt.close()
    writer.close()
  return last_row


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
