"""Cost of the LM head + cross-entropy against the head matmul alone, forward + backward.

    python scripts/bench_loss_head.py [--vocab 256,32768] [--tokens 1024] [--d_model 256]
        [--chunk 0] [--json PATH] [--smoke]

For each vocabulary size it times (process CPU time, median of repeats, after a warm-up):
  matmul:  the head matmul h @ W with a linear stand-in loss sum(logits * g) (forward + both
           gradients: exactly the head's matmul work);
  head+CE: training/loss.py's lm loss path (chunked when --chunk > 0);
  pass:    one elementwise pass over a [tokens, vocab] float32 array (read + reduce).
and reports (head+CE - matmul) in units of one pass: the target is that the loss costs the
matmul plus about one pass over the logits.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# JAX, NumPy and training/ are imported inside the functions, after absl has parsed the flags,
# so --help answers without JAX's ~2 s import.

flags.DEFINE_string('vocab', '256,32768', 'Comma-separated vocabulary sizes.')
flags.DEFINE_integer('tokens', 1024, 'Tokens (batch x length) per call, as [4, tokens/4].')
flags.DEFINE_integer('d_model', 256, 'Model width.')
flags.DEFINE_integer('chunk', 0, 'attention.loss_chunk for the head+CE path (0 = unchunked).')
flags.DEFINE_integer('repeats', 7, 'Timed repeats (median).')
flags.DEFINE_string('json', '', 'Also write the table to this JSON file.')
flags.DEFINE_bool('smoke', False, 'Seconds-long run: vocab 256 and 1024, 128 tokens.')


class _Head:
  """The two methods of a model that training/loss.py uses."""

  def __init__(self, w):
    self.w = w

  def head_matrix(self):
    return self.w

  def logits(self, h):
    return h @ self.w


def cpu_medians(calls, repeats):
  """Median process CPU seconds of each (fn, args) in `calls`, repeats interleaved so a change
  in the machine's load hits every variant alike."""
  import jax
  import numpy as np

  for fn, args in calls:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in calls]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(calls):
      c0 = time.process_time()
      jax.block_until_ready(fn(*args))
      times[i].append(time.process_time() - c0)
  return [float(np.median(t)) for t in times]


def measure(vocab: int, tokens: int, d: int, chunk: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp

  from training import loss as loss_lib

  k = jax.random.split(jax.random.PRNGKey(0), 4)
  B = 4
  h = jax.random.normal(k[0], (B, tokens // B, d), jnp.float32)
  w = jax.random.normal(k[1], (d, vocab), jnp.float32) * d ** -0.5
  g = jax.random.normal(k[2], (B, tokens // B, vocab), jnp.float32)
  targets = jax.random.randint(k[3], (B, tokens // B), 0, vocab)

  # Everything is an argument: closed-over arrays would be constant-folded at compile time.
  matmul = jax.jit(jax.grad(lambda h, w, g: jnp.sum((h @ w) * g), argnums=(0, 1)))
  head_ce = jax.jit(jax.grad(
      lambda h, w, t: loss_lib.lm_loss_sum(_Head(w), h, t, chunk=chunk)[0], argnums=(0, 1)))
  one_pass = jax.jit(lambda x: jnp.max(x))
  t_mm, t_ce, t_pass = cpu_medians(
      [(matmul, (h, w, g)), (head_ce, (h, w, targets)), (one_pass, (g,))], repeats)
  return {'vocab': vocab, 'tokens': tokens, 'd_model': d, 'chunk': chunk,
          'matmul_ms': t_mm * 1e3, 'head_ce_ms': t_ce * 1e3, 'pass_ms': t_pass * 1e3,
          'extra_passes': (t_ce - t_mm) / t_pass}


def main(_):
  import jax

  F = flags.FLAGS
  vocabs = [256, 1024] if F.smoke else [int(v) for v in F.vocab.split(',')]
  tokens = 128 if F.smoke else F.tokens
  rows = [measure(v, tokens, F.d_model, F.chunk, 2 if F.smoke else F.repeats) for v in vocabs]
  print(f'# bench_loss_head | {jax.devices()[0].platform} | jax {jax.__version__} | '
        f'{tokens} tokens x d={F.d_model} | float32 | forward + backward | process CPU time '
        f'(median, interleaved) | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs')
  print(f'{"vocab":>7} {"chunk":>6} {"matmul ms":>10} {"head+CE ms":>11} {"pass ms":>8} '
        f'{"extra passes":>13}')
  for r in rows:
    print(f'{r["vocab"]:>7} {r["chunk"]:>6} {r["matmul_ms"]:>10.1f} {r["head_ce_ms"]:>11.1f} '
          f'{r["pass_ms"]:>8.2f} {r["extra_passes"]:>13.1f}')
  if F.json:
    with open(F.json, 'w') as f:
      json.dump(rows, f, indent=1)
  print(' | '.join(f'V={r["vocab"]}: head+CE = matmul + {r["extra_passes"]:.1f} passes'
                   for r in rows))


if __name__ == '__main__':
  from training.safety.errors import run_cli
  run_cli(lambda: app.run(main))
