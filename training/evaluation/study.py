"""Seeded studies with error bars: arms (config overrides) x seeds at a fixed token budget.

A `Study` names its arms, seeds, budget and the comparisons it tests. `run_study` trains every
(arm, seed) through `training.loop.run` in its own workdir (resumable: a run whose result.json
exists is skipped; a run cut short resumes from its checkpoint), evaluates the held-out loss
(and bits per byte) of each trained model, also under the arm's evaluation variants (CART at
another R', a KV cache plan, ...), and writes `<out>/<study>.md`, `.json` and `.png`.

Per arm: the mean over seeds and its 95% t-interval. A comparison "a < b" (a's loss is lower)
is the mean of the paired per-seed differences a - b with its 95% t-interval, and its verdict:
supported (the interval lies below zero), contradicted (above zero) or inconclusive at this
budget (it contains zero). One seed gives no interval, so no verdict: `run_study` refuses it.
"""

import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

log = logging.getLogger('loomax')

SUPPORTED, CONTRADICTED, INCONCLUSIVE = 'supported', 'contradicted', 'inconclusive at this budget'
RESULT = 'result.json'


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  overrides: dict[str, Any]        # dotted config keys -> values, over the study's base config
  label: str = ''
  # Extra held-out evaluations of the trained model: variant name -> keyword arguments of the
  # model's __call__ (e.g. {"R'=1": {'loops': 1}}); the metric is '<arm>@<variant>'.
  evals: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The claim "metric `a` is lower than metric `b`" (metrics: '<arm>' or '<arm>@<variant>')."""
  a: str
  b: str
  claim: str                       # the sentence the verdict is about, e.g. the paper's claim


@dataclasses.dataclass
class Study:
  name: str
  title: str
  base: Callable[[], Any]          # () -> ConfigDict every arm starts from
  arms: list[Arm]
  comparisons: list[Comparison]
  seeds: tuple[int, ...] = (0, 1, 2)
  budget: str = ''                 # what each run trains on (the report's first paragraph)
  why: str = ''                    # why this budget (left out of smoke reports)
  # check(arm, config, model) before training: asserts that the studied mechanism is active.
  check: Callable[[Arm, Any, Any], None] | None = None
  smoke: bool = False
  # training.evaluation.downstream.Files: lambada / multiple_choice / perplexity files scored after
  # training (reported beside the diagnostics, mean and interval over seeds); None = none.
  downstream: Any = None


# --- statistics ---

def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student-t interval of the mean over n >= 2 values."""
  from scipy import stats
  x = np.asarray(values, np.float64)
  if x.size < 2:
    raise ValueError(f'an interval needs at least 2 seeds; got {x.size}')
  mean = float(x.mean())
  half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
  """For a difference a - b under the claim a < b."""
  if high < 0:
    return SUPPORTED
  if low > 0:
    return CONTRADICTED
  return INCONCLUSIVE


