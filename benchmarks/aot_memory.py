r"""Ahead-of-time compiled memory of the paper-size train step, per slice.

For each row `SIZE/PATCH@SLICE` it builds `configs/imagenet.py:res=256,
size=SIZE,patch=PATCH,slice=SLICE` (the documented launch: mesh, remat,
gradient accumulation; without `slice=` where its LAUNCH table has no such
row, i.e. full FSDP and no accumulation), lowers and compiles the real jitted train step
(`train.train_step` with the state's shardings, donated) for an abstract
mesh of that slice, and prints XLA's memory analysis of the executable per
device. Nothing is allocated: state and batch are `jax.ShapeDtypeStruct`s
with `NamedSharding`s (`train.create_sharded_state`'s abstract state).

Compiler, per slice:
  * TPU slices compile with the TPU compiler itself (libtpu, through
    `jax.experimental.topologies`) when `jax[tpu]` is installed
    (`pip install -e .[tpu_compile]`); no TPU is needed. Without it, or with
    --cpu, they compile on fake CPU devices of the same mesh shape.
  * GPU slices (8xH100) compile on fake CPU devices: JAX cannot compile for
    a GPU without one, and CPU figures are the CPU compiler's buffer
    assignment, a rough proxy for the GPU's. With `--gpu`, on a machine
    with one GPU, they compile with the GPU compiler itself: JAX mocks the
    slice's devices on the one real GPU (`mock_num_gpu_processes`, as its
    own mock-GPU tests do); nothing runs, so one GPU of the same family
    suffices (an H200 for the H100 rows: the same sm_90 compiler). Not yet
    seen to finish: on an H200 the 1.1B/p16 row was still compiling after
    120 s (the limit of that run).
The table says which compiler made each row.

Columns (GiB per device): arguments (train state shard + batch shard),
outputs, temporaries (activations kept for the backward pass, gradients,
workspace), peak = arguments + outputs + temporaries - aliased (donated)
outputs, against the chip's HBM; compile s = trace + lower + compile.

  python benchmarks/aot_memory.py --rows=1.1B/16@v5litepod-64,1.9B/8@v5p-128

With `--sampling` the sampler of `farmer_jax.sample` (EMA params, resampling
CFG, exact flow inverse) is compiled too, at `--sample_batch` per device
(`--notrain --sampling`: the sampler alone). A row whose config `main`
would refuse (`config_lib.validate`) is an error, not a row.
`--shallow` keeps every width but cuts depth to 2 flow blocks of 1 layer and
a 1-layer prior (CI's fast, paper-shaped check).
"""
import os
import re
import sys

# Fake CPU devices for CPU-compiled rows; must precede JAX's backend start.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=64")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import bench_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from farmer_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from farmer_jax import inference  # pylint: disable=g-import-not-at-top,wrong-import-position
from farmer_jax import sharding
from farmer_jax import train

_ROWS = flags.DEFINE_list(
    "rows", ["1.1B/16@v5litepod-64"],
    "SIZE/PATCH@SLICE, e.g. 1.9B/8@v5p-128; SLICE from SLICES.")
_OVERRIDES = flags.DEFINE_list(
    "overrides", [], "config overrides KEY=VALUE (Python literal), e.g. "
    "grad_accum_steps=2 or model.remat=False.")
_CPU = flags.DEFINE_bool("cpu", False, "Compile TPU rows on fake CPU devices.")
_SHALLOW = flags.DEFINE_bool("shallow", False,
                             "2 flow blocks x 1 layer, 1 prior layer.")
_SAMPLING = flags.DEFINE_bool("sampling", False, "Also compile the sampler.")
_TRAIN = flags.DEFINE_bool("train", True, "Compile the train step "
                           "(--notrain --sampling: the sampler only).")
_GPU = flags.DEFINE_bool("gpu", False, "Compile GPU slices with the GPU "
                         "compiler, the slice mocked on this machine's GPU.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 1,
                                     "Sampler images per device.")

