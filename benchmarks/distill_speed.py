r"""Exact sequential AF inverse vs the one-step student: speed and quality.

Prints two markdown tables for a trained teacher and its distilled student
(spec section 8; `farmer_jax/distill.py`):

* speed: `Farmer.decode` (n blocks x N sequential KV-cached token steps) vs
  `distill.student_decode` (n parallel passes), jitted, compile excluded,
  median of `--repeats` timed calls per batch size: seconds per batch,
  images/s, seconds/image and the speed-up;
* quality: reconstruction error `decode(F(x)) - x` on the whole test split
  (RMS and max |error|, `[-1, 1]` pixel units) for the exact inverse, the
  student at initialisation (the teacher's weights) and the trained student.

  python benchmarks/distill_speed.py --config=configs/digits_distill.py \
      --config.distill.teacher_workdir=workdirs/digits \
      --student_workdir=workdirs/digits_student --batch_sizes=1,8,64
"""
import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from farmer_jax import distill
from farmer_jax import metrics
from farmer_jax import nll
from farmer_jax.models import Farmer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/digits_distill.py", "Distillation config (its model "
    "section is the teacher's).", lock_config=True)
_STUDENT = flags.DEFINE_string("student_workdir", None,
                               "Workdir of the distillation run.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "64"],
                                 "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per batch size.")
flags.mark_flag_as_required("student_workdir")


def _median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _test_set(run):
  """All test images `[M, H, W, C]` in `[-1, 1]` and their labels."""
  xs, labels = [], []
  for batch in metrics.eval_batches(run.config, run.config.data.eval_split,
                                    run.batch_sharding, -1):
    mask = np.asarray(jax.device_get(batch["mask"])) > 0
    xs.append(np.asarray(jax.device_get(batch["image"]))[mask])
    labels.append(np.asarray(jax.device_get(batch["label"]))[mask])
  x = nll.to_model_range(jnp.asarray(np.concatenate(xs)))
  return x, jnp.asarray(np.concatenate(labels))


def _recon(decode_fn, params, z, x, labels, chunk: int = 100):
  """(RMS error, max |error|) of `decode_fn(params, z, labels)` vs `x`."""
  sq, mx = [], []
  for i in range(0, len(x), chunk):
    err = np.asarray(decode_fn(params, z[i:i + chunk], labels[i:i + chunk])
                     - x[i:i + chunk])
    sq.append(np.square(err).reshape(len(err), -1).mean(-1))
    mx.append(np.abs(err).max())
  return float(np.sqrt(np.concatenate(sq).mean())), float(max(mx))


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  run = distill.load_teacher(config)
  model, teacher = run.model, run.variables["params"]
  student, student_params = distill.load_student(config, _STUDENT.value)
  encode = jax.jit(functools.partial(model.apply, method=Farmer.encode))
  exact = jax.jit(lambda p, z, l: model.apply({"params": p}, z, l,
                                              method=Farmer.decode))
  fast = jax.jit(functools.partial(distill.student_decode, student))

  x, labels = _test_set(run)
  z = jnp.concatenate([encode({"params": teacher}, x[i:i + 100],
                              labels[i:i + 100])[0]
                       for i in range(0, len(x), 100)])
  cfg = config.model
  print(f"\nTeacher {config.distill.teacher_workdir} (image "
        f"{cfg.image_size}x{cfg.image_size}x{cfg.channels}, N="
        f"{model.num_tokens} tokens of d={model.token_dim}, "
        f"{cfg.af_blocks} AF blocks); student {_STUDENT.value}; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"median of {_REPEATS.value} calls.\n")
  print("| decoder | batch | s/batch | images/s | s/image | speed-up |")
  print("|---|---:|---:|---:|---:|---:|")
  for b in (int(s) for s in _BATCH_SIZES.value):
    reps = -(-b // len(z))
    zb = jnp.tile(z, (reps, 1, 1))[:b]
    lb = jnp.tile(labels, reps)[:b]
    t_exact = _median_seconds(exact, teacher, zb, lb, repeats=_REPEATS.value)
    t_fast = _median_seconds(fast, student_params, zb, lb,
                             repeats=_REPEATS.value)
    for name, t in (("exact (sequential)", t_exact), ("student (1 step)",
                                                     t_fast)):
      print(f"| {name} | {b} | {t:.4f} | {b / t:.1f} | {t / b:.5f} | "
            f"{t_exact / t:.1f}x |")

  print(f"\nReconstruction error on {len(x)} test images, [-1, 1] units:\n")
  print("| decoder | RMS error | max abs error |")
  print("|---|---:|---:|")
  rows = (("exact inverse", exact, teacher),
          ("student at init (teacher weights)", fast, teacher["flow"]),
          ("student (distilled)", fast, student_params))
  for name, fn, params in rows:
    rms, mx = _recon(fn, params, z, x, labels)
    print(f"| {name} | {rms:.3g} | {mx:.3g} |")


if __name__ == "__main__":
  app.run(main)
