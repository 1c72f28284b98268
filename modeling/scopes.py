"""Name scopes (jax.named_scope) around the parts of a step a profile attributes separately.

They only label HLO instructions (their op_name metadata, forward and backward); they change
no computation. training/metrics/profile.py reads them back.
"""

ATTENTION_SCOPE = 'attention_core'
LOSS_SCOPE = 'lm_loss'
OPTIMIZER_SCOPE = 'optimizer_update'
