"""The training loop: config -> mesh -> data -> sharded state -> steps -> metrics/checkpoints.

Each arrow of the data flow in docs/architecture.md is one call below.
"""

import logging
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from checkpoint import metadata as ckpt_metadata
from checkpoint.manager import config_json
from modeling import registry
from parallelism import distributed, mesh as mesh_lib
from training import data as data_lib, hybrid_data
from training import checkpointing, evals, perf, telemetry, throughput
from training import config_checks, run_files, stop, workdir_lock  # H3: issue 27
from training.checkpointing import NonFiniteLoss  # noqa: F401 - raised by run()
from training.monitor import MetricWriter, Progress, setup_logging
from training.program import build_program
from training.state import count_params

log = logging.getLogger('loomax')


def evaluate(eval_step, params, batches) -> float:
  total = count = 0.0
  for b in batches:
    t, c = eval_step(params, b)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`; returns the last logged metrics row. Raises UserError for
  bad input (before any compile), NonFiniteLoss, or stop.Stopped after a signal (train.py
  turns each into its exit status, training/errors.py)."""
  config_checks.validate(config)  # H3: ranges, one line, before anything starts
  distributed.initialize(config.distributed)
  setup_logging()
  config_checks.validate_on_devices(config, jax.device_count(), jax.process_count())  # H3
  mesh = mesh_lib.make_mesh(config.mesh)
  if config.get('dry_run', False):
    return dry_run(config, build_program(config, mesh))
  with workdir_lock.acquire(workdir):  # H3: one writer per workdir, before anything is written
    return _train(config, workdir, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, Any]:
  ckpt = checkpointing.open_checkpointer(config, workdir)
  start_plan = checkpointing.plan_start(config, ckpt)
  config = checkpointing.resolve_config(config, start_plan)
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
  eval_per_byte = data_lib.tokens_per_byte(eval_batches)  # None without byte counts

  state, train_iter, start_info = checkpointing.restore_or_init(config, program, start_plan,
                                                                workdir, train_iter)
  run_files.write_config(config, workdir)  # H3: atomic, only after validation and the restore
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

  if hybrid:
    # A step is batch_size whole documents of any length: tokens/s counts their tokens, and
    # MFU is not reported (a token's FLOPs depend on its document's length; the planner's
    # modelled and executed figures are hdp/*).
    timing = throughput.Throughput(None, None, matmul_peak(config, mesh))
  else:
    timing = throughput.Throughput(config.batch_size * config.seq_len,
                                   perf.train_flops_per_token(config.model, config.seq_len),
                                   matmul_peak(config, mesh))
  # Real tokens are counted on this process's rows; every process loads as many.
  real_scale = 1 if hybrid else nproc
  writer = MetricWriter(workdir)
  tele = telemetry.Telemetry(config, program)   # telemetry.py: padding, balance, comm, memory
  writer.write(start, tele.startup())
  task_evals = evals.in_training(config, program)   # eval.tasks beyond 'loss': {} when none
  progress = Progress(config.steps, start, enabled=config.progress)
  log_lines = not (progress.active and sys.stderr.isatty())  # a log file gets the rows

  # (step, metrics on device, real tokens, data wait s): fetched one step late, keeps
  # dispatch async.
  pending = None
  last_row: dict[str, Any] = {}
  profiling = False

  finite = {'step': start, 'ok': True}  # whether the state after that step may be saved
  skipped = 0

  def save(step, force=False):
    saver.save(step, state, train_iter.get_state(),
               finite['ok'] and finite['step'] == step, force=force)

  compile_logged = []  # perf/compile_s goes into the first row only

  def finish_step(step, metrics, real_tokens, data_wait_s):
    nonlocal last_row, skipped
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
                  if k not in ('loss', 'lr', 'grad_norm', 'param_norm', 'tokens', 'skipped')})
      row.update(tele.row(state.params, None if hybrid else batch))
      if config.optimizer.skip_nonfinite:
        row['train/skipped_steps'] = skipped
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

  stopping = False
  stopper = stop.StopControl(nproc)  # H3: signals, agreed stop, interruptible data waits
  try:
    for step in range(start + 1, config.steps + 1):
      if config.profile_steps and step == config.profile_start and pid == 0:
        jax.profiler.start_trace(os.path.join(workdir, 'tb'))
        profiling = True
      t0 = time.perf_counter()
      host_batch = stopper.next_batch(train_iter, step)  # H3: a signal ends a blocked wait
      tele.observe(host_batch)
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
      stopping = stopper.agreed()  # H3: the same step on every process
      save_due = config.checkpoint.every and step % config.checkpoint.every == 0
      eval_due = (eval_on and config.eval_every > 0 and step % config.eval_every == 0
                  and step != config.steps)
      if stopping or save_due or eval_due:
        finish_step(*pending)  # a step is saved only once it is known finite
        pending = None
        timing.pause()  # saves and evals stay out of the throughput window
      if stopping or save_due:
        save(step, force=stopping)
      if stopping:
        log.warning('signal received: saved step %d; exiting without the final eval', step)
        break
      if eval_due:
        eval_loss = evaluate(eval_step, state.params, eval_batches)
        writer.write(step, {**data_lib.eval_row(eval_loss, eval_per_byte),
                            **task_evals(state.params)})
        log.info('eval at step %d: loss %.4f', step, eval_loss)
      timing.resume()
    if pending is not None:
      finish_step(*pending)
    final_step = int(state.step)
    last_row = {**last_row, 'step': final_step, 'params': n_params}
    if not stopping:
      save(final_step, force=True)  # before the final eval, which a preemption may cut short
      if eval_on:
        eval_loss = evaluate(eval_step, state.params, eval_batches)
        eval_metrics = data_lib.eval_row(eval_loss, eval_per_byte)
        writer.write(final_step, {**eval_metrics, **task_evals(state.params)})
        log.info('final eval at step %d: loss %.4f', final_step, eval_loss)
        last_row.update(eval_metrics)
  finally:
    stopper.restore()  # a notebook or test process gets its Ctrl-C and SIGTERM back
    if profiling:
      jax.profiler.stop_trace()
    progress.close()
    ckpt.close()
    writer.close()
  if stopping:  # H3: after the finally, so the save is complete; train.py exits 128 + signal
    raise stop.Stopped(stopper.signum, final_step, saved=saver.last_good == final_step)
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
