"""Downstream evaluations from local files: LAMBADA-style last-word prediction, multiple choice
(HellaSwag / PIQA / ARC layouts) and perplexity over a text file. Nothing downloads: the user
names the files (scripts/evaluate.py --lambada_file, --choice_file, --text_file).

    lambada          jsonl of {"text": ...}: the last word (after the last space) is the target;
                     accuracy = every target token is the model's arg-max given the true
                     prefix (greedy decoding of the word), perplexity = exp(mean over examples of
                     the word's negative log-likelihood), as in the LAMBADA paper (Paperno et
                     al., 2016) and CART's variable-R table.
    multiple_choice  jsonl, one question per line, in any of these layouts:
                       HellaSwag  {"ctx", "endings": [...], "label"}
                       PIQA       {"goal", "sol1", "sol2", "label"}
                       ARC        {"question", "choices": {"text": [...], "label": [...]},
                                   "answerKey"}
                       generic    {"context", "choices": [...], "label"}
                     each choice scored by the summed log-likelihood of " " + choice after the
                     context: acc = arg-max of the sum, acc_norm = arg-max of the sum divided by
                     the choice's length in bytes (the usual length normalisation).
    perplexity       a UTF-8 text file cut into windows of the run's seq_len: loss (nats/token),
                     perplexity and bits per byte.

Every score is computed with `Evaluator.run` (training/evaluation/evals.py): the run's mesh and layout.
"""

import dataclasses
import json
import math
from typing import Any

import numpy as np

from training.data import tokenizer as tokenizer_lib

TASKS = ('lambada', 'multiple_choice', 'perplexity')


@dataclasses.dataclass(frozen=True)
class Files:
  lambada: str = ''          # jsonl of {"text": ...}
  choice: str = ''           # jsonl in a multiple-choice layout
  text: str = ''             # a text file


def _tokenizer(config):
  return tokenizer_lib.load(config.data.get('tokenizer', 'bytes'))


def _encode(tok, text: str) -> np.ndarray:
  return np.asarray(tok.encode(text), np.int32)


