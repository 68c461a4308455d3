r"""Scores images by exact likelihood: per-image bits/dim, sorted, CSV or JSON.

  python -m farmer_jax.score --workdir=workdirs/digits my_digits/ odd.png \
      [--label=null|marginal|K] [--format=csv|json] [--out=scores.csv]

Each file (or every image file under a folder) must already have the run's
size and channels (no resizing: a resized image is another image). Files
that cannot be read or have the wrong shape get a per-file error row and
the rest still score. Rows are sorted by bits/dim, highest (least likely,
the anomaly / out-of-distribution end) first.

Bits/dim is exact for the model's density of the 8-bit image under uniform
dequantisation (one fixed draw per image; `--num_dequant` averages more).
`--label`: `null` scores under the learned unconditional (null-label)
density; `marginal` under `p(x) = mean_c p(x | c)` over all classes;
an integer under that class.
"""
import csv
import functools
import io
import json
import math
import sys
from typing import List, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from farmer_jax import config_lib
from farmer_jax import fileio
from farmer_jax import inference
from farmer_jax import input_pipeline
from farmer_jax import nll
from farmer_jax import pretrained

FLAGS = flags.FLAGS
_EXTENSIONS = input_pipeline.IMAGE_EXTENSIONS


def define_flags() -> None:
  """The flags of this CLI (defined only when run as a program)."""
  pretrained.define_workdir_flags()  # --workdir, --pretrained=digits
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  inference.define_restore_flags()  # --mesh=-1,1,1, --matmul_precision
  flags.DEFINE_string("label", "null", "'null', 'marginal' or a class index.")
  flags.DEFINE_integer("num_dequant", 1, "Dequantisation draws per image.")
  flags.DEFINE_enum("format", "csv", ["csv", "json"], "Output format.")
  flags.DEFINE_string("out", None, "Output file (default: stdout).")
  flags.DEFINE_integer("batch_size", 64, "Images per jitted call.")
  flags.DEFINE_integer("seed", 0, "Dequantisation seed.")


def list_files(paths: List[str]) -> List[str]:
  """Files as given, folders expanded (recursively) to their image files."""
  out = []
  for path in paths:
    if fileio.path(path).is_dir():
      for root, _, names in sorted(fileio.path(path).walk()):
        out += [str(root / n) for n in sorted(names)
                if n.lower().endswith(_EXTENSIONS)]
    else:
      out.append(path)
  return out


def load_image(path: str, size: int, channels: int) -> np.ndarray:
  """uint8 `[size, size, channels]`, or ValueError saying what is wrong."""
  try:
    with input_pipeline.open_image(path) as im:
      im.load()
      mode = im.mode
      if mode in ("L", "RGB"):
        array = np.asarray(im, np.uint8)
      elif mode == "P" or mode == "1":  # palette / bilevel: convert losslessly
        array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
        mode = "RGB" if channels == 3 else "L"
      else:
        raise ValueError(f"image mode {mode!r} is not grayscale (L) or RGB")
  except (OSError, SyntaxError) as e:
    raise ValueError(f"unreadable image: {e}") from e
  array = array[..., None] if array.ndim == 2 else array
  if array.shape[-1] != channels:
    raise ValueError(f"has {array.shape[-1]} channel(s) ({mode}); the model "
                     f"takes {channels}")
  if array.shape[:2] != (size, size):
    raise ValueError(f"is {array.shape[1]}x{array.shape[0]}; the model takes "
                     f"{size}x{size} (resize it yourself if that is meant)")
  return array


@functools.lru_cache(maxsize=8)
def _bpd_fn(model, marginal: bool, num_classes: int, num_dims: int):
  """Jitted `(variables, x_uint8, labels, rng) -> bits/dim [B]`."""
  def bpd(variables, x_uint8, labels, rng):
    x = nll.uniform_dequantize(rng, x_uint8)
    if marginal:  # log mean_c p(x | c)
      per_class = jax.vmap(lambda c: model.apply(
          variables, x, jnp.full_like(labels, c), method=model.log_prob))(
              jnp.arange(num_classes))
      logp = jax.nn.logsumexp(per_class, axis=0) - math.log(num_classes)
    else:
      logp = model.apply(variables, x, labels, method=model.log_prob)
    return nll.bits_per_dim(-logp, num_dims)
  return jax.jit(bpd)