def compare(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
  """Paired by seed (the same seed = the same data order and held-out set in every arm)."""
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    raise ValueError(f'no verdict from {len(seeds)} seed(s): a comparison needs >= 2 seeds '
                     'present in both arms')
  mean, low, high = t_interval([a[s] - b[s] for s in seeds])
  return {'diff': mean, 'low': low, 'high': high, 'seeds': seeds, 'verdict': verdict(low, high)}


# --- running ---

def apply_overrides(config, overrides: dict[str, Any]):
  """Sets dotted keys ('model.cart.loops') on `config`; an unknown key is an error naming it."""
  for key, value in overrides.items():
    *path, leaf = key.split('.')
    node = config
    for part in path:
      node = node[part]
    if leaf not in node:
      raise KeyError(f'study override {key}={value!r}: no such config key')
    node[leaf] = value
  return config


def arm_config(study: Study, arm: Arm, seed: int):
  c = apply_overrides(study.base(), arm.overrides)
  c.seed = seed
  c.eval_every = -1                # the harness evaluates each trained model itself
  c.progress = False
  if not c.checkpoint.every:       # a run cut short resumes from its latest quarter
    c.checkpoint.every = max(1, c.steps // 4)
  c.checkpoint.keep = 1
  return c


def workdir_of(root: str, study: Study, arm: Arm, seed: int) -> str:
  return os.path.join(root, study.name, arm.name, f'seed_{seed}')


def parameter_counts(model_config) -> tuple[int, int]:
  """(stored, effective): a family whose build has `parameter_counts` (CART: the shared core
  counted once per application) reports both; otherwise effective = stored."""
  import jax
  import ml_collections
  from flax import nnx

  from modeling import registry
  frozen = ml_collections.FrozenConfigDict(model_config)
  counts = getattr(registry.get_family(frozen.name).build, 'parameter_counts', None)
  if counts is not None:
    return tuple(int(n) for n in counts(frozen))
  model = nnx.eval_shape(lambda: registry.build_model(frozen, rngs=nnx.Rngs(0)))
  n = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
  return n, n


def held_out(config, seed: int = 0):
  """The held-out batches every run of a study is scored on (packing seeded by `seed`)."""
  from training import data as data_lib
  c = apply_overrides(type(config)(config.to_dict()), {'seed': seed})
  return data_lib.make_eval_batches(c, num_batches=c.eval_batches)


def evaluate(workdir: str, arm: Arm, batches, files=None) -> dict[str, Any]:
  """Held-out loss (nats/token) and bits/byte of the trained model, and of each variant."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from training import data as data_lib
  from training import loss as loss_lib
  from training.evaluation import serving

  run = serving.load(workdir)
  model = run.model()
  graphdef, params = nnx.split(model)
  per_byte = data_lib.tokens_per_byte(batches)

  def score(kwargs) -> float:
    @jax.jit
    def loss_sum(params, batch):
      m = nnx.merge(graphdef, params)
      h = m(batch['inputs'], segment_ids=batch['segment_ids'], positions=batch['positions'],
            **kwargs)
      return loss_lib.lm_loss_sum(m, h, batch['targets'])
    total = count = 0.0
    for b in batches:
      t, c = loss_sum(params, {k: jnp.asarray(v) for k, v in b.items()})
      total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)

  def row(loss):
    return {'loss': loss, 'bits_per_byte': loss * per_byte / math.log(2) if per_byte else None}

  out = {**row(score({})), 'step': run.step,
         'variants': {name: row(score(kw)) for name, kw in arm.evals.items()}}
  diag = getattr(model, 'diagnostics', None)
  out['diagnostics'] = {k: float(v) for k, v in diag().items()} if diag is not None else {}
  out['diagnostics'].update(_downstream(run, files))
  return out


def _downstream(run, files) -> dict[str, float]:
  """{'<task>/<metric>': value} of the downstream tasks whose file `files` names."""
  if files is None:
    return {}
  from training.evaluation import downstream, evals
  named = {'lambada': files.lambada, 'multiple_choice': files.choice, 'perplexity': files.text}
  if not any(named.values()):
    return {}
  ev = evals.Evaluator(run.config, run.mesh, run.setup.shardings.params, evals.EvalSettings())
  out = {}
  for task, path in named.items():
    if path:
      for key, value in downstream.run(task, ev, run.params, files).items():
        if isinstance(value, float) and key != 'chance':
          out[f'{task}/{key}'] = value
  return out


def run_one(study: Study, arm: Arm, seed: int, root: str, batches) -> dict[str, Any]:
  """Trains (or resumes) one (arm, seed) and evaluates it; skipped when result.json exists."""
  workdir = workdir_of(root, study, arm, seed)
  path = os.path.join(workdir, RESULT)
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    log.info('study %s: %s seed %d already done (%s)', study.name, arm.name, seed, path)
    return result
  from training import loop
  config = arm_config(study, arm, seed)
  start, cpu = time.perf_counter(), time.process_time()
  loop.run(config, workdir)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  stored, effective = parameter_counts(config.model)
  result = {'arm': arm.name, 'seed': seed, 'stored_params': stored,
            'effective_params': effective,
            'tokens': config.steps * config.batch_size * config.seq_len,
            'steps': config.steps, 'wall_s': wall, 'cpu_s': cpu,
            # The 1-minute load average as the run ended: above the core count, other work
            # shared the cores and the wall time is a loaded figure (cpu_s is the steadier one).
            'load_1m': os.getloadavg()[0],
            **evaluate(workdir, arm, batches, study.downstream)}
  with open(path, 'w') as f:
    json.dump(result, f, indent=1)
  return result


def run_study(study: Study, root: str, out: str, command: str | None = None,
              note: str = '') -> dict[str, Any]:
  """Runs every (arm, seed) not yet done, then writes the report; returns its JSON content."""
  if len(study.seeds) < 2:
    raise ValueError(f'study {study.name}: {len(study.seeds)} seed(s); no verdict from one '
                     'seed: give at least 2 (3 or more for a useful interval)')
  names = [a.name for a in study.arms]
  for c in study.comparisons:
    for metric in (c.a, c.b):
      arm, _, variant = metric.partition('@')
      if arm not in names or (variant and variant not in study.arms[names.index(arm)].evals):
        raise ValueError(f'comparison {c.a} < {c.b}: unknown metric {metric!r}; arms {names}')
  if study.check is not None:
    import ml_collections
    from flax import nnx

    from modeling import registry
    for arm in study.arms:
      config = arm_config(study, arm, study.seeds[0])
      frozen = ml_collections.FrozenConfigDict(config.model)
      study.check(arm, config, nnx.eval_shape(
          lambda f=frozen: registry.build_model(f, rngs=nnx.Rngs(0))))
  batches = held_out(study.base())
  results = []
  for arm in study.arms:
    for seed in study.seeds:
      r = run_one(study, arm, seed, root, batches)
      log.info('study %s: %s seed %d: held-out loss %.4f', study.name, arm.name, seed, r['loss'])
      print(f'  {arm.name} seed {seed}: loss {r["loss"]:.4f} ({r["wall_s"]:.0f} s)', flush=True)
      results.append(r)
  report = summarize(study, results, command or ' '.join(['python'] + sys.argv), note)
  write_report(study, report, out)
  return report


# --- report ---

def metric_values(results, metric: str) -> dict[int, float]:
  arm, _, variant = metric.partition('@')
  out = {}
  for r in results:
    if r['arm'] == arm:
      out[r['seed']] = r['variants'][variant]['loss'] if variant else r['loss']
  return out


def machine() -> str:
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return (f'{platform.node() or "host"}: {cpu}, {os.cpu_count()} CPU threads visible | JAX '
          f'{jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), '
          f'{jax.device_count()} device(s)')


def _mean_of(rows, key):
  vals = [r[key] for r in rows if key in r]
  return float(np.mean(vals)) if len(vals) == len(rows) else None


def _max_of(rows, key):
  vals = [r[key] for r in rows if key in r]
  return float(max(vals)) if len(vals) == len(rows) else None


def summarize(study: Study, results: list[dict], command: str, note: str = '') -> dict[str, Any]:
  arms = []
  for arm in study.arms:
    rows = [r for r in results if r['arm'] == arm.name]
    entry = {'name': arm.name, 'label': arm.label or arm.name, 'overrides': arm.overrides,
             'seeds': [r['seed'] for r in rows], 'stored_params': rows[0]['stored_params'],
             'effective_params': rows[0]['effective_params'], 'tokens': rows[0]['tokens'],
             'steps': rows[0]['steps'], 'wall_s': float(np.mean([r['wall_s'] for r in rows])),
             'cpu_s': _mean_of(rows, 'cpu_s'), 'load_1m_max': _max_of(rows, 'load_1m')}
    for key in ('loss', 'bits_per_byte'):
      vals = [r[key] for r in rows if r[key] is not None]
      entry[key] = dict(zip(('mean', 'low', 'high'), t_interval(vals))) if len(vals) > 1 else None
    entry['variants'] = {}
    for v in arm.evals:
      entry['variants'][v] = dict(zip(('mean', 'low', 'high'),
                                      t_interval([r['variants'][v]['loss'] for r in rows])))
    diags = sorted({k for r in rows for k in r.get('diagnostics', {})})
    entry['diagnostics'] = {k: dict(zip(('mean', 'low', 'high'), t_interval(
        [r['diagnostics'][k] for r in rows]))) for k in diags}
    arms.append(entry)
  comparisons = [{'a': c.a, 'b': c.b, 'claim': c.claim,
                  **compare(metric_values(results, c.a), metric_values(results, c.b))}
                 for c in study.comparisons]
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  return {'study': study.name, 'title': study.title, 'smoke': study.smoke,
          'budget': study.budget if study.smoke else f'{study.budget} {study.why}'.strip(),
          'seeds': list(study.seeds), 'command': command, 'note': note,
          'machine': machine(), 'date': stamp, 'arms': arms, 'comparisons': comparisons,
          'runs': results}


def _ci(d) -> str:
  if d is None:
    return '-'
  return f'{d["mean"]:.4f} ± {(d["high"] - d["low"]) / 2:.4f}'


def markdown(report: dict[str, Any]) -> str:
  smoke = report['smoke']
  lines = [f'# {report["title"]}' + (' (SMOKE: plumbing check, not evidence)' if smoke else ''),
           '']
  if smoke:
    lines += ['**Smoke run**: a few untrained steps at tiny shapes; the verdicts below only '
              'show the harness works and say nothing about the claims.', '']
  lines += [f'- command: `{report["command"]}`', f'- machine: {report["machine"]}',
            f'- date: {report["date"]}', f'- seeds: {report["seeds"]}']
  if report.get('note'):
    lines += [f'- note: {report["note"]}']
  lines += ['',
            report['budget'].strip(), '',
            'Held-out loss in nats/token and bits per byte: mean over seeds ± half the 95% '
            't-interval.', '',
            'Wall and process CPU seconds per run (mean over seeds); "load" is the highest '
            '1-minute load average at the end of a run: above the core count other work '
            'shared the machine, so the wall time is a loaded figure ("-": not recorded).', '',
            '| arm | stored | effective | tokens | wall s | CPU s | load | held-out loss | '
            'bits/byte |',
            '|---|---|---|---|---|---|---|---|---|']
  fmt = lambda v, f: '-' if v is None else format(v, f)
  for a in report['arms']:
    lines.append(f'| {a["label"]} | {a["stored_params"]:,} | {a["effective_params"]:,} | '
                 f'{a["tokens"]:,} | {a["wall_s"]:.0f} | {fmt(a.get("cpu_s"), ".0f")} | '
                 f'{fmt(a.get("load_1m_max"), ".1f")} | {_ci(a["loss"])} | '
                 f'{_ci(a["bits_per_byte"])} |')
  variants = [(a, v, d) for a in report['arms'] for v, d in a['variants'].items()]
  if variants:
    lines += ['', '| arm | evaluated as | held-out loss |', '|---|---|---|']
    lines += [f'| {a["label"]} | {v} | {_ci(d)} |' for a, v, d in variants]
  diags = [(a, k, d) for a in report['arms'] for k, d in a['diagnostics'].items()]
  if diags:
    lines += ['', '| arm | diagnostic / downstream task | value |', '|---|---|---|']
    lines += [f'| {a["label"]} | {k} | {_ci(d)} |' for a, k, d in diags]
  lines += ['', '## Comparisons', '',
            'Difference a - b of held-out loss (nats/token), paired by seed, with its 95% '
            't-interval; the claim is a < b.', '',
            '| claim | a | b | a - b | 95% interval | verdict |', '|---|---|---|---|---|---|']
  for c in report['comparisons']:
    lines.append(f'| {c["claim"]} | {c["a"]} | {c["b"]} | {c["diff"]:+.4f} | '
                 f'[{c["low"]:+.4f}, {c["high"]:+.4f}] | {c["verdict"]} |')
  lines += ['', f'![{report["study"]}]({report["study"]}.png)', '']
  return '\n'.join(lines)


def plot(report: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  bars = [(a['label'], a['loss']) for a in report['arms']]
  bars += [(f'{a["label"]} @ {v}', d) for a in report['arms'] for v, d in a['variants'].items()]
  fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(bars)), 4.5))
  means = [d['mean'] for _, d in bars]
  errs = [(d['high'] - d['low']) / 2 for _, d in bars]
  ax.bar(range(len(bars)), means, yerr=errs, capsize=4, color='tab:blue', alpha=0.8)
  ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=45, ha='right', fontsize=8)
  lo, hi = min(m - e for m, e in zip(means, errs)), max(m + e for m, e in zip(means, errs))
  ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
  ax.set_ylabel('held-out loss (nats/token), 95% CI')
  ax.set_title(report['title'] + (' [SMOKE]' if report['smoke'] else ''), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(study: Study, report: dict[str, Any], out: str) -> list[str]:
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'{study.name}.{ext}') for ext in ('md', 'json', 'png')]
  with open(paths[0], 'w') as f:
    f.write(markdown(report))
  with open(paths[1], 'w') as f:
    json.dump(report, f, indent=1)
  plot(report, paths[2])
  return paths
