"""Offline tokenisation of a corpus into ArrayRecord shards (scripts/prepare_data.py).

Output directory:
    plan.json                          what is being prepared (inputs, tokenizer, shard split)
    shard-SSSSS-of-NNNNN.array_record  one record per document: int32 little-endian token ids
    shard-SSSSS-of-NNNNN.lengths.npy   tokens per document of that shard
    shard-SSSSS-of-NNNNN.done          written last: the shard is complete (resume skips it)
    lengths.npy                        tokens per document over all shards, in record order
    prepared.json                      summary; data.source='array_record' checks its tokenizer

Input files are split into shards of contiguous files of about equal size; worker processes
tokenise whole shards, so an interrupted run resumes at shard granularity and the output does
not depend on the number of workers.
"""

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from checkpoint.errors import UserError
from training.data import sources, tokenizer

_BATCH_DOCS = 256  # documents per encode_batch call


@dataclasses.dataclass(frozen=True)
class Plan:
  source: str
  files: tuple[str, ...]
  file_bytes: tuple[int, ...]
  tokenizer: str
  tokenizer_fingerprint: str
  text_field: str
  errors: str
  shards: tuple[tuple[int, ...], ...]  # file indices of each shard

  def shard_name(self, shard: int) -> str:
    return f'shard-{shard:05d}-of-{len(self.shards):05d}'

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), 'shards': [list(s) for s in self.shards]}


def split_files(file_bytes: Sequence[int], num_shards: int) -> list[tuple[int, ...]]:
  """Contiguous runs of files of about equal total size (no shard is empty)."""
  n = len(file_bytes)
  num_shards = max(1, min(num_shards, n))
  cum = np.cumsum(np.asarray(file_bytes, np.float64) + 1.0)  # +1: empty files count too
  cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num_shards) / num_shards, side='left') + 1
  cuts = np.unique(np.clip(cuts, 1, n - 1)) if n > 1 else np.array([], np.int64)
  bounds = [0, *cuts.tolist(), n]
  return [tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def make_plan(source: str, files: Sequence[str], tok_spec: str, *, text_field: str = 'text',
              errors: str = 'strict', num_shards: int = 16) -> Plan:
  tok = tokenizer.load(tok_spec)
  sizes = [os.path.getsize(f) for f in files]
  return Plan(source, tuple(os.path.abspath(f) for f in files), tuple(sizes), tok_spec,
              sources.tokenizer_fingerprint(tok), text_field, errors,
              tuple(split_files(sizes, num_shards)))


def _check_same_plan(out: str, plan: Plan) -> None:
  path = os.path.join(out, 'plan.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(plan.to_json()))  # tuples as the lists json gives back
  diff = [k for k in new if k != 'tokenizer' and old.get(k) != new[k]]
  if diff:
    raise UserError(f'--out {out} holds a different preparation (differs in: '
                    f'{", ".join(diff)}); use a new --out directory or delete it.')


def prepare_shard(plan: Plan, out: str, shard: int) -> dict:
  """Tokenises one shard; writes its records, lengths and (last) its completion marker."""
  from array_record.python import array_record_module
  tok = tokenizer.load(plan.tokenizer)
  name = os.path.join(out, plan.shard_name(shard))
  start = time.perf_counter()
  lengths, nbytes, skipped = [], 0, 0
  tmp = name + '.array_record.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, 'group_size:1')
  try:
    def flush(texts):
      nonlocal nbytes, skipped
      for text, ids in zip(texts, tok.encode_batch(texts)):
        if not len(ids):
          skipped += 1  # an empty document holds nothing to learn
          continue
        writer.write(np.asarray(ids, '<i4').tobytes())
        lengths.append(len(ids))
        nbytes += len(text) if isinstance(text, bytes) else len(text.encode('utf-8'))

    # Byte tokens of text files are the file's bytes, undecoded: the same ids training reads.
    raw = plan.tokenizer == 'bytes' and plan.source in ('text', 'local_text')
    batch: list = []
    for i in plan.shards[shard]:
      for text in sources.iter_texts(plan.files[i], plan.source, plan.text_field, plan.errors,
                                     raw=raw):
        batch.append(text)
        if len(batch) >= _BATCH_DOCS:
          flush(batch)
          batch = []
    flush(batch)
  finally:
    writer.close()
  np.save(name + '.lengths.npy', np.asarray(lengths, np.int32))
  os.replace(tmp, name + '.array_record')
  stats = {'documents': len(lengths), 'tokens': int(np.sum(lengths, dtype=np.int64)),
           'bytes': nbytes, 'empty_skipped': skipped,
           'input_bytes': sum(plan.file_bytes[i] for i in plan.shards[shard]),
           'seconds': time.perf_counter() - start}
  with open(name + '.done.tmp', 'w') as f:
    json.dump(stats, f)
  os.replace(name + '.done.tmp', name + '.done')
  return {'shard': shard, **stats}


def _worker(args) -> dict:
  return prepare_shard(*args)


def prepare(plan: Plan, out: str, *, workers: int = 1,
            on_shard: Callable[[dict], None] = lambda s: None) -> dict:
  """Runs (or resumes) `plan` into `out`; returns the summary also written to prepared.json."""
  os.makedirs(out, exist_ok=True)
  _check_same_plan(out, plan)
  with open(os.path.join(out, 'plan.json'), 'w') as f:
    json.dump(plan.to_json(), f, indent=1)
  todo = [s for s in range(len(plan.shards))
          if not os.path.exists(os.path.join(out, plan.shard_name(s) + '.done'))]
  start = time.perf_counter()
  done_now = []
  jobs = [(plan, out, s) for s in todo]
  if workers > 1 and len(jobs) > 1:
    # spawn: the workers must not inherit a forked copy of the tokenizers' thread pools.
    with multiprocessing.get_context('spawn').Pool(min(workers, len(jobs))) as pool:
      for stats in pool.imap_unordered(_worker, jobs):
        done_now.append(stats)
        on_shard(stats)
  else:
    for job in jobs:
      stats = _worker(job)
      done_now.append(stats)
      on_shard(stats)
  seconds = time.perf_counter() - start
  return _finish(plan, out, done_now, seconds)


def _finish(plan: Plan, out: str, done_now: list[dict], seconds: float) -> dict:
  per_shard, lengths = [], []
  for s in range(len(plan.shards)):
    name = os.path.join(out, plan.shard_name(s))
    with open(name + '.done') as f:
      per_shard.append(json.load(f))
    lengths.append(np.load(name + '.lengths.npy'))
  all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
  np.save(os.path.join(out, sources.LENGTHS_FILE), all_lengths)
  tokens_now = sum(s['tokens'] for s in done_now)
  summary = {
      'tokenizer': plan.tokenizer, 'tokenizer_fingerprint': plan.tokenizer_fingerprint,
      'vocab_size': tokenizer.load(plan.tokenizer).vocab_size, 'source': plan.source,
      'shards': [plan.shard_name(s) + '.array_record' for s in range(len(plan.shards))],
      'documents': int(sum(s['documents'] for s in per_shard)),
      'tokens': int(sum(s['tokens'] for s in per_shard)),
      'bytes': int(sum(s['bytes'] for s in per_shard)),
      'empty_skipped': int(sum(s['empty_skipped'] for s in per_shard)),
      'shards_prepared_now': len(done_now), 'seconds_now': seconds,
      'tokens_per_sec_now': tokens_now / seconds if done_now and seconds > 0 else 0.0,
  }
  summary['bytes_per_token'] = summary['bytes'] / max(summary['tokens'], 1)
  with open(os.path.join(out, sources.PREPARED_META), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary
