"""The automatic parallel planner: candidates respect the shapes, the memory model moves the
right way, every plan it prints compiles within its budget and trains, and mesh.auto runs."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from configs import cart_tiny, sambay_tiny
from parallelism.planner import documents, estimate as est, hardware, search, workload
from parallelism.planner.estimate import Candidate
from tests.helpers import tiny_config
from training import autoplan, calibration, loop


def _workload(config=None, seq_len=256, tokens=256 * 8):
  return workload.from_config(config or tiny_config(), seq_len, tokens)


def test_candidates_respect_shapes():
  w = _workload(seq_len=256, tokens=256 * 4)
  cands = list(search.candidates(w, hardware.PROFILES['h100'], 8))
  assert cands
  for c in cands:
    assert c.devices == 8
    assert w.rows % (c.data * c.fsdp * c.grad_accum) == 0
    assert w.heads % c.tensor == 0
    assert c.context == 1 or (c.context_impl != 'none' and w.seq_len % (2 * c.context) == 0)
  # every factorisation of 8 that the shapes allow appears
  meshes = {(c.data, c.fsdp, c.context, c.tensor) for c in cands}
  assert (4, 1, 1, 2) in meshes and (1, 1, 8, 1) in meshes and (8, 1, 1, 1) not in meshes


def test_memory_model_directions():
  w = _workload(seq_len=4096, tokens=4096 * 8)
  base = Candidate(8, 1, 1, 1, 'none', 'blockwise', 'none', 1)
  mem = lambda **kw: est.memory(Candidate(**{**base.__dict__, **kw}), w)['total']
  assert mem(remat='full') < mem(remat='dots') < mem()
  assert mem(data=1, fsdp=8) < mem()                       # fsdp shards the state
  assert mem(attention='xla') > 4 * mem()                  # dense scores are O(L^2)
  ring = lambda n: mem(data=1, context=n, context_impl='ring')
  assert ring(8) < ring(4) < ring(2)                       # context splits the activations


def test_time_model_charges_recompute_and_links():
  w = _workload(seq_len=4096, tokens=4096 * 8)
  hw = hardware.PROFILES['h100']
  t = lambda c: est.estimate(c, w, hw).time
  none = t(Candidate(8, 1, 1, 1, 'none', 'jax_nn', 'none', 1))
  full = t(Candidate(8, 1, 1, 1, 'none', 'jax_nn', 'full', 1))
  assert full['recompute'] > 0 == none['recompute'] and full['step'] > none['step']
  inter = hardware.Hardware(**{**hw.__dict__, 'devices_per_node': 2})
  assert (est.estimate(Candidate(1, 1, 1, 8, 'none', 'jax_nn', 'none', 1), w, inter).time['step']
          > t(Candidate(1, 1, 1, 8, 'none', 'jax_nn', 'none', 1))['step'])


def test_a_ring_hides_transfers_only_with_asynchronous_collectives():
  w = _workload(seq_len=4096, tokens=4096)
  ring = Candidate(1, 1, 8, 1, 'ring', 'blockwise', 'none', 1)
  cpu = hardware.PROFILES['cpu']
  assert not cpu.async_collectives and hardware.PROFILES['h100'].async_collectives
  overlapped = hardware.Hardware(**{**cpu.__dict__, 'async_collectives': True})
  sync = est.estimate(ring, w, cpu).time['comm_context']
  assert sync > est.estimate(ring, w, overlapped).time['comm_context'] >= 0


def test_hardware_profiles_parse():
  assert hardware.parse('h200').memory_bytes > hardware.parse('h100').memory_bytes
  custom = hardware.parse('custom:100,1000,50')
  assert custom.peak_flops == 100e12 and custom.intra_bytes_per_s == 50e9
  for bad in ('a100', 'custom:1,2'):
    with pytest.raises(ValueError, match='--hardware'):
      hardware.parse(bad)
  for hw in hardware.PROFILES.values():
    assert hw.source


def test_workload_counts_cart_loops():
  c = cart_tiny.get_config()
  w = workload.from_config(c, 128, 128 * 4)
  m = c.model
  assert w.effective_layers > m.num_layers     # the core counts once per application


def test_attention_speed_follows_the_head_layout():
  """A measured share for the candidate's per-device (query, kv) heads replaces the kernel's
  generic one: with 1:1 blocks measured twice as fast, tensor=2 (1 query head per device over
  H=2, K=1) models less attention time than context=2 (2 query heads on 1 kv head)."""
  c = tiny_config()
  c.model.update(num_heads=2, num_kv_heads=1, head_dim=64)
  w = workload.from_config(c, 4096, 4096)
  assert est.head_layout(2, 1, 1) == (2, 1) and est.head_layout(2, 1, 2) == (1, 1)
  assert est.head_layout(4, 2, 4) == (1, 1) and est.head_layout(8, 2, 2) == (4, 1)
  hw = hardware.Hardware(**{**hardware.PROFILES['cpu'].__dict__, 'attention_layouts': (
      ('blockwise', 2, 1, 0.1), ('blockwise', 1, 1, 0.2))})
  attn = lambda cand: est.estimate(cand, w, hw).time['compute']
  ctx = attn(Candidate(1, 1, 2, 1, 'ring', 'blockwise', 'none', 1))
  ten = attn(Candidate(1, 1, 1, 2, 'none', 'blockwise', 'none', 1))
  assert ten < ctx
  assert hw.attention_share('blockwise', 2, 1) == 0.1
  assert hw.attention_share('blockwise', 4, 4) == dict(hw.attention_efficiency)['blockwise']


def test_measured_remat_cost_replaces_the_recompute_share():
  w = _workload(seq_len=4096, tokens=4096 * 8)
  hw = hardware.PROFILES['cpu']
  cand = Candidate(8, 1, 1, 1, 'none', 'blockwise', 'dots', 1)
  assert est.estimate(cand, w, hw).time['recompute'] == 0       # dots: nothing redone
  slow = hardware.Hardware(**{**hw.__dict__, 'attention_remat': (('blockwise', 'dots', 1.5),)})
  t = est.estimate(cand, w, slow).time
  attn = est.estimate(cand, w, hw).time['compute'] - est.estimate(
      cand, dataclasses.replace(w, attention_flops=0.0), hw).time['compute']
  assert t['recompute'] == pytest.approx(0.5 * attn)


def test_scan_flops_are_their_own_term():
  """SambaY's selective scans come from the registry and run at the scan's share of peak."""
  w = workload.from_config(sambay_tiny.get_config(), 256, 256 * 8)
  dense = _workload()
  assert w.scan_flops > 0 == dense.scan_flops
  cand = Candidate(8, 1, 1, 1, 'none', 'blockwise', 'none', 1)
  hw = hardware.PROFILES['cpu']
  slow = hardware.Hardware(**{**hw.__dict__, 'scan_efficiency': hw.scan_efficiency / 10})
  t, t_slow = est.estimate(cand, w, hw).time, est.estimate(cand, w, slow).time
  assert t_slow['scan'] == pytest.approx(10 * t['scan'])
  assert t_slow['step'] - t['step'] == pytest.approx(9 * t['scan'])
  ring = est.estimate(Candidate(1, 1, 8, 1, 'ring', 'blockwise', 'none', 1), w, hw).time
  assert ring['scan'] > t['scan']       # the context-parallel scan's state correction


def test_calibrate_workload_measures_each_head_layout(tmp_path):
  c = sambay_tiny.get_config()
  hw = calibration.calibrate_workload(hardware.PROFILES['cpu'], c, devices=8, seq_len=64)
  layouts = {(impl, h, k) for impl, h, k, _ in hw.attention_layouts}
  # tensor 1, 2, 4 over 4 heads (2 kv heads): (4, 2), (2, 1), (1, 1), each kernel
  assert layouts == {(i, h, k) for i in ('xla', 'blockwise') for h, k in ((4, 2), (2, 1), (1, 1))}
  assert all(share > 0 for *_, share in hw.attention_layouts)
  assert 0 < hw.scan_efficiency != hardware.PROFILES['cpu'].scan_efficiency
  assert {(i, p) for i, p, _ in hw.attention_remat} == {
      (i, p) for i in ('xla', 'blockwise') for p in search.REMAT[1:]}
  assert all(ratio > 0 for *_, ratio in hw.attention_remat)
  hardware.save(hw, str(tmp_path / 'hw.json'))
  assert hardware.parse(str(tmp_path / 'hw.json')) == hw
  with pytest.raises(ValueError, match='needs gpu devices'):
    calibration.calibrate_workload(hardware.PROFILES['h100'], c, devices=8, seq_len=64)


def test_measured_layouts_replace_the_modelled_context_costs():
  """A measured (strategy, context, tensor) factor scales that candidate's attention and
  replaces its modelled transfers; a measured scan factor replaces the correction guess."""
  w = workload.from_config(sambay_tiny.get_config(), 4096, 4096)
  hw = hardware.PROFILES['cpu']
  ring = Candidate(1, 1, 8, 1, 'ring', 'blockwise', 'none', 1)
  base = est.estimate(ring, w, hw).time
  assert base['comm_context'] > 0
  measured = dataclasses.replace(hw, context_attention=(('blockwise', 'ring', 8, 1, 2.0),),
                                 scan_layouts=((8, 1, 3.0),))
  t = est.estimate(ring, w, measured).time
  assert 'comm_context' not in t                     # inside the measured attention time
  unsplit_scan = est.estimate(Candidate(8, 1, 1, 1, 'none', 'blockwise', 'none', 1), w, hw)
  assert t['scan'] == pytest.approx(3.0 * unsplit_scan.time['scan'])
  attn = lambda tt: tt['compute'] - tt['scan'] - 3 * w.matmul_flops * w.global_tokens / 8 / (
      hw.peak_flops * hw.matmul_efficiency)
  assert attn(t) == pytest.approx(2.0 * attn(base))
  # another strategy at the same split keeps the model
  other = Candidate(1, 1, 8, 1, 'token_ring', 'blockwise', 'none', 1)
  assert est.estimate(other, w, measured).time['comm_context'] > 0
  # ... and so does another per-block kernel
  dense = Candidate(1, 1, 8, 1, 'ring', 'xla', 'none', 1)
  assert est.estimate(dense, w, measured).time['comm_context'] > 0


def test_calibrate_layouts_measures_each_split(tmp_path):
  c = sambay_tiny.get_config()
  hw = calibration.calibrate_layouts(hardware.PROFILES['cpu'], c, devices=2, seq_len=64)
  assert {(k, i, n, t) for k, i, n, t, _ in hw.context_attention} == {
      (k, i, 2, 1) for k in ('xla', 'blockwise') for i in search.CONTEXT_IMPLS}
  assert {(n, t) for n, t, _ in hw.scan_layouts} == {(2, 1), (1, 2)}
  assert all(0 < f < 100 for *_, f in hw.context_attention + hw.scan_layouts)
  hardware.save(hw, str(tmp_path / 'hw.json'))
  assert hardware.parse(str(tmp_path / 'hw.json')) == hw
  with pytest.raises(ValueError, match='needs them here'):
    calibration.calibrate_layouts(hardware.PROFILES['cpu'], c, devices=16, seq_len=64)


@pytest.fixture(scope='module')
def planned():
  """The tiny dense model at 256 tokens x 8 rows on the 8 fake devices, 64 MiB each."""
  c = tiny_config()
  rows = autoplan.plan(c, devices=8, memory_bytes=64 * 2**20, seq_len=256, global_tokens=2048,
                       hw=hardware.PROFILES['cpu'], top=2, max_compiles=4)
  return c, rows


def test_first_choice_compiles_within_budget(planned):
  _, rows = planned
  first = rows[0]
  assert first.feasible and first.checked == 'compiled', first
  assert first.compiled_bytes <= 64 * 2**20
  compiled = [r for r in rows if r.checked == 'compiled']
  assert all(r.compiled_bytes > 0 for r in compiled)
  # rows that do not fit are ranked after every row that does
  fits = [r.feasible for r in rows]
  assert fits == sorted(fits, reverse=True)


def _family_config(name):
  if name == 'transformer':
    c = tiny_config()
  else:
    c = {'cart': cart_tiny, 'sambay': sambay_tiny}[name].get_config()
    c.perf.peak_flops, c.progress = 1e12, False
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    if name == 'cart':
      c.model.cart.update(prelude_layers=1, coda_layers=1, loops=2)
    else:
      c.model.sambay.window = 16
  c.batch_size, c.seq_len = 8, 64
  c.eval_every, c.eval_batches, c.log_every = -1, 0, 1
  return c


@pytest.mark.parametrize('family', ['transformer', 'cart', 'sambay'])
def test_top_plan_trains(family, tmp_path):
  """Every plan it prints runs: the top plan for each family trains 2 steps on 8 devices."""
  c = _family_config(family)
  rows = autoplan.plan(c, devices=8, memory_bytes=256 * 2**20, seq_len=c.seq_len,
                       global_tokens=c.batch_size * c.seq_len, hw=hardware.PROFILES['cpu'],
                       top=1, max_compiles=3)
  top = rows[0]
  assert top.feasible and top.checked == 'compiled', [(r.candidate, r.refused) for r in rows[:3]]
  cfg = autoplan.apply(c, top.candidate)
  cfg.steps = 2
  row = loop.run(cfg, str(tmp_path))
  assert row['step'] == 2 and math.isfinite(row['train/loss'])
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['mesh']['data'] == top.candidate.data


def test_static_pairs_follow_the_document_boundaries():
  """Full-length documents cost (L + 1) / 2 causal pairs per token whatever the context split
  (zigzag balances them); documents of L/4 cost (L/4 + 1) / 2."""
  w = _workload(seq_len=256, tokens=256 * 8)
  full = documents.Documents(np.full(8, 256), 1.0, 1.0, False)
  quarter = documents.Documents(np.full(32, 64), 1.0, 1.0, False)
  for ctx in (1, 2, 8):
    c = Candidate(8 // ctx, 1, ctx, 1, 'ring' if ctx > 1 else 'none', 'blockwise', 'none', 1)
    assert documents.static_pairs_per_token(c, w, full) == pytest.approx(257 / 2)
    assert documents.static_pairs_per_token(c, w, quarter) == pytest.approx(65 / 2)
  # pieces cut at row boundaries restart their positions
  assert documents._row_positions(np.array([300, 212]), 256)[1, :3].tolist() == [0, 1, 2]


def test_document_lengths_parse():
  assert len(documents.parse_lengths('lognormal:100,1.0')) > 1000
  assert documents.parse_lengths('pareto:32,1.2').min() >= 32
  c = tiny_config()
  assert documents.parse_lengths('data', corpus=lambda: autoplan.corpus_lengths(c)).min() >= 2
  with pytest.raises(ValueError, match='--doc_lengths'):
    documents.parse_lengths('weibull:1,2')


def test_a_length_distribution_brings_hybrid_dp_and_its_plan_trains(tmp_path):
  """With the corpus's document lengths the hybrid-DP candidates are ranked beside the static
  meshes, their compiled figure is the group program's, and the best of them trains."""
  c = tiny_config(**{'eval_every': -1, 'log_every': 1})
  lengths = autoplan.corpus_lengths(c)
  budget = 256 * 2**20
  rows = autoplan.plan(c, devices=8, memory_bytes=budget, seq_len=64, global_tokens=64 * 32,
                       hw=hardware.PROFILES['cpu'], top=1, max_compiles=2, doc_lengths=lengths)
  hybrid = [r for r in rows if r.candidate.hybrid and r.feasible]
  assert hybrid and all(r.candidate.tensor == 1 for r in hybrid)
  best = hybrid[0]
  cfg = autoplan.apply(c, best.candidate, seq_len=64, global_tokens=64 * 32)
  assert cfg.parallelism.hybrid_dp.enabled and cfg.batch_size == best.candidate.documents
  assert 0 < autoplan.compile_memory(cfg, jax.devices()[:8]) <= budget
  assert '--config.parallelism.hybrid_dp.layouts=(1,2,4,8)' in autoplan.flags(best.candidate)
  cfg.steps = 2
  row = loop.run(cfg, str(tmp_path))
  assert row['step'] == 2 and math.isfinite(row['train/loss'])