def split_tokens(tok, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of the context and of the continuation as they are tokenised together (the
  continuation's ids are the tail of encode(context + continuation) when the context's ids are
  its prefix; otherwise the two are encoded apart)."""
  ctx, whole = _encode(tok, context), _encode(tok, context + continuation)
  if len(whole) > len(ctx) and np.array_equal(whole[:len(ctx)], ctx):
    return ctx, whole[len(ctx):]
  return ctx, _encode(tok, continuation)


def scoring_row(ctx: np.ndarray, cont: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """One row of `length` tokens whose targets are the continuation only (the context is cut
  from the left to fit; at least one context token is kept)."""
  if len(cont) + 1 > length:
    raise ValueError(f'a continuation of {len(cont)} tokens does not fit rows of {length}')
  tokens = np.concatenate([ctx, cont])[-(length + 1):]
  n = len(tokens) - 1
  targets = tokens[1:].copy()
  targets[:n - len(cont)] = -1
  pad = length - n
  return {'inputs': np.pad(tokens[:-1], (0, pad)).astype(np.int32),
          'targets': np.pad(targets, (0, pad), constant_values=-1).astype(np.int32),
          'segment_ids': np.pad(np.ones(n, np.int32), (0, pad)),
          'positions': np.pad(np.arange(n, dtype=np.int32), (0, pad))}


def _score(ev, params, rows, length):
  """(summed nll, all-greedy-correct, continuation tokens) per row."""
  nll, arg = ev.run(params, rows, length)
  out = []
  for r, n, a in zip(rows, nll, arg):
    m = r['targets'] >= 0
    out.append((float(n[m].sum()), bool(np.all(a[m] == r['targets'][m])), int(m.sum())))
  return out


def _jsonl(path: str) -> list[dict]:
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f'{path}: no examples')
  return rows


def lambada(ev, params, path: str) -> dict[str, Any]:
  tok, L = _tokenizer(ev.config), ev.config.seq_len
  rows = []
  for i, ex in enumerate(_jsonl(path)):
    text = ex.get('text')
    if not isinstance(text, str) or ' ' not in text.strip():
      raise ValueError(f'{path}:{i + 1}: needs a "text" of two or more words')
    text = text.rstrip()
    cut = text.rindex(' ')
    rows.append(scoring_row(*split_tokens(tok, text[:cut], text[cut:]), L))
  scored = _score(ev, params, rows, L)
  return {'accuracy': float(np.mean([ok for _, ok, _ in scored])),
          'perplexity': math.exp(float(np.mean([s for s, _, _ in scored]))),
          'examples': len(rows)}


def choice_example(ex: dict, where: str) -> tuple[str, list[str], int]:
  """(context, choices, index of the right one) from the common layouts."""
  if 'endings' in ex:                                   # HellaSwag
    ctx, choices, label = ex.get('ctx') or ex.get('context', ''), ex['endings'], ex['label']
  elif 'sol1' in ex:                                    # PIQA
    ctx, choices, label = ex['goal'], [ex['sol1'], ex['sol2']], ex['label']
  elif isinstance(ex.get('choices'), dict):             # ARC
    ctx, choices = ex['question'], list(ex['choices']['text'])
    label = list(ex['choices']['label']).index(str(ex['answerKey']))
  elif 'choices' in ex:                                 # generic
    ctx, choices = ex.get('context', ex.get('query', ex.get('question', ''))), ex['choices']
    label = ex.get('label', ex.get('gold'))
  else:
    raise ValueError(f'{where}: no known multiple-choice layout (HellaSwag ctx/endings/label, '
                     'PIQA goal/sol1/sol2/label, ARC question/choices/answerKey, or '
                     'context/choices/label)')
  label = int(label)
  if not 0 <= label < len(choices):
    raise ValueError(f'{where}: label {label} is not one of {len(choices)} choices')
  return str(ctx), [str(c) for c in choices], label


def multiple_choice(ev, params, path: str) -> dict[str, Any]:
  tok, L = _tokenizer(ev.config), ev.config.seq_len
  examples = [choice_example(ex, f'{path}:{i + 1}') for i, ex in enumerate(_jsonl(path))]
  rows, lengths = [], []
  for ctx, choices, _ in examples:
    for c in choices:
      rows.append(scoring_row(*split_tokens(tok, ctx, ' ' + c.strip()), L))
      lengths.append(len((' ' + c.strip()).encode('utf-8')))
  scored = _score(ev, params, rows, L)
  acc = norm = 0
  i = 0
  for _, choices, label in examples:
    ll = np.array([-s for s, _, _ in scored[i:i + len(choices)]])
    nbytes = np.array(lengths[i:i + len(choices)], np.float64)
    acc += int(np.argmax(ll) == label)
    norm += int(np.argmax(ll / nbytes) == label)
    i += len(choices)
  n = len(examples)
  return {'acc': acc / n, 'acc_norm': norm / n, 'examples': n,
          'chance': float(np.mean([1 / len(c) for _, c, _ in examples]))}


def perplexity(ev, params, path: str) -> dict[str, Any]:
  tok, L = _tokenizer(ev.config), ev.config.seq_len
  with open(path, 'rb') as f:
    data = f.read()
  text = data.decode('utf-8')
  ids = _encode(tok, text)
  if len(ids) < 2:
    raise ValueError(f'{path}: needs at least 2 tokens')
  rows = []
  for s in range(0, len(ids) - 1, L):
    window = ids[s:s + L + 1]
    n = len(window) - 1
    pad = L - n
    rows.append({'inputs': np.pad(window[:-1], (0, pad)).astype(np.int32),
                 'targets': np.pad(window[1:], (0, pad), constant_values=-1).astype(np.int32),
                 'segment_ids': np.pad(np.ones(n, np.int32), (0, pad)),
                 'positions': np.pad(np.arange(n, dtype=np.int32), (0, pad))})
  total = sum(s for s, _, _ in _score(ev, params, rows, L))
  tokens = len(ids) - 1
  loss = total / tokens
  # Bytes the scored tokens stand for (every token but the first).
  nbytes = len(data) - len(tok.decode(ids[:1]).encode('utf-8'))
  return {'loss': loss, 'perplexity': math.exp(loss), 'tokens': tokens,
          'bits_per_byte': total / math.log(2) / max(nbytes, 1)}


def run(name: str, ev, params, files: Files) -> dict[str, Any]:
  """One downstream task, reading its file from `files` (a missing one is a clear error)."""
  path = {'lambada': files.lambada, 'multiple_choice': files.choice,
          'perplexity': files.text}[name]
  if not path:
    flag = {'lambada': '--lambada_file', 'multiple_choice': '--choice_file',
            'perplexity': '--text_file'}[name]
    raise ValueError(f'eval task {name!r} reads a local file: give {flag}=PATH')
  return {'lambada': lambada, 'multiple_choice': multiple_choice,
          'perplexity': perplexity}[name](ev, params, path)


def scalars(results: dict, prefix: str = 'eval') -> dict[str, float]:
  out = {}
  for name in TASKS:
    for key, value in results.get(name, {}).items():
      if isinstance(value, float):
        out[f'{prefix}/{name}/{key}'] = value
  return out
