"""Smoke runs of the decode benchmark and the three study scripts: each writes its table (and the
studies their report and figure) and returns an exit status from its stated threshold."""

import json
import os

import pytest


def test_bench_decode_smoke(tmp_path, capsys):
  from scripts import bench_decode
  out = tmp_path / 'bd.json'
  bench_decode.main(['--smoke', '--json', str(out)])
  rows = json.load(open(out))['rows']
  assert {r['family'] for r in rows} == {'transformer', 'cart', 'sambay'}
  by = {(r['family'], r['context']): r for r in rows}
  for fam in ('transformer', 'cart', 'sambay'):
    assert by[fam, 256]['cache_bytes'] > by[fam, 64]['cache_bytes'] > 0
    assert by[fam, 64]['tokens_per_s'] > 0
  # SambaY's cache grows with one full-attention layer only: the smallest at long context.
  assert by['sambay', 256]['cache_bytes'] < by['cart', 256]['cache_bytes']
  assert by['sambay', 256]['cache_bytes'] < by['transformer', 256]['cache_bytes']
  assert '| 256 |' in capsys.readouterr().out


@pytest.mark.parametrize('name', ['study_sambay', 'study_kv_routing', 'study_cart'])
def test_study_smoke_writes_report(name, tmp_path):
  import importlib
  study = importlib.import_module(f'scripts.{name}')
  status = study.main(['--smoke', '--out', str(tmp_path)])
  assert status in (0, 1)
  md = [f for f in os.listdir(tmp_path) if f.endswith('.md')]
  assert len(md) == 1
  text = open(tmp_path / md[0]).read()
  assert '- command:' in text and '- machine:' in text and '- date:' in text
  assert ('holds' if status == 0 else 'does NOT hold') in text
  assert os.path.getsize(tmp_path / md[0].replace('.md', '.png')) > 1000
