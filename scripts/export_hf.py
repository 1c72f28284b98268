"""Export a dense loomax checkpoint as a Hugging Face Llama model directory.

    python scripts/export_hf.py --checkpoint runs/tiny --out hf/tiny [--step N] [--dtype float32]

Writes config.json + model.safetensors (+ tokenizer.json and tokenizer_config.json when the
run used data.tokenizer=hf:PATH) that transformers.AutoModelForCausalLM.from_pretrained loads
and that computes the same logits (checkpoint/hf.py says why the mapping is exact and what it
refuses). Needs neither torch nor transformers. Refuses an existing --out.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ('float32', 'float16', 'bfloat16')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--checkpoint', required=True, help='a workdir or its checkpoints directory')
  p.add_argument('--out', required=True, help='new Hugging Face model directory')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  p.add_argument('--dtype', default='float32', choices=DTYPES, help='dtype of the weights written')
  return p.parse_args(argv)


def consolidated_params(checkpoint: str, step: int | None) -> tuple[dict, dict, int]:
  """(params by path in the unrolled layout as float32 numpy, the run's config, step)."""
  import numpy as np

  from checkpoint import convert as convert_lib
  from training.program import build_program
  with tempfile.TemporaryDirectory() as tmp:
    npz = os.path.join(tmp, 'params.npz')
    req = convert_lib.Request(src=checkpoint, dst=npz, step=step, mesh={'data': 1},
                              params_only=True, layout='unrolled', dtype='float32',
                              export='npz')
    convert_lib.convert(lambda c, m: build_program(c, m).setup, req, out=lambda s: None,
                        progress=False)
    with open(npz + '.json') as f:
      side = json.load(f)
    with np.load(npz) as z:
      params = {k: np.asarray(z[k]) for k in z.files}
  return params, side['config'], side['step']


def tokenizer_files(config: dict, out: str) -> dict:
  """Copies an HF tokenizer next to the weights; returns the special ids config.json names."""
  spec = config.get('data', {}).get('tokenizer', 'bytes')
  if not spec.startswith('hf:'):
    print(f'note: data.tokenizer={spec!r} is not an HF tokenizer; no tokenizer files written')
    return {}
  path = spec[3:]
  path = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
  shutil.copyfile(path, os.path.join(out, 'tokenizer.json'))
  with open(path) as f:
    added = [t for t in json.load(f).get('added_tokens', []) if t.get('special')]
  tok_config = {'tokenizer_class': 'PreTrainedTokenizerFast',
                'model_max_length': int(config['seq_len']), 'add_bos_token': False,
                'add_eos_token': False, 'clean_up_tokenization_spaces': False}
  special = {}
  if added:  # the first special token (train_tokenizer.py's '<|endoftext|>') ends documents
    tok_config['eos_token'] = added[0]['content']
    special = {'eos_token_id': int(added[0]['id'])}
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(tok_config, f, indent=1)
  return special


def export(checkpoint: str, out: str, *, step: int | None = None,
           dtype: str = 'float32') -> dict:
  from checkpoint import hf
  from checkpoint.convert import resolve_src
  from checkpoint.manager import Checkpointer
  if os.path.exists(out):
    raise FileExistsError(f'--out {out} exists; refusing to overwrite it')
  src = Checkpointer(resolve_src(checkpoint), read_only=True)
  which = src.latest_step() if step is None else step
  if which is None:
    raise FileNotFoundError(f'--checkpoint {checkpoint}: no checkpoint found')
  hf.check_exportable(src.read_meta(which)['config']['model'])  # before reading any array
  params, config, step = consolidated_params(checkpoint, which)
  tensors = hf.to_hf(params, config['model'])
  tensors = {k: v.astype(hf._np_dtype(dtype)) for k, v in tensors.items()}
  tmp = out + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  special = tokenizer_files(config, tmp)
  hf_config = hf.llama_config(config['model'], max_positions=int(config['seq_len']),
                              dtype=dtype, special=special)
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=1)
  hf.write_safetensors(os.path.join(tmp, 'model.safetensors'), tensors, {'format': 'pt'})
  os.replace(tmp, out)
  return {'step': step, 'tensors': len(tensors), 'out': out}


def main(argv=None) -> int:
  args = parse_args(argv)
  from checkpoint.manager import CheckpointError
  try:
    summary = export(args.checkpoint, args.out, step=args.step, dtype=args.dtype)
  except (ValueError, FileExistsError, FileNotFoundError, CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'exported step {summary["step"]} ({summary["tensors"]} tensors) to {summary["out"]}')
  return 0


def cli():
  """The console script (pyproject.toml): a user error is one line, status 2."""
  from training.safety.errors import run_cli
  run_cli(main)


if __name__ == '__main__':
  cli()
