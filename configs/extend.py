"""Context extension: continue a model trained at 256 tokens at 2,048 with scaled RoPE.

    python train.py --config configs/tiny.py --workdir runs/tiny          # the original model
    python train.py --config configs/extend.py:yarn --workdir runs/extend_yarn \
        --config.init_from=runs/tiny/checkpoints

The argument is the RoPE scaling type (none | linear | ntk | yarn | llama3), with factor
2048 / 256 = 8 and original_max_position_embeddings = 256; append ',runlocal' for a shorter
run. The recipe follows YaRN's and Llama 3's: parameters only from the original run
(`init_from`, fresh optimizer), a lower peak learning rate with a short warm-up, and a length
schedule 1,024 -> 2,048 at constant tokens per step. docs/context_extension.md walks through it.
"""

from configs import tiny

ORIGINAL, TARGET = 256, 2048


def get_config(arg: str | None = None):
  kind, *flags = (arg or 'yarn').split(',')
  c = tiny.get_config()
  c.init_from = ''                   # give the original run's checkpoints on the command line
  c.steps = 20 if 'runlocal' in flags else 60
  c.seq_len, c.batch_size = TARGET, 2      # 4,096 tokens per step, as tiny's 16 x 256
  c.data.length_schedule = f'0:1024,{c.steps // 3}:{TARGET}'
  m = c.model
  m.rope_scaling.type = kind
  if kind != 'none':
    m.rope_scaling.factor = TARGET / ORIGINAL
    m.rope_scaling.original_max_position_embeddings = ORIGINAL
  o = c.optimizer
  o.lr = 1e-3                        # a third of tiny's peak: adapt, do not relearn
  o.warmup_steps = 5
  o.schedule = 'cosine'
  o.decay_steps = c.steps
  c.log_every = 5
  c.eval_every = -1                  # scripts/evaluate.py runs the long-context evals after
  c.eval.tasks = 'loss,position_loss,passkey'
  c.eval.lengths = str(TARGET)
  return c
