r"""Memory of one train step, by batch size, with and without `nn.remat`.

XLA's compiled memory analysis of the jitted train step
(`jax.jit(step).lower(...).compile().memory_analysis()`), not a runtime
measurement: 'arguments' is the train state (params, AdamW moments, EMA)
plus the batch; 'temporaries' is the scratch XLA allocates during the step
(activations kept for the backward pass, gradients, workspace); 'peak' is
arguments + temporaries + outputs - the bytes outputs alias from donated
arguments. `config.model.remat=True` wraps every transformer layer in
`nn.remat`, recomputing activations in the backward pass.

  python benchmarks/memory.py --batch_sizes=16,64,256 --size=M
"""
from absl import app
from absl import flags

import bench_lib

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["16", "64", "256"],
                                 "Global batch sizes.")
_SIZE = flags.DEFINE_string("size", "M", "Row of SIZES.")

MIB = 2.0 ** 20


def measure(size: str, batch_size: int, remat: bool) -> dict:
  config = bench_lib.sized_config(size, batch_size,
                                  remat="full" if remat else "none")
  step, mesh, _, abstract, batch, _ = bench_lib.train_step_parts(config)
  with bench_lib.sharding.context(mesh, config):
    mem = step.lower(abstract, batch).compile().memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
          + mem.output_size_in_bytes - mem.alias_size_in_bytes)
  return dict(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
              peak=peak)


def main(argv):
  del argv
  rows = []
  for batch_size in map(int, _BATCH_SIZES.value):
    plain = measure(_SIZE.value, batch_size, remat=False)
    remat = measure(_SIZE.value, batch_size, remat=True)
    rows.append([batch_size, plain["args"] / MIB, plain["temp"] / MIB,
                 remat["temp"] / MIB, plain["peak"] / MIB,
                 remat["peak"] / MIB,
                 f"{plain['temp'] / max(remat['temp'], 1):.1f}x"])
  print(f"Device: {bench_lib.device_name()}; size {_SIZE.value}; XLA "
        "compiled memory analysis, MiB")
  print(bench_lib.table(
      ["batch", "arguments (state + batch)", "temporaries",
       "temporaries, remat", "peak", "peak, remat",
       "temporaries saved by remat"], rows))


if __name__ == "__main__":
  app.run(main)
