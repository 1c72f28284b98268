"""Every CLI starts: each scripts/*.py (found by glob, so new scripts are covered) and train.py
answer --help, and each benchmark, study and eval script finishes its --smoke run.

The scripts run as subprocesses, two at a time in the background from the first test on, so
the imports (~2 s of JAX per process) and the smoke runs overlap on CI's two cores. --help
answers before JAX is imported (checked with -X importtime; HELP_IMPORTS_JAX lists the scripts
that cannot yet), so it costs ~0.1 s.
"""

import concurrent.futures
import glob
import os
import re
import subprocess
import sys
import time
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_cli(path: str) -> bool:
  """A script with a main guard; the others (scripts/study_report.py) are shared helpers."""
  with open(path) as f:
    return re.search(r"__name__ == ['\"]__main__['\"]", f.read()) is not None


SCRIPTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'scripts', '*.py'))
                 if _is_cli(p))
CLIS = SCRIPTS + ['train.py']
# Smokes another test already runs (in-process, with its JSON checked), not run twice:
SMOKE_ELSEWHERE = {
    'scripts/bench_gpu.py',             # its CPU mode is --tiny: tests/test_kernels.py
    'scripts/bench_sambay_context.py',  # --smoke --json: tests/test_sambay_context.py
}
# Benchmarks, studies and evals must have a seconds-long --smoke mode (the project standard).
MEASURING = [s for s in SCRIPTS if s not in SMOKE_ELSEWHERE
             and os.path.basename(s).startswith(('bench_', 'study_', 'eval_'))]
# --help still imports JAX here, through a module its parser needs (to be fixed there, not here):
HELP_IMPORTS_JAX = {
    # flag help lists training.metrics.profile.SHAPES; training/metrics/profile.py imports JAX
    'scripts/bench_train.py': 'training.metrics.profile',
    'scripts/profile_step.py': 'training.metrics.profile',
    # --source choices come from training.data.sources; training/data/__init__ imports JAX
    'scripts/prepare_data.py': 'training.data',
    'scripts/train_tokenizer.py': 'training.data',
}
# A smoke run checks that a script runs end to end, not how fast its compiled code is; at smoke
# sizes XLA:CPU's compile is most of the run, and most of that is LLVM optimisation and the
# fusion emitters (a tiny CART train step: 8 s of CPU to compile with them, 2 s without). So the
# smokes compile without both, where this jaxlib knows the flags (XLA aborts on unknown ones).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
# Flags a script's --help must name (checked on the --help run above, so other tests need not
# start the script again for its help).
HELP_MENTIONS = {
    'scripts/bench_context.py': ('--ratio_length', '--tiny'),
    'scripts/bench_gpu.py': ('--tiny',),
    'scripts/export_hf.py': ('--out',),
    'scripts/import_hf.py': ('--out',),
    'scripts/prepare_data.py': ('--tokenizer', 'parquet'),
    'scripts/train_tokenizer.py': ('--vocab_size', 'sentencepiece'),
}
# The longest smokes (each trains several arms x 2 seeds; 45-145 s each on a loaded 2-core
# machine, the others 5-30 s) start first, so the 2-wide pool ends with short jobs on both
# workers instead of one long study running alone (longest-processing-time-first order).
SLOWEST_SMOKES = ('scripts/study_sambay.py', 'scripts/study_kv_routing.py', 'scripts/study_cart.py',
                  'scripts/study_context_extension.py')
TIMEOUT_S = 600
_IMPORT_TIME = re.compile(r'^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$')


