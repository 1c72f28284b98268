"""A RULER-style synthetic long-context suite: retrieval (needle-in-a-haystack single,
multi-key, multi-value, multi-query), multi-hop tracing (variable tracking) and aggregation
(common-words and frequent-words extraction), after "RULER: What's the Real Context Size of
Your Long-Context Language Models?" (Hsieh et al., 2024).

Every example is a pure function of (seed, task, length, index), built for any tokenizer:
the prompt's pieces (header, haystack sentences, needles, question) are encoded separately and
concatenated, and the haystack is cut so that every prompt of a (task, length) has exactly
`length - answer budget` tokens (one compiled generation per task and length). The haystack
is RULER's repeated noise sentences, written here; nothing is downloaded. Words and keys are
pseudo-words from a fixed local syllable generator.

Scoring as RULER's: the share of expected strings found in the greedy continuation (an
answer of one string is exact retrieval); a task's score is the mean over its examples, the
suite's score at a length the mean over tasks. The templates are short, loomax's own wording,
so that small byte-level contexts (256 tokens) still hold some tasks; a task that does not fit
a length is skipped and said so.
"""

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

TASKS = ('niah_single', 'niah_multikey', 'niah_multivalue', 'niah_multiquery', 'vt', 'cwe',
         'fwe')
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLES = 4            # MK: needles (one queried), MV: values, MQ: keys asked (RULER's 4)
VT_HOPS = 4            # variable tracking: one chain of 4 hops -> 5 variables
CWE_COMMON, CWE_FREQ, CWE_RARE_FREQ = 5, 8, 2
FWE_TOP, FWE_ALPHA = 3, 2.0
_NOISE = ('The grass is green. ', 'The sky is blue. ', 'The sun is yellow. ', 'Here we go. ',
          'There and back again. ')
_SEED_TASK = {t: i for i, t in enumerate(TASKS)}

# Answerer: (prompts [B, P] int32, max_new_tokens) -> generated ids [B, max_new_tokens].
Answerer = Callable[[np.ndarray, int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Sample:
  task: str
  prompt: np.ndarray            # int32 token ids
  answers: tuple[str, ...]      # every string the continuation must contain
  depth: float                  # NIAH single: where the needle sits (0 = start); else nan


@dataclasses.dataclass(frozen=True)
class Settings:
  tasks: tuple[str, ...] = TASKS
  samples: int = 4              # examples per (task, length); NIAH single: per depth
  depths: tuple[float, ...] = DEPTHS
  rows: int = 8                 # rows per generation call
  seed: int = 1234

  def __post_init__(self):
    bad = [t for t in self.tasks if t not in TASKS]
    if bad:
      raise ValueError(f'eval.ruler_tasks: unknown {bad}; valid: all or {", ".join(TASKS)}')


def parse_tasks(text: str) -> tuple[str, ...]:
  names = tuple(s.strip() for s in str(text).split(',') if s.strip())
  return TASKS if names in ((), ('all',)) else names


# ------------------------------------------------------------------ words and haystack

@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
  """2,000 distinct pronounceable pseudo-words (fixed; the suite's word list)."""
  rng = np.random.default_rng(20240406)
  cons, vows = 'bdfgklmnprstvz', 'aeiou'
  out: dict[str, None] = {}
  while len(out) < 2000:
    n = int(rng.integers(2, 4))
    out[''.join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))]
                for _ in range(n))] = None
  return tuple(out)


