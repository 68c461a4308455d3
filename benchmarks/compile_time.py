r"""Compile time of the train step vs depth: `nn.scan` keeps it nearly flat.

For each depth D, the model of size `--size` gets D transformer layers in
the AR prior (`ar_layers = D`) and in every flow block
(`af_layers_per_block = D`); both stacks are `nn.scan`ned
(`models/layers.py`), so XLA compiles one layer body per stack whatever D
is. Reported: trace + lower seconds (`jax.jit(step).lower(...)`), XLA
compile seconds (`.compile()`), their sum, and the parameter count. The
persistent compilation cache is off, so every compile is a real one.

  python benchmarks/compile_time.py --depths=4,24 --size=S
"""
import time

from absl import app
from absl import flags
import jax

import bench_lib

_DEPTHS = flags.DEFINE_list("depths", ["4", "24"], "Layers per stack.")
_SIZE = flags.DEFINE_string("size", "S", "Row of SIZES for the widths.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch size.")


def measure(size: str, depth: int, batch_size: int) -> dict:
  config = bench_lib.sized_config(size, batch_size)
  config.model.update(ar_layers=depth, af_layers_per_block=depth)
  step, mesh, _, abstract, batch, num_params = bench_lib.train_step_parts(
      config)
  with bench_lib.sharding.context(mesh, config):
    start = time.perf_counter()
    lowered = step.lower(abstract, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
  return dict(depth=depth, params=num_params, lower_s=lower_s,
              compile_s=compile_s)


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for depth in map(int, _DEPTHS.value):
    r = measure(_SIZE.value, depth, _BATCH.value)
    rows.append([r["depth"], f"{r['params'] / 1e6:.2f}M", r["lower_s"],
                 r["compile_s"], r["lower_s"] + r["compile_s"]])
  print(f"Device: {bench_lib.device_name()}; size {_SIZE.value}, batch "
        f"{_BATCH.value}")
  print(bench_lib.table(["depth (layers per stack)", "params",
                         "trace+lower s", "XLA compile s", "total s"], rows))


if __name__ == "__main__":
  app.run(main)