def score_images(run, images: np.ndarray, *, label: str = "null",
                 num_dequant: int = 1, batch_size: int = 64,
                 seed: int = 0) -> np.ndarray:
  """Exact bits/dim of uint8 images `[B, H, W, C]`, `[B]` float64.

  Args:
    run: a restored run (`inference.restore`).
    images: uint8 images at the run's size and channels.
    label: 'null' (unconditional density), 'marginal' (mean over classes)
      or a class index as a string.
    num_dequant: uniform dequantisation draws averaged per image.
    batch_size: images per jitted call.
    seed: dequantisation seed.
  """
  num_classes = run.config.model.num_classes
  marginal = label == "marginal" and num_classes > 0
  value = num_classes  # the null label (every label of an uncond model)
  if label not in ("null", "marginal") and num_classes > 0:
    value = int(label)
    if not 0 <= value < num_classes:
      raise ValueError(f"--label={label}: classes are 0..{num_classes - 1}.")
  fn = _bpd_fn(run.model, marginal, num_classes, config_lib.num_dims(run.config))
  rng, out = jax.random.PRNGKey(seed), []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    labels = np.full((len(chunk),), value, np.int32)
    draws = [fn(run.variables, chunk, labels,
                jax.random.fold_in(rng, start * 1000 + k))
             for k in range(num_dequant)]
    out.append(np.mean([np.asarray(d, np.float64) for d in draws], axis=0))
  return np.concatenate(out) if out else np.zeros((0,))


def score_files(run, files: List[str], **kwargs) -> List[dict]:
  """One row per file: `{file, bits_per_dim}` or `{file, error}`, sorted."""
  size, channels = run.config.model.image_size, run.config.model.channels
  good: List[Tuple[str, np.ndarray]] = []
  rows = []
  for path in files:
    try:
      good.append((path, load_image(path, size, channels)))
    except ValueError as e:  # load_image turns OSErrors into these
      rows.append(dict(file=path, bits_per_dim=None, error=str(e)))
  if good:
    scores = score_images(run, np.stack([g[1] for g in good]), **kwargs)
    rows += [dict(file=p, bits_per_dim=float(s), error="")
             for (p, _), s in zip(good, scores)]
  return sorted(rows, key=lambda r: (r["bits_per_dim"] is None,
                                     -(r["bits_per_dim"] or 0)))


def format_rows(rows: List[dict], fmt: str) -> str:
  if fmt == "json":
    return json.dumps(rows, indent=1)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=["file", "bits_per_dim", "error"])
  writer.writeheader()
  for r in rows:
    writer.writerow({**r, "bits_per_dim": "" if r["bits_per_dim"] is None
                     else f"{r['bits_per_dim']:.5f}"})
  return buf.getvalue()


def main(argv) -> None:
  if len(argv) < 2:
    raise app.UsageError("Give image files or folders to score.")
  files = list_files(argv[1:])
  if not files:
    raise app.UsageError(f"No image files ({', '.join(_EXTENSIONS)}) in "
                         f"{argv[1:]}.")
  workdir = pretrained.resolve(FLAGS.workdir, FLAGS.pretrained)
  run = inference.restore(workdir, FLAGS.step,
                          mesh_shape=inference.parse_mesh(FLAGS.mesh),
                          matmul_precision=FLAGS.matmul_precision)
  rows = score_files(run, files, label=FLAGS.label,
                     num_dequant=FLAGS.num_dequant,
                     batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  text = format_rows(rows, FLAGS.format)
  if FLAGS.out:
    fileio.write_text(FLAGS.out, text)
  else:
    sys.stdout.write(text)
  bad = sum(r["error"] != "" for r in rows)
  if bad:
    print(f"{bad} of {len(rows)} file(s) could not be scored (see 'error').",
          file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
