"""farmer_jax/writers.py: TensorBoard event files without TensorFlow."""
import io
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.hparams import plugin_data_pb2

import helpers
from farmer_jax import writers


def _events(path):
  """Every Event of a TFRecord file, checking both CRCs of each record."""
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      assert len(header) == 12, "truncated record header"
      (length,) = struct.unpack("<Q", header[:8])
      assert struct.unpack("<I", header[8:])[0] == masked_crc32c(header[:8])
      data = f.read(length)
      assert struct.unpack("<I", f.read(4))[0] == masked_crc32c(data)
      out.append(event_pb2.Event.FromString(data))
  return out


def test_events_hold_scalars_images_and_hparams(tmp_path):
  writer = writers.create(str(tmp_path))
  writer.write_hparams({"model.af_width": 64, "model.prior": "farmer",
                        "ema": 0.999, "scan": True, "mesh": (1, 2)})
  writer.write_scalars(5, {"train/loss": 1.25, "eval/num_images": 32})
  grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4, 1) * 10
  writer.write_images(5, {"grid": grey, "unit": np.full((1, 2, 2, 3), 0.5)})
  # Written as they come: readable before the writer is closed.
  (path,) = [p for p in os.listdir(tmp_path) if p.startswith(
      "events.out.tfevents.")]
  assert len(_events(tmp_path / path)) == 4
  writer.close()

  events = _events(tmp_path / path)
  assert events[0].file_version == "brain.Event:2"
  hparams = events[1].summary.value[0]
  assert hparams.metadata.plugin_data.plugin_name == "hparams"
  info = plugin_data_pb2.HParamsPluginData.FromString(
      hparams.metadata.plugin_data.content).session_start_info
  assert info.hparams["model.af_width"].number_value == 64
  assert info.hparams["model.prior"].string_value == "farmer"
  assert info.hparams["scan"].bool_value
  assert info.hparams["mesh"].string_value == "(1, 2)"

  scalars = {v.tag: v for v in events[2].summary.value}
  assert events[2].step == 5
  assert scalars["train/loss"].metadata.plugin_data.plugin_name == "scalars"
  assert np.frombuffer(scalars["train/loss"].tensor.tensor_content,
                       np.float32)[0] == 1.25
  assert np.frombuffer(scalars["eval/num_images"].tensor.tensor_content,
                       np.float32)[0] == 32

  images = {v.tag: v for v in events[3].summary.value}
  assert images["grid"].metadata.plugin_data.plugin_name == "images"
  w, h, *pngs = images["grid"].tensor.string_val
  assert (int(w), int(h), len(pngs)) == (4, 3, 2)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pngs[1]))),
                                grey[1, ..., 0])
  unit = np.asarray(Image.open(io.BytesIO(
      images["unit"].tensor.string_val[2])))
  assert unit.shape == (2, 2, 3) and (unit == 128).all()  # floats in [0, 1]


def test_bad_image_shape_is_refused(tmp_path):
  writer = writers.EventWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"'x'.*\[N, H, W, 1 or 3\]"):
    writer.write_images(0, {"x": np.zeros((3, 3, 2), np.uint8)})
  writer.close()


@pytest.fixture
def info_lines(monkeypatch):
  """What writers.py logs at INFO (caplog can miss absl's records in a worker
  where earlier tests reconfigured logging)."""
  lines = []
  monkeypatch.setattr(writers.logging, "info",
                      lambda msg, *args: lines.append(msg % args))
  return lines


def test_log_lines_and_just_logging(tmp_path, info_lines):
  writer = writers.create(str(tmp_path), just_logging=True)
  writer.write_scalars(7, {"train/loss": 0.123456789, "step_count": 3})
  assert info_lines == ["[7] step_count=3, train/loss=0.123457"]
  assert not os.listdir(tmp_path)  # other processes write no events


def test_progress_reports_rate_and_eta(info_lines):
  clock = [100.0]
  recorded = []

  class Recorder:
    def write_scalars(self, step, scalars):
      recorded.append((step, scalars))

  progress = writers.Progress(10, Recorder(), every_secs=60.0,
                              clock=lambda: clock[0])
  for step, clock[0] in [(1, 100.0), (2, 130.0), (5, 190.0), (10, 200.0)]:
    progress(step)
  assert [s for s, _ in recorded] == [5, 10]  # every 60 s, and the last step
  assert recorded[0][1]["steps_per_sec"] == pytest.approx(4 / 90)
  assert recorded[1][1]["steps_per_sec"] == pytest.approx(5 / 10)
  assert recorded[1][1]["uptime"] == pytest.approx(100.0)
  assert info_lines == ["0.04 steps/s, 50.0% (5/10), ETA 1m52s",
                        "0.50 steps/s, 100.0% (10/10), ETA 0m00s"]


def test_a_local_run_never_imports_tensorflow(tmp_path):
  """The loop's writers and progress: no TensorFlow (~11 s per process)."""
  code = (
      "import sys\n"
      "from farmer_jax import loop, writers\n"
      f"w = writers.create({str(tmp_path)!r})\n"
      "w.write_hparams({'a': 1}); w.write_scalars(1, {'x': 1.0})\n"
      "w.write_images(1, {'g': __import__('numpy').zeros((1, 2, 2, 1), "
      "'uint8')}); w.close()\n"
      "writers.Progress(2, w)(1)\n"
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'clu')))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"