def _run(args: list[str], importtime: bool = False,
         xla_flags: str = '') -> tuple[int, str, float, set[str]]:
  """(exit code, stdout + stderr, wall seconds, modules imported: only with importtime)."""
  # No forced device count: scripts that need 8 fake devices set it themselves.
  env = {**os.environ, 'XLA_FLAGS': xla_flags, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  start = time.perf_counter()
  out = subprocess.run([sys.executable, *(['-X', 'importtime'] if importtime else []), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
  seconds = time.perf_counter() - start
  modules, stderr = set(), []
  for line in out.stderr.splitlines(keepends=True):
    m = _IMPORT_TIME.match(line.rstrip('\n')) if importtime else None
    if m:
      modules.add(m.group(1))
    elif not (importtime and line.startswith('import time: self [us]')):
      stderr.append(line)
  return out.returncode, out.stdout + ''.join(stderr), seconds, modules


@pytest.fixture(scope='module')
def launched():
  """Starts every --help and every smoke run at once on a 2-wide pool; tests await theirs."""
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
  jobs = {('help', s): pool.submit(_run, [s, '--help'], importtime=True) for s in CLIS}
  # Runs while the pool answers the --help calls.
  probe = _run(['-c', 'import jax; jax.devices()'], xla_flags=FAST_COMPILE)
  flags = FAST_COMPILE if probe[0] == 0 else ''
  if not flags:
    warnings.warn(f'this jaxlib refuses XLA_FLAGS={FAST_COMPILE!r}: the smokes compile at full '
                  f'cost; update FAST_COMPILE in tests/test_scripts.py: {probe[1][-300:]}',
                  stacklevel=2)
  order = sorted(MEASURING, key=lambda s: (SLOWEST_SMOKES.index(s) if s in SLOWEST_SMOKES
                                           else len(SLOWEST_SMOKES), s))
  jobs.update({('smoke', s): pool.submit(_run, [s, '--smoke'], xla_flags=flags) for s in order})
  yield jobs
  pool.shutdown(wait=True, cancel_futures=True)


def test_scripts_are_discovered():
  assert 'scripts/bench_train.py' in SCRIPTS and len(MEASURING) >= 10, SCRIPTS
  assert set(SLOWEST_SMOKES) <= set(MEASURING), set(SLOWEST_SMOKES) - set(MEASURING)


@pytest.mark.parametrize('script', CLIS)
def test_help(script, launched):
  rc, out, _, _ = launched[('help', script)].result()
  # absl apps (train.py, bench_train, bench_sharding) print the flags and exit 1 on --help.
  assert rc == 0 or (rc == 1 and 'Try --helpfull' in out), out[-3000:]
  assert 'usage' in out.lower() or 'flags:' in out.lower(), out[-3000:]
  assert 'Traceback' not in out, out[-3000:]


@pytest.mark.parametrize('script', sorted(HELP_MENTIONS))
def test_help_names_its_flags(script, launched):
  rc, out, _, _ = launched[('help', script)].result()
  assert rc == 0, out[-3000:]
  for flag in HELP_MENTIONS[script]:
    assert flag in out, (flag, out[-3000:])


@pytest.mark.parametrize('script', CLIS)
def test_help_does_not_import_jax(script, launched):
  """Parse the flags before importing JAX (~2 s): --help and argument errors answer at once."""
  _, _, _, modules = launched[('help', script)].result()
  assert modules, 'no -X importtime lines were read'
  if script in HELP_IMPORTS_JAX:
    module = HELP_IMPORTS_JAX[script]
    assert module in modules, f'{script} --help no longer imports {module}: unlist it above'
  else:
    assert 'jax' not in modules and 'flax' not in modules, (
        f'{script} --help imports JAX: parse the arguments before the heavy imports')


@pytest.mark.parametrize('script', MEASURING)
def test_has_a_smoke_mode(script, launched):
  _, out, _, _ = launched[('help', script)].result()
  assert '--smoke' in out or '--[no]smoke' in out, f'{script} needs a seconds-long --smoke mode'


@pytest.mark.parametrize('script', MEASURING)
def test_smoke_run(script, launched):
  rc, out, seconds, _ = launched[('smoke', script)].result()
  assert rc == 0, out[-5000:]
  # Every benchmark ends with its table or a summary line, not just a clean exit.
  lines = [line for line in out.splitlines() if line.strip()]
  assert any(s in out for s in ('summary', '|', 'loss')), lines[-10:]
  print(f'{script} --smoke: {seconds:.1f} s')