class _Pieces:
  """Token ids of text pieces, encoded once per tokenizer."""

  def __init__(self, tok):
    self.tok = tok
    self._cache: dict[str, np.ndarray] = {}

  def __call__(self, text: str) -> np.ndarray:
    if text not in self._cache:
      self._cache[text] = np.asarray(self.tok.encode(text), np.int32)
    return self._cache[text]

  def haystack(self, n: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """n tokens of noise sentences from sentence `offset` on, and the sentence starts."""
    ids, starts, total, i = [], [], 0, offset
    while total < n:
      piece = self(_NOISE[i % len(_NOISE)])
      starts.append(total)
      ids.append(piece)
      total += len(piece)
      i += 1
    return (np.concatenate(ids)[:n] if ids else np.zeros(0, np.int32)), starts


class DoesNotFit(ValueError):
  pass


def _assemble(P: _Pieces, budget: int, head: str, inserts: list[str], tail: str,
              depths: list[float], rng) -> tuple[np.ndarray, list[float]]:
  """head + haystack with `inserts` at sentence starts nearest `depths` + tail, exactly
  `budget` tokens; returns the ids and the actual depths."""
  fixed = len(P(head)) + len(P(tail)) + sum(len(P(s)) for s in inserts)
  n = budget - fixed
  if n < 0:
    raise DoesNotFit(f'needs {fixed} tokens of template, the budget is {budget}')
  hay, starts = P.haystack(n, int(rng.integers(len(_NOISE))))
  starts = [s for s in starts if s < n] or [0]   # never after the cut (partial) sentence
  cuts = [min(starts, key=lambda s: abs(s - d * n)) for d in depths]
  order = np.argsort(cuts, kind='stable')
  parts, prev = [P(head)], 0
  for j in order:
    parts += [hay[prev:cuts[j]], P(inserts[j])]
    prev = cuts[j]
  parts += [hay[prev:], P(tail)]
  ids = np.concatenate(parts).astype(np.int32)
  assert len(ids) == budget, (len(ids), budget)
  return ids, [c / max(n, 1) for c in cuts]


def _key(rng, taken: set) -> str:
  w = words()
  while True:
    k = f'{w[rng.integers(len(w))]}-{w[rng.integers(len(w))]}'
    if k not in taken:
      taken.add(k)
      return k


def _number(rng, taken: set) -> str:
  while True:
    v = str(int(rng.integers(1_000_000, 10_000_000)))
    if v not in taken:
      taken.add(v)
      return v


# ------------------------------------------------------------------ the tasks

def _niah(task: str, P: _Pieces, budget: int, rng, depth: float | None):
  keys, values = set(), set()
  head = 'Find the magic numbers hidden in this text.\n'
  needle = 'The magic number for {} is {}. '
  if task == 'niah_single':
    k, v = _key(rng, keys), _number(rng, values)
    inserts, answers = [needle.format(k, v)], (v,)
    tail = f'\nThe magic number for {k} is'
    d = [float(rng.uniform()) if depth is None else depth]
  elif task == 'niah_multikey':
    ks = [_key(rng, keys) for _ in range(NEEDLES)]
    vs = [_number(rng, values) for _ in range(NEEDLES)]
    inserts, answers = [needle.format(k, v) for k, v in zip(ks, vs)], (vs[0],)
    tail = f'\nThe magic number for {ks[0]} is'
    d = list(rng.uniform(size=NEEDLES))
  elif task == 'niah_multivalue':
    k = _key(rng, keys)
    vs = [_number(rng, values) for _ in range(NEEDLES)]
    inserts, answers = [needle.format(k, v) for v in vs], tuple(vs)
    tail = f'\nAll magic numbers for {k} are'
    d = list(rng.uniform(size=NEEDLES))
  else:   # niah_multiquery
    ks = [_key(rng, keys) for _ in range(NEEDLES)]
    vs = [_number(rng, values) for _ in range(NEEDLES)]
    inserts, answers = [needle.format(k, v) for k, v in zip(ks, vs)], tuple(vs)
    tail = f'\nThe magic numbers for {", ".join(ks)} are'
    d = list(rng.uniform(size=NEEDLES))
  ids, actual = _assemble(P, budget, head, inserts, tail, d, rng)
  return ids, answers, actual[0] if task == 'niah_single' else float('nan')


def _vt(P: _Pieces, budget: int, rng):
  letters = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
  names: list[str] = []
  while len(names) < VT_HOPS + 1:
    n = ''.join(letters[i] for i in rng.integers(26, size=5))
    if n not in names:
      names.append(n)
  value = _number(rng, set())
  inserts = [f'VAR {names[0]} = {value}. '] + [f'VAR {b} = VAR {a}. '
                                               for a, b in zip(names, names[1:])]
  d = list(np.linspace(0.05, 0.95, len(inserts)))
  ids, _ = _assemble(P, budget, 'Track the variable assignments in this text.\n', inserts,
                     f'\nThe variables holding {value} are', d, rng)
  return ids, tuple(names), float('nan')


def _cwe(P: _Pieces, budget: int, rng):
  """Common words: CWE_COMMON words CWE_FREQ times each, rare words CWE_RARE_FREQ times each
  filling the rest of the budget; answer: the common words."""
  w = words()
  pick = rng.permutation(len(w))
  common = [w[i] for i in pick[:CWE_COMMON]]
  rare = [w[i] for i in pick[CWE_COMMON:]]
  head, tail = 'Some words in this list appear more often than others.\n', \
      f'\nThe {CWE_COMMON} most common words are'
  seq = common * CWE_FREQ
  fixed = len(P(head)) + len(P(tail)) + sum(len(P(' ' + x)) for x in seq)
  if fixed > budget:
    raise DoesNotFit(f'needs {fixed} tokens, the budget is {budget}')
  room = budget - fixed
  for r in rare:
    cost = CWE_RARE_FREQ * len(P(' ' + r))
    if cost > room:
      break
    seq += [r] * CWE_RARE_FREQ
    room -= cost
  seq = [seq[i] for i in rng.permutation(len(seq))]
  body = [P(' ' + x) for x in seq]
  pad = P.haystack(room, 0)[0]     # whatever does not fit a whole word: noise at the start
  ids = np.concatenate([P(head), pad] + body + [P(tail)]).astype(np.int32)
  return ids, tuple(common), float('nan')


def _fwe(P: _Pieces, budget: int, rng):
  """Frequent words: coded words drawn from a Zeta(FWE_ALPHA) distribution over ranks;
  answer: the FWE_TOP most frequent (redrawn until the top is unambiguous)."""
  w = words()
  vocab = [w[i] for i in rng.permutation(len(w))[:200]]
  head, tail = 'Read the coded text and find its most frequent words.\n', \
      f'\nThe {FWE_TOP} most frequent coded words are'
  room = budget - len(P(head)) - len(P(tail))
  for _ in range(20):
    ranks = rng.zipf(FWE_ALPHA, size=4 * budget)
    ranks = ranks[ranks <= len(vocab)] - 1
    seq, used = [], 0
    for r in ranks:
      t = len(P(' ' + vocab[r]))
      if used + t > room:
        break
      seq.append(r)
      used += t
    counts = np.bincount(seq, minlength=len(vocab))
    top = np.argsort(-counts, kind='stable')
    if len(seq) and counts[top[FWE_TOP - 1]] > counts[top[FWE_TOP]]:
      break
  else:
    raise DoesNotFit(f'budget {budget} is too small for an unambiguous top {FWE_TOP}')
  pad = P.haystack(room - used, 0)[0]
  ids = np.concatenate([P(head), pad] + [P(' ' + vocab[r]) for r in seq] + [P(tail)])
  return ids.astype(np.int32), tuple(vocab[i] for i in top[:FWE_TOP]), float('nan')


def answer_budget(task: str, tok) -> int:
  """Tokens generated for a task: its longest possible answer plus a margin of 2."""
  P = _Pieces(tok)
  num, key = ' 9999999', ' zuzuzu'
  text = {'niah_single': num, 'niah_multikey': num,
          'niah_multivalue': ','.join([num] * NEEDLES),
          'niah_multiquery': ','.join([num] * NEEDLES),
          'vt': ' ' + ' '.join(['ZZZZZ'] * (VT_HOPS + 1)),
          'cwe': ''.join([key] * CWE_COMMON), 'fwe': ''.join([key] * FWE_TOP)}[task]
  return len(P(text)) + 2


def make_sample(task: str, tok, length: int, index: int, seed: int,
                depth: float | None = None, pieces: _Pieces | None = None) -> Sample:
  """Example `index` of `task` at `length` tokens (prompt + answer budget); deterministic."""
  P = pieces or _Pieces(tok)
  budget = length - answer_budget(task, tok)
  depth_key = -1 if depth is None else int(round(depth * 1000))
  rng = np.random.default_rng([seed, _SEED_TASK[task], length, index, depth_key + 1])
  if task.startswith('niah'):
    ids, answers, d = _niah(task, P, budget, rng, depth)
  elif task == 'vt':
    ids, answers, d = _vt(P, budget, rng)
  elif task == 'cwe':
    ids, answers, d = _cwe(P, budget, rng)
  else:
    ids, answers, d = _fwe(P, budget, rng)
  return Sample(task, ids, answers, d)


def score(generated: str, answers: tuple[str, ...]) -> float:
  """RULER's string match: the share of expected strings in the continuation."""
  g = generated.lower()
  return float(np.mean([a.lower() in g for a in answers]))


# ------------------------------------------------------------------ running

def model_answerer(model, rows: int) -> Answerer:
  """Greedy generation through `modeling.sampling`'s cache path (prefill + decode scan), one
  compile per (prompt length, answer budget); batches padded to `rows`."""
  from modeling import sampling
  decoder = sampling.decoder_for(model)
  compiled: dict[tuple[int, int], Any] = {}
  greedy = sampling.Sampler(temperature=0.0)
  import jax

  def answer(prompts: np.ndarray, max_new: int) -> np.ndarray:
    n, plen = prompts.shape
    out = []
    for s in range(0, n, rows):
      chunk = prompts[s:s + rows]
      batch = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk), 0)])
      if (plen, max_new) not in compiled:
        compiled[plen, max_new] = sampling.compile_generate(model, decoder, rows, plen, max_new,
                                                           greedy)
      state, prefill, decode = compiled[plen, max_new]
      rng = jax.random.PRNGKey(0)
      first, cache = prefill(state, batch, rng)
      rest, _ = decode(state, cache, first, rng)
      toks = np.concatenate([np.asarray(first)[:, None], np.asarray(rest)], 1)
      out.append(toks[:len(chunk)])
    return np.concatenate(out)

  return answer


