"""Long-context evaluation tasks for any model family: does the model use its context?

    loss           mean held-out next-token loss at each length
    position_loss  held-out loss by token position within its document, log2-spaced buckets
                   [0,1) [1,2) [2,4) ... up to the length: does more context keep helping?
    passkey        retrieval accuracy, context length x needle depth (Mohtashami & Jaggi, 2023)
    mqar           multi-query associative recall accuracy by length and number of key-value
                   pairs (Arora et al., 2023)
    ruler          RULER-style suite (training/evaluation/ruler.py): NIAH variants, variable tracking,
                   common/frequent words, scored on greedy generation through the decode cache

Tasks are scored by the model's own next-token predictions: arg-max at every scored position
given the true prefix. A passkey counts as retrieved when all its digits are predicted (the
same as greedy generation of the answer, which can only go right if every digit does); MQAR
accuracy is the share of queried values predicted. Nothing is trained on the tasks.

Every length runs through the run's parallel layout on the given mesh: the batch rows over the
data axes and, with a context axis, ring attention in the zigzag layout (outputs are put back
in sequence order here); lengths above `blockwise_above` use the blockwise kernel.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from modeling import registry
from parallelism.context import layout as context_layout
from training import data as data_lib
from training.evaluation import downstream, ruler
from training.composition import make_runtime
from training.data import tasks
from training.program import batch_sharding

TASKS = ('loss', 'position_loss', 'passkey', 'mqar', 'ruler') + downstream.TASKS
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  tasks: tuple[str, ...] = ('loss',)
  lengths: tuple[int, ...] = ()          # () = the run's seq_len
  eval_tokens: int = 16384               # loss / position_loss: held-out tokens per length
  passkey_samples: int = 4               # examples per (length, depth) cell
  passkey_depths: tuple[float, ...] = PASSKEY_DEPTHS
  mqar_pairs: tuple[int, ...] = (4, 16, 64)
  mqar_samples: int = 8                  # examples per (length, pairs) cell
  ruler_tasks: tuple[str, ...] = ruler.TASKS
  ruler_samples: int = 4                 # examples per (task, length); NIAH single: per depth
  rows_per_batch: int = 8                # rows per forward call (rounded up to the data axes)
  blockwise_above: int = 2048            # lengths above this use attention.impl=blockwise
  seed: int = 1234
  files: downstream.Files = downstream.Files()   # lambada, multiple_choice, perplexity inputs

  def __post_init__(self):
    bad = [t for t in self.tasks if t not in TASKS]
    if bad:
      raise ValueError(f'eval.tasks: unknown {bad}; valid: {list(TASKS)}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'EvalSettings':
    e = config.eval
    return cls(tasks=parse_list(e.tasks, str), lengths=parse_list(e.lengths, int),
               eval_tokens=e.tokens, passkey_samples=e.passkey_samples,
               mqar_pairs=parse_list(e.mqar_pairs, int), mqar_samples=e.mqar_samples,
               ruler_tasks=ruler.parse_tasks(e.ruler_tasks), ruler_samples=e.ruler_samples,
               seed=config.seed + 1)


def parse_list(text: str, kind) -> tuple:
  return tuple(kind(s.strip()) for s in str(text).split(',') if s.strip())


def position_buckets(length: int) -> list[tuple[int, int]]:
  """[0,1), [1,2), [2,4), ..., the last ending at `length`."""
  out, lo = [(0, 1)], 1
  while lo < length:
    out.append((lo, min(2 * lo, length)))
    lo *= 2
  return out


class Evaluator:
  """Compiled forward passes of one model on one mesh, per length: rows in, per-token
  (negative log-likelihood, arg-max) out, in sequence order."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, param_shardings,
               settings: EvalSettings):
    self.config, self.mesh, self.settings = config, mesh, settings
    self.param_shardings = param_shardings
    self._data_size = _batch_axis_size(config, mesh)
    self._compiled: dict[int, tuple[Callable, Callable, ml_collections.ConfigDict]] = {}

  def rows_per_call(self) -> int:
    d = self._data_size
    return max(d, -(-self.settings.rows_per_batch // d) * d)

  def length_config(self, length: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(self.config.to_dict())
    c.seq_len, c.batch_size = length, self.rows_per_call()
    if length > self.settings.blockwise_above:
      c.attention.impl = 'blockwise'
    if c.parallelism.context_impl == 'disaggregated':
      c.parallelism.context_impl = 'none'   # its plan is made per training batch
    return c

  def _program(self, length: int):
    if length not in self._compiled:
      c = self.length_config(length)
      runtime = make_runtime(c, self.mesh)
      graphdef = nnx.split(nnx.eval_shape(
          lambda: registry.build_model(c.model, rngs=nnx.Rngs(0), runtime=runtime)))[0]

      def forward(params, batch):
        model = nnx.merge(graphdef, params)
        h = model(batch['inputs'], segment_ids=batch['segment_ids'],
                  positions=batch['positions'])
        logits = model.logits(h).astype(jnp.float32)
        safe = jnp.maximum(batch['targets'], 0)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None],
                                                                  -1)[..., 0]
        return nll, jnp.argmax(logits, -1).astype(jnp.int32)

      sharding = batch_sharding(c, self.mesh)
      fn = jax.jit(forward, in_shardings=(self.param_shardings, sharding))
      self._compiled[length] = (fn, context_layout.host_layout(c, self.mesh), c)
    return self._compiled[length]

  def run(self, params, rows: list[dict[str, np.ndarray]], length: int):
    """(nll [n, L], argmax [n, L]) numpy for n rows of `length` tokens."""
    fn, host_layout, c = self._program(length)
    sharding = batch_sharding(c, self.mesh)
    order = host_layout({'i': np.arange(length)[None]})['i'][0]   # zigzag permutation, if any
    inverse = np.argsort(order)
    R = self.rows_per_call()
    nll_out, arg_out = [], []
    for s in range(0, len(rows), R):
      chunk = rows[s:s + R]
      batch = {k: np.stack([r[k] for r in chunk] + [_pad_row(r0, k) for r0 in
                                                    [chunk[0]] * (R - len(chunk))])
               for k in ('inputs', 'targets', 'segment_ids', 'positions')}
      batch = host_layout(batch)
      batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
      nll, arg = fn(params, batch)
      nll, arg = _gather(nll)[:len(chunk)], _gather(arg)[:len(chunk)]
      nll_out.append(nll[:, inverse])
      arg_out.append(arg[:, inverse])
    return np.concatenate(nll_out), np.concatenate(arg_out)


def _batch_axis_size(config, mesh) -> int:
  rules = dict((n, a) for n, a in config.parallelism.rules)
  axes = rules.get('batch')
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return int(np.prod([mesh.shape[a] for a in axes if a in mesh.shape] or [1]))


def _pad_row(row, key):
  return np.full_like(row[key], -1) if key == 'targets' else np.zeros_like(row[key])


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


# ------------------------------------------------------------------ the tasks

def held_out_rows(config, length: int, num_rows: int) -> list[dict[str, np.ndarray]]:
  c = ml_collections.ConfigDict(config.to_dict())
  c.seq_len, c.batch_size = length, num_rows
  batch = data_lib.make_eval_batches(c, num_batches=1)[0]
  return [{k: v[i] for k, v in batch.items()} for i in range(num_rows)]


def loss_and_position_loss(ev: Evaluator, params, length: int) -> tuple[float, dict]:
  s = ev.settings
  n = max(1, math.ceil(s.eval_tokens / length))
  rows = held_out_rows(ev.config, length, n)
  nll, _ = ev.run(params, rows, length)
  targets = np.stack([r['targets'] for r in rows])
  positions = np.stack([r['positions'] for r in rows])
  valid = targets >= 0
  loss = float(nll[valid].mean()) if valid.any() else float('nan')
  buckets, losses, counts = [], [], []
  for lo, hi in position_buckets(length):
    m = valid & (positions >= lo) & (positions < hi)
    buckets.append([lo, hi])
    counts.append(int(m.sum()))
    losses.append(float(nll[m].mean()) if m.any() else None)
  return loss, {'buckets': buckets, 'loss': losses, 'tokens': counts}


def passkey(ev: Evaluator, params, length: int) -> dict:
  """Accuracy per needle depth at one length; examples drawn until every depth bin is full."""
  s = ev.settings
  src = tasks.PasskeySource(s.seed, 'eval', length, length)
  depths = np.asarray(s.passkey_depths)
  cells: list[list] = [[] for _ in depths]
  # The needle goes between filler sentences, so short contexts offer few depths: draw a
  # bounded number of examples, bin each by its nearest depth; a bin left empty scores None.
  for index in range(50 * s.passkey_samples * len(depths)):
    row, _, depth = src.example(index)
    b = int(np.argmin(np.abs(depths - depth)))
    if len(cells[b]) < s.passkey_samples:
      cells[b].append(row)
    if min(len(c) for c in cells) == s.passkey_samples:
      break
  rows = [r for c in cells for r in c]
  _, arg = ev.run(params, rows, length)
  targets = np.stack([r['targets'] for r in rows])
  scored = targets >= 0
  exact = [bool(np.all(a[m] == t[m])) for a, t, m in zip(arg, targets, scored)]
  digits = [float(np.mean(a[m] == t[m])) for a, t, m in zip(arg, targets, scored)]
  acc, dig, counts, i = [], [], [], 0
  for c in cells:
    n = len(c)
    acc.append(float(np.mean(exact[i:i + n])) if n else None)
    dig.append(float(np.mean(digits[i:i + n])) if n else None)
    counts.append(n)
    i += n
  return {'accuracy': acc, 'digit_accuracy': dig, 'samples': counts}


def mqar(ev: Evaluator, params, length: int, pairs: int) -> float:
  s = ev.settings
  src = tasks.MqarSource(s.seed, 'eval', length, length, ev.config.model.vocab_size, pairs)
  rows = [src[i] for i in range(s.mqar_samples)]
  _, arg = ev.run(params, rows, length)
  targets = np.stack([r['targets'] for r in rows])
  m = targets >= 0
  return float((arg[m] == targets[m]).mean())


def mqar_fits(length: int, pairs: int, vocab_size: int) -> str | None:
  """Why (length, pairs) cannot be posed, or None."""
  if 4 * pairs - 1 > length:
    return f'length {length} < {4 * pairs - 1} tokens needed for {pairs} pairs'
  if pairs > (vocab_size - 1) // 2:
    return f'{pairs} pairs need {2 * pairs + 1} token ids; vocab_size is {vocab_size}'
  return None


def passkey_fits(length: int) -> str | None:
  try:
    tasks.PasskeySource(0, 'eval', length, length)
  except ValueError as e:
    return str(e).replace('data.task_length', 'length')
  return None


def run_tasks(ev: Evaluator, params, progress: Callable[[str], Any] | None = None) -> dict:
  """Every task of `ev.settings` at every length: the results.json structure."""
  s = ev.settings
  lengths = list(s.lengths or (ev.config.seq_len,))
  out: dict[str, Any] = {'lengths': lengths, 'tasks': list(s.tasks), 'skipped': []}
  tick = progress or (lambda _: None)
  if 'loss' in s.tasks or 'position_loss' in s.tasks:
    out['loss'], out['position_loss'] = {}, {}
    for L in lengths:
      tick(f'loss L={L}')
      loss, by_pos = loss_and_position_loss(ev, params, L)
      out['loss'][str(L)] = loss
      out['position_loss'][str(L)] = by_pos
    for t in ('loss', 'position_loss'):
      if t not in s.tasks:
        del out[t]
  if 'passkey' in s.tasks:
    tasks.tokenizer.check_byte_vocab(ev.config.model.vocab_size, 'passkey')
    grid = {'depths': list(s.passkey_depths), 'lengths': [], 'accuracy': [],
            'digit_accuracy': [], 'samples': []}
    for L in lengths:
      why = passkey_fits(L)
      if why:
        out['skipped'].append(f'passkey L={L}: {why}')
        continue
      tick(f'passkey L={L}')
      r = passkey(ev, params, L)
      grid['lengths'].append(L)
      grid['accuracy'].append(r['accuracy'])
      grid['digit_accuracy'].append(r['digit_accuracy'])
      grid['samples'].append(r['samples'])
    out['passkey'] = grid
  if 'mqar' in s.tasks:
    table = {'pairs': list(s.mqar_pairs), 'lengths': lengths, 'accuracy': []}
    for L in lengths:
      row = []
      for n in s.mqar_pairs:
        why = mqar_fits(L, n, ev.config.model.vocab_size)
        if why:
          out['skipped'].append(f'mqar L={L} pairs={n}: {why}')
          row.append(None)
          continue
        tick(f'mqar L={L} pairs={n}')
        row.append(mqar(ev, params, L, n))
      table['accuracy'].append(row)
    out['mqar'] = table
  if 'ruler' in s.tasks:
    out['ruler'] = ruler.evaluate(ev.config, params, lengths, ruler.Settings(
        tasks=s.ruler_tasks, samples=s.ruler_samples, rows=ev.rows_per_call(), seed=s.seed), tick)
    out['skipped'] += out['ruler']['skipped']
  for name in (t for t in s.tasks if t in downstream.TASKS):   # training/evaluation/downstream.py
    tick(name)
    out[name] = downstream.run(name, ev, params, s.files)
  return out


def scalars(results: dict, prefix: str = 'eval') -> dict[str, float]:
  """Flat TensorBoard scalars: eval/<task>/... from a `run_tasks` result."""
  out = {}
  for L, v in results.get('loss', {}).items():
    out[f'{prefix}/loss/len_{L}'] = v
  for L, r in results.get('position_loss', {}).items():
    for (lo, hi), v in zip(r['buckets'], r['loss']):
      if v is not None:
        out[f'{prefix}/position_loss/len_{L}/pos_{lo:06d}_{hi:06d}'] = v
  pk = results.get('passkey')
  if pk:
    for L, accs in zip(pk['lengths'], pk['accuracy']):
      scored = [a for a in accs if a is not None]
      for d, a in zip(pk['depths'], accs):
        if a is not None:
          out[f'{prefix}/passkey/len_{L}/depth_{d:.2f}'] = a
      if scored:
        out[f'{prefix}/passkey/len_{L}/mean'] = float(np.mean(scored))
  out.update(downstream.scalars(results, prefix))
  mq = results.get('mqar')
  if mq:
    for L, accs in zip(mq['lengths'], mq['accuracy']):
      for n, a in zip(mq['pairs'], accs):
        if a is not None:
          out[f'{prefix}/mqar/len_{L}/pairs_{n}'] = a
  if 'ruler' in results:
    out.update(ruler.scalars(results['ruler'], prefix))
  return out


def in_training(config: ml_collections.ConfigDict, program) -> Callable[[Any], dict]:
  """params -> {eval/<task>/...} for the tasks in eval.tasks other than 'loss' (the loop
  computes eval/loss itself), on the run's own mesh and parameter shardings; {} when none."""
  settings = EvalSettings.from_config(config)
  extra = tuple(t for t in settings.tasks if t != 'loss')
  if not extra:
    return lambda params: {}
  if config.parallelism.hybrid_dp.enabled:
    raise ValueError(f'eval.tasks={config.eval.tasks!r}: task evals need a static mesh layout; '
                     "with parallelism.hybrid_dp.enabled=True set eval.tasks='loss'")
  ev = Evaluator(config, program.mesh, program.setup.shardings.params,
                 dataclasses.replace(settings, tasks=extra))
  return lambda params: scalars(run_tasks(ev, params))
