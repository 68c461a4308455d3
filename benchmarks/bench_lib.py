"""Shared pieces of the benchmark scripts: model sizes, timing, tables.

Every benchmark builds its model from `configs/digits.py` (28x28x1 MNIST,
patch 4: N = 49 tokens of d = 16) with one row of `SIZES` applied, runs on
`jax.devices()[0]` alone (a (1, 1, 1) mesh) and prints a markdown table.
"""
import ast
import functools
import importlib.util
import os
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import sharding
from farmer_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (af_blocks, af_layers_per_block, af_width, ar_layers, ar_width);
# heads = width // 32. 'S' is the digits default model.
SIZES = {
    "XS": (2, 1, 32, 2, 32),
    "S": (4, 1, 64, 3, 96),
    "M": (4, 2, 128, 6, 192),
    "L": (4, 2, 256, 8, 384),
}


# The two configurations of the side-by-side with TARFlow's PyTorch
# code (same flow blocks, same parameter count, 64-d heads, MLP ratio 4):
# name: (image_size, channels, patch, af_width, af_blocks, af_layers_per_block,
#        batch). With `prior='farmer'` the AR prior has the flow's width and
# depth (ar_layers = af_layers_per_block), d_I = d / 2 (S) or 16 (M).
REFERENCE = {
    "refS": (8, 1, 2, 128, 4, 2, 64),
    "refM": (32, 3, 4, 256, 4, 4, 32),
}


def load_config(arg: str = ""):
  """`configs/digits.py:get_config(arg)`, unlocked."""
  path = os.path.join(REPO, "configs", "digits.py")
  spec = importlib.util.spec_from_file_location("configs_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def sized_config(size: str, batch_size: int = 64, **model_overrides):
  """The digits config with model size `size`, on a 1-device mesh."""
  config = load_config()
  af_blocks, af_layers, af_width, ar_layers, ar_width = SIZES[size]
  config.model.update(af_blocks=af_blocks, af_layers_per_block=af_layers,
                      af_width=af_width, af_heads=max(af_width // 32, 1),
                      ar_layers=ar_layers, ar_width=ar_width,
                      ar_heads=max(ar_width // 32, 1))
  config.model.update(model_overrides)
  config.update(batch_size=batch_size, mesh_shape=(1, 1, 1))
  return config


def apply_overrides(config, overrides) -> None:
  """`key.sub=value` strings (values as Python literals) into `config`."""
  for item in overrides:
    key, _, text = item.partition("=")
    *parents, name = key.strip().split(".")
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[name] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      node[name] = text


def reference_config(name: str, prior: str = "gaussian", batch_size: int = 0):
  """A `REFERENCE` row (or 'digits': the digits default) on a 1-device mesh.

  Args:
    name: 'refS', 'refM' or 'digits'.
    prior: 'gaussian' (the TARFlow ablation, as the PyTorch reference) or
      'farmer'.
    batch_size: 0 = the row's own batch (digits: 64).
  """
  config = load_config()
  if name != "digits":
    image, channels, patch, width, blocks, layers, batch = REFERENCE[name]
    d = patch * patch * channels
    config.model.update(
        image_size=image, channels=channels, patch_size=patch,
        af_width=width, af_heads=width // 64, af_blocks=blocks,
        af_layers_per_block=layers, ar_width=width, ar_heads=width // 64,
        ar_layers=layers, d_I=d // 2 if d < 32 else 16, K_I=16, K_R=16)
    config.batch_size = batch
  config.model.prior = prior
  if batch_size:
    config.batch_size = batch_size
  config.mesh_shape = (1, 1, 1)
  return config


def train_step_parts(config, device=None):
  """`(jitted_step, mesh, init_fn, abstract_state, batch, num_params)` on
  `device` alone (default `jax.devices()[0]`), a synthetic batch."""
  mesh = sharding.create_mesh(config, devices=[device or jax.devices()[0]])
  model = train.Farmer(config.model)
  tx, schedule = train.create_optimizer(config)
  init_fn, abstract, shardings = train.create_sharded_state(
      config, model, tx, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config)
  step = jax.jit(
      functools.partial(train.train_step, model=model, tx=tx,
                        schedule=schedule, config=config),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  s, c = config.model.image_size, config.model.channels
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (config.batch_size, s, s, c),
                                 dtype=np.uint8),
           "label": rng.integers(0, 10, (config.batch_size,), dtype=np.int32)}
  batch = jax.device_put(batch, batch_sharding)
  num_params = sum(a.size for a in jax.tree.leaves(abstract.params))
  return step, mesh, init_fn, abstract, batch, num_params


def perturbed_params(model, scale: float, seed: int = 0):
  """`model`'s initial parameters with N(0, scale^2) noise added to each,
  on the host: the flow's heads start at zero (the identity),
  so an untrained model inverts nothing interesting without it."""
  s, c = model.config.image_size, model.config.channels
  with jax.default_device(jax.devices("cpu")[0]):
    params = jax.jit(model.init)(jax.random.PRNGKey(seed),
                                 jnp.zeros((1, s, s, c)),
                                 jnp.zeros((1,), jnp.int32))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 2), len(leaves))
    params = jax.tree.unflatten(treedef, [
        a + scale * jax.random.normal(k, a.shape, a.dtype)
        for a, k in zip(leaves, keys)])
  return jax.device_get(params)


def flops_of(compiled) -> float:
  """XLA's FLOP count of a lowered or compiled step (its cost analysis);
  NaN where the backend gives none (a lowered step on a GPU)."""
  cost = compiled.cost_analysis()
  if not cost:  # a lowered (uncompiled) program on a GPU: no analysis.
    return float("nan")
  if isinstance(cost, (list, tuple)):  # older jax: one dict per module.
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def unrolled_flops(config, remat=None) -> float:
  """XLA's FLOP count of the train step of `config` with every layer
  unrolled (a scanned step's cost analysis counts each loop body once),
  lowered for the CPU (a GPU gives no analysis of a lowered program).

  `remat`, if given, replaces `config.model.remat`: False counts model
  FLOPs only, without the forward recomputed in the backward pass.
  """
  config = config.copy_and_resolve_references()
  config.model.scan_layers = False
  if remat is not None:
    config.model.remat = remat
  step, mesh, _, abstract, batch, _ = train_step_parts(
      config, jax.devices("cpu")[0])
  with sharding.context(mesh, config):
    return flops_of(step.lower(abstract, batch))


def memory_of(compiled) -> dict:
  """Bytes per device of a compiled program (XLA's memory analysis):
  `args`, `out`, `temp`, `alias` and `peak` = args + out + temp - alias
  (donated outputs reuse their arguments' buffers)."""
  mem = compiled.memory_analysis()
  out = dict(args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
             temp=mem.temp_size_in_bytes, alias=mem.alias_size_in_bytes)
  out["peak"] = out["args"] + out["out"] + out["temp"] - out["alias"]
  return out


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time of `fn()` (blocked until ready) over `repeats` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(n: int, repeats: int = 5) -> float:
  """FLOP/s of a jitted f32 `[n, n] @ [n, n]` on `jax.devices()[0]`."""
  device = jax.devices()[0]
  a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n)), device)
  b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n)), device)
  # Default precision (TF32 on recent GPUs): the peak of matmul_precision
  # 'default'; the float32 configs' 'highest' runs below it on a GPU.
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, b))
  return 2.0 * n ** 3 / median_seconds(lambda: matmul(a, b), repeats)


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} ({jax.device_count()}" \
         f" device(s), jax {jax.__version__})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A markdown table; floats get 3 significant digits (no exponent >= 1)."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
