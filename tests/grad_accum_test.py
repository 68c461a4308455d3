"""Gradient accumulation (`config.grad_accum_steps`) inside the jitted step.

Accumulating over microbatches must give the full batch's loss and
gradient (the mean of equal-sized microbatch means is the batch mean), on
the batch-sharded mesh that training uses. Label dropout is off so both see
the same labels. `train_step` calls `_loss_and_grads` with
`config.grad_accum_steps`; the end-to-end training tests run it at 1.
"""
import functools

import jax
import numpy as np

import helpers
from farmer_jax import sharding
from farmer_jax import train


def _config(accum: int):
  config = helpers.load_config("digits", "tiny")
  config.model.label_drop = 0.0
  config.update(grad_accum_steps=accum, mesh_shape=(2, 4, 1))
  return config


def _batch(config, seed: int = 0):
  s, c = config.model.image_size, config.model.channels
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (config.batch_size, s, s, c),
                                dtype=np.uint8),
          "label": rng.integers(0, 10, (config.batch_size,), dtype=np.int32)}


def test_microbatches_are_strided_rows():
  a = np.arange(12)
  np.testing.assert_array_equal(train._microbatches(a, 3),  # pylint: disable=protected-access
                                [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])


def test_accumulated_grads_equal_full_batch():
  """On the 8-device mesh, batch-sharded as in training: 4 per device."""
  config = _config(1)
  config.batch_size = 32
  mesh = sharding.create_mesh(config)
  model = train.Farmer(config.model)
  batch = _batch(config)
  x = batch["image"].astype(np.float32) / 127.5 - 1.0
  params = helpers.init_random(model, x[:1], batch["label"][:1])["params"]
  batch_sharding = sharding.batch_sharding(mesh, config)
  x, labels = jax.device_put((x, batch["label"]), batch_sharding)
  rng = jax.random.PRNGKey(3)
  results = {}
  for accum in (1, 4):
    fn = jax.jit(functools.partial(
        train._loss_and_grads, model=model, dims=train.num_dims(config),  # pylint: disable=protected-access
        accum=accum))
    with sharding.context(mesh, config):
      results[accum] = jax.device_get(fn(params, x, labels, rng))
  (loss_1, out_1), grads_1 = results[1]
  (loss_4, out_4), grads_4 = results[4]
  np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
  # Per-image terms come back as [accum, B / accum]; rows k::accum.
  np.testing.assert_allclose(out_4["log_prob"].T.reshape(-1),
                             out_1["log_prob"], rtol=1e-5)
  norm = float(np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads_1))))
  assert norm > 1e-3  # a real gradient, not zeros.
  for g_4, g_1 in zip(jax.tree.leaves(grads_4), jax.tree.leaves(grads_1)):
    # float32 sums in another order: ~1e-6 of the gradient's scale.
    np.testing.assert_allclose(g_4, g_1, rtol=1e-4, atol=1e-6 * norm)
