"""The Hugging Face Llama forward pass written out in float64 numpy from config.json and the
state dict, as transformers' LlamaForCausalLM computes it (rotate_half RoPE, repeat_kv GQA,
LlamaRMSNorm), so the export can be checked without torch. Independent of loomax's code."""

import numpy as np


def rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def llama_logits(config: dict, tensors: dict[str, np.ndarray], tokens: np.ndarray,
                 inv_freq=None, attention_factor: float = 1.0) -> np.ndarray:
  """Logits [T, V] of one sequence `tokens` [T] (positions 0..T-1, causal); `inv_freq` and
  `attention_factor` substitute RoPE-scaled frequencies (HF's rope_init_fn outputs)."""
  w = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  H, K = config['num_attention_heads'], config['num_key_value_heads']
  D = config['hidden_size']
  Dh = config.get('head_dim') or D // H
  eps, theta = config['rms_norm_eps'], config['rope_theta']
  T = len(tokens)
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
  freqs = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None]
  emb = np.concatenate([freqs, freqs], axis=-1)
  cos, sin = (np.cos(emb) * attention_factor)[:, None, :], (np.sin(emb) * attention_factor)[:, None, :]
  causal = np.tril(np.ones((T, T), bool))
  x = w['model.embed_tokens.weight'][tokens]
  for i in range(config['num_hidden_layers']):
    p = f'model.layers.{i}.'
    h = rms_norm(x, w[p + 'input_layernorm.weight'], eps)
    q = (h @ w[p + 'self_attn.q_proj.weight'].T).reshape(T, H, Dh)
    k = (h @ w[p + 'self_attn.k_proj.weight'].T).reshape(T, K, Dh)
    v = (h @ w[p + 'self_attn.v_proj.weight'].T).reshape(T, K, Dh)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)  # repeat_kv
    scores = np.einsum('qhd,khd->hqk', q, k) / np.sqrt(Dh)
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum('hqk,khd->qhd', probs, v).reshape(T, H * Dh)
    x = x + o @ w[p + 'self_attn.o_proj.weight'].T
    h = rms_norm(x, w[p + 'post_attention_layernorm.weight'], eps)
    gate = h @ w[p + 'mlp.gate_proj.weight'].T
    up = h @ w[p + 'mlp.up_proj.weight'].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + 'mlp.down_proj.weight'].T
  x = rms_norm(x, w['model.norm.weight'], eps)
  head = w['model.embed_tokens.weight'] if config['tie_word_embeddings'] else w['lm_head.weight']
  return x @ head.T
