r"""Train-step throughput: images/s and achieved FLOP/s vs the matmul peak.

For each model size (`bench_lib.SIZES`, digits 28x28x1, or a reference row:
`refS` / `refM` from `bench_lib.REFERENCE`, the side-by-side with
TARFlow's PyTorch code (torch_reference.py), and `digits`, the README default) and each prior
in `--priors` (reference rows only; SIZES rows use the config's prior), the
jitted train step (`train.train_step`: forward + backward + AdamW + EMA, state donated)
is compiled once, run `--warmup` times, then timed over `--steps` steps.
FLOPs per step are XLA's count for the step with its layers unrolled
(`jax.jit(...).lower(...).cost_analysis()['flops']` with
`scan_layers=False`, whichever variant is timed: the cost analysis counts a
scan's body once, so a scanned refS step reads 1.3 GFLOP instead of 10.1);
achieved FLOP/s = FLOPs per step x steps/s. The peak is a jitted f32
`[n, n] @ [n, n]` matmul (`--matmul_n`) timed in the same run on the same
device; the last column is achieved / peak.

  python benchmarks/train_throughput.py --sizes=XS,S,M --batch_size=64
  python benchmarks/train_throughput.py --sizes=refS,refM,digits \
      --priors=gaussian,farmer --batch_size=0
"""
import time

from absl import app
from absl import flags
import jax

import bench_lib

_SIZES = flags.DEFINE_list("sizes", ["XS", "S", "M"],
                           "Rows of SIZES, or refS / refM / digits.")
_PRIORS = flags.DEFINE_list("priors", ["gaussian", "farmer"],
                            "Priors of the reference rows.")
_BATCH = flags.DEFINE_integer("batch_size", 64,
                              "Global batch size; 0 = a reference row's own.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per size.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compile.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "Side of the peak matmul.")
_OVERRIDES = flags.DEFINE_list(
    "overrides", [], "Config overrides KEY=VALUE (Python literals), applied "
    "to every row, e.g. model.remat=full.")
_SCAN = flags.DEFINE_bool("scan_layers", None,
                          "config.model.scan_layers (default: the config's).")


def measure(size: str, batch_size: int, steps: int, warmup: int,
            prior: str = "") -> dict:
  """Compiles and times the train step of one model size."""
  if size in bench_lib.SIZES:
    config = bench_lib.sized_config(size, batch_size or 64)
  else:
    config = bench_lib.reference_config(size, prior, batch_size)
  bench_lib.apply_overrides(config, _OVERRIDES.value)
  batch_size = config.batch_size
  if _SCAN.value is not None:
    config.model.scan_layers = _SCAN.value
  step, mesh, init_fn, _, batch, num_params = bench_lib.train_step_parts(
      config)
  with bench_lib.sharding.context(mesh, config):
    state = init_fn()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
  # An unrolled step is its own count; a scanned one is lowered again
  # unrolled (its cost analysis sees each loop body once).
  flops = (bench_lib.unrolled_flops(config) if config.model.scan_layers
           else bench_lib.flops_of(lowered))
  with bench_lib.sharding.context(mesh, config):
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
  return dict(size=size, prior=config.model.prior, batch=batch_size,
              params=num_params, step_s=seconds,
              images_per_s=batch_size / seconds, flops=flops,
              flops_per_s=flops / seconds)


def main(argv):
  del argv
  peak = bench_lib.matmul_peak(_MATMUL_N.value)
  rows = []
  runs = [(size, prior) for size in _SIZES.value
          for prior in ([""] if size in bench_lib.SIZES else _PRIORS.value)]
  for size, prior in runs:
    r = measure(size, _BATCH.value, _STEPS.value, _WARMUP.value, prior)
    rows.append([r["size"], r["prior"], f"{r['params'] / 1e6:.2f}M", r["batch"],
                 r["step_s"] * 1e3, r["images_per_s"], r["flops"] / 1e9,
                 r["flops_per_s"] / 1e9, peak / 1e9,
                 f"{100 * r['flops_per_s'] / peak:.1f}%"])
  print(f"Device: {bench_lib.device_name()}")
  print(bench_lib.table(
      ["size", "prior", "params", "batch", "ms/step", "images/s", "GFLOP/step",
       "achieved GFLOP/s", f"matmul peak GFLOP/s ({_MATMUL_N.value}^3 f32)",
       "achieved / peak"], rows))


if __name__ == "__main__":
  app.run(main)
