"""Metric writers for the training loop: log lines and TensorBoard events.

A local workdir gets TensorBoard event files written here, with
TensorBoard's own protos and record framing and no TensorFlow: importing
TensorFlow (which CLU's `SummaryWriter` does) costs ~11 s of start-up per
process. A `gs://` workdir keeps CLU's writer, whose TensorFlow file system
uploads the events file at every flush, so TensorBoard follows a pod run
live.

Every writer has CLU's `MetricWriter` methods that the loop uses:
`write_scalars`, `write_images`, `write_hparams`, `flush`, `close`.
"""
import os
import socket
import time
from typing import Any, Mapping

from absl import logging
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto import tensor_pb2
from tensorboard.compat.proto import tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer import record_writer

from farmer_jax import fileio
from farmer_jax import metrics


class LogWriter:
  """Scalars as `[step] k=v, ...` INFO lines (CLU's `LoggingWriter` format)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    logging.info("[%d] Got images: %s.", step,
                 {k: np.shape(v) for k, v in images.items()})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self) -> None:
    logging.flush()

  def close(self) -> None:
    self.flush()


def _uint8(images: np.ndarray) -> np.ndarray:
  """uint8 as is; floats in [0, 1] scaled, as `tf.summary.image` does."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class EventWriter:
  """TensorBoard events (`events.out.tfevents.*`) in a local folder.

  Each write is one record, appended and flushed at once, so TensorBoard and
  readers of the file see it immediately and a killed run loses nothing it
  reported. Scalars are float32 rank-0 tensors with the `scalars` plugin's
  metadata and images the `images` plugin's `[width, height, png, ...]`
  string tensors: what `tf.summary.scalar` / `tf.summary.image` write.
  """

  def __init__(self, logdir: str):
    logdir = fileio.path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    name = (f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}"
            f".{os.getpid()}.v2")
    self.path = logdir / name
    self._file = self.path.open("ab")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _summary(self, step: int, values) -> None:
    self._write(event_pb2.Event(step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    meta = scalar_metadata.create_summary_metadata(display_name="",
                                                   description="")
    self._summary(step, [summary_pb2.Summary.Value(
        tag=k, metadata=meta, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            tensor_content=np.float32(v).tobytes()))
                         for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`{tag: [N, H, W, 1 or 3]}`, uint8 or floats in [0, 1]."""
    values = []
    for tag, batch in images.items():
      batch = _uint8(batch)
      if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"Image summary {tag!r} must be [N, H, W, 1 or 3], "
                         f"got shape {batch.shape}.")
      _, h, w, _ = batch.shape
      strings = [str(w).encode(), str(h).encode()]
      strings += [metrics.png_bytes(image) for image in batch]
      values.append(summary_pb2.Summary.Value(
          tag=tag,
          metadata=image_metadata.create_summary_metadata(
              display_name="", description=""),
          tensor=tensor_pb2.TensorProto(
              dtype=types_pb2.DT_STRING, string_val=strings,
              tensor_shape=tensor_shape_pb2.TensorShapeProto(
                  dim=[tensor_shape_pb2.TensorShapeProto.Dim(
                      size=len(strings))]))))
    self._summary(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The HParams dashboard's session start; values bool, number or str."""
    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
             for k, v in hparams.items()}
    self._write(event_pb2.Event(step=0,
                                summary=hparams_summary.hparams_pb(clean)))

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    if not self._records.closed:
      self._records.close()


class MultiWriter:
  """Writes to each of `writers`."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create(workdir: str, *, just_logging: bool = False):
  """Log lines, plus TensorBoard events in `workdir` unless `just_logging`.

  Like `clu.metric_writers.create_default_writer`, whose writer a remote
  workdir gets (TensorFlow's file systems speak `gs://`).
  """
  if fileio.is_remote(workdir):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(workdir,
                                                just_logging=just_logging)
  if just_logging:
    return LogWriter()
  return MultiWriter([LogWriter(), EventWriter(workdir)])


def _format_secs(secs: float) -> str:
  minutes, secs = divmod(int(secs), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
  """Logs steps/s, % done and ETA every `every_secs` and at the last step;
  writes `steps_per_sec` and `uptime` scalars (as CLU's `ReportProgress`)."""

  def __init__(self, total_steps: int, writer, every_secs: float = 60.0,
               clock=time.monotonic):
    self.total_steps, self.writer, self.every_secs = (total_steps, writer,
                                                      every_secs)
    self._clock = clock
    self._t0 = self._last_time = clock()
    self._last_step = None

  def __call__(self, step: int) -> None:
    now = self._clock()
    if self._last_step is None:  # the first step: compiles, not a rate
      self._last_step, self._last_time = step, now
      return
    if step != self.total_steps and now - self._last_time < self.every_secs:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    eta = (self.total_steps - step) / max(rate, 1e-9)
    logging.info("%.2f steps/s, %.1f%% (%d/%d), ETA %s", rate,
                 100 * step / self.total_steps, step, self.total_steps,
                 _format_secs(eta))
    self.writer.write_scalars(step, {"steps_per_sec": rate,
                                     "uptime": now - self._t0})
    self._last_step, self._last_time = step, now