GIB = 2.0 ** 30
# name: (TPU topology for jax.experimental.topologies or None for GPU,
#        devices, HBM per device in GiB). HBM: the chips' specifications
#        (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, H100 SXM 80 GB).
SLICES = {
    "v4-32": ("v4:2x2x4", 16, 32.0),
    "v5litepod-64": ("v5e:8x8", 64, 16.0),
    "v5litepod-256": ("v5e:16x16", 256, 16.0),
    "v5p-128": ("v5p:4x4x4", 64, 95.0),
    "8xH100": (None, 8, 80e9 / GIB),
}


def imagenet_config_module():
  path = os.path.join(REPO, "configs", "imagenet.py")
  spec = importlib.util.spec_from_file_location("configs_imagenet", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def devices_for(slice_name: str, cpu: bool):
  """`(devices, compiler name)` for a slice: libtpu topology or fake CPUs."""
  topology, count, _ = SLICES[slice_name]
  if topology and not cpu:
    try:
      from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
      # v4: one JAX device per chip (megacore), as on a real v4 slice.
      kwargs = ({"chip_config_name": "megacore"}
                if topology.startswith("v4") else {})
      topo = topologies.get_topology_desc(topology_name=topology,
                                          platform="tpu", **kwargs)
      return list(topo.devices), f"TPU {topology} (libtpu)"
    except Exception as e:  # pylint: disable=broad-except
      print(f"# {slice_name}: no TPU compiler ({type(e).__name__}: "
            f"{str(e)[:120]}); using fake CPU devices.", file=sys.stderr)
  if not topology and _GPU.value:
    gpus = jax.devices()
    if gpus[0].platform != "gpu" or len(gpus) < count:
      raise SystemExit(f"--gpu: {slice_name} needs {count} (mocked) GPU "
                       f"devices; JAX has {len(gpus)} {gpus[0].platform} "
                       "device(s).")
    return gpus[:count], (f"GPU {gpus[0].device_kind} ({count} mocked on "
                          f"1, jax {jax.__version__})")
  cpus = jax.devices("cpu")
  if len(cpus) < count:
    raise SystemExit(f"{slice_name} needs {count} fake CPU devices; set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{count} or more.")
  return cpus[:count], f"CPU ({count} fake devices)"


def parse_row(row: str):
  match = re.fullmatch(r"([\w.]+)/(\d+)@([\w-]+)", row.strip())
  if not match or match.group(3) not in SLICES:
    raise SystemExit(f"--rows entry {row!r}: use SIZE/PATCH@SLICE with SLICE "
                     f"in {sorted(SLICES)}.")
  return match.group(1), int(match.group(2)), match.group(3)


def row_config(size: str, patch: int, slice_name: str):
  """The launch config of the row: with `slice=` if LAUNCH has the row."""
  module = imagenet_config_module()
  arg = f"res=256,size={size},patch={patch}"
  if (size, patch, slice_name) in module.LAUNCH:
    arg += f",slice={slice_name}"
  config = module.get_config(arg)
  if _SHALLOW.value:
    config.model.update(af_blocks=2, af_layers_per_block=1, ar_layers=1)
  bench_lib.apply_overrides(config, _OVERRIDES.value)
  return config


def compile_train_step(config, mesh) -> tuple[dict, float]:
  """Memory of the compiled train step and seconds to trace+lower+compile."""
  start = time.perf_counter()
  model = train.Farmer(config.model)
  tx, schedule = train.create_optimizer(config)
  _, abstract, shardings = train.create_sharded_state(config, model, tx, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config)
  s, c = config.model.image_size, config.model.channels
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, s, s, c),
                                         jnp.uint8, sharding=batch_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=batch_sharding)}
  step = jax.jit(
      functools.partial(train.train_step, model=model, tx=tx,
                        schedule=schedule, config=config),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  with sharding.context(mesh, config):
    compiled = step.lower(abstract, batch).compile()
  params = sum(a.size for a in jax.tree.leaves(abstract.params))
  return (dict(bench_lib.memory_of(compiled), params=params),
          time.perf_counter() - start)


def compile_sampler(config, mesh, per_device: int) -> tuple[dict, float]:
  """Memory of the compiled sampler (inference.sampler) on the EMA params."""
  start = time.perf_counter()
  model = train.Farmer(config.model)
  tx, _ = train.create_optimizer(config)
  _, abstract, _ = train.create_sharded_state(config, model, tx, mesh)
  batch_sharding = sharding.batch_sharding(mesh, config)
  n = per_device * len(mesh.devices.flat)
  fn, traced_kw = inference.sampler(model, batch_sharding,
                                    inference.sampling_kwargs(config.sample))
  labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch_sharding)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32,
                             sharding=sharding.replicated(mesh))
  with sharding.context(mesh, config):
    compiled = fn.lower({"params": abstract.ema_params}, None, rng,
                        labels, traced_kw).compile()
  return bench_lib.memory_of(compiled), time.perf_counter() - start