def test_mesh_auto_runs_and_logs(tmp_path, caplog):
  c = tiny_config(**{'mesh.auto': True, 'mesh.auto_memory_gib': 0.25, 'steps': 2,
                     'eval_every': -1, 'log_every': 1})
  with caplog.at_level('INFO', logger='loomax'):
    row = loop.run(c, str(tmp_path))
  assert row['step'] == 2 and np.isfinite(row['train/loss'])
  chosen = [r.getMessage() for r in caplog.records if 'mesh.auto chosen' in r.getMessage()]
  assert chosen, [r.getMessage() for r in caplog.records][:20]
  assert json.load(open(tmp_path / 'config.json'))['mesh']['auto'] is False


def test_compile_always_without_devices_is_an_error():
  with pytest.raises(ValueError, match='--compile=always needs 64 gpu devices'):
    autoplan.plan(tiny_config(), devices=64, memory_bytes=2**30, seq_len=256,
                  global_tokens=256 * 64, hw=hardware.PROFILES['h100'], compile='always')


def test_large_targets_are_modelled_only():
  """64 H100s at 128K: no compile here, the rows say 'modelled' and the first fits."""
  c = tiny_config()
  c.model.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 mlp_dim=14336, vocab_size=128256)
  rows = autoplan.plan(c, devices=64, memory_bytes=80e9, seq_len=131072,
                       global_tokens=131072 * 8, hw=hardware.PROFILES['h100'])
  assert rows[0].feasible and rows[0].checked == 'modelled'
  assert rows[0].candidate.context > 1 or rows[0].candidate.remat != 'none'
  assert jax.device_count() < 64


