#!/usr/bin/env bash
# One-command GPU run: the staged benchmark (scripts/bench_gpu.py) from the repository root,
# with this machine's own python and its CUDA jax, and loomax's pure-Python dependencies
# (flax, optax, orbax, grain, ml_collections, tensorboardX, ...) from an ignored folder on
# PYTHONPATH, for a GPU host that has jax but no network. Preparing the folder: docs/gpu.md.
#
#   scripts/gpu_run.sh                          # all stages, rows -> $OUT/bench_gpu.jsonl
#   scripts/gpu_run.sh --stages numerics,attn   # any bench_gpu.py flags pass through
#
# Environment: PYTHON (default python3), LOOMAX_GPU_DEPS (default .gpu_deps), OUT (default
# runs/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${PYTHON:-python3}"
DEPS="${LOOMAX_GPU_DEPS:-$ROOT/.gpu_deps}"
OUT="${OUT:-$ROOT/runs/gpu}"
export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"

# The machine's jax must win: a jax copied into the folder would bring the CPU jaxlib.
for shadow in jax jaxlib; do
  if [ -e "$DEPS/$shadow" ]; then
    echo "gpu_run.sh: $DEPS/$shadow would shadow this machine's $shadow; remove it" >&2
    exit 2
  fi
done
"$PY" - <<'PY'
import importlib, sys
import jax
missing = [m for m in ('flax', 'optax', 'orbax.checkpoint', 'grain', 'ml_collections',
                       'tensorboardX', 'absl') if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f'gpu_run.sh: missing {missing}: prepare the dependency folder (docs/gpu.md)')
print(f'gpu_run.sh: jax {jax.__version__} from {jax.__file__}', flush=True)
PY
mkdir -p "$OUT"
exec "$PY" scripts/bench_gpu.py --json "$OUT/bench_gpu.jsonl" "$@"
