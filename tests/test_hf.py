"""Hugging Face interop: an exported checkpoint computes loomax's logits (against a numpy Llama
reference always, and transformers itself when the [hf] extra is installed), import gives the
same weights back as a params-only universal checkpoint, and what does not map is refused."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from checkpoint import hf, integrity, metadata, universal
from checkpoint.manager import Checkpointer
from parallelism import mesh as mesh_lib
from scripts import export_hf, import_hf
from tests.helpers import Trainer, tiny_config
from tests.llama_reference import llama_logits
from tests.test_convert import read_all
from training.program import build_program

TOKENS = np.array([3, 17, 200, 5, 99, 42, 7, 7, 250, 1, 0, 128], np.int32)


def perturbed_checkpoint(directory, **overrides):
  """A tiny GQA model whose every weight (norm scales too) is random, saved like training does."""
  c = tiny_config(**{'model.num_layers': 2, 'model.rope_theta': 500.0, 'model.norm_eps': 1e-5,
                     **overrides})
  t = Trainer(c, devices=jax.devices()[:1])
  rng = np.random.default_rng(1)
  params = jax.tree.map(  # numpy noise: no per-shape compiles
      lambda p: jax.device_put(np.asarray(p) + 0.2 * rng.standard_normal(p.shape, np.float32),
                               p.sharding), t.state.params)
  state = t.state.replace(params=params)
  ckpt = Checkpointer(str(directory), async_save=False)
  universal.save_state(ckpt, 3, state,
                       metadata.describe(c, metadata.state_arrays(t.program.setup), t.mesh), None)
  ckpt.close()
  T = len(TOKENS)

  @jax.jit
  def logits(params):
    model = nnx.merge(t.program.setup.graphdef, params)
    h = model(TOKENS[None], segment_ids=np.ones((1, T), np.int32),
              positions=np.arange(T, dtype=np.int32)[None])
    return model.logits(h)[0]

  return c, np.asarray(logits(params))


@pytest.fixture(scope='module', params=[{'model.tie_embeddings': True, 'model.scan_layers': True},
                                        {'model.tie_embeddings': False}],
                ids=['tied-scanned', 'untied'])
def exported(request, tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  config, logits = perturbed_checkpoint(root / 'ckpt', **request.param)
  assert export_hf.main(['--checkpoint', str(root / 'ckpt'), '--out', str(root / 'hf')]) == 0
  return root, config, logits


def test_export_matches_llama_reference(exported):
  root, config, logits = exported
  hf_config = json.load(open(root / 'hf' / 'config.json'))
  tensors = hf.read_safetensors(str(root / 'hf' / 'model.safetensors'))
  assert hf_config['num_key_value_heads'] == 2 and hf_config['num_attention_heads'] == 4
  assert hf_config['tie_word_embeddings'] == config.model.tie_embeddings
  assert ('lm_head.weight' in tensors) != config.model.tie_embeddings
  ref = llama_logits(hf_config, tensors, TOKENS)
  assert np.abs(ref - logits).max() <= 1e-4, np.abs(ref - logits).max()


def test_export_loads_in_transformers(exported):
  transformers = pytest.importorskip('transformers', reason='the [hf] extra is not installed')
  import torch
  root, _, logits = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(str(root / 'hf'),
                                                            torch_dtype=torch.float32)
  with torch.no_grad():
    out = model(torch.tensor(TOKENS[None], dtype=torch.long)).logits[0].numpy()
  diff = float(np.abs(out - logits).max())
  print(f'transformers vs loomax logits: max abs diff {diff:.2e}')
  assert diff <= 1e-4


def test_import_round_trip(exported, tmp_path):
  root, config, _ = exported
  out = tmp_path / 'imported'
  assert import_hf.main(['--hf', str(root / 'hf'), '--out', str(out)]) == 0
  back, meta = read_all(str(out))
  assert meta['items'] == ['params', 'train'] and meta['layout'] == 'unrolled'
  # Same weights as the checkpoint, whatever its layout (the scanned one stacks the layers).
  orig, _, _ = export_hf.consolidated_params(str(root / 'ckpt'), None)
  assert {f'params/{k}' for k in orig} == {p for p in back if p.startswith('params/')}
  for k, x in orig.items():
    np.testing.assert_array_equal(back[f'params/{k}'], x, err_msg=k)
  # init_from's restore (universal.restore_params) reads it onto another mesh and layout.
  c = tiny_config(**{**{k: config.model[k.split('.')[1]] for k in (
      'model.num_layers', 'model.rope_theta', 'model.norm_eps', 'model.tie_embeddings')},
      'model.scan_layers': True, 'mesh.data': 2, 'mesh.fsdp': 2})
  program = build_program(c, mesh_lib.make_mesh(c.mesh, devices=jax.devices()[:4]))
  params, _ = universal.restore_params(Checkpointer(str(out), read_only=True), 0, c,
                                       program.setup, program.mesh)
  np.testing.assert_array_equal(np.asarray(params['params/blocks/attn/wq'][1]),
                                orig['blocks/1/attn/wq'])
  assert params['params/embed/table'].sharding.mesh.shape['fsdp'] == 2


def test_refusals_name_the_key(tmp_path):
  model = tiny_config().model.to_dict()
  for key, value, match in (('sliding_window', 16, 'model.sliding_window=16'),
                            ('rope_theta', 0.0, r'model.rope_theta=0.0.*NoPE'),
                            ('name', 'cart', "model.name='cart'")):
    with pytest.raises(hf.NotMappable, match=match):
      hf.check_exportable({**model, key: value})
  with pytest.raises(hf.NotMappable, match='cache_every'):
    hf.check_exportable({**model, 'kv_routing': {'cache_every': 2}})
  good = hf.llama_config(model, max_positions=32)
  for key, value in (('rope_scaling', {'rope_type': 'dynamic', 'factor': 4.0}),
                     ('attention_bias', True), ('hidden_act', 'gelu'), ('model_type', 'gemma')):
    with pytest.raises(hf.NotMappable, match=f'config.json {key}[.=]'):
      hf.model_config_from_hf({**good, key: value})
  m = hf.model_config_from_hf(good)
  assert {k: m[k] for k in ('num_kv_heads', 'head_dim', 'norm_eps', 'tie_embeddings')} == \
      {'num_kv_heads': 2, 'head_dim': 16, 'norm_eps': model['norm_eps'], 'tie_embeddings': True}
  rng = np.random.default_rng(0)
  params = {}
  c = tiny_config(**{'mesh.data': 1})
  setup = build_program(c, mesh_lib.make_mesh(c.mesh, devices=jax.devices()[:1])).setup
  for p, i in metadata.state_arrays(setup).items():
    if p.startswith('params/'):
      params[p[7:]] = rng.normal(size=i.shape).astype(np.float32)
  tensors = hf.to_hf(params, model)
  back = hf.from_hf(tensors, m)
  assert all(np.array_equal(back[k], params[k]) for k in params)
  with pytest.raises(hf.NotMappable, match='tensor model.layers.0.self_attn.q_proj.bias'):
    hf.from_hf({**tensors, 'model.layers.0.self_attn.q_proj.bias': np.zeros(64)}, m)
  with pytest.raises(hf.NotMappable, match=r'model.norm.weight has shape \(3,\)'):
    hf.from_hf({**tensors, 'model.norm.weight': np.zeros(3)}, m)
  # safetensors round trip, bfloat16 included.
  path = str(tmp_path / 'x.safetensors')
  x = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(3, hf._np_dtype('bfloat16'))}
  hf.write_safetensors(path, x)
  y = hf.read_safetensors(path)
  assert all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


def test_export_refuses_before_reading_arrays(exported, tmp_path, capsys):
  """An unmappable model config is refused from the checkpoint's metadata alone."""
  root, _, _ = exported
  swa = tmp_path / 'swa'
  shutil.copytree(root / 'ckpt', swa)
  meta_file = os.path.join(str(swa), '3', 'meta', 'metadata')
  meta = json.load(open(meta_file))
  meta['config']['model']['sliding_window'] = 8
  meta['meta_checksum'] = integrity.meta_checksum(meta)  # a consistent step, not a damaged one
  json.dump(meta, open(meta_file, 'w'))
  assert export_hf.main(['--checkpoint', str(swa), '--out', str(tmp_path / 'out')]) == 1
  assert 'model.sliding_window=8' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'out')
  assert export_hf.main(['--checkpoint', str(root / 'ckpt'), '--out', str(root / 'hf')]) == 1
  assert 'exists' in capsys.readouterr().err