def run(answer: Answerer, tok, lengths, settings: Settings,
        progress: Callable[[str], Any] | None = None) -> dict:
  """Every task at every length: the `ruler` part of results.json."""
  tick = progress or (lambda _: None)
  P = _Pieces(tok)
  lengths = [int(L) for L in lengths]
  res: dict[str, Any] = {'tasks': list(settings.tasks), 'lengths': lengths,
                         'score': [], 'samples': [], 'average': [], 'skipped': [],
                         'examples': {},
                         'niah_depth': {'depths': list(settings.depths), 'lengths': [],
                                        'score': []}}
  for task in settings.tasks:
    row, counts = [], []
    for L in lengths:
      tick(f'ruler {task} L={L}')
      try:
        if task == 'niah_single':
          samples = [make_sample(task, tok, L, i, settings.seed, depth=d, pieces=P)
                     for d in settings.depths for i in range(settings.samples)]
        else:
          samples = [make_sample(task, tok, L, i, settings.seed, pieces=P)
                     for i in range(settings.samples)]
      except DoesNotFit as e:
        res['skipped'].append(f'ruler {task} L={L}: {e}')
        row.append(None)
        counts.append(0)
        continue
      max_new = answer_budget(task, tok)
      gen = answer(np.stack([s.prompt for s in samples]), max_new)
      texts = [tok.decode(np.asarray(g)) for g in gen]
      scores = [score(t, s.answers) for t, s in zip(texts, samples)]
      row.append(float(np.mean(scores)))
      counts.append(len(samples))
      res['examples'][f'{task}/{L}'] = {'answers': list(samples[0].answers),
                                        'generated': texts[0]}
      if task == 'niah_single':
        k = settings.samples
        res['niah_depth']['lengths'].append(L)
        res['niah_depth']['score'].append(
            [float(np.mean(scores[j * k:(j + 1) * k])) for j in range(len(settings.depths))])
    res['score'].append(row)
    res['samples'].append(counts)
  for j in range(len(lengths)):
    col = [r[j] for r in res['score'] if r[j] is not None]
    res['average'].append(float(np.mean(col)) if col else None)
  return res


