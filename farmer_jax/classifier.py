"""A small CNN classifier for offline sample quality (no downloads).

Trained on the run's own training split (`config.classifier`), it gives
(a) the class accuracy of class-conditional samples and (b) a Fréchet
distance between real and generated images in its penultimate feature
space — FID's recipe with a network that can be trained here. Numbers are
comparable between runs on the same dataset and classifier, not with
published FIDs.

The weights are cached in `<workdir>/classifier/` (flax msgpack + a JSON
with the recipe version, `config.classifier` and the test accuracy), trained
on first use and retrained when the recipe or `config.classifier` changes.

On configs/digits.py's default split (4,500 / 500 MNIST digits) it reaches
about 0.985 test accuracy in 2,000 steps, about a minute on 2 CPU cores:
random shifts, dropout and weight decay keep the small training split from
being memorised.
"""
import functools
from typing import Any, Sequence, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from farmer_jax import fileio
from farmer_jax import input_pipeline

_DIR = "classifier"
# The cache's recipe version: bump it whenever the network, the augmentation
# or the optimiser below changes, so no run reuses weights of another recipe.
# 1: three conv layers, Adam, no shifts (unversioned caches); 2: this one.
_VERSION = 2
# Training-time noise (in [-1, 1] units): samples are never exactly on the
# 8-bit grid, so the classifier should not rely on clean pixels.
_TRAIN_NOISE = 0.05
# Random translations of up to one pixel per this many pixels of image side:
# +/- 2 px at 28x28, none at 8x8 where one pixel is an eighth of the digit.
_SIDE_PER_SHIFT_PX = 12
# AdamW's decoupled weight decay (per unit learning rate).
_WEIGHT_DECAY = 1e-4


class CNN(nn.Module):
  """uint8 images `[B, H, W, C]` -> `(logits [B, K], features [B, 128])`.

  3x3 convolutions (`(width, stride)` per layer) down to 1/8 of the side,
  then a global mean and one dense layer: the 128 ReLU features, the space of
  the Fréchet distance. The global mean (FID's Inception recipe) keeps the
  features sensitive to local texture such as isolated bright pixels; the
  last stride-1 layer widens what each pooled position sees to 31 px, a
  whole 28x28 digit.
  Dropout acts between the features and the logits, only when
  `train=True` (rng "dropout"); `features` never see it.
  """
  num_classes: int
  layers: Sequence[Tuple[int, int]] = ((32, 2), (64, 2), (128, 2), (128, 1))
  num_features: int = 128
  dropout: float = 0.5

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    for width, stride in self.layers:
      x = nn.relu(nn.Conv(width, (3, 3), strides=stride)(x))
    features = nn.relu(nn.Dense(self.num_features)(jnp.mean(x, axis=(1, 2))))
    dropped = nn.Dropout(self.dropout, deterministic=not train)(features)
    return nn.Dense(self.num_classes)(dropped), features


def _single_host(config, batch_size: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  return config


def _shift(images, rng, max_shift: int):
  """Translates each image by up to `max_shift` px per axis (edge padding)."""
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  m = max_shift
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * m + 1)

  def crop(image, offset):
    return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

  return jax.vmap(crop)(padded, offsets)


def _train(config, rng) -> Tuple[Any, float]:
  """Trains on config.data.train_split; returns (params, test accuracy)."""
  cc = config.classifier
  model = CNN(config.model.num_classes)
  data_config = _single_host(config, cc.batch_size)
  data = input_pipeline.create_train_iterator(data_config, process_index=0,
                                              process_count=1)
  s, c = config.model.image_size, config.model.channels
  params = model.init(rng, jnp.zeros((1, s, s, c), jnp.uint8))["params"]
  tx = optax.adamw(optax.cosine_decay_schedule(cc.lr, cc.steps),
                   weight_decay=_WEIGHT_DECAY)
  opt_state = tx.init(params)
  max_shift = s // _SIDE_PER_SHIFT_PX

  @jax.jit
  def step(params, opt_state, batch, rng):
    shift_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
    images = _shift(batch["image"].astype(jnp.float32), shift_rng, max_shift)
    images = images + _TRAIN_NOISE * 127.5 * jax.random.normal(
        noise_rng, images.shape)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True,
                              rngs={"dropout": dropout_rng})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(cc.steps):
    params, opt_state, loss = step(params, opt_state, next(data),
                                   jax.random.fold_in(rng, i))
    if (i + 1) % 500 == 0 or i + 1 == cc.steps:
      logging.info("classifier step %d/%d: loss %.4f", i + 1, cc.steps,
                   float(loss))
  images, labels = real_images(data_config, config.data.eval_split)
  acc = float(np.mean(predict(model, params, images) == labels))
  return params, acc