@pytest.mark.parametrize('script', ['export_hf.py', 'import_hf.py'])
def test_cli_help(script):
  out = subprocess.run([sys.executable, f'scripts/{script}', '--help'], capture_output=True,
                       text=True, check=True).stdout
  assert '--out' in out


# --- RoPE scaling (model.rope_scaling <-> HF rope_scaling / rope_parameters) ---

LLAMA3 = {'type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16}


def _logits(model_cfg: dict, flat: dict, tokens) -> np.ndarray:
  """Logits of a dense model built from a model config dict and unrolled 'a/0/b' parameters."""
  import ml_collections

  from modeling import registry
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: registry.build_model(
      ml_collections.ConfigDict(model_cfg), rngs=nnx.Rngs(0))))
  nested: dict = {}
  for path, x in flat.items():
    node, *keys = nested, *[int(k) if k.isdigit() else k for k in path.split('/')]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = np.asarray(x)
  model = nnx.merge(graphdef, nested)
  T = len(tokens)
  h = model(tokens[None], segment_ids=np.ones((1, T), np.int32),
            positions=np.arange(T, dtype=np.int32)[None])
  return np.asarray(model.logits(h)[0])


def test_llama3_scaled_export_reimport_same_logits(tmp_path):
  """A tiny Llama with llama3 scaling (positions past L0=16 inside the sequence): the export
  equals the numpy Llama with HF's llama3 frequencies, and re-importing it gives the same
  config and the same logits."""
  from tests.test_rope_scaling import hf_llama3
  tokens = np.tile(TOKENS, 3)   # 36 positions > L0
  config, _ = perturbed_checkpoint(tmp_path / 'ckpt', **{f'model.rope_scaling.{k}': v
                                                         for k, v in LLAMA3.items()})
  assert export_hf.main(['--checkpoint', str(tmp_path / 'ckpt'), '--out', str(tmp_path / 'hf')]) == 0
  hf_config = json.load(open(tmp_path / 'hf' / 'config.json'))
  assert hf_config['rope_theta'] == 500.0
  assert hf_config['rope_scaling'] == {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                       'high_freq_factor': 4.0,
                                       'original_max_position_embeddings': 16}
  assert hf_config['rope_parameters']['rope_type'] == 'llama3'
  assert import_hf.main(['--hf', str(tmp_path / 'hf'), '--out', str(tmp_path / 'back')]) == 0
  back, meta = read_all(str(tmp_path / 'back'))
  model_cfg = meta['config']['model']
  assert {k: model_cfg['rope_scaling'][k] for k in LLAMA3} == LLAMA3
  orig, _, _ = export_hf.consolidated_params(str(tmp_path / 'ckpt'), None)
  ours = _logits(config.model.to_dict(), orig, tokens)
  again = _logits(model_cfg, {k[len('params/'):]: v for k, v in back.items()
                              if k.startswith('params/')}, tokens)
  np.testing.assert_array_equal(again, ours)
  inv, att = hf_llama3(500.0, 16, 8.0, 1.0, 4.0, 16)
  tensors = hf.read_safetensors(str(tmp_path / 'hf' / 'model.safetensors'))
  ref = llama_logits(hf_config, tensors, tokens, inv_freq=inv, attention_factor=att)
  assert np.abs(ref - ours).max() <= 1e-4, np.abs(ref - ours).max()
  plain = llama_logits(hf_config, tensors, tokens)
  assert np.abs(plain - ours).max() > 1e-2   # the scaling matters on this sequence
  transformers = pytest.importorskip('transformers', reason='the [hf] extra is not installed')
  import torch
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                            torch_dtype=torch.float32)
  with torch.no_grad():
    out = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
  assert np.abs(out - ours).max() <= 1e-4


