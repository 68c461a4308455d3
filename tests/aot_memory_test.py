"""CI's row of benchmarks/aot_memory.py, so the ahead-of-time path cannot rot.

The script runs as CI would run it for a pod (the real train step, abstract
state and batch with shardings, nothing allocated), on 8 fake CPU devices
with a paper-shaped but shallow FARMER-1.1B (every width, res 256, patch 16,
K_R = 200; 2 flow blocks, 1 prior layer), and its guided sampler. The
per-device arguments must be the FSDP shard of the train state, counted
independently: params, two AdamW moments and the EMA, float32 (16 bytes per
parameter) over 8 devices, plus the batch shard; the sampler's, the shard
of the EMA parameters alone.
"""
import os
import subprocess
import sys

import helpers

GIB = 2.0 ** 30


def _rows(stdout: str) -> list[dict]:
  lines = [l for l in stdout.splitlines() if l.startswith("|")]
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in lines]
  return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_aot_memory_prints_the_fsdp_shard_of_the_state():
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(XLA_FLAGS=helpers.xla_flags(8), JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(
      [sys.executable, os.path.join("benchmarks", "aot_memory.py"),
       "--rows=1.1B/16@8xH100", "--shallow", "--overrides=batch_size=16",
       "--sampling"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  row, sample = _rows(out.stdout)
  assert (row["step"], row["model"], row["compiler"]) == (
      "train", "1.1B/p16", "CPU (8 fake devices)"), row
  assert row["mesh (data x fsdp x tensor)"] == "1x8x1"  # full FSDP default.
  assert row["batch / device"] == "2"
  params = float(row["params"].rstrip("M").replace(",", "")) * 1e6
  # The shallow paper-shaped model: 2 AF blocks + 1 AR layer at width 768
  # and the 197M K_R = 200 head.
  assert 200e6 < params < 260e6, row
  state = 16 * params / 8  # params + 2 moments + EMA, f32, 8-way FSDP.
  batch = 2 * 256 * 256 * 3 + 2 * 4  # uint8 images + int32 labels.
  args = float(row["arguments GiB"]) * GIB
  assert abs(args - (state + batch)) < 0.02 * state, (args, state, row)
  peak = float(row["peak GiB"])
  assert float(row["temporaries GiB"]) > 0 and peak >= float(
      row["arguments GiB"])
  free = float(row["free"].rstrip("%"))
  assert abs(free - 100 * (1 - peak / float(row["HBM GiB"]))) < 1.0
  # The sampler (one image per device) reads only the EMA parameters,
  # sharded like the state: 4 bytes per parameter over 8 devices.
  assert (sample["step"], sample["batch / device"]) == ("sample", "1"), sample
  ema = 4 * params / 8
  sample_args = float(sample["arguments GiB"]) * GIB
  assert abs(sample_args - ema) < 0.02 * ema, (sample_args, ema, sample)
  assert 0 < float(sample["peak GiB"]) < peak, sample