def real_images(config, split: str, limit: int = -1):
  """All (or `limit`) real images of `split` as uint8 arrays + labels."""
  source = input_pipeline.get_source(config, split)
  n = len(source) if limit < 0 else min(limit, len(source))
  examples = [source[i] for i in range(n)]
  return (np.stack([e["image"] for e in examples]),
          np.asarray([e["label"] for e in examples], np.int32))


def _recipe(config) -> dict:
  """What the cached weights depend on besides the data: retrain if it moves."""
  cc = config.classifier
  return dict(version=_VERSION, steps=int(cc.steps),
              batch_size=int(cc.batch_size), lr=float(cc.lr))


def load_or_train(config, workdir: str):
  """The cached classifier of `workdir`, trained first if missing or stale.

  The cache is reused only if its `info.json` records this module's recipe
  version and the same `config.classifier` (steps, batch size, lr).

  Returns:
    `(model, params, info)`; info has `version`, `steps`, `batch_size`,
    `lr` and `test_accuracy`.
  """
  if config.classifier.steps <= 0 or config.model.num_classes < 2:
    raise ValueError(
        "No sample-quality classifier for this config: it needs "
        "config.classifier.steps > 0 and config.model.num_classes >= 2.")
  model = CNN(config.model.num_classes)
  path = fileio.path(workdir) / _DIR
  weights, meta = path / "params.msgpack", path / "info.json"
  if meta.exists():
    info = fileio.read_json(meta)
    recipe = _recipe(config)
    if {k: info.get(k) for k in recipe} == recipe:
      s, c = config.model.image_size, config.model.channels
      # Shapes only: the restore needs the tree, not initial values.
      template = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, s, s, c), jnp.uint8))["params"]
      params = flax.serialization.from_bytes(template, weights.read_bytes())
      return model, params, info
  logging.info("Training the sample-quality classifier (%d steps)...",
               config.classifier.steps)
  params, acc = _train(config, jax.random.PRNGKey(config.seed + 7))
  info = dict(_recipe(config), test_accuracy=acc)
  logging.info("Classifier test accuracy: %.4f", acc)
  if jax.process_index() == 0:
    fileio.write_bytes(weights, flax.serialization.to_bytes(params))
    # Written last: marks the cache complete.
    fileio.write_json(meta, info, indent=None)
  return model, params, info


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, images):
  return model.apply({"params": params}, images)


def _batched(model, params, images, batch: int = 500):
  outs = [_apply(model, params, images[i:i + batch])
          for i in range(0, len(images), batch)]
  return (np.concatenate([np.asarray(o[0]) for o in outs]),
          np.concatenate([np.asarray(o[1]) for o in outs]))


def predict(model, params, images: np.ndarray) -> np.ndarray:
  """uint8 images -> predicted class `[B]`."""
  return _batched(model, params, images)[0].argmax(-1)


def features(model, params, images: np.ndarray) -> np.ndarray:
  """uint8 images -> penultimate features `[B, 128]`, float64."""
  return _batched(model, params, images)[1].astype(np.float64)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """FID's formula between the Gaussians fitted to two feature sets."""
  return frechet_from_stats(feats_a.mean(0), np.cov(feats_a, rowvar=False),
                            feats_b.mean(0), np.cov(feats_b, rowvar=False))


def frechet_from_stats(mu_a, s_a, mu_b, s_b) -> float:
  """`|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})`.

  The cross term uses `tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})`, a symmetric PSD
  form with the same trace, computed from eigenvalues (no scipy needed).
  """
  root_a = _sqrtm_psd(s_a)
  cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
  tr_cross = np.sum(np.sqrt(np.clip(cross, 0, None)))
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b)
               - 2 * tr_cross)