@pytest.mark.parametrize('scaling', [
    {'type': 'linear', 'factor': 4.0},
    {'type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 256, 'beta_fast': 16.0,
     'beta_slow': 2.0},
    {'type': 'longrope', 'factor': 4.0, 'original_max_position_embeddings': 256,
     'long_factor': ','.join(str(1.0 + i) for i in range(8))},
    dict(LLAMA3)])
def test_rope_scaling_config_round_trip(scaling):
  model = tiny_config(**{f'model.rope_scaling.{k}': v for k, v in scaling.items()}).model.to_dict()
  back = hf.model_config_from_hf(hf.llama_config(model, max_positions=1024))['rope_scaling']
  for key, value in scaling.items():
    assert back[key] == (value if key != 'long_factor' else
                         ','.join(repr(float(v)) for v in value.split(','))), key


def test_rope_scaling_import_follows_hf_rules():
  good = hf.llama_config(tiny_config().model.to_dict(), max_positions=32)
  # Llama 3.1's published values, theta 500000.
  m = hf.model_config_from_hf({**good, 'rope_theta': 500000.0, 'rope_parameters': None,
                               'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0,
                                                'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                                'original_max_position_embeddings': 8192}})
  assert m['rope_theta'] == 500000.0 and m['rope_scaling']['type'] == 'llama3'
  # HF yarn with original_max_position_embeddings takes factor = max_positions / L0.
  y = hf.model_config_from_hf({**good, 'max_position_embeddings': 131072, 'rope_scaling': {
      'type': 'yarn', 'factor': 3.0, 'original_max_position_embeddings': 32768}})['rope_scaling']
  assert y['factor'] == 4.0 and y['original_max_position_embeddings'] == 32768
  # transformers v5 puts everything in rope_parameters.
  v5 = hf.model_config_from_hf({**good, 'rope_scaling': None, 'rope_parameters': {
      'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e6}})
  assert v5['rope_scaling']['type'] == 'linear' and v5['rope_theta'] == 1e6
  with pytest.raises(hf.NotMappable, match=r'rope_scaling\.mscale='):
    hf.model_config_from_hf({**good, 'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0,
                                                      'mscale': 0.7, 'mscale_all_dim': 0.7}})
  with pytest.raises(hf.NotMappable, match=r'model\.rope_scaling\.type=.ntk.*dynamic'):
    hf.check_exportable({**tiny_config().model.to_dict(),
                         'rope_scaling': {'type': 'ntk', 'factor': 2.0}})
