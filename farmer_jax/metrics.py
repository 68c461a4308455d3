"""Exact test bits/dim, sample quality and image grids.

Test bits/dim uses uniform dequantisation (spec section 1) with a fixed RNG,
so the number is reproducible; it is split into the flow log-det, the
informative (per-token mixtures) and redundant (shared mixture) parts plus
the constant `log2(127.5)` of the pixel bin:
`bpd = bpd_flow + bpd_I + bpd_R + log2(127.5)`.

A class-conditional model is also a classifier by Bayes' rule with a uniform
class prior: `argmax_c log p(x | c)` (`class_log_probs`, `bayes_accuracy`),
on the same dequantised images as the bits/dim.
"""
import io
import math

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from PIL import Image

from farmer_jax import classifier
from farmer_jax import fileio
from farmer_jax import input_pipeline
from farmer_jax import nll
from farmer_jax.models import Farmer

BIN_BITS = nll.LOG_BIN / math.log(2.0)


def eval_terms(model, params, batch, rng, num_dims: int):
  """Per-image bits/dim terms under uniform dequantisation, `[B]` each."""
  x = nll.uniform_dequantize(rng, batch["image"])
  out = model.apply({"params": params}, x, batch["label"])
  to_bits = lambda nats: -nats / (num_dims * math.log(2.0))
  return dict(bpd=nll.bits_per_dim(-out["log_prob"], num_dims),
              bpd_flow=to_bits(out["logdet"]), bpd_I=to_bits(out["logp_I"]),
              bpd_R=to_bits(out["logp_R"]))


def reconstruction(model, params, images, labels, decode_fn=None,
                   decoder_params=None) -> dict:
  """`decode(encode(x))` of uint8 images and its per-image error.

  Args:
    model: the `Farmer` module (its encoder is the teacher's for a student).
    params: its params (no `{'params': ...}` wrapper).
    images: uint8 `[B, H, W, C]`.
    labels: `[B]` int.
    decode_fn: `decode_fn(decoder_params, z, labels) -> x` in place of the
      exact inverse (the distilled student); None: `Farmer.decode`.
    decoder_params: what `decode_fn` takes.

  Returns:
    dict: `recon [B, H, W, C]` in `[-1, 1]` units (not clipped), `sq_err
    [B]` (`‖x^ - x‖^2 / D`) and `max_abs [B]`.
  """
  x = nll.to_model_range(images)
  z, _ = model.apply({"params": params}, x, labels, method=Farmer.encode)
  if decode_fn is None:
    recon = model.apply({"params": params}, z, labels, method=Farmer.decode)
  else:
    recon = decode_fn(decoder_params, z, labels)
  err = (recon - x).reshape(x.shape[0], -1)
  return dict(recon=recon, sq_err=jnp.mean(jnp.square(err), -1),
              max_abs=jnp.max(jnp.abs(err), -1))


def class_log_probs(model, params, batch, rng, num_classes: int):
  """`log p(x | c)` (nats) of each image for every class, `[B, C]`.

  One uniform dequantisation (as `eval_terms`, the same `rng` gives the same
  `x`) serves every class, so the classes are compared on one `x`. Classes
  run one after another (`lax.map`): the memory of one forward pass.
  """
  x = nll.uniform_dequantize(rng, batch["image"])

  def log_prob(c):
    labels = jnp.full(x.shape[:1], c, jnp.int32)
    return model.apply({"params": params}, x, labels, method=Farmer.log_prob)

  return jax.lax.map(log_prob, jnp.arange(num_classes)).T


