"""Test-wide setup: 8 fake CPU devices and quick XLA compiles, set before JAX is imported."""

import os
import subprocess
import sys

# Most of this suite's time is XLA:CPU compiling tiny programs, and most of that is LLVM
# optimisation and the fusion emitters (a tiny CART train step: 8 s of CPU to compile with
# them, 2 s without). Tests check results, not the speed of the compiled code, so they compile
# without both, where this jaxlib knows the flags (XLA aborts on unknown ones: probed once).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def _known(flags: str) -> bool:
  env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                         capture_output=True, timeout=120)
  return probe.returncode == 0


_fast = FAST_COMPILE if _known(FAST_COMPILE) else ''
os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8', _fast]).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
