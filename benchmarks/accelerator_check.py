r"""The model on an accelerator against the CPU: numbers that must agree, speed.

For each row (`--rows`: `refS`, `refM` from `bench_lib.REFERENCE` with the
FARMER prior, `digits`, the README default, or `tiny`, the tests'), one model with its random
initialisation perturbed (the flow heads start at zero, i.e. the identity),
one batch of dequantised random images, on `jax.devices()[0]` and on the
CPU in the same process:

* bits/dim of the batch on the device minus on the CPU, float32
  activations, at `model.matmul_precision` 'default' (on a GPU XLA rounds
  float32 matmul operands to TF32) and 'highest', and with bfloat16
  activations ('default', as configs/imagenet.py);
* the exact inverse's round trip `max |x - F^-1(F(x))|` in the same three
  settings on the device, and the CPU's beside them;
* exact-inverse speed (`Farmer.decode`, KV-cached, batch `--inverse_batch`,
  median of 3 timed calls after one compile call), images/s on the device
  at 'default' and 'highest': `torch_reference.py`'s inverse column.

On a CPU-only machine the device *is* the CPU, where every precision is
float32: those columns are the CPU's own figures (difference 0), computed
once; only the bf16 columns differ.

  python benchmarks/accelerator_check.py --rows=digits,refS,refM
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import bench_lib
from farmer_jax import nll
from farmer_jax.models import Farmer

_ROWS = flags.DEFINE_list("rows", ["digits", "refS", "refM"],
                          "refS / refM / digits / tiny (digits:tiny).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images in the compared batch.")
_INV_BATCH = flags.DEFINE_integer("inverse_batch", 16,
                                  "Batch of the timed inverse.")


def model_of(row: str, **model_overrides) -> Farmer:
  config = (bench_lib.load_config("tiny") if row == "tiny"
            else bench_lib.reference_config(row, "farmer"))
  config.model.update(model_overrides)
  return Farmer(config.model)


def build(row: str):
  """`(perturbed params on the host, images, labels)` of a row: the same
  for every precision and activation dtype (parameters are float32)."""
  model = model_of(row)
  params = {"params": bench_lib.perturbed_params(model, 0.05)}
  s, c = model.config.image_size, model.config.channels
  with jax.default_device(jax.devices("cpu")[0]):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (_BATCH.value, s, s, c), dtype=np.uint8)
    x = nll.uniform_dequantize(jax.random.PRNGKey(3), jnp.asarray(images))
  labels = np.arange(_BATCH.value, dtype=np.int32) % model.config.num_classes
  return params, np.asarray(x), labels


def bpd_and_roundtrip(model, params, x, labels, device):
  """`(bits/dim [B], max |x - F^-1(F(x))|)` computed on `device`."""
  params, x, labels = jax.device_put((params, x, labels), device)
  log_prob = jax.jit(lambda p, x, l: model.apply(p, x, l)["log_prob"])(
      params, x, labels)

  def roundtrip(p, x, l):
    z, _ = model.apply(p, x, l, method=Farmer.encode)
    return model.apply(p, z, l, method=Farmer.decode)

  x_back = jax.jit(roundtrip)(params, x, labels)
  bpd = nll.bits_per_dim(-log_prob, x[0].size)
  return np.asarray(bpd), float(jnp.abs(x_back - x).max())


def inverse_speed(model, params, device) -> float:
  """Images/s of the exact inverse (KV-cached decode) on `device`."""
  b = _INV_BATCH.value
  z = 0.7 * jax.random.normal(jax.random.PRNGKey(1),
                              (b, model.num_tokens, model.token_dim))
  labels = jnp.arange(b, dtype=jnp.int32) % model.config.num_classes
  params, z, labels = jax.device_put((params, z, labels), device)
  decode = jax.jit(lambda p, z, l: model.apply(p, z, l, method=Farmer.decode))
  jax.block_until_ready(decode(params, z, labels))
  return b / bench_lib.median_seconds(lambda: decode(params, z, labels), 3)


SETTINGS = {  # name: model overrides
    "default": dict(matmul_precision="default"),
    "highest": dict(matmul_precision="highest"),
    "bf16": dict(matmul_precision="default", dtype="bfloat16"),
}


def main(argv):
  del argv
  device, cpu = jax.devices()[0], jax.devices("cpu")[0]
  print(f"Device: {bench_lib.device_name()}", flush=True)
  rows = []
  for row in _ROWS.value:
    start = time.perf_counter()
    params, x, labels = build(row)
    bpd_cpu, err_cpu = bpd_and_roundtrip(
        model_of(row, matmul_precision="highest"), params, x, labels, cpu)
    bpd, err, speed = {}, {}, {}
    for name, overrides in SETTINGS.items():
      model = model_of(row, **overrides)
      if device == cpu and name != "bf16":  # the CPU's float32 is float32
        bpd[name], err[name] = bpd_cpu, err_cpu
      else:
        bpd[name], err[name] = bpd_and_roundtrip(model, params, x, labels,
                                                 device)
      if name != "bf16":
        speed[name] = inverse_speed(model, params, device)
    rows.append(
        [row, f"{float(bpd_cpu.mean()):.4f}"]
        + [f"{float(np.abs(bpd[k] - bpd_cpu).max()):.1e}" for k in SETTINGS]
        + [f"{err_cpu:.1e}"] + [f"{err[k]:.1e}" for k in SETTINGS]
        + [f"{speed[k]:,.0f}" for k in speed]
        + [f"{time.perf_counter() - start:.0f}"])
    print(f"# {row} done: " + ", ".join(str(c) for c in rows[-1][1:]),
          flush=True)
  print(bench_lib.table(
      ["row", "bits/dim (CPU)"]
      + [f"max abs bits/dim diff (device - CPU), {k}" for k in SETTINGS
         if k != "bf16"] + ["bf16: max abs bits/dim diff (device - CPU)"]
      + ["round trip CPU"] + [f"round trip device, {k}" for k in SETTINGS]
      + [f"inverse images/s (batch {_INV_BATCH.value}), {k}" for k in speed]
      + ["s"], rows))


if __name__ == "__main__":
  app.run(main)