def bayes_accuracy(log_probs_fn, params, batches, rng,
                   num_images: int) -> dict:
  """Accuracy of `argmax_c log p(x | c)` on the first `num_images` images.

  Args:
    log_probs_fn: jitted `class_log_probs` with model and classes bound.
    params: (EMA) parameters.
    batches: iterable of global batches with `image`, `label`, `mask`.
    rng: base key; batch `i` uses `fold_in(rng, i)` (as `evaluate_bpd`).
    num_images: real (mask == 1) images to classify, at most.

  Returns:
    `{bayes_accuracy, bayes_num_images}`.
  """
  hits, count = [], 0
  for i, batch in enumerate(batches):
    log_p = to_host(log_probs_fn(params, batch, jax.random.fold_in(rng, i)))
    keep = to_host(batch["mask"]) > 0
    keep &= count + np.cumsum(keep) <= num_images
    labels = to_host(batch["label"])
    hits.append(np.argmax(log_p, axis=-1)[keep] == labels[keep])
    count += int(keep.sum())
    if count >= num_images:
      break  # every process holds the same masks: all stop here.
  hits = np.concatenate(hits) if hits else np.zeros((0,), bool)
  return dict(bayes_accuracy=float(hits.mean()) if len(hits) else math.nan,
              bayes_num_images=int(len(hits)))


def summarize(per_image: dict, masks: list) -> dict:
  """Mean and standard error over the real (mask == 1) images."""
  mask = np.concatenate(masks) > 0
  out = {}
  for key, chunks in per_image.items():
    values = np.concatenate(chunks)[mask].astype(np.float64)
    out[key] = float(values.mean())
    if key == "bpd":
      out["bpd_stderr"] = float(values.std(ddof=1) / math.sqrt(len(values)))
  out["num_images"] = int(mask.sum())
  return out


def evaluate_bpd(eval_fn, params, batches, rng) -> dict:
  """Runs `eval_fn(params, batch, rng) -> per-image terms` over `batches`.

  Args:
    eval_fn: jitted `eval_terms` with model and dims bound.
    params: (EMA) parameters.
    batches: iterable of global batches with a float `mask`.
    rng: base key; batch `i` uses `fold_in(rng, i)`.
  """
  per_image, masks = {}, []
  for i, batch in enumerate(batches):
    terms = to_host(eval_fn(params, batch, jax.random.fold_in(rng, i)))
    for key, value in terms.items():
      per_image.setdefault(key, []).append(np.asarray(value))
    masks.append(to_host(batch["mask"]))
  return summarize(per_image, masks)


def eval_batches(config, split: str, batch_sharding, num_batches: int):
  """Global, masked eval batches of `split` (this host loads its share)."""
  it = input_pipeline.create_eval_iterator(
      config, split, process_index=jax.process_index(),
      process_count=jax.process_count(), num_batches=num_batches)
  for local in it:
    yield input_pipeline.make_global_batch(local, batch_sharding)


def sample_quality(images: np.ndarray, labels: np.ndarray, clf,
                   real_features: np.ndarray) -> dict:
  """Class accuracy and Fréchet distance of uint8 samples (classifier.py).

  Args:
    images: uint8 samples `[B, H, W, C]`.
    labels: the classes they were sampled for, `[B]`.
    clf: `(model, params)` of `classifier.load_or_train`.
    real_features: classifier features of real images, `[M, F]`.
  """
  feats = classifier.features(*clf, images)
  preds = classifier.predict(*clf, images)
  return dict(accuracy=float(np.mean(preds == labels)),
              frechet=classifier.frechet_distance(real_features, feats),
              num_samples=int(len(images)))


def to_host(tree):
  """numpy copies of the global arrays in `tree`, on every process.

  An array spread over several processes is all-gathered (a collective:
  every process must call this), so multi-host evaluation works.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:  # every process holds it: no collective
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def make_grid(images: np.ndarray, ncol: int = 0, pad: int = 1) -> np.ndarray:
  """uint8 `[B, H, W, C]` -> one uint8 `[H', W', C]` grid image."""
  b, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(b)))
  nrow = int(math.ceil(b / ncol))
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255,
                 np.uint8)
  for i in range(b):
    r, col = divmod(i, ncol)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 `[H, W, 1 or 3]` encoded as PNG."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
      buffer, format="PNG")
  return buffer.getvalue()


def save_png(grid: np.ndarray, path) -> None:
  """uint8 `[H, W, C]` as a PNG at `path` (local or gs://), folders made."""
  fileio.write_bytes(path, png_bytes(grid))
