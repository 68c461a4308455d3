"""Sharding is data: the mesh and logical-axis rules come from the config.

Model code names axes logically (`batch`, `embed`, `mlp`, `heads`, ...);
`config.logical_axis_rules` maps them to the mesh axes `data`, `fsdp`,
`tensor`. Data parallelism vs FSDP is a config switch (the mesh shape), not
a code path. This module is the only place that builds `NamedSharding`s.
"""
import contextlib

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from farmer_jax import config_lib


def create_mesh(config, devices=None) -> Mesh:
  """The `(data, fsdp, tensor)` mesh of `config.mesh_shape` over all devices."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.resolve_mesh_shape(config.mesh_shape, len(devices))
  return jax.make_mesh(shape, config_lib.MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules(config):
  return tuple((k, v) for k, v in config.logical_axis_rules)


@contextlib.contextmanager
def context(mesh: Mesh, config):
  """Mesh + logical rules active, so `nn.with_logical_constraint` binds."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules(config)):
    yield


def tree_shardings(boxed_tree, mesh: Mesh, config):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned`.

  Unboxed leaves (step counters, RNG keys, ...) are replicated. The result
  has the structure of `nn.meta.unbox(boxed_tree)`.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(config))


def batch_sharding(mesh: Mesh, config) -> NamedSharding:
  """Leading (batch) axis split as the rule for 'batch' says."""
  spec = nn.logical_to_mesh_axes(("batch",), rules(config))
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (the restore target)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, shardings)


def abstract_and_shardings(init_fn, mesh: Mesh, config):
  """Abstract first: `init_fn()`'s tree, unboxed, and its shardings.

  Args:
    init_fn: a no-argument function returning a tree whose leaves may be
      `nn.LogicallyPartitioned` (e.g. `model.init`'s params); only traced.
    mesh: the target mesh.
    config: holds `logical_axis_rules`.

  Returns:
    `(abstract, shardings)`: ShapeDtypeStructs carrying their shardings (an
    Orbax restore target), and the NamedShardings (for `out_shardings`).
  """
  boxed = jax.eval_shape(init_fn)
  shardings = tree_shardings(boxed, mesh, config)
  return with_shardings(nn.meta.unbox(boxed), shardings), shardings
