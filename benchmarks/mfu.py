r"""Model FLOP utilisation of the real train step, run long on one device.

Builds `--config` (default FARMER-1.1B at ImageNet 256, patch 16; any
`--config.KEY=VALUE` overrides it, e.g. a reduced depth that fits one
accelerator), checks it as `main` does, and on `jax.devices()[0]` alone
compiles the jitted train step (`train.train_step`: forward, backward,
AdamW, EMA; state donated) on synthetic uint8 images and labels. It runs
`--warmup` steps, then times `--steps` steps, logging images/s every
`--log_every`, and prints one table row:

* ms/step and images/s over the timed steps;
* model TFLOP per step: XLA's cost analysis of the same step with its
  layers unrolled and remat off, lowered for the CPU
  (`bench_lib.unrolled_flops`): forward and backward, no recomputation
  (PaLM's "model FLOPs"); hardware TFLOP per step: the same with the
  config's remat, i.e. what the device executes;
* MFU = model FLOPs x steps/s / the device's dense bfloat16 peak
  (`--peak_tflops`, default `PEAK_BF16_TFLOPS` by device kind, else a
  bfloat16 matmul of side `--matmul_n` timed here), and HFU likewise;
* memory per device: the compiled step's memory analysis (arguments +
  outputs + temporaries - donated: `aot_memory.py`'s peak for this shape
  and compiler) and, where the backend reports it, the device's measured
  peak bytes in use after the run.

  # On one H100 / H200 (benchmarks/gpu_checks.sh mfu): 1.1B-shaped, 4 of its
  # 28 flow blocks, 64 images per step (the 8xH100 launch's per-device
  # microbatch).
  python benchmarks/mfu.py --config.model.af_blocks=4 \
      --config.batch_size=64 --steps=300
  # The same shape compiled for this machine's CPU, nothing run: the CPU
  # compiler's memory prediction and the FLOP counts.
  python benchmarks/mfu.py --config.model.af_blocks=4 \
      --config.batch_size=64 --steps=0
  # A CPU smoke run:
  python benchmarks/mfu.py --config=configs/imagenet.py:res=64,size=tiny \
      --config.batch_size=8 --steps=3 --warmup=1
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

import bench_lib
from farmer_jax import config_lib
from farmer_jax.models import layers

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/imagenet.py:res=256,size=1.1B",
    "The experiment config (overrides: --config.KEY=VALUE).",
    lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 300, "Timed steps (0: compile and "
                             "count only, nothing allocated).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed steps after compile.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 50, "Log images/s every "
                                  "this many timed steps.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "The device's dense bf16 "
                           "peak, TFLOP/s (0: PEAK_BF16_TFLOPS, else a "
                           "timed matmul).")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 4096, "Side of the timed "
                                 "bf16 matmul when the peak is not known.")

# Dense bfloat16 peak, TFLOP/s, by a substring of `device_kind` (vendors'
# data sheets; without sparsity). The first match wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
    ("TPU v6 lite", 918.0),
)


def peak_flops(device) -> tuple[float, str]:
  """`(FLOP/s, where it comes from)` of `device`'s dense bf16 peak."""
  if _PEAK.value > 0:
    return _PEAK.value * 1e12, "--peak_tflops"
  kind = getattr(device, "device_kind", "")
  for name, tflops in PEAK_BF16_TFLOPS:
    if name in kind:
      return tflops * 1e12, "data sheet"
  n = _MATMUL_N.value
  a = jnp.ones((n, n), jnp.bfloat16)
  matmul = jax.jit(jnp.dot)
  jax.block_until_ready(matmul(a, a))
  return 2.0 * n ** 3 / bench_lib.median_seconds(lambda: matmul(a, a), 5), (
      f"timed {n}^3 bf16 matmul")


def run_steps(compiled, init_fn, batch, mesh, config) -> float:
  """Seconds per step of `--steps` steps after `--warmup`, logged."""
  b = config.batch_size
  with bench_lib.sharding.context(mesh, config):
    state = init_fn()
    for _ in range(_WARMUP.value):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    start = last = time.perf_counter()
    for i in range(1, _STEPS.value + 1):
      state, metrics = compiled(state, batch)
      if i % _LOG_EVERY.value == 0 or i == _STEPS.value:
        jax.block_until_ready(metrics)
        now = time.perf_counter()
        n = i - (i - 1) // _LOG_EVERY.value * _LOG_EVERY.value
        print(f"# step {i}/{_STEPS.value}: {n * b / (now - last):,.1f} "
              f"images/s, loss {float(metrics['loss']):.4f}", flush=True)
        last = now
    return (time.perf_counter() - start) / _STEPS.value


def main(argv):
  del argv
  config = _CONFIG.value
  device = jax.devices()[0]
  config.mesh_shape = (1, 1, 1)
  config_lib.validate(config, num_devices=1, process_count=1)
  start = time.perf_counter()
  step, mesh, init_fn, abstract, batch, num_params = (
      bench_lib.train_step_parts(config, device))
  with bench_lib.sharding.context(mesh, config):
    compiled = step.lower(abstract, batch).compile()
  compile_s = time.perf_counter() - start
  predicted = bench_lib.memory_of(compiled)["peak"]
  print(f"# compiled in {compile_s:.0f} s; {num_params / 1e6:,.0f}M params; "
        f"predicted peak {predicted / 2**30:.2f} GiB", flush=True)
  seconds = run_steps(compiled, init_fn, batch, mesh, config) if (
      _STEPS.value) else float("nan")
  stats = device.memory_stats() or {}
  measured = stats.get("peak_bytes_in_use")
  model_flops = bench_lib.unrolled_flops(config, remat=False)
  hardware_flops = (bench_lib.unrolled_flops(config)
                    if layers.remat_policy(config.model.remat)
                    else model_flops)
  m = config.model
  if _STEPS.value:
    peak, source = peak_flops(device)
    print(f"Device: {bench_lib.device_name()}; peak {peak / 1e12:,.1f} "
          f"TFLOP/s bf16 ({source}); {_STEPS.value} steps after "
          f"{_WARMUP.value} warm-up.")
  else:
    peak = float("nan")
    print(f"Device: {bench_lib.device_name()}; compiled and counted only.")
  print(bench_lib.table(
      ["model", "params", "batch", "dtype", "remat", "attention", "ms/step",
       "images/s", "model TFLOP/step", "hardware TFLOP/step",
       "achieved TFLOP/s", "MFU", "HFU", "compiled peak GiB",
       "measured peak GiB", "compile s"],
      [[f"{m.image_size}px p{m.patch_size} AF {m.af_blocks}x"
        f"{m.af_layers_per_block}x{m.af_width} AR {m.ar_layers}x{m.ar_width}",
        f"{num_params / 1e6:,.0f}M", config.batch_size, m.dtype,
        str(m.remat), m.attention,
        seconds * 1e3, config.batch_size / seconds, model_flops / 1e12,
        hardware_flops / 1e12, model_flops / seconds / 1e12,
        f"{100 * model_flops / seconds / peak:.1f}%",
        f"{100 * hardware_flops / seconds / peak:.1f}%",
        f"{predicted / 2**30:.2f}",
        "-" if measured is None else f"{measured / 2**30:.2f}",
        compile_s]]))


if __name__ == "__main__":
  app.run(main)
