"""Import a Hugging Face Llama model directory as a params-only loomax universal checkpoint.

    python scripts/import_hf.py --hf hf/tiny --out runs/imported [--config configs/tiny.py]

The result has the layout scripts/convert_checkpoint.py --params-only writes (parameters plus
step and rng, no optimizer state, at step 0): start training from it with
--config.init_from=DIR, convert it to another mesh, layout or dtype, or export it again. Its
config is --config (default configs/base.py) with the model.* keys of config.json; an HF
tokenizer.json beside the weights is copied and named in data.tokenizer. Refuses what does
not map (checkpoint/hf.py) and an existing --out.
"""

import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--hf', required=True, help='directory with config.json and *.safetensors')
  p.add_argument('--out', required=True, help='new checkpoints directory')
  p.add_argument('--config', default=None,
                 help='loomax config file for the non-model keys (default: configs/base.py)')
  return p.parse_args(argv)


def load_config(path: str | None):
  import importlib.util

  from configs import base
  if path is None:
    return base.get_config()
  spec = importlib.util.spec_from_file_location('loomax_import_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def import_hf(hf_dir: str, out: str, config_path: str | None = None) -> dict:
  import jax
  import numpy as np

  from checkpoint import hf, metadata
  from checkpoint.manager import Checkpointer
  from parallelism import mesh as mesh_lib
  from training.program import build_program
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} exists; refusing to overwrite it')
  with open(os.path.join(hf_dir, 'config.json')) as f:
    hf_config = json.load(f)
  files = sorted(glob.glob(os.path.join(hf_dir, '*.safetensors')))
  if not files:
    raise FileNotFoundError(f'--hf {hf_dir}: no *.safetensors files (PyTorch .bin files are '
                            'not read; save the model with safe_serialization=True)')
  config = load_config(config_path)
  config.model.update(hf.model_config_from_hf(hf_config))
  config.model.update(scan_layers=False, param_dtype='float32', kv_routing={'p': 1.0,
                      'cache_every': 1, 'cache_layers': ''})
  tensors = {}
  for path in files:
    tensors.update(hf.read_safetensors(path))
  params = hf.from_hf(tensors, config.model.to_dict())

  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  tokenizer_json = os.path.join(hf_dir, 'tokenizer.json')
  if os.path.exists(tokenizer_json):
    os.makedirs(tmp)
    shutil.copyfile(tokenizer_json, os.path.join(tmp, 'tokenizer.json'))
    config.data.tokenizer = 'hf:' + os.path.join(os.path.abspath(out), 'tokenizer.json')
  devices = jax.devices()[:1]
  config.mesh.update({a: 1 for a in mesh_lib.AXES})  # any mesh reads it; this one is 1 device
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  setup = build_program(config, mesh).setup
  wanted = {p: i for p, i in metadata.state_arrays(setup).items()
            if metadata.item_of(p) != 'opt_state'}
  one = jax.sharding.SingleDeviceSharding(devices[0])
  arrays = {}
  for path, info in wanted.items():
    if metadata.item_of(path) == 'params':
      x = params.pop(path.split(metadata.SEP, 1)[1])
    elif path == 'step':
      x = np.zeros(info.shape, info.dtype)
    elif path == 'rng':
      x = np.asarray(jax.random.PRNGKey(config.seed), info.dtype)
    else:
      raise AssertionError(f'unexpected state array {path}')
    if tuple(x.shape) != tuple(info.shape):
      raise hf.NotMappable(f'{path}: the HF weights give shape {tuple(x.shape)}, the model '
                           f'config {tuple(info.shape)}.')
    arrays[path] = jax.device_put(np.asarray(x, info.dtype), one)
  assert not params, f'unused parameters {sorted(params)}'
  meta = metadata.describe(config, wanted, mesh, 1)
  meta['converted_from'] = {'hugging_face': os.path.abspath(hf_dir),
                            'model_type': hf_config.get('model_type')}
  try:
    ckpt = Checkpointer(tmp, keep=None, async_save=False)
    ckpt.save(0, arrays, meta, None)
    ckpt.close()
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {'arrays': len(arrays), 'out': out, 'tokenizer': config.data.tokenizer}


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    summary = import_hf(args.hf, args.out, args.config)
  except (ValueError, FileExistsError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'imported {summary["arrays"]} arrays into {summary["out"]} (step 0, params only; '
        f'data.tokenizer={summary["tokenizer"]})')
  return 0


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
