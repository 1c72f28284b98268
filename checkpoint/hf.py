"""Weight and config mapping between loomax's dense transformer and Hugging Face Llama.

The two compute the same function, so the mapping is a renaming plus reshapes:
  * rotary embeddings: both rotate the two halves of each head (x[:d/2], x[d/2:]) with
    theta^(-2i/d) frequencies (HF's `rotate_half`), so q/k need no permutation (that is only
    needed for Meta's original interleaved-pair checkpoints);
  * RMSNorm: x * rsqrt(mean(x^2) + eps) * weight in float32 in both (not Gemma's 1 + weight);
  * grouped-query attention: K/V heads map to num_key_value_heads, query head h uses K/V head
    h // (H/K) in both;
  * SwiGLU: down(silu(gate(x)) * up(x)); attention scale head_dim^-0.5; no biases.
  * RoPE scaling: `model.rope_scaling` (modeling/rope.py) <-> HF `rope_scaling` /
    `rope_parameters` for linear, yarn, llama3 and longrope (same formulas; see `hf_rope_scaling`).
Whatever does not map (a sliding window, NoPE, cross-layer K/V sharing, static NTK or HF's
length-dependent `dynamic` RoPE, biases, another activation, another family) is refused with
an error naming the key.

Tensors here are numpy arrays keyed by loomax parameter paths without the 'params/' prefix, in
the unrolled layout ('blocks/3/attn/wq'), or by HF names ('model.layers.3.self_attn.q_proj.weight').
"""

import json
import os
from typing import Any

import numpy as np

HF_ARCHITECTURE = 'LlamaForCausalLM'
_IMPORTABLE_TYPES = ('llama', 'mistral')


class NotMappable(ValueError):
  """A model, config key or tensor with no exact Llama counterpart."""


def check_exportable(model: dict[str, Any]) -> None:
  """Raises NotMappable naming the first model.* key Llama cannot express."""
  def refuse(key, why):
    raise NotMappable(f'model.{key}={model.get(key, model.get(key.split(".")[0]))!r}: {why}; '
                      'Llama cannot express it, so the export would not compute the same '
                      'function.')
  if model['name'] != 'transformer':
    refuse('name', "only the dense family ('transformer') maps to Llama")
  if model.get('sliding_window', 0):
    refuse('sliding_window', 'sliding-window attention')
  if not model.get('rope_theta', 0):
    refuse('rope_theta', 'no rotary embeddings (NoPE)')
  hf_rope_scaling(model)   # refuses scaling HF cannot express
  routing = model.get('kv_routing', {})
  if routing.get('cache_every', 1) != 1 or routing.get('cache_layers', ''):
    raise NotMappable('model.kv_routing.cache_every / cache_layers: layers that share another '
                      "layer's K/V cache at inference; Llama has one cache per layer.")


def llama_config(model: dict[str, Any], *, max_positions: int, dtype: str = 'float32',
                 special: dict[str, int] | None = None) -> dict[str, Any]:
  """config.json of the Llama model equal to loomax `model` (a model config as a dict)."""
  check_exportable(model)
  theta = float(model['rope_theta'])
  scaling, max_positions = hf_rope_scaling(model, max_positions)
  return {
      'architectures': [HF_ARCHITECTURE], 'model_type': 'llama',
      'vocab_size': int(model['vocab_size']), 'hidden_size': int(model['d_model']),
      'intermediate_size': int(model['mlp_dim']), 'num_hidden_layers': int(model['num_layers']),
      'num_attention_heads': int(model['num_heads']),
      'num_key_value_heads': int(model['num_kv_heads']), 'head_dim': int(model['head_dim']),
      'hidden_act': 'silu', 'max_position_embeddings': int(max_positions),
      'rms_norm_eps': float(model['norm_eps']), 'rope_theta': theta, 'rope_scaling': scaling,
      'rope_parameters': {**(scaling or {'rope_type': 'default'}), 'rope_theta': theta},
      'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0,
      'tie_word_embeddings': bool(model['tie_embeddings']),
      'initializer_range': float(model.get('init_std', 0.02)), 'pretraining_tp': 1,
      'use_cache': True, 'torch_dtype': dtype, 'dtype': dtype,
      **({'original_max_position_embeddings': scaling['original_max_position_embeddings']}
         if scaling and scaling['rope_type'] == 'longrope' else {}),   # HF reads it here
      **(special or {}),
  }


