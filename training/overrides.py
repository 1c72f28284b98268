"""One-line errors for command-line config overrides that name no config key.

ml_collections reports a misspelt `--config.model.num_layer=3` as three chained exceptions
inside absl's flag parsing; `unknown_key_error` finds the offending override and says, in one
line, which key is unknown and which existing keys are closest (difflib).
"""

import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

_PREFIX = '--config.'


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a `--config` value 'path/to/file.py[:arg]'."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_loomax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out.extend(flat_keys(value, f'{prefix}{key}.'))
  return out


def unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
  """A one-line message when dotted `key` is not in `config`, else None."""
  node = config
  for depth, part in enumerate(key.split('.')):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = flat_keys(config)
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
      if not close:  # compare the last part with the keys of the deepest known level
        level = '.'.join(key.split('.')[:depth])
        siblings = [k for k in known if k.rpartition('.')[0] == level]
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else (
          '; every key is listed in configs/base.py')
      return f'unknown config key {key!r} (from --config.{key}){hint}'
    node = node[part]
  return None


def override_keys(argv: Sequence[str]) -> list[str]:
  """Dotted keys of the `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments."""
  return [a[len(_PREFIX):].split('=', 1)[0] for a in argv if a.startswith(_PREFIX)]


def config_spec(argv: Sequence[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def unknown_key_error(argv: Sequence[str]) -> str | None:
  """The one-line message for the first unknown override key in `argv`, if any."""
  spec = config_spec(argv)
  if spec is None or not os.path.exists(spec.partition(':')[0]):
    return None
  config = load_config_file(spec)
  for key in override_keys(argv):
    message = unknown_key(config, key)
    if message:
      return message
  return None
