r"""Compile time of the train step vs depth: `nn.scan` keeps it nearly flat.

For each depth D, the model of size `--size` gets D transformer layers in
the AR prior (`ar_layers = D`) and in every flow block
(`af_layers_per_block = D`) (`--vary=layers`), or D flow blocks
(`af_blocks = D`, `--vary=blocks`). Layer stacks and the flow's blocks are
all `nn.scan`ned (`models/layers.py`, `models/flow.py`), so XLA compiles one
body per stack whatever D is; `--scan_layers=false` unrolls them (the same
parameters) to show what the loops save. Reported: trace + lower seconds (`jax.jit(step).lower(...)`), XLA
compile seconds (`.compile()`), their sum, and the parameter count. The
persistent compilation cache is off, so every compile is a real one.

  python benchmarks/compile_time.py --depths=4,24 --size=S
  python benchmarks/compile_time.py --depths=4,24 --size=S --vary=blocks
"""
import time

from absl import app
from absl import flags
import jax

import bench_lib

_DEPTHS = flags.DEFINE_list("depths", ["4", "24"], "Layers per stack.")
_SIZE = flags.DEFINE_string("size", "S", "Row of SIZES for the widths.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_VARY = flags.DEFINE_enum("vary", "layers", ["layers", "blocks"],
                          "What the depth sets.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "config.model.scan_layers.")


def measure(size: str, depth: int, batch_size: int, vary: str = "layers",
            scan_layers: bool = True) -> dict:
  config = bench_lib.sized_config(size, batch_size)
  if vary == "layers":
    config.model.update(ar_layers=depth, af_layers_per_block=depth)
  else:
    config.model.af_blocks = depth
  config.model.scan_layers = scan_layers
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
    r = measure(_SIZE.value, depth, _BATCH.value, _VARY.value, _SCAN.value)
    rows.append([r["depth"], f"{r['params'] / 1e6:.2f}M", r["lower_s"],
                 r["compile_s"], r["lower_s"] + r["compile_s"]])
  print(f"Device: {bench_lib.device_name()}; size {_SIZE.value}, batch "
        f"{_BATCH.value}, scan_layers={_SCAN.value}")
  what = "layers per stack" if _VARY.value == "layers" else "flow blocks"
  print(bench_lib.table([f"depth ({what})", "params",
                         "trace+lower s", "XLA compile s", "total s"], rows))


if __name__ == "__main__":
  app.run(main)