def to_hf(params: dict[str, np.ndarray], model: dict[str, Any]) -> dict[str, np.ndarray]:
  """loomax parameters (unrolled layout) -> HF Llama state dict (torch's [out, in] Linear)."""
  check_exportable(model)
  D, H, K, Dh = (int(model[k]) for k in ('d_model', 'num_heads', 'num_kv_heads', 'head_dim'))
  out = {'model.embed_tokens.weight': params['embed/table'],
         'model.norm.weight': params['final_norm/scale']}
  if not model['tie_embeddings']:
    out['lm_head.weight'] = params['head'].T
  for i in range(int(model['num_layers'])):
    p, q = f'blocks/{i}/', f'model.layers.{i}.'
    out[q + 'input_layernorm.weight'] = params[p + 'attn_norm/scale']
    out[q + 'post_attention_layernorm.weight'] = params[p + 'mlp_norm/scale']
    out[q + 'self_attn.q_proj.weight'] = params[p + 'attn/wq'].reshape(D, H * Dh).T
    out[q + 'self_attn.k_proj.weight'] = params[p + 'attn/wk'].reshape(D, K * Dh).T
    out[q + 'self_attn.v_proj.weight'] = params[p + 'attn/wv'].reshape(D, K * Dh).T
    out[q + 'self_attn.o_proj.weight'] = params[p + 'attn/wo'].reshape(H * Dh, D).T
    out[q + 'mlp.gate_proj.weight'] = params[p + 'mlp/w_gate'].T
    out[q + 'mlp.up_proj.weight'] = params[p + 'mlp/w_up'].T
    out[q + 'mlp.down_proj.weight'] = params[p + 'mlp/w_down'].T
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def model_config_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """loomax model.* values for an HF config.json; raises NotMappable naming the HF key."""
  def refuse(key, why):
    raise NotMappable(f'config.json {key}={hf.get(key)!r}: {why}; loomax\'s dense transformer '
                      'cannot compute the same function.')
  if hf.get('model_type') not in _IMPORTABLE_TYPES:
    refuse('model_type', f'only {_IMPORTABLE_TYPES} map to the dense family')
  if hf.get('model_type') == 'mistral' and hf.get('sliding_window'):
    refuse('sliding_window', 'sliding-window attention')
  if hf.get('hidden_act', 'silu') != 'silu':
    refuse('hidden_act', 'loomax uses SiLU-gated MLPs')
  for key in ('attention_bias', 'mlp_bias'):
    if hf.get(key):
      refuse(key, 'loomax projections have no bias')
  rope = hf.get('rope_parameters') or {}
  scaling = rope_scaling_from_hf(hf)
  if int(hf.get('pretraining_tp', 1) or 1) != 1:
    refuse('pretraining_tp', 'sliced projections')
  D, H = int(hf['hidden_size']), int(hf['num_attention_heads'])
  head_dim = int(hf.get('head_dim') or D // H)
  return {
      'name': 'transformer', 'vocab_size': int(hf['vocab_size']), 'd_model': D,
      'num_layers': int(hf['num_hidden_layers']), 'num_heads': H,
      'num_kv_heads': int(hf.get('num_key_value_heads') or H), 'head_dim': head_dim,
      'mlp_dim': int(hf['intermediate_size']),
      'rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
      'norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
      'tie_embeddings': bool(hf.get('tie_word_embeddings', False)),
      'sliding_window': 0, 'rope_scaling': scaling,
  }


# RoPE scaling: loomax `model.rope_scaling` keys <-> HF keys (modeling/rope.py has the formulas).
_ROPE_KEYS = {
    'linear': ('factor',),
    'yarn': ('factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow',
             'attention_factor', 'truncate'),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
    'longrope': ('factor', 'original_max_position_embeddings', 'attention_factor', 'long_factor'),
}
_LOOMAX_ROPE_DEFAULTS = {'type': 'none', 'factor': 1.0, 'original_max_position_embeddings': 0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'beta_fast': 32.0,
                         'beta_slow': 1.0, 'truncate': True, 'attention_factor': 0.0,
                         'long_factor': ''}


def hf_rope_scaling(model: dict[str, Any], max_positions: int = 0):
  """(HF rope_scaling dict or None, max_position_embeddings) for loomax `model`.

  HF's yarn and longrope take their factor as max_position_embeddings /
  original_max_position_embeddings when the latter is given, so those write
  max_position_embeddings = factor x L0 (factor x L0 must be a whole number).
  """
  sc = dict(model.get('rope_scaling') or {})
  kind = sc.get('type', 'none')
  if kind == 'none':
    return None, max_positions
  if kind not in _ROPE_KEYS:
    raise NotMappable(f'model.rope_scaling.type={kind!r}: HF has no static NTK rope (its '
                      "'dynamic' type changes the frequencies with the sequence length); Llama "
                      'cannot express it, so the export would not compute the same function.')
  out: dict[str, Any] = {'rope_type': kind}
  for key in _ROPE_KEYS[kind]:
    value = sc.get(key, _LOOMAX_ROPE_DEFAULTS[key])
    if key == 'attention_factor' and not value:
      continue   # 0 = the paper's default, which HF computes the same way
    if key == 'long_factor':
      value = [float(v) for v in str(value).split(',') if v.strip()] if isinstance(
          value, str) else [float(v) for v in value]
      out['short_factor'] = value   # loomax applies long_factor at every length
    out[key] = value
  if kind in ('yarn', 'longrope'):
    L0 = int(out['original_max_position_embeddings'])
    max_positions = out['factor'] * L0
    if max_positions != int(max_positions):
      raise NotMappable(f'model.rope_scaling.factor={out["factor"]!r}: HF {kind} derives the '
                        'factor as max_position_embeddings / original_max_position_embeddings, '
                        f'so factor x {L0} must be a whole number.')
    max_positions = int(max_positions)
  return out, max_positions


def rope_scaling_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """loomax model.rope_scaling values for an HF config (`rope_scaling` or v5
  `rope_parameters`); raises NotMappable naming the HF key."""
  params = hf.get('rope_parameters') or {}
  src = hf.get('rope_scaling') or params
  field = 'rope_scaling' if hf.get('rope_scaling') else 'rope_parameters'
  kind = src.get('rope_type', src.get('type', 'default')) if src else 'default'
  if kind == 'default':
    return dict(_LOOMAX_ROPE_DEFAULTS)

  def refuse(key, why):
    raise NotMappable(f'config.json {field}.{key}={src.get(key)!r}: {why}; loomax\'s dense '
                      'transformer cannot compute the same function.')
  if kind not in _ROPE_KEYS:
    refuse('rope_type', f'supported: default, {", ".join(_ROPE_KEYS)} (dynamic NTK changes the '
           'frequencies with the sequence length, which a decode cache cannot follow)')
  out = dict(_LOOMAX_ROPE_DEFAULTS, type=kind)
  max_pos = hf.get('max_position_embeddings')
  if kind == 'yarn':
    if src.get('mscale') or src.get('mscale_all_dim'):
      refuse('mscale', 'DeepSeek-style yarn attention scaling is not implemented')
    L0 = src.get('original_max_position_embeddings')
    factor = float(src['factor'])
    if L0:   # HF: the factor is then max_position_embeddings / L0
      factor = float(max_pos) / float(L0)
    out.update(factor=factor, original_max_position_embeddings=int(L0 or max_pos),
               beta_fast=float(src.get('beta_fast') or 32), beta_slow=float(src.get('beta_slow')
                                                                          or 1),
               attention_factor=float(src.get('attention_factor') or 0.0),
               truncate=bool(src.get('truncate', True)))
  elif kind == 'linear':
    out.update(factor=float(src['factor']))
  elif kind == 'llama3':
    out.update({k: float(src[k]) for k in ('factor', 'low_freq_factor', 'high_freq_factor')},
               original_max_position_embeddings=int(src['original_max_position_embeddings']))
  elif kind == 'longrope':
    if list(src.get('short_factor') or []) != list(src.get('long_factor') or []):
      refuse('short_factor', 'loomax applies long_factor at every length (HF switches to '
             'short_factor for sequences up to original_max_position_embeddings)')
    L0 = src.get('original_max_position_embeddings') or hf.get('original_max_position_embeddings')
    factor = float(max_pos) / float(L0) if L0 else float(src.get('factor') or 1.0)
    out.update(factor=factor, original_max_position_embeddings=int(L0 or max_pos),
               attention_factor=float(src.get('attention_factor') or 0.0),
               long_factor=','.join(repr(float(v)) for v in src['long_factor']))
  return out


_DERIVED = ('rotary_emb.inv_freq',)  # recomputed from rope_theta, not weights


def from_hf(tensors: dict[str, np.ndarray], model: dict[str, Any]) -> dict[str, np.ndarray]:
  """HF Llama state dict -> loomax parameters (unrolled layout); every tensor must be used."""
  D, H, K, Dh = (int(model[k]) for k in ('d_model', 'num_heads', 'num_kv_heads', 'head_dim'))
  left = {k: v for k, v in tensors.items() if not k.endswith(_DERIVED)}

  def take(name, shape):
    if name not in left:
      raise NotMappable(f'tensor {name} is missing from the safetensors files.')
    x = np.asarray(left.pop(name))
    if tuple(x.shape) != tuple(shape):
      raise NotMappable(f'tensor {name} has shape {tuple(x.shape)}, config.json implies '
                        f'{tuple(shape)}.')
    return x

  V, F = int(model['vocab_size']), int(model['mlp_dim'])
  out = {'embed/table': take('model.embed_tokens.weight', (V, D)),
         'final_norm/scale': take('model.norm.weight', (D,))}
  if model['tie_embeddings']:
    left.pop('lm_head.weight', None)  # some writers store the tied copy as well
  else:
    out['head'] = take('lm_head.weight', (V, D)).T
  for i in range(int(model['num_layers'])):
    p, q = f'blocks/{i}/', f'model.layers.{i}.'
    out[p + 'attn_norm/scale'] = take(q + 'input_layernorm.weight', (D,))
    out[p + 'mlp_norm/scale'] = take(q + 'post_attention_layernorm.weight', (D,))
    out[p + 'attn/wq'] = take(q + 'self_attn.q_proj.weight', (H * Dh, D)).T.reshape(D, H, Dh)
    out[p + 'attn/wk'] = take(q + 'self_attn.k_proj.weight', (K * Dh, D)).T.reshape(D, K, Dh)
    out[p + 'attn/wv'] = take(q + 'self_attn.v_proj.weight', (K * Dh, D)).T.reshape(D, K, Dh)
    out[p + 'attn/wo'] = take(q + 'self_attn.o_proj.weight', (D, H * Dh)).T.reshape(H, Dh, D)
    out[p + 'mlp/w_gate'] = take(q + 'mlp.gate_proj.weight', (F, D)).T
    out[p + 'mlp/w_up'] = take(q + 'mlp.up_proj.weight', (F, D)).T
    out[p + 'mlp/w_down'] = take(q + 'mlp.down_proj.weight', (D, F)).T
  if left:
    raise NotMappable(f'tensor {sorted(left)[0]} (and {len(left) - 1} more) has no loomax '
                      'counterpart.')
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# --- safetensors files (the format is an 8-byte header size, a JSON header, then raw tensors;
# read and written here so the core package needs neither torch nor the safetensors library) ---

_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
              'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8',
              'BOOL': 'bool'}


def _np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # installed with jax
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, 'rb') as f:
    size = int.from_bytes(f.read(8), 'little')
    try:
      header = json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f'{path}: not a safetensors file ({e}).') from None
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _ST_DTYPES:
      raise NotMappable(f'{path}: tensor {name} has dtype {info["dtype"]}.')
    start, end = info['data_offsets']
    out[name] = np.frombuffer(data[start:end], _np_dtype(_ST_DTYPES[info['dtype']])).reshape(
        info['shape'])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  names = {v: k for k, v in _ST_DTYPES.items()}
  header: dict[str, Any] = {'__metadata__': metadata or {}}
  offset, blobs = 0, []
  for name in sorted(tensors):
    x = np.ascontiguousarray(tensors[name])
    blob = x.tobytes()
    header[name] = {'dtype': names[x.dtype.name], 'shape': list(x.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  head = json.dumps(header, separators=(',', ':')).encode()
  head += b' ' * (-len(head) % 8)  # the data starts 8-byte aligned
  tmp = path + '.partial'
  with open(tmp, 'wb') as f:
    f.write(len(head).to_bytes(8, 'little'))
    f.write(head)
    for blob in blobs:
      f.write(blob)
  os.replace(tmp, path)
