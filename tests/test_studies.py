"""Smoke runs of the decode benchmark and the three study scripts (untrained models: the smoke
setting skips training so the test stays seconds long): each writes its table, the studies
their report and figure, and returns an exit status from its stated threshold."""

import json
import os

import pytest


def test_bench_decode_smoke(tmp_path, capsys):
  from scripts import bench_decode
  out = tmp_path / 'bd.json'
  bench_decode.main(['--smoke', '--json', str(out)])
  rows = json.load(open(out))['rows']
  by = {r['family']: r for r in rows}
  assert set(by) == {'transformer', 'cart', 'sambay'}
  assert all(r['context'] == 64 and r['tokens_per_s'] > 0 for r in rows)
  # SambaY's cache grows with one full-attention layer only: the smallest of the three.
  assert by['sambay']['cache_bytes'] < min(by['cart']['cache_bytes'],
                                           by['transformer']['cache_bytes'])
  assert '| 64 |' in capsys.readouterr().out


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
