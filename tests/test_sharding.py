"""Sharding layer: every mesh trains exactly like one device; bad meshes fail clearly."""

import jax
import ml_collections
import numpy as np
import pytest

from parallelism import mesh as mesh_lib
from parallelism import rules as rules_lib
from tests.helpers import Trainer, random_batch, tiny_config

MESHES = {
    'data8': dict(data=8),
    'fsdp8': dict(data=1, fsdp=8),
    'data2_fsdp4': dict(data=2, fsdp=4),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'fsdp4_tensor2': dict(data=1, fsdp=4, tensor=2),
}
STEPS = 3


def mesh_config(**sizes):
  return {f'mesh.{k}': v for k, v in sizes.items()}


@pytest.fixture(scope='module')
def batches():
  return [random_batch(tiny_config(), seed=s) for s in range(STEPS)]


@pytest.fixture(scope='module')
def reference(batches):
  t = Trainer(tiny_config(**mesh_config(data=1)), devices=jax.devices()[:1])
  return t.train(batches), t.params()


@pytest.mark.parametrize('name', list(MESHES))
def test_mesh_matches_single_device(name, batches, reference):
  t = Trainer(tiny_config(**mesh_config(**MESHES[name])))
  assert t.mesh.devices.size == 8
  losses = t.train(batches)
  ref_losses, ref_params = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               t.params(), ref_params)


def test_grad_accumulation_on_a_3d_mesh(batches, reference):
  t = Trainer(tiny_config(**mesh_config(data=2, fsdp=2, tensor=2),
                          **{'optimizer.grad_accum_steps': 2}))
  np.testing.assert_allclose(t.train(batches), reference[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               t.params(), reference[1])


def test_params_and_optimizer_state_are_born_sharded():
  t = Trainer(tiny_config(**mesh_config(data=1, fsdp=8)))

  def per_device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

  def total_bytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))

  for part in (t.state.params, t.state.opt_state):
    # Every parameter here has a dimension divisible by 8 on its 'embed' axis.
    assert per_device_bytes(part) * 8 <= total_bytes(part) + 64
  emb = t.state.params['embed']['table']
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')


def cfg_mesh(**sizes):
  c = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'context': 1, 'tensor': 1})
  c.update(sizes)
  return c


def test_minus_one_takes_the_rest():
  assert mesh_lib.mesh_shape(cfg_mesh(fsdp=2, tensor=2), 8) == dict(data=2, fsdp=2, context=1,
                                                                    tensor=2)


@pytest.mark.parametrize('sizes, message', [
    (dict(data=3, fsdp=2), 'mesh data=3 x fsdp=2 = 6 does not match 8 devices'),
    (dict(data=-1, fsdp=3), 'mesh fsdp=3 = 3 does not divide 8 devices'),
    (dict(data=-1, fsdp=-1), 'only one mesh axis may be -1'),
    (dict(data=0), 'mesh.data=0'),
])
def test_bad_mesh_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_shape(cfg_mesh(**sizes), 8)


def test_indivisible_parameter_names_it():
  # kv heads (2) are replicated over tensor=8; the 4 query heads cannot be.
  with pytest.raises(ValueError, match=r"w[qo].*of size 4 is not divisible by mesh tensor=8"):
    Trainer(tiny_config(**mesh_config(data=1, tensor=8)))


def test_rules_errors():
  mesh = mesh_lib.make_mesh(cfg_mesh(data=2, fsdp=4))
  rules = (('batch', ('data', 'fsdp')), ('embed', 'fsdp'))
  assert rules_lib.logical_to_spec(('batch', None), rules, mesh) == \
      jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  with pytest.raises(ValueError, match="'mlp' has no entry"):
    rules_lib.logical_to_spec(('mlp',), rules, mesh)
  with pytest.raises(ValueError, match='map mesh axis'):
    rules_lib.logical_to_spec(('batch', 'embed'), rules, mesh)