def table(res: dict) -> str:
  """The task x length table as Markdown (score in %, '-' = did not fit)."""
  Ls = res['lengths']
  lines = ['| task | ' + ' | '.join(str(L) for L in Ls) + ' |',
           '|---|' + '---:|' * len(Ls)]
  fmt = lambda v: '-' if v is None else f'{100 * v:.1f}'   # noqa: E731
  for t, row in zip(res['tasks'], res['score']):
    lines.append(f'| {t} | ' + ' | '.join(fmt(v) for v in row) + ' |')
  lines.append('| **average** | ' + ' | '.join(fmt(v) for v in res['average']) + ' |')
  return '\n'.join(lines)


def scalars(res: dict, prefix: str = 'eval') -> dict[str, float]:
  out = {}
  for t, row in zip(res['tasks'], res['score']):
    for L, v in zip(res['lengths'], row):
      if v is not None:
        out[f'{prefix}/ruler/{t}/len_{L}'] = v
  for L, v in zip(res['lengths'], res['average']):
    if v is not None:
      out[f'{prefix}/ruler/average/len_{L}'] = v
  nd = res['niah_depth']
  for L, row in zip(nd['lengths'], nd['score']):
    for d, v in zip(nd['depths'], row):
      out[f'{prefix}/ruler/niah_depth/len_{L}/depth_{d:.2f}'] = v
  return out


def evaluate(config, params, lengths, settings: Settings,
             progress: Callable[[str], Any] | None = None) -> dict:
  """The suite for a run's model (`config`) with `params` (sharded or not): greedy
  generation through the family's decode cache, prompts in the run's tokenizer."""
  from flax import nnx

  from modeling import registry
  from modeling.transformer import Runtime
  from training.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load(config.data.tokenizer)
  tokenizer_lib.check_vocab(tok, config.model.vocab_size)
  abstract = nnx.eval_shape(lambda: registry.build_model(config.model, rngs=nnx.Rngs(0),
                                                         runtime=Runtime()))
  model = nnx.merge(nnx.split(abstract)[0], params)
  return run(model_answerer(model, settings.rows), tok, lengths, settings, progress)