def table_row(what, size, patch, slice_name, compiler, config, mesh, mem,
              seconds, per_device_batch):
  hbm = SLICES[slice_name][2]
  free = 100.0 * (1.0 - mem["peak"] / GIB / hbm)
  shape = "x".join(str(v) for v in mesh.devices.shape)
  return [what, f"{size}/p{patch}", slice_name, compiler, shape,
          per_device_batch, config.grad_accum_steps,
          str(config.model.remat),
          f"{mem['params'] / 1e6:,.0f}M" if "params" in mem else "-",
          f"{mem['args'] / GIB:.2f}", f"{mem['out'] / GIB:.2f}",
          f"{mem['temp'] / GIB:.2f}", f"{mem['peak'] / GIB:.2f}",
          f"{hbm:.1f}", f"{free:.0f}%", f"{seconds:.0f}"]


HEADER = ["step", "model", "slice", "compiler", "mesh (data x fsdp x tensor)",
          "batch / device", "accum", "remat", "params", "arguments GiB",
          "outputs GiB", "temporaries GiB", "peak GiB", "HBM GiB", "free",
          "compile s"]


def print_train_row(size, patch, slice_name, compiler, config, mesh,
                    per_device_batch):
  """Compiles the train step and prints its row (or why it does not fit)."""
  try:
    mem, seconds = compile_train_step(config, mesh)
    cells = table_row("train", size, patch, slice_name, compiler, config,
                      mesh, mem, seconds, per_device_batch)
  except Exception as e:  # pylint: disable=broad-except
    # The TPU compiler refuses a program that does not fit: a row too.
    text = re.sub(r"\s+", " ", str(e))[:160].replace("|", "/")
    cells = ["train", f"{size}/p{patch}", slice_name, compiler, "-",
             per_device_batch, config.grad_accum_steps,
             "-", "-", "-", "-", "-", "-", f"{SLICES[slice_name][2]:.1f}",
             f"does not compile: {text}", "-"]
  print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  if _GPU.value:  # before the GPU backend starts: one GPU seen as a slice.
    jax.config.update("mock_num_gpu_processes", max(
        [SLICES[parse_row(r)[2]][1] for r in _ROWS.value
         if not SLICES[parse_row(r)[2]][0]] or [0]))
  print("| " + " | ".join(HEADER) + " |")
  print("|" + "|".join("---" for _ in HEADER) + "|", flush=True)
  for row in _ROWS.value:
    size, patch, slice_name = parse_row(row)
    config = row_config(size, patch, slice_name)
    devices, compiler = devices_for(slice_name, _CPU.value)
    try:  # what `main` would refuse is no row (e.g. a microbatch < devices)
      config_lib.validate(config, num_devices=len(devices), process_count=1)
    except config_lib.ConfigError as e:
      raise SystemExit(f"--rows={row}: {e}") from e
    if _GPU.value and not SLICES[slice_name][0]:
      # jax.make_mesh takes mocked GPU processes for slices and refuses them.
      shape = config_lib.resolve_mesh_shape(config.mesh_shape, len(devices))
      mesh = jax.sharding.Mesh(
          np.asarray(devices).reshape(shape), config_lib.MESH_AXES,
          axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
    else:
      mesh = sharding.create_mesh(config, devices=devices)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if _TRAIN.value:
      print_train_row(size, patch, slice_name, compiler, config, mesh,
                      config.batch_size // batch_shards)
    if _SAMPLING.value:
      mem, seconds = compile_sampler(config, mesh, _SAMPLE_BATCH.value)
      print("| " + " | ".join(str(c) for c in table_row(
          "sample", size, patch, slice_name, compiler, config, mesh, mem,
          seconds, _SAMPLE_BATCH.value)) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