def test_plan_cli_prints_ranked_rows_and_writes_json(tmp_path, capsys):
  from scripts import plan as plan_cli
  out = tmp_path / 'plan.json'
  # 2 devices: --calibrate_kernels also measures each (context, tensor) split of them here
  assert plan_cli.main(['--config', 'configs/sambay_tiny.py', '--devices', '2',
                        '--device_memory_gib', '0.5', '--seq_len', '256',
                        '--global_batch_tokens', '2048', '--hardware', 'cpu', '--compile',
                        'never', '--calibrate_kernels', '--json', str(out),
                        '--config.model.num_layers=8']) == 0
  text = capsys.readouterr().out
  assert 'first choice: --config.mesh.data=' in text
  d = json.loads(out.read_text())
  assert d['hardware']['attention_layouts'] and d['hardware']['scan_efficiency'] > 0
  assert d['hardware']['context_attention'] and d['hardware']['scan_layouts']
  steps = [r['time']['step'] for r in d['rows'] if r['feasible']]
  assert steps == sorted(steps) and all(r['checked'] == 'modelled' for r in d['rows'])
  assert all(r['time']['scan'] > 0 for r in d['rows'])
  with pytest.raises(SystemExit, match='model.nope'):
    plan_cli.main(['--config', 'configs/tiny.py', '--config.model.nope=1'])
  # a length distribution: hybrid-DP rows join, with their keys to paste
  assert plan_cli.main(['--config', 'configs/tiny.py', '--devices', '8', '--seq_len', '256',
                        '--global_batch_tokens', '8192', '--hardware', 'cpu', '--compile',
                        'never', '--doc_lengths', 'lognormal:64,1.0', '--json', str(out)]) == 0
  assert 'documents lognormal:64,1.0 (median' in capsys.readouterr().out
  rows = json.loads(out.read_text())['rows']
  hybrid = [r for r in rows if r['overrides'].get('parallelism.hybrid_dp.enabled')]
  assert hybrid and all(r['overrides']['batch_size'] % 8 == 0 for r in hybrid)
  with pytest.raises(SystemExit, match='--doc_lengths'):
    plan_cli.main(['--config', 'configs/tiny.py', '--doc_lengths', 'zipf:1,2'])
