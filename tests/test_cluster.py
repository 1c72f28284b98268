"""Cluster start-up: explicit settings, 'auto' and detection of launchers; two processes started
the way `srun` starts them (SLURM environment only) join one mesh and train like one process."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from parallelism import distributed
from tests.helpers import tiny_config
from tests.test_multiprocess import OVERRIDES, ROOT, free_port, train_losses
from training import loop

CLUSTER_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                'SLURM_LOCALID', 'OMPI_MCA_orte_hnp_uri', 'OMPI_COMM_WORLD_SIZE',
                'KUBERNETES_SERVICE_HOST', 'JOB_COMPLETION_INDEX', 'TPU_WORKER_HOSTNAMES',
                'TPU_PROCESS_ADDRESSES', 'LOOMAX_COORDINATOR', 'LOOMAX_NUM_PROCESSES',
                'LOOMAX_PROCESS_ID')


def slurm_env(ntasks: int, procid: int, job_id: int) -> dict[str, str]:
  """What `srun --ntasks=N` sets on one node (the variables JAX's SlurmCluster reads and a few
  more a real step has)."""
  return {'SLURM_JOB_ID': str(job_id), 'SLURM_STEP_ID': '0', 'SLURM_NTASKS': str(ntasks),
          'SLURM_PROCID': str(procid), 'SLURM_LOCALID': str(procid), 'SLURM_NODEID': '0',
          'SLURM_STEP_NODELIST': 'localhost', 'SLURM_JOB_NODELIST': 'localhost',
          'SLURM_STEP_NUM_NODES': '1', 'SLURM_JOB_NUM_NODES': '1',
          'SLURM_NTASKS_PER_NODE': str(ntasks)}


@pytest.fixture
def clean_env(monkeypatch):
  for k in CLUSTER_VARS:
    monkeypatch.delenv(k, raising=False)
  return monkeypatch


def dist(**kw):
  d = base.get_config().distributed
  d.update(kw)
  return d


def test_settings_precedence(clean_env):
  assert distributed.settings(dist()).mode == 'single'
  for k, v in slurm_env(4, 2, 77).items():
    clean_env.setenv(k, v)
  s = distributed.settings(dist())
  assert (s.mode, s.cluster, s.coordinator, s.num_processes, s.process_id) == \
      ('auto', 'slurm', None, None, None)
  # Explicit settings win over the detected cluster.
  s = distributed.settings(dist(coordinator='h:1', num_processes=2, process_id=1))
  assert (s.mode, s.coordinator, s.num_processes, s.process_id) == ('explicit', 'h:1', 2, 1)
  clean_env.setenv('LOOMAX_PROCESS_ID', '0')
  assert distributed.settings(dist(num_processes=4)).process_id == 0
  # A one-task step is a single process: nothing to join.
  clean_env.setenv('SLURM_NTASKS', '1')
  clean_env.delenv('LOOMAX_PROCESS_ID')
  assert distributed.settings(dist()).mode == 'single'
  assert distributed.settings(dist(coordinator='auto')).mode == 'auto'


def test_detects_other_launchers(clean_env):
  clean_env.setenv('OMPI_MCA_orte_hnp_uri', '1234.0;tcp://10.0.0.1:5000')
  clean_env.setenv('OMPI_COMM_WORLD_SIZE', '8')
  assert distributed.detect_cluster() == 'ompi'
  clean_env.delenv('OMPI_MCA_orte_hnp_uri')
  clean_env.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert distributed.detect_cluster() == 'tpu'
  clean_env.setenv('TPU_WORKER_HOSTNAMES', 'w0')  # one host: single process
  assert distributed.detect_cluster() == ''


def test_bad_settings_name_the_key(clean_env):
  with pytest.raises(ValueError, match='distributed.num_processes.*distributed.coordinator'):
    distributed.settings(dist(num_processes=2, process_id=0))
  with pytest.raises(ValueError, match=r'distributed.coordinator=.*needs distributed.num_proc'):
    distributed.settings(dist(coordinator='h:1'))
  with pytest.raises(ValueError, match=r'distributed.process_id=3 must be in \[0, 2\)'):
    distributed.settings(dist(coordinator='h:1', num_processes=2, process_id=3))
  with pytest.raises(ValueError, match='host:port'):
    distributed.settings(dist(coordinator='nohost'))
  with pytest.raises(ValueError, match='distributed.local_device_ids'):
    distributed.local_device_ids(dist(local_device_ids='gpu0'))
  assert distributed.local_device_ids(dist()) == []
  assert distributed.local_device_ids(dist(local_device_ids='auto')) is None
  assert distributed.local_device_ids(dist(local_device_ids='0,1')) == [0, 1]


def test_slurm_step_trains_like_one_process(tmp_path):
  """Two processes with only srun's environment: 'auto' start-up by JAX's SlurmCluster
  (coordinator = first node of SLURM_STEP_NODELIST; the port from JAX_COORDINATOR_PORT, since
  JAX's default, derived from SLURM_JOB_ID, may be taken on a shared CI machine)."""
  steps, workdir = 3, tmp_path / 'slurm'
  workdir.mkdir()
  args = [f'--config.{k}={v}' for k, v in {**OVERRIDES, 'steps': steps, 'perf.peak_flops': 1e12,
                                             'progress': False}.items()]
  base_env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
  job_id, port = random.randrange(10**5, 10**6), free_port()
  procs = []
  for pid in range(2):
    env = {**base_env, **slurm_env(2, pid, job_id), 'JAX_COORDINATOR_PORT': str(port),
           'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}
    log = open(workdir / f'process{pid}.log', 'w')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py'), '--config', 'configs/tiny.py',
         '--workdir', str(workdir), *args], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT))
  loop.run(tiny_config(**OVERRIDES, **{'steps': steps, 'mesh.data': -1}), str(tmp_path / 'one'))
  try:
    for p in procs:
      assert p.wait(timeout=300) == 0, open(workdir / 'process0.log').read()[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  # Independent single-process runs would each write metrics here (2 x steps rows) and see
  # half the batch; one group writes `steps` rows from process 0, with the 1-process losses.
  multi = train_losses(str(workdir))
  assert len(multi) == steps
  np.testing.assert_allclose(multi, train_losses(str(tmp_path / 'one')), rtol=1e-5)
